// Per-request acceptance with the embedded pair's real drafts: two requests at once, one greedy on
// held-out code, where the draft agrees with the target most of the time, the other sampling at
// temperature 2, where the target's flattened distribution accepts the greedy draft's token a few times in
// a hundred. Their outputs come from the real target service (mode ar); whether the target accepts the
// draft's token at each position of them comes from the real draft model (its greedy token after the
// output so far; a greedy draft's token is accepted exactly when it is the target's own, DESIGN §5), so it
// does not depend on windows or timing. The tuner then runs them as the PEARL loop would, on the step
// costs bench:cpu measured for the pair (docs/performance.md): deterministic, where this shared 2-core
// machine's own step times under other processes' load would make the outcome a matter of luck.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Engine } from "../lib/native.js";
import { packageRoot } from "../lib/paths.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";
import { MODES, Stack } from "./helpers/stack.js";
import { agreesAlong, type Machine, Simulation, agreesAtRate } from "./helpers/tuner.js";

const PROMPTS = (
  JSON.parse(readFileSync(join(packageRoot(), "bench", "heldout_prompts.json"), "utf8")) as {
    prompts: { text: string }[];
  }
).prompts;

/** The embedded pair's decode steps on two cores (docs/performance.md, bench:cpu): target 0.31 ms for one
 * row and 0.885 ms for eight, draft 0.095 ms and 0.29 ms. */
const CPU_PAIR: Machine = {
  targetMs: (tokens) => 0.228 + 0.082 * tokens,
  draftMs: (batch) => 0.067 + 0.028 * batch,
};

/** Whether the target accepts the draft's token at each position of `output` after `prompt`. */
async function draftAccepted(prompt: number[], output: number[]): Promise<boolean[]> {
  const draft = await Engine.load({
    modelDir: join(EMBEDDED_MODELS, "draft"),
    backend: "cpu",
    numThreads: 1,
  });
  try {
    await draft.addSequence(1);
    const tokens = [...prompt, ...output];
    const [result] = await draft.step([{ seqId: 1, tokens: Int32Array.from(tokens), output: "logits" }]);
    const vocab = draft.info.vocabSize;
    return output.map((token, k) => {
      const row = result!.logits!.subarray((prompt.length - 1 + k) * vocab, (prompt.length + k) * vocab);
      let best = 0;
      for (let id = 1; id < vocab; id++) if (row[id]! > row[best]!) best = id;
      return best === token;
    });
  } finally {
    await draft.close();
  }
}

describe("per-request acceptance with the embedded pair's drafts", () => {
  let stack: Stack;
  /** Per request: the draft's token accepted at each position after the first (the prefill's). */
  const accepted: Record<"agrees" | "disagrees", boolean[]> = { agrees: [], disagrees: [] };

  before(async () => {
    stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
    });
    const tokenizer = TextTokenizer.load(join(EMBEDDED_MODELS, "target"))!;
    const requests = [
      { name: "agrees", prompt: PROMPTS[0]!.text, temperature: 0 },
      { name: "disagrees", prompt: PROMPTS[1]!.text, temperature: 2 },
    ] as const;
    for (const { name, prompt, temperature } of requests) {
      const promptTokenIds = tokenizer.encode(prompt);
      const ar = await stack.generate({
        promptTokenIds,
        maxTokens: 300,
        temperature,
        seed: 11,
        mode: MODES.ar,
      });
      accepted[name] = (await draftAccepted(promptTokenIds, ar.tokenIds)).slice(1);
    }
  });

  after(async () => {
    await stack?.stop();
  });

  const rate = (bits: boolean[]): number => bits.filter(Boolean).length / bits.length;

  test("the two drafts differ as intended", () => {
    assert.ok(rate(accepted.agrees) > 0.7, `greedy: ${rate(accepted.agrees)}`);
    assert.ok(rate(accepted.disagrees) < 0.15, `temperature 2: ${rate(accepted.disagrees)}`);
  });

  test("the request whose draft agrees badly stops drafting alone; the other drafts to its end", () => {
    const simulation = new Simulation(CPU_PAIR, () => agreesAtRate(0.8), { minGamma: 0 });
    // The gateway's first requests: the pair's acceptance and the step-time fits settle.
    simulation.run(2, 300);
    const [agrees, disagrees] = simulation.runRequests([
      agreesAlong(accepted.agrees),
      agreesAlong(accepted.disagrees),
    ]);
    const stoppedAt = disagrees!.indexOf(0);
    assert.ok(stoppedAt > 0, `it drafted first, then stopped: ${disagrees}`);
    assert.ok(
      disagrees!.slice(stoppedAt).every((window) => window === 0),
      "for good",
    );
    assert.ok(agrees!.length > stoppedAt, "the other was still running then");
    assert.ok(
      agrees!.every((window) => window >= 1),
      `and drafted at every step to its end: ${agrees}`,
    );
    const stops = simulation.logs.filter((record) => record.message === "request stops drafting");
    assert.equal(stops.length, 1, JSON.stringify(stops));
    assert.equal(
      stops[0]!.why,
      "its draft agrees too rarely: its rows cost the batch more than they gain it",
    );
  });
});
