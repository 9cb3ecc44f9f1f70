// Exact finish: what a step may emit. A step offers candidate tokens (accepted proposals, then the
// target's own token); the session emits them in order, stopping after an end-of-sequence token (it is the
// last token ever emitted) and never exceeding what max_tokens and the context length leave.
import { FinishReason } from "../../proto/gen/pearl/v1/common.js";

export interface Emission {
  tokens: number[];
  /** Accepted proposals among the emitted tokens. */
  accepted: number;
  finishReason: FinishReason;
}

/**
 * @param candidates accepted proposals followed by the target's token (or just the target's token)
 * @param accepted how many leading candidates are accepted proposals
 * @param remaining tokens the session may still emit (>= 1)
 */
export function decideEmission(
  candidates: readonly number[],
  accepted: number,
  eosTokenIds: ReadonlySet<number>,
  remaining: number,
): Emission {
  const tokens: number[] = [];
  let finishReason = FinishReason.FINISH_REASON_UNSPECIFIED;
  for (const token of candidates) {
    if (tokens.length >= remaining) break;
    tokens.push(token);
    if (eosTokenIds.has(token)) {
      finishReason = FinishReason.FINISH_REASON_STOP;
      break;
    }
  }
  if (finishReason === FinishReason.FINISH_REASON_UNSPECIFIED && tokens.length >= remaining) {
    finishReason = FinishReason.FINISH_REASON_LENGTH;
  }
  return { tokens, accepted: Math.min(accepted, tokens.length), finishReason };
}
