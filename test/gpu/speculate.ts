// Greedy speculative decoding driven directly over two engines (the embedded draft and target on cuda),
// several sequences at once: each round drafts `draftLength` tokens per sequence in batched draft steps,
// then verifies every window in ONE batched target step. The committed tokens must equal what the target
// alone decodes greedily: that is the exactness PEARL's gateway relies on.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { Engine, type StepItem } from "../../lib/native.js";
import { greedyDecode } from "../reference/drive.js";

const MODELS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "models");

/** Prompts of the embedded pair's reference file, varied so that sessions differ in length. */
export function referencePrompts(count: number): number[][] {
  const reference = JSON.parse(readFileSync(join(MODELS, "reference.json"), "utf8")) as {
    prompts: { ids: number[] }[];
  };
  return Array.from({ length: count }, (_, i) => {
    const ids = reference.prompts[i % reference.prompts.length]!.ids;
    return ids.slice(0, ids.length - 7 * Math.floor(i / reference.prompts.length));
  });
}

interface Session {
  seqId: number;
  committed: number[];
  /** Tokens in the draft's KV. */
  draftLength: number;
  generated: number;
}

export interface SpeculativeOutcome {
  speculative: number[][];
  targetOnly: number[][];
  acceptedTokens: number;
  targetSteps: number;
}

export async function speculativeGreedy(options: {
  sessions: number;
  draftLength: number;
  newTokens: number;
  /** The cuda backend's deterministic mode, for both engines. */
  deterministic: boolean;
  /** The target's (and its reference's) devices: tensor parallelism over several (default: GPU 0). */
  targetDevices?: number[];
}): Promise<SpeculativeOutcome> {
  const { deterministic, targetDevices } = options;
  const prompts = referencePrompts(options.sessions);
  // The target-only reference runs on an engine of its own: on the same engine its committed prompts would
  // be prefix-cache hits for the speculative run, which would then prefill only the prompts' tails (a
  // different row count, so outside deterministic mode a different GEMM and different rounding of those
  // K/V) and could flip a near-tie that has nothing to do with speculation.
  const reference = await Engine.load({
    modelDir: join(MODELS, "target"),
    backend: "cuda",
    deterministic,
    devices: targetDevices,
  });
  const targetOnly: number[][] = [];
  try {
    for (const [i, prompt] of prompts.entries()) {
      targetOnly.push(await greedyDecode(reference, 1000 + i, prompt, options.newTokens));
    }
  } finally {
    await reference.close();
  }
  const target = await Engine.load({
    modelDir: join(MODELS, "target"),
    backend: "cuda",
    deterministic,
    devices: targetDevices,
  });
  const draft = await Engine.load({ modelDir: join(MODELS, "draft"), backend: "cuda", deterministic });
  try {
    const sessions: Session[] = prompts.map((prompt, i) => ({
      seqId: i,
      committed: [...prompt],
      draftLength: prompt.length,
      generated: 0,
    }));
    for (const session of sessions) {
      await target.addSequence(session.seqId);
      await draft.addSequence(session.seqId);
    }
    // Prompts are prefilled one at a time, as greedyDecode does: outside deterministic mode a prefill of
    // more than 16 rows takes cuBLASLt, whose rounding depends on the row count.
    const firstTokens: number[] = [];
    for (const session of sessions) {
      const [result] = await target.step([
        { seqId: session.seqId, tokens: Int32Array.from(session.committed) },
      ]);
      firstTokens.push(result!.nextToken);
    }
    await draft.step(
      sessions.map((session) => ({
        seqId: session.seqId,
        tokens: Int32Array.from(session.committed),
        output: "none" as const,
      })),
    );
    for (const [i, session] of sessions.entries()) {
      session.committed.push(firstTokens[i]!);
      session.generated = 1;
    }

    let acceptedTokens = 0;
    let targetSteps = 0;
    for (;;) {
      const active = sessions.filter((session) => session.generated < options.newTokens);
      if (active.length === 0) break;
      // Draft: catch the draft up with the committed tokens, then extend greedily one token per step.
      const drafts = new Map<number, number[]>(active.map((session) => [session.seqId, []]));
      for (let d = 0; d < options.draftLength; d++) {
        const items: StepItem[] = active.map((session) => {
          const proposed = drafts.get(session.seqId)!;
          const tokens = d === 0 ? session.committed.slice(session.draftLength) : proposed.slice(-1);
          return { seqId: session.seqId, tokens: Int32Array.from(tokens) };
        });
        const results = await draft.step(items);
        for (const [i, session] of active.entries()) {
          session.draftLength += items[i]!.tokens.length;
          drafts.get(session.seqId)!.push(results[i]!.nextToken);
        }
      }
      // Verify every window in one target step.
      const verdicts = await target.step(
        active.map((session) => ({
          seqId: session.seqId,
          tokens: Int32Array.from([session.committed.at(-1)!, ...drafts.get(session.seqId)!]),
          numDraft: options.draftLength,
        })),
      );
      targetSteps++;
      for (const [i, session] of active.entries()) {
        const verdict = verdicts[i]!;
        const proposed = drafts.get(session.seqId)!;
        const before = session.committed.length;
        session.committed.push(...proposed.slice(0, verdict.accepted), verdict.nextToken);
        session.generated += verdict.accepted + 1;
        acceptedTokens += verdict.accepted;
        // The draft's KV holds the committed prefix plus its proposals but the last; keep what was accepted.
        const keep = Math.min(session.draftLength, before + verdict.accepted);
        await draft.truncate(session.seqId, keep);
        session.draftLength = keep;
      }
    }
    return {
      speculative: sessions.map((session) =>
        session.committed.slice(
          prompts[session.seqId]!.length,
          prompts[session.seqId]!.length + options.newTokens,
        ),
      ),
      targetOnly,
      acceptedTokens,
      targetSteps,
    };
  } finally {
    await target.close();
    await draft.close();
  }
}
