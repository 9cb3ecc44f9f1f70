// Bad input, each a clear rejected Promise naming what is wrong, after which the process and the engine
// keep working: malformed steps on a loaded engine, and broken copies of a fixture checkpoint at load.
import assert from "node:assert/strict";
import { cpSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { Engine, type StepItem } from "../lib/native.js";
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
    await assertLoadRejects(dir, /model\.safetensors/);
  });

  test("a header length past the end of the file", async () => {
    const dir = brokenCopy("header-length", (d) => {
      const path = join(d, "model.safetensors");
      const bytes = readFileSync(path);
      bytes.writeBigUInt64LE(BigInt(bytes.length) * 4n, 0);
      writeFileSync(path, bytes);
    });
    await assertLoadRejects(dir, /model\.safetensors/);
  });

  test("a header that is not JSON", async () => {
    const dir = brokenCopy("header-json", (d) => {
      const path = join(d, "model.safetensors");
      const bytes = readFileSync(path);
      bytes.write("{not json", 8, "utf8");
      writeFileSync(path, bytes);
    });
    await assertLoadRejects(dir, /model\.safetensors/);
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
    await assertLoadRejects(dir, /hidden_size/);
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
  // A healthy sequence that every test steps before and after the bad call, to prove nothing changed.
  const healthy = 1;
  const healthyPrompt = [5, 9, 2, 7];

  before(async () => {
    const modelDir = brokenCopy("short-context", (d) =>
      editConfig(d, (config) => {
        config.max_position_embeddings = MAX_POSITIONS;
      }),
    );
    engine = await Engine.load({ modelDir, backend: "cpu" });
    vocab = engine.info.vocabSize;
    assert.equal(engine.info.maxPositionEmbeddings, MAX_POSITIONS);
  });
  after(async () => engine?.close());

  /** Runs `bad`, expects a rejection matching `pattern`, then checks the engine still computes the same. */
  async function rejectsAndRecovers(
    bad: () => Promise<unknown>,
    pattern: RegExp,
    errorType = Error,
  ): Promise<void> {
    await engine.addSequence(healthy);
    const expected = await stepLogits(engine, healthy, healthyPrompt);
    await engine.truncate(healthy, 0);
    await assert.rejects(bad(), (error: Error) => {
      assert.ok(error instanceof errorType, `expected a ${errorType.name}, got ${error.constructor.name}`);
      assert.match(error.message, pattern);
      return true;
    });
    assert.equal(await engine.sequenceLength(healthy), 0);
    assert.equal(bitDifference(await stepLogits(engine, healthy, healthyPrompt), expected), undefined);
    await engine.release(healthy);
  }

  const step = (item: StepItem) => engine.step([{ seqId: healthy, tokens: Int32Array.of(1) }, item]);

  test("token id >= vocab size", async () => {
    await rejectsAndRecovers(
      () => step({ seqId: 2, tokens: Int32Array.of(1, vocab) }),
      new RegExp(`${vocab}`),
    );
  });

  test("negative token id", async () => {
    await engine.addSequence(2);
    await rejectsAndRecovers(() => step({ seqId: 2, tokens: Int32Array.of(-3) }), /-3/);
    await engine.release(2);
  });

  test("empty token list", async () => {
    await engine.addSequence(2);
    await rejectsAndRecovers(() => step({ seqId: 2, tokens: new Int32Array(0) }), /empty|token/i);
    await engine.release(2);
  });

  test("a sequence past max_position_embeddings", async () => {
    await engine.addSequence(2);
    const full = Int32Array.from({ length: MAX_POSITIONS }, (_, i) => i % vocab);
    await rejectsAndRecovers(
      () => step({ seqId: 2, tokens: Int32Array.from({ length: MAX_POSITIONS + 1 }, (_, i) => i % vocab) }),
      /max_position_embeddings/,
    );
    assert.equal(only(await engine.step([{ seqId: 2, tokens: full }])).length, MAX_POSITIONS);
    await rejectsAndRecovers(() => step({ seqId: 2, tokens: Int32Array.of(1) }), /max_position_embeddings/);
    await engine.release(2);
  });

  test("an unknown sequence", async () => {
    await rejectsAndRecovers(() => step({ seqId: 12345, tokens: Int32Array.of(1) }), /12345/);
    await rejectsAndRecovers(() => engine.truncate(12345, 0), /12345/);
    await rejectsAndRecovers(() => engine.release(12345), /12345/);
    await rejectsAndRecovers(() => engine.sequenceLength(12345), /12345/);
  });

  test("num_draft that leaves no committed token", async () => {
    await engine.addSequence(2);
    await rejectsAndRecovers(
      () => step({ seqId: 2, tokens: Int32Array.of(1, 2), numDraft: 2 }),
      /num_?draft/i,
    );
    await engine.release(2);
  });

  test("the same sequence twice in one step", async () => {
    await rejectsAndRecovers(
      () =>
        engine.step([
          { seqId: healthy, tokens: Int32Array.of(1) },
          { seqId: healthy, tokens: Int32Array.of(2) },
        ]),
      new RegExp(`${healthy}`),
    );
  });

  test("wrong JavaScript types are TypeErrors naming the field", async () => {
    const untyped = [{ seqId: 2, tokens: [1, 2] }] as unknown as StepItem[];
    await rejectsAndRecovers(() => engine.step(untyped), /items\[0\]\.tokens/, TypeError);
    await rejectsAndRecovers(
      () => step({ seqId: 2.5, tokens: Int32Array.of(1) }),
      /items\[1\]\.seqId/,
      TypeError,
    );
    const badOutput = { seqId: 2, tokens: Int32Array.of(1), output: "all" } as unknown as StepItem;
    await rejectsAndRecovers(() => step(badOutput), /items\[1\]\.output/, TypeError);
    const badSampling = {
      seqId: 2,
      tokens: Int32Array.of(1),
      sampling: { temperature: 1 },
    } as unknown as StepItem;
    await rejectsAndRecovers(() => step(badSampling), /items\[1\]\.sampling\.topK/, TypeError);
    await rejectsAndRecovers(() => engine.truncate(healthy, -1), /length/, TypeError);
  });
});
