// The embedded model pair (models/) against what tools/train_pair.py recorded with Python: the native CPU
// runtime must reproduce transformers' greedy continuations of held-out prompts for both models, and the JS
// tokenizer must encode and decode every recorded string exactly as the Python tokenizers library did.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { Tokenizer } from "@huggingface/tokenizers";

import { Engine } from "../lib/native.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import { greedyDecode } from "./reference/drive.js";

const MODELS = join(dirname(fileURLToPath(import.meta.url)), "..", "models");
const MODEL_NAMES = ["target", "draft"] as const;

interface Continuation {
  greedy: number[];
  text: string;
}

interface ReferencePrompt {
  text: string;
  ids: number[];
  target: Continuation;
  draft: Continuation;
}

interface TokenizerCase {
  text: string;
  ids: number[];
  decoded: string;
}

interface Reference {
  new_tokens: number;
  prompts: ReferencePrompt[];
  tokenizer_cases: TokenizerCase[];
}

const reference = JSON.parse(readFileSync(join(MODELS, "reference.json"), "utf8")) as Reference;

function readModelFile(model: string, file: string): string {
  return readFileSync(join(MODELS, model, file), "utf8");
}

function loadTokenizer(model: string): Tokenizer {
  return new Tokenizer(
    JSON.parse(readModelFile(model, "tokenizer.json")) as object,
    JSON.parse(readModelFile(model, "tokenizer_config.json")) as object,
  );
}

test("the reference holds 3 prompts with continuations and a set of tokenizer strings", () => {
  assert.equal(reference.prompts.length, 3);
  for (const prompt of reference.prompts) {
    for (const model of MODEL_NAMES) {
      const greedy = prompt[model].greedy;
      assert.ok(
        greedy.length > 0 && greedy.length <= reference.new_tokens,
        `${model}: ${greedy.length} tokens`,
      );
    }
  }
  assert.ok(reference.tokenizer_cases.length >= 8);
  const nonAscii = reference.tokenizer_cases.filter((c) =>
    [...c.text].some((ch) => ch.codePointAt(0)! > 0x7f),
  );
  assert.ok(nonAscii.length >= 3, "too few non-ASCII test strings");
});

test("draft and target share one tokenizer", () => {
  for (const file of ["tokenizer.json", "tokenizer_config.json"]) {
    assert.equal(readModelFile("draft", file), readModelFile("target", file), `${file} differs`);
  }
});

describe("JS tokenizer against the Python tokenizers library", () => {
  const tokenizer = loadTokenizer("target");

  for (const [index, testCase] of reference.tokenizer_cases.entries()) {
    test(`case ${index}: ${JSON.stringify(testCase.text.slice(0, 40))}`, () => {
      assert.deepEqual(tokenizer.encode(testCase.text).ids, testCase.ids, "encode");
      assert.equal(
        tokenizer.decode(testCase.ids, { skip_special_tokens: false }),
        testCase.decoded,
        "decode",
      );
      assert.equal(testCase.decoded, testCase.text, "Python's own round trip");
    });
  }

  test("the held-out prompts encode to the recorded ids, also through lib/tokenizer", () => {
    const textTokenizer = TextTokenizer.load(join(MODELS, "target"));
    assert.ok(textTokenizer, "models/target has no tokenizer");
    for (const prompt of reference.prompts) {
      assert.deepEqual(tokenizer.encode(prompt.text).ids, prompt.ids);
      assert.deepEqual(textTokenizer.encode(prompt.text), prompt.ids);
    }
  });

  test("the recorded continuation texts decode from their ids", () => {
    for (const prompt of reference.prompts) {
      for (const model of MODEL_NAMES) {
        const { greedy, text } = prompt[model];
        assert.equal(tokenizer.decode(greedy, { skip_special_tokens: false }), text, model);
      }
    }
  });
});

for (const model of MODEL_NAMES) {
  describe(`native runtime, ${model} model`, () => {
    let engine: Engine;

    before(async () => {
      engine = await Engine.load({ modelDir: join(MODELS, model), backend: "cpu" });
    });
    after(async () => engine?.close());

    test("model info matches the exported checkpoint and its tokenizer", () => {
      const config = JSON.parse(readModelFile(model, "config.json")) as { vocab_size: number };
      assert.equal(engine.info.architecture, "LlamaForCausalLM");
      assert.equal(engine.info.dtype, "bfloat16");
      assert.equal(engine.info.vocabSize, config.vocab_size);
      const endOfText = loadTokenizer(model).token_to_id("<|endoftext|>");
      assert.deepEqual(engine.info.eosTokenIds, [endOfText]);
    });

    test("greedy continuations equal transformers'", async () => {
      for (const [index, prompt] of reference.prompts.entries()) {
        const expected = prompt[model].greedy;
        const actual = await greedyDecode(engine, index, prompt.ids, expected.length);
        assert.deepEqual(actual, expected, `prompt ${index}`);
      }
    });
  });
}
