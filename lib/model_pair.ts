// A draft can only speed up a target it shares a vocabulary with: the draft's token ids are the target's
// token ids, and both must agree on what ends a sequence.
import type { ModelInfo } from "../proto/gen/pearl/v1/common.js";

/** What differs between the two models, one line each; empty when the pair is usable. */
export function modelPairDifferences(draft: ModelInfo, target: ModelInfo): string[] {
  const differences: string[] = [];
  if (draft.vocabSize !== target.vocabSize) {
    differences.push(`vocab size: draft ${draft.vocabSize}, target ${target.vocabSize}`);
  }
  const draftEos = [...draft.eosTokenIds].sort((a, b) => a - b);
  const targetEos = [...target.eosTokenIds].sort((a, b) => a - b);
  if (draftEos.join(",") !== targetEos.join(",")) {
    differences.push(`eos token ids: draft [${draftEos.join(", ")}], target [${targetEos.join(", ")}]`);
  }
  if (draft.bosTokenId !== target.bosTokenId) {
    differences.push(`bos token id: draft ${draft.bosTokenId}, target ${target.bosTokenId}`);
  }
  return differences;
}

export function checkModelPair(draft: ModelInfo, target: ModelInfo): void {
  const differences = modelPairDifferences(draft, target);
  if (differences.length > 0) {
    throw new Error(
      `draft model "${draft.modelId}" cannot serve as the draft of target model "${target.modelId}": ` +
        differences.join("; "),
    );
  }
}
