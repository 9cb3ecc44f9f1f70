// A session closed while its service is still adding it to the engine must end, not start: the draft
// would otherwise draft for a request nobody waits for and hold its KV until the gateway's stream ends
// (the 30-minute soak caught 24 draft blocks held that way). The loops run in-process on the real engine;
// the test only chooses the moment of the close: the instant the loop asks the engine for the sequence,
// so that the close arrives while the loop awaits it.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import winston from "winston";
import { draftServiceDefaults, targetServiceDefaults } from "../lib/config.js";
import { type EngineLoopParts, SequenceIds } from "../lib/engine_loop.js";
import { createRegistry } from "../lib/metrics.js";
import { engineMetrics } from "../lib/engine_metrics.js";
import { Engine } from "../lib/native.js";
import { StepTimes } from "../lib/step_times.js";
import { Drafter } from "../services/draft/drafter.js";
import { Verifier } from "../services/target/verifier.js";
import { fixtureDir } from "./helpers/models.js";

const MODEL = fixtureDir("llama-gqa-f32");
const PROMPT = [5, 6, 7, 8, 9, 10];

/** The real engine; `onFirstAdd` runs the first time a sequence is asked for, before that resolves. */
async function engineWithAddHook(): Promise<{ engine: Engine; onFirstAdd: (action: () => void) => void }> {
  const engine = await Engine.load({ modelDir: MODEL, backend: "cpu", numThreads: 1 });
  const addSequence = engine.addSequence.bind(engine);
  let action: (() => void) | undefined;
  engine.addSequence = (seqId: number) => {
    const added = addSequence(seqId);
    const once = action;
    action = undefined;
    once?.();
    return added;
  };
  return { engine, onFirstAdd: (next) => (action = next) };
}

function parts(engine: Engine, role: "draft" | "target"): EngineLoopParts {
  const registry = createRegistry("test", false);
  let core: { activeSessions: number } | undefined;
  return {
    engine,
    ids: new SequenceIds(),
    stepTimes: new StepTimes(),
    metrics: engineMetrics(registry, role, engine, () => core?.activeSessions ?? 0),
    registry,
    logger: winston.createLogger({ silent: true }),
  };
}

async function assertReleased(core: { activeSessions: number }, engine: Engine): Promise<void> {
  const deadline = performance.now() + 2000;
  for (;;) {
    const stats = await engine.cacheStats();
    if (core.activeSessions === 0 && stats.sequences === 0 && stats.blocksUsed === 0) return;
    assert.ok(
      performance.now() < deadline,
      `still held: ${core.activeSessions} sessions, ${stats.sequences} sequences, ${stats.blocksUsed} blocks`,
    );
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

describe("a close that arrives while the session enters the engine", () => {
  test("the draft frees the session", async () => {
    const sink = { failed: () => undefined, tokens: () => undefined };
    const { engine, onFirstAdd } = await engineWithAddHook();
    const drafter = new Drafter(parts(engine, "draft"), draftServiceDefaults());
    onFirstAdd(() => drafter.close(sink, 1));
    drafter.start();
    try {
      drafter.open(sink, {
        sessionId: 1,
        requestId: "closed-on-add",
        promptTokenIds: PROMPT,
        sampling: { temperature: 0, topK: 0, topP: 1, seed: 1 },
        distributionTopK: 16,
        lookahead: 8,
        maxPosition: 200,
      });
      await assertReleased(drafter, engine);
    } finally {
      await drafter.stop();
      await engine.close();
    }
  });

  test("the target frees the session", async () => {
    const sink = { failed: () => undefined, verdict: () => undefined };
    const { engine, onFirstAdd } = await engineWithAddHook();
    const verifier = new Verifier(parts(engine, "target"), targetServiceDefaults());
    onFirstAdd(() => verifier.close(sink, 1));
    verifier.start();
    try {
      // Not autoregressive: once prefilled it would wait for proposals for ever.
      verifier.open(sink, {
        sessionId: 1,
        requestId: "closed-on-add",
        promptTokenIds: PROMPT,
        sampling: { temperature: 0, topK: 0, topP: 1, seed: 1 },
        maxTokens: 100,
        autoregressive: false,
        verifyWindow: 4,
      });
      await assertReleased(verifier, engine);
    } finally {
      await verifier.stop();
      await engine.close();
    }
  });
});
