// Bad input, each a clear rejected Promise naming what is wrong, after which the process and the engine
// keep working: malformed steps on a loaded engine, and broken copies of a fixture checkpoint at load.
import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, beforeEach, describe, test } from "node:test";

import { type Backend, Engine, type EngineOptions, type StepItem } from "../lib/native.js";
import { bitDifference, only, stepLogits } from "./reference/drive.js";
import { loadFixture } from "./reference/fixtures.js";

const FIXTURE_DIR = loadFixture("llama-gqa-f32").dir;
const MAX_POSITIONS = 24;

const scratch = mkdtempSync(join(tmpdir(), "pearl-runtime-errors-"));
after(() => rmSync(scratch, { recursive: true, force: true }));

/** A copy of the fixture checkpoint that `edit` breaks. */
function brokenCopy(label: string, edit: (dir: string) => void): string {
  const dir = join(scratch, label);
  cpSync(FIXTURE_DIR, dir, { recursive: true });
  edit(dir);
  return dir;
}

function editConfig(dir: string, edit: (config: Record<string, unknown>) => void): void {
  const path = join(dir, "config.json");
  const config = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
  edit(config);
  writeFileSync(path, JSON.stringify(config, null, 2));
}

type Header = Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;

/** Rewrites model.safetensors with an edited header and the original tensor data. */
function editHeader(dir: string, edit: (header: Header) => void): void {
  const path = join(dir, "model.safetensors");
  const bytes = readFileSync(path);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString("utf8")) as Header;
  edit(header);
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  writeFileSync(path, Buffer.concat([length, json, bytes.subarray(8 + headerLength)]));
}

async function assertLoadRejects(modelDir: string, pattern: RegExp): Promise<void> {
  await assert.rejects(Engine.load({ modelDir, backend: "cpu" }), (error: Error) => {
    assert.match(error.message, pattern);
    return true;
  });
}

describe("loading a broken checkpoint", () => {
  test("a missing model folder", async () => {
    await assertLoadRejects(join(scratch, "does-not-exist"), /does-not-exist/);
  });

  test("truncated safetensors data", async () => {
    const dir = brokenCopy("truncated", (d) => {
      const path = join(d, "model.safetensors");
      truncateSync(path, Math.floor(readFileSync(path).length / 2));
    });
    await assertLoadRejects(dir, /model\.safetensors: .*(out of range|truncated)/);
  });

  test("a header length past the end of the file", async () => {
    const dir = brokenCopy("header-length", (d) => {
      const path = join(d, "model.safetensors");
      const bytes = readFileSync(path);
      bytes.writeBigUInt64LE(BigInt(bytes.length) * 4n, 0);
      writeFileSync(path, bytes);
    });
    await assertLoadRejects(dir, /model\.safetensors: header length/);
  });

  test("a header that is not JSON", async () => {
    const dir = brokenCopy("header-json", (d) => {
      const path = join(d, "model.safetensors");
      const bytes = readFileSync(path);
      bytes.write("{not json", 8, "utf8");
      writeFileSync(path, bytes);
    });
    await assertLoadRejects(dir, /model\.safetensors: .*JSON/);
  });

  test("tensor data offsets out of range", async () => {
    let victim = "";
    const dir = brokenCopy("offsets", (d) =>
      editHeader(d, (header) => {
        const [name, entry] = Object.entries(header).find(([key]) => key !== "__metadata__")!;
        victim = name;
        entry.data_offsets = [entry.data_offsets[0] + 1_000_000, entry.data_offsets[1] + 1_000_000];
      }),
    );
    await assertLoadRejects(dir, new RegExp(victim.replaceAll(".", "\\.")));
  });

  test("a missing tensor", async () => {
    const dir = brokenCopy("missing-tensor", (d) =>
      editHeader(d, (header) => {
        delete header["model.layers.0.mlp.up_proj.weight"];
      }),
    );
    await assertLoadRejects(dir, /model\.layers\.0\.mlp\.up_proj\.weight/);
  });

  test("config.json missing a field", async () => {
    const dir = brokenCopy("config-field", (d) =>
      editConfig(d, (config) => {
        delete config.hidden_size;
      }),
    );
    await assertLoadRejects(dir, /config\.json: .*hidden_size/);
  });

  test("an unsupported architecture", async () => {
    const dir = brokenCopy("architecture", (d) =>
      editConfig(d, (config) => {
        config.architectures = ["GPT2LMHeadModel"];
        config.model_type = "gpt2";
      }),
    );
    await assertLoadRejects(dir, /GPT2LMHeadModel|gpt2/);
  });

  test("an unsupported rope type", async () => {
    const dir = brokenCopy("rope", (d) =>
      editConfig(d, (config) => {
        const yarn = { rope_type: "yarn", factor: 4, original_max_position_embeddings: 64 };
        // transformers 4 writes rope_scaling, transformers 5 rope_parameters (with rope_theta inside).
        config.rope_scaling = yarn;
        if (config.rope_parameters)
          config.rope_parameters = { ...(config.rope_parameters as object), ...yarn };
      }),
    );
    await assertLoadRejects(dir, /yarn/);
  });

  test("options of the wrong type are TypeErrors naming the option", async () => {
    const load = (options: object) => Engine.load(options as EngineOptions);
    await assert.rejects(load({ modelDir: 42 }), { name: "TypeError", message: /options\.modelDir/ });
    await assert.rejects(load({ modelDir: FIXTURE_DIR, numBlocks: 1.5 }), {
      name: "TypeError",
      message: /options\.numBlocks/,
    });
    await assert.rejects(load({ modelDir: FIXTURE_DIR, devices: [0, "1"] }), {
      name: "TypeError",
      message: /options\.devices\[1\]/,
    });
  });

  test("an unknown backend", async () => {
    await assert.rejects(
      Engine.load({ modelDir: FIXTURE_DIR, backend: "tpu" as Backend }),
      /unknown backend "tpu"/,
    );
  });

  test("the process still loads and runs a good checkpoint", async () => {
    const engine = await Engine.load({ modelDir: FIXTURE_DIR, backend: "cpu" });
    await engine.addSequence(0);
    const result = only(await engine.step([{ seqId: 0, tokens: Int32Array.of(1, 2, 3) }]));
    assert.equal(result.length, 3);
    await engine.close();
  });
});

describe("bad step input on a loaded engine", () => {
  let engine: Engine;
  let vocab: number;
  // `healthy` steps alongside every bad call and must come out untouched; `victim` is the bad call's target.
  const healthy = 1;
  const victim = 2;
  const healthyPrompt = [5, 9, 2, 7];
  let healthyLogits: Float32Array;

  before(async () => {
    const modelDir = brokenCopy("short-context", (d) =>
      editConfig(d, (config) => {
        config.max_position_embeddings = MAX_POSITIONS;
      }),
    );
    engine = await Engine.load({ modelDir, backend: "cpu" });
    vocab = engine.info.vocabSize;
    assert.equal(engine.info.maxPositionEmbeddings, MAX_POSITIONS);
    await engine.addSequence(healthy);
    healthyLogits = await stepLogits(engine, healthy, healthyPrompt);
    await engine.release(healthy);
  });
  after(async () => engine?.close());

  beforeEach(async () => {
    await engine.addSequence(healthy);
    await engine.addSequence(victim);
  });
  afterEach(async () => {
    for (const seqId of [healthy, victim]) {
      await engine.release(seqId).catch((error: Error) => assert.match(error.message, /unknown sequence/));
    }
  });

  /** Expects `bad` to reject with `pattern`, then checks that the engine changed nothing and still computes. */
  async function rejectsAndRecovers(
    bad: () => Promise<unknown>,
    pattern: RegExp,
    errorType = Error,
  ): Promise<void> {
    await assert.rejects(bad(), (error: Error) => {
      assert.ok(error instanceof errorType, `expected a ${errorType.name}, got ${error.constructor.name}`);
      assert.match(error.message, pattern);
      return true;
    });
    assert.equal(await engine.sequenceLength(healthy), 0, "the rejected step appended nothing");
    assert.equal(bitDifference(await stepLogits(engine, healthy, healthyPrompt), healthyLogits), undefined);
    await engine.truncate(healthy, 0);
  }

  /** A batch of the healthy sequence plus one bad item. */
  const step = (item: StepItem) => engine.step([{ seqId: healthy, tokens: Int32Array.of(1) }, item]);

  test("token id >= vocab size", async () => {
    await rejectsAndRecovers(
      () => step({ seqId: victim, tokens: Int32Array.of(1, vocab) }),
      new RegExp(`token id ${vocab}`),
    );
  });

  test("negative token id", async () => {
    await rejectsAndRecovers(() => step({ seqId: victim, tokens: Int32Array.of(-3) }), /token id -3/);
  });

  test("empty token list", async () => {
    await rejectsAndRecovers(() => step({ seqId: victim, tokens: new Int32Array(0) }), /empty/i);
  });

  test("a sequence past max_position_embeddings", async () => {
    const tokens = (count: number) => Int32Array.from({ length: count }, (_, i) => i % vocab);
    await rejectsAndRecovers(
      () => step({ seqId: victim, tokens: tokens(MAX_POSITIONS + 1) }),
      /max_position_embeddings/,
    );
    assert.equal(
      only(await engine.step([{ seqId: victim, tokens: tokens(MAX_POSITIONS) }])).length,
      MAX_POSITIONS,
    );
    await rejectsAndRecovers(() => step({ seqId: victim, tokens: tokens(1) }), /max_position_embeddings/);
  });

  test("an unknown sequence", async () => {
    await rejectsAndRecovers(() => step({ seqId: 12345, tokens: Int32Array.of(1) }), /12345/);
    await rejectsAndRecovers(() => engine.truncate(12345, 0), /12345/);
    await rejectsAndRecovers(() => engine.release(12345), /12345/);
    await rejectsAndRecovers(() => engine.sequenceLength(12345), /12345/);
  });

  test("a sequence added twice", async () => {
    await rejectsAndRecovers(() => engine.addSequence(victim), /already exists/);
  });

  test("truncating past the end", async () => {
    await rejectsAndRecovers(() => engine.truncate(victim, 3), /truncate/);
  });

  test("num_draft that leaves no committed token", async () => {
    await rejectsAndRecovers(
      () => step({ seqId: victim, tokens: Int32Array.of(1, 2), numDraft: 2 }),
      /num_draft/,
    );
  });

  test("the same sequence twice in one step", async () => {
    await rejectsAndRecovers(
      () =>
        engine.step([
          { seqId: victim, tokens: Int32Array.of(1) },
          { seqId: victim, tokens: Int32Array.of(2) },
        ]),
      /sequence 2: appears more than once/,
    );
  });

  test("wrong JavaScript types are TypeErrors naming the field", async () => {
    const untyped = [{ seqId: victim, tokens: [1, 2] }] as unknown as StepItem[];
    await rejectsAndRecovers(() => engine.step(untyped), /items\[0\]\.tokens/, TypeError);
    await rejectsAndRecovers(
      () => step({ seqId: 2.5, tokens: Int32Array.of(1) }),
      /items\[1\]\.seqId/,
      TypeError,
    );
    const badOutput = { seqId: victim, tokens: Int32Array.of(1), output: "all" } as unknown as StepItem;
    await rejectsAndRecovers(() => step(badOutput), /items\[1\]\.output/, TypeError);
    const badSampling = {
      seqId: victim,
      tokens: Int32Array.of(1),
      sampling: { temperature: 1 },
    } as unknown as StepItem;
    await rejectsAndRecovers(() => step(badSampling), /items\[1\]\.sampling\.topK/, TypeError);
    await rejectsAndRecovers(() => engine.truncate(victim, -1), /length/, TypeError);
  });
});
