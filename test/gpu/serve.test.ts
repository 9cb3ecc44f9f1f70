// `pearl serve` with the embedded model pair, started as a user starts it (the real CLI as a child
// process), both models on the backend PEARL_TEST_BACKEND names (default cuda, on one GPU), asked over REST
// with the official openai client: greedy completions of code prompts are the same text in modes ar, pearl
// and sd, one request at a time in the default mode and many at once with the target deterministic.
// `PEARL_TEST_BACKEND=cpu` runs the same test on any machine, so that on the GPU only the backend differs.
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";

import { type Backend, cudaDeviceCount } from "../../lib/native.js";
import { TextTokenizer } from "../../lib/tokenizer.js";
import type { Usage } from "../../services/gateway/openai.js";
import { EMBEDDED_MODELS, PearlServe } from "../helpers/pearl_serve.js";

const BACKENDS: readonly Backend[] = ["cuda", "cpu", "auto"];
const BACKEND = process.env.PEARL_TEST_BACKEND ?? "cuda";
if (!(BACKENDS as readonly string[]).includes(BACKEND)) {
  throw new Error(`PEARL_TEST_BACKEND must be one of ${BACKENDS.join(", ")}, got "${BACKEND}"`);
}

/** What `pearl serve` calls the embedded target in the OpenAI API. */
const MODEL = "pearl-code";
const MAX_TOKENS = 48;
const MODES = ["ar", "pearl", "sd"] as const;
type Decoding = (typeof MODES)[number];

// Outside deterministic mode, the cuda backend is batch-invariant only on steps of at most 16 rows (larger
// ones take cuBLASLt). One request at a time stays there if every prompt is at most 15 tokens (its prefill
// is one step of at most 15 rows, and it holds no full KV block for the prefix cache to serve to the next
// mode) and every verify step holds at most 15 proposals plus the token before them.
const PROMPTS = [
  "def fibonacci(n):\n",
  "def is_prime(n):\n",
  "class Stack:\n    def __init__(self):\n",
  "import os\n\ndef list_files(path):\n",
  "def read_json(path):\n",
  "for i in range(10):\n",
  "def quicksort(items):\n",
  "    def __repr__(self):\n",
  'if __name__ == "__main__":\n',
  "def merge(left, right):\n",
];
const MAX_PROMPT_TOKENS = 15;
const DEFAULT_MODE_VERIFY_WINDOW = 15;

interface Completion {
  text: string;
  finishReason: string;
  usage: Usage;
}

async function startServe(extraArgs: string[]): Promise<{ serve: PearlServe; client: OpenAI }> {
  const serve = await PearlServe.start(
    ["--draft-backend", BACKEND, "--target-backend", BACKEND, ...extraArgs],
    120_000,
  );
  const client = new OpenAI({ baseURL: `${serve.httpUrl("gateway")}/v1`, apiKey: "unused", maxRetries: 0 });
  return { serve, client };
}

async function complete(client: OpenAI, prompt: string, decoding: Decoding): Promise<Completion> {
  const completion = await client.completions.create({
    model: MODEL,
    prompt,
    max_tokens: MAX_TOKENS,
    temperature: 0,
    decoding,
  } as OpenAI.CompletionCreateParamsNonStreaming);
  const choice = completion.choices[0]!;
  return { text: choice.text, finishReason: choice.finish_reason, usage: completion.usage as Usage };
}

/** The engines' "model loaded" log lines: backend and deterministic mode per service. */
function loadedEngines(serve: PearlServe): Record<string, { backend: unknown; deterministic: unknown }> {
  return Object.fromEntries(
    serve
      .logRecords("model loaded")
      .map((record) => [
        String(record.service),
        { backend: record.backend, deterministic: record.deterministic },
      ]),
  );
}

function assertEngines(serve: PearlServe, targetDeterministic: boolean): void {
  const engines = loadedEngines(serve);
  assert.deepEqual(Object.keys(engines).sort(), ["draft", "target"]);
  if (BACKEND !== "auto") {
    assert.equal(engines.draft!.backend, BACKEND);
    assert.equal(engines.target!.backend, BACKEND);
  }
  assert.equal(engines.target!.deterministic, targetDeterministic);
}

/** Same text, finish and length as ar; pearl and sd drafted (drafting is pinned on by --min-gamma 1). */
function assertLikeAr(result: Completion, ar: Completion, what: string): void {
  assert.equal(result.text, ar.text, what);
  assert.equal(result.finishReason, ar.finishReason, what);
  assert.equal(result.usage.completion_tokens, ar.usage.completion_tokens, what);
}

function assertDrafted(results: Completion[], what: string): void {
  for (const result of results) {
    assert.ok(result.usage.accepted_tokens <= result.usage.draft_tokens, what);
    if (result.usage.completion_tokens > 1) assert.ok(result.usage.draft_tokens > 0, `${what} drafted`);
  }
  assert.ok(
    results.reduce((sum, result) => sum + result.usage.accepted_tokens, 0) > 0,
    `the embedded draft agrees with its target at least sometimes (${what})`,
  );
}

/** Every prompt in every mode in flight at once gives the text ar gives alone (the target deterministic). */
async function assertConcurrentLikeAr(client: OpenAI): Promise<void> {
  const alone: Completion[] = [];
  for (const prompt of PROMPTS) alone.push(await complete(client, prompt, "ar"));
  const requests = MODES.flatMap((decoding) => PROMPTS.map((prompt, i) => ({ decoding, prompt, i })));
  const results = await Promise.all(
    requests.map(async (request) => ({
      ...request,
      result: await complete(client, request.prompt, request.decoding),
    })),
  );
  for (const { decoding, prompt, i, result } of results) {
    assertLikeAr(result, alone[i]!, `${decoding} on ${JSON.stringify(prompt)}, concurrent`);
  }
  assertDrafted(
    results.filter(({ decoding }) => decoding !== "ar").map(({ result }) => result),
    "pearl and sd, concurrent",
  );
}

describe(`pearl serve on ${BACKEND}: greedy REST completions equal ar`, () => {
  test("the prompts are short enough for default-mode exactness on cuda", () => {
    const tokenizer = TextTokenizer.load(join(EMBEDDED_MODELS, "target"))!;
    for (const prompt of PROMPTS) {
      const tokens = tokenizer.encode(prompt).length;
      assert.ok(tokens <= MAX_PROMPT_TOKENS, `${JSON.stringify(prompt)}: ${tokens} tokens`);
    }
  });

  describe("default mode, one request at a time", () => {
    let serve: PearlServe;
    let client: OpenAI;

    before(async () => {
      ({ serve, client } = await startServe([
        "--target-max-verify-window",
        String(DEFAULT_MODE_VERIFY_WINDOW),
      ]));
    });
    after(async () => {
      if (serve) assert.equal(await serve.stop(), 0);
    });

    test("both engines run on the backend asked for, the target not deterministic", () => {
      assertEngines(serve, false);
    });

    test("every prompt: pearl and sd give ar's text", async () => {
      const drafted: Completion[] = [];
      for (const prompt of PROMPTS) {
        const ar = await complete(client, prompt, "ar");
        assert.equal(ar.usage.draft_tokens, 0);
        for (const decoding of ["pearl", "sd"] as const) {
          const result = await complete(client, prompt, decoding);
          assertLikeAr(result, ar, `${decoding} on ${JSON.stringify(prompt)}`);
          drafted.push(result);
        }
      }
      assertDrafted(drafted, "pearl and sd, one at a time");
    });
  });

  describe("target deterministic, every prompt in every mode in flight at once", () => {
    let serve: PearlServe;
    let client: OpenAI;

    before(async () => {
      ({ serve, client } = await startServe(["--target-deterministic"]));
    });
    after(async () => {
      if (serve) assert.equal(await serve.stop(), 0);
    });

    test("both engines run on the backend asked for, the target deterministic", () => {
      assertEngines(serve, true);
    });

    test("concurrent ar, pearl and sd requests give the text ar gives alone", async () => {
      await assertConcurrentLikeAr(client);
    });
  });
});

// The draft on GPU 0 and the target tensor-parallel over GPUs 1 and 2 where the machine has three, else both
// of the target's ranks on GPU 0 beside the draft (the same sharding and protocol, collectives as kernels).
describe("pearl serve on cuda, the target tensor-parallel over 2 ranks", { skip: BACKEND !== "cuda" }, () => {
  const targetDevices = cudaDeviceCount() >= 3 ? "1,2" : "0,0";
  let serve: PearlServe;
  let client: OpenAI;

  before(async () => {
    ({ serve, client } = await startServe([
      "--target-deterministic",
      "--draft-devices",
      "0",
      "--target-devices",
      targetDevices,
      "--allow-shared-devices",
    ]));
  });
  after(async () => {
    if (serve) assert.equal(await serve.stop(), 0);
  });

  test(`the placement log names the target's devices ${targetDevices}`, () => {
    const placement = serve.logRecords(
      `placement: draft on GPU 0, target on GPUs ${targetDevices} (tensor parallel 2)`,
    )[0];
    assert.ok(placement, "pearl serve logs its placement");
    assert.equal(placement.targetDevices, targetDevices);
    assert.equal(placement.targetTensorParallel, 2);
  });

  test("concurrent ar, pearl and sd requests give the text ar gives alone", async () => {
    await assertConcurrentLikeAr(client);
  });
});
