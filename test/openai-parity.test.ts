// OpenAI surface parity (vLLM's): n and best_of, logprobs and top_logprobs, echo with prompt scores, several
// prompts per request, /tokenize, /detokenize and /version, on `pearl serve` with the embedded pair and the
// official openai client. Every score is checked against the target's own logits, computed here by the
// native runtime on the same model: the target's log-probabilities of the committed tokens, the same
// whether pearl, sd or ar decoded them.
import assert from "node:assert/strict";
import { credentials } from "@grpc/grpc-js";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { ChatTemplate } from "../lib/chat_template.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { Engine } from "../lib/native.js";
import { packageVersion } from "../lib/paths.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import type { TokenLogprobs } from "../proto/gen/pearl/v1/common.js";
import { GatewayClient, type GenerateRequest, type GenerateResponse } from "../proto/gen/pearl/v1/gateway.js";
import { TargetServiceClient } from "../proto/gen/pearl/v1/target.js";
import { EMBEDDED_MODELS, PearlServe } from "./helpers/pearl_serve.js";
import { generateRequest } from "./helpers/stack.js";

const MODEL = "pearl-code";
const PROMPT = "def add(a, b):\n    return";
const DECODINGS = ["pearl", "sd", "ar"] as const;
/** float32 scores against float64 references. */
const TOLERANCE = 2e-5;

type Decoding = (typeof DECODINGS)[number];
type CompletionParams = Partial<OpenAI.CompletionCreateParamsNonStreaming> & { decoding?: Decoding };

interface Processing {
  temperature: number;
  topK: number;
  topP: number;
}

/** The reference scores of one row of logits: log_softmax when greedy, else the processed distribution
 * (temperature, then the top-k cut, then the nucleus, ties to the lowest id), -Infinity outside it. */
function referenceLogprobs(row: Float32Array, processing: Processing): Float64Array {
  const out = new Float64Array(row.length).fill(-Infinity);
  const temperature = processing.temperature > 0 ? processing.temperature : 1;
  const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
  const weights = Array.from(row, (logit) => Math.exp((logit - max) / temperature));
  let support = weights.map((_, id) => id);
  if (processing.temperature > 0) {
    support.sort((a, b) => weights[b]! - weights[a]! || a - b);
    if (processing.topK > 0) support = support.slice(0, processing.topK);
    if (processing.topP < 1) {
      const total = support.reduce((sum, id) => sum + weights[id]!, 0);
      let cumulative = 0;
      const keep = support.findIndex((id) => (cumulative += weights[id]! / total) >= processing.topP);
      support = support.slice(0, keep + 1);
    }
  }
  const total = support.reduce((sum, id) => sum + weights[id]!, 0);
  for (const id of support) out[id] = Math.log(weights[id]! / total);
  return out;
}

function argmax(values: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i]! > values[best]!) best = i;
  return best;
}

describe("OpenAI parity: n, best_of, logprobs, echo, tokenize (pearl serve, openai client)", () => {
  let serve: PearlServe;
  let client: OpenAI;
  let gateway: GatewayClient;
  let engine: Engine;
  let rootUrl: string;
  const tokenizer = TextTokenizer.load(join(EMBEDDED_MODELS, "target"))!;
  const chatTemplate = ChatTemplate.load(join(EMBEDDED_MODELS, "target"));

  before(async () => {
    [serve, engine] = await Promise.all([
      PearlServe.start(),
      Engine.load({ modelDir: join(EMBEDDED_MODELS, "target"), backend: "cpu", numThreads: 1 }),
    ]);
    rootUrl = serve.httpUrl("gateway");
    client = new OpenAI({ baseURL: `${rootUrl}/v1`, apiKey: "unused", maxRetries: 0 });
    gateway = new GatewayClient(serve.grpcAddress("gateway"), credentials.createInsecure(), CHANNEL_OPTIONS);
  });

  after(async () => {
    gateway?.close();
    await engine?.close();
    if (serve) assert.equal(await serve.stop(), 0);
  });

  /** The target's logits of every row of `tokens`, from the native runtime. */
  async function logitRows(tokens: number[]): Promise<Float32Array[]> {
    await engine.addSequence(1);
    try {
      const [result] = await engine.step([{ seqId: 1, tokens: Int32Array.from(tokens), output: "logits" }]);
      const vocab = engine.info.vocabSize;
      return tokens.map((_, row) => result!.logits!.subarray(row * vocab, (row + 1) * vocab));
    } finally {
      await engine.release(1);
    }
  }

  function complete(params: CompletionParams) {
    return client.completions.create({
      model: MODEL,
      prompt: PROMPT,
      ...params,
    } as OpenAI.CompletionCreateParamsNonStreaming);
  }

  /** One request over the gateway's gRPC API: its tokens, their scores (however the responses split
   * them) and the prompt's. */
  function generate(request: Partial<GenerateRequest>) {
    return new Promise<{
      tokenIds: number[];
      logprobs: TokenLogprobs;
      promptLogprobs?: TokenLogprobs;
      draftTokens: number;
    }>((resolve, reject) => {
      const call = gateway.generate(generateRequest(request));
      const tokenIds: number[] = [];
      const logprobs: TokenLogprobs = {
        tokenIds: [],
        logprobs: [],
        topK: 0,
        topTokenIds: [],
        topLogprobs: [],
      };
      let promptLogprobs: TokenLogprobs | undefined;
      let draftTokens = 0;
      call.on("data", (response: GenerateResponse) => {
        draftTokens += response.usage?.draftTokens ?? 0;
        tokenIds.push(...response.tokenIds);
        const piece = response.logprobs;
        if (piece) {
          logprobs.topK = piece.topK;
          logprobs.tokenIds.push(...piece.tokenIds);
          logprobs.logprobs.push(...piece.logprobs);
          logprobs.topTokenIds.push(...piece.topTokenIds);
          logprobs.topLogprobs.push(...piece.topLogprobs);
        }
        promptLogprobs ??= response.promptLogprobs;
      });
      call.on("error", reject);
      call.on("end", () => resolve({ tokenIds, logprobs, promptLogprobs, draftTokens }));
    });
  }

  test("sampled logprobs are the target's processed distribution, identical in pearl, sd and ar", async () => {
    const promptTokenIds = tokenizer.encode(PROMPT);
    const processing = { temperature: 0.8, topK: 20, topP: 0.9 };
    const runs = [];
    for (const decoding of DECODINGS) {
      runs.push(
        await generate({
          promptTokenIds,
          maxTokens: 24,
          ...processing,
          seed: 7,
          mode: PROTO_MODES[decoding],
          topLogprobs: 3,
          promptLogprobs: true,
        }),
      );
    }
    const [pearl, sd, ar] = runs.map(({ draftTokens, ...scores }, i) => {
      assert.equal(draftTokens > 0, DECODINGS[i] !== "ar", `${DECODINGS[i]} drafted ${draftTokens} tokens`);
      return scores;
    });
    assert.deepEqual(pearl, ar, "pearl scores like ar");
    assert.deepEqual(sd, ar, "sd scores like ar");
    const scores = ar!.logprobs.logprobs;
    assert.deepEqual(ar!.logprobs.tokenIds, ar!.tokenIds, "one score per committed token");

    const sequence = [...promptTokenIds, ...ar!.tokenIds];
    const rows = await logitRows(sequence);
    ar!.tokenIds.forEach((token, i) => {
      const row = promptTokenIds.length + i - 1;
      const expected = referenceLogprobs(rows[row]!, processing);
      assert.ok(
        Math.abs(scores[i]! - expected[token]!) < TOLERANCE,
        `token ${i}: ${scores[i]} vs ${expected[token]}`,
      );
      const top = ar!.logprobs.topTokenIds.slice(3 * i, 3 * i + 3);
      const expectedTop = Array.from(expected.keys())
        .sort((a, b) => expected[b]! - expected[a]! || a - b)
        .slice(0, 3);
      assert.deepEqual(top, expectedTop, `the 3 most likely tokens at ${i}`);
    });
    // The prompt's scores are raw, whatever the request's processing.
    const prompt = ar!.promptLogprobs!;
    assert.deepEqual(prompt.tokenIds, promptTokenIds.slice(1));
    prompt.logprobs.forEach((logprob, i) => {
      const expected = referenceLogprobs(rows[i]!, { temperature: 0, topK: 0, topP: 1 })[
        promptTokenIds[i + 1]!
      ]!;
      assert.ok(Math.abs(logprob - expected) < TOLERANCE, `prompt token ${i + 1}`);
    });

    // The REST API reports the same numbers.
    const completion = await complete({
      max_tokens: 24,
      temperature: processing.temperature,
      top_p: processing.topP,
      seed: 7,
      logprobs: 3,
      top_k: processing.topK,
    } as CompletionParams);
    const logprobs = completion.choices[0]!.logprobs!;
    assert.deepEqual(logprobs.token_logprobs, scores);
    assert.deepEqual(
      logprobs.tokens,
      ar!.tokenIds.map((id) => tokenizer.tokenText(id)),
    );
    assert.equal(logprobs.tokens!.join(""), completion.choices[0]!.text);
    logprobs.top_logprobs!.forEach((top, i) => {
      const entries = Object.values(top);
      assert.ok(entries.length >= 3 && entries.length <= 4, "the 3 most likely and the chosen token");
      assert.equal(top[logprobs.tokens![i]!], scores[i]);
    });
    let offset = 0;
    logprobs.tokens!.forEach((text, i) => {
      assert.equal(logprobs.text_offset![i], offset);
      offset += [...text].length;
    });
  });

  test("an lm-evaluation-harness loglikelihood request scores the continuation exactly", async () => {
    // What lm-eval's local-completions model sends for loglikelihood (tokenized requests, batched):
    // context + continuation as token ids, echo, logprobs 1, one generated token it then drops.
    const context = tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return");
    const greedy: number[] = [];
    for (let i = 0; i < 5; i++) {
      const rows = await logitRows([...context, ...greedy]);
      greedy.push(argmax(rows[rows.length - 1]!));
    }
    const wrong = [...greedy];
    wrong[2] = (wrong[2]! + 1) % engine.info.vocabSize;
    const continuations = [greedy, wrong];
    for (const maxTokens of [1, 0]) {
      const response = await fetch(`${rootUrl}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          model: MODEL,
          prompt: continuations.map((continuation) => [...context, ...continuation]),
          temperature: 0,
          max_tokens: maxTokens,
          logprobs: 1,
          seed: 1234,
          echo: true,
        }),
      });
      assert.equal(response.status, 200, await response.clone().text());
      const body = (await response.json()) as {
        choices: {
          index: number;
          logprobs: { token_logprobs: (number | null)[]; top_logprobs: Record<string, number>[] };
        }[];
      };
      const choices = [...body.choices].sort((a, b) => a.index - b.index);
      assert.equal(choices.length, 2);
      for (const [i, continuation] of continuations.entries()) {
        // lm-eval's parse_logprobs: the generated token (max_tokens 1) is the last entry.
        const end = maxTokens === 1 ? -1 : undefined;
        const tokenLogprobs = choices[i]!.logprobs.token_logprobs.slice(context.length, end) as number[];
        const topLogprobs = choices[i]!.logprobs.top_logprobs.slice(context.length, end);
        assert.equal(tokenLogprobs.length, continuation.length);
        const sum = tokenLogprobs.reduce((a, b) => a + b, 0);
        const isGreedy = tokenLogprobs.every(
          (logprob, j) => logprob === Math.max(...Object.values(topLogprobs[j]!)),
        );

        const rows = await logitRows([...context, ...continuation]);
        let expectedSum = 0;
        let expectedGreedy = true;
        continuation.forEach((token, j) => {
          const row = rows[context.length + j - 1]!;
          expectedSum += referenceLogprobs(row, { temperature: 0, topK: 0, topP: 1 })[token]!;
          expectedGreedy &&= argmax(row) === token;
        });
        assert.ok(Math.abs(sum - expectedSum) < 5 * TOLERANCE, `sum ${sum} vs ${expectedSum}`);
        assert.equal(isGreedy, expectedGreedy);
        assert.equal(isGreedy, i === 0, "the greedy continuation is greedy, the altered one is not");
      }
    }
  });

  test("echo: the prompt's text and scores lead, max_tokens 0 returns only them, streamed alike", async () => {
    const promptTokens = tokenizer.encode(PROMPT).length;
    const whole = await complete({ max_tokens: 6, temperature: 0, echo: true, logprobs: 2 });
    const choice = whole.choices[0]!;
    assert.ok(choice.text.startsWith(PROMPT));
    const logprobs = choice.logprobs!;
    assert.equal(logprobs.tokens!.length, promptTokens + whole.usage!.completion_tokens);
    assert.equal(logprobs.token_logprobs![0], null, "nothing scores the first prompt token");
    assert.equal(logprobs.top_logprobs![0], null);
    assert.ok(
      logprobs.token_logprobs!.slice(1).every((logprob) => typeof logprob === "number" && logprob <= 0),
    );

    const promptOnly = await complete({ max_tokens: 0, echo: true, logprobs: 2 });
    assert.equal(promptOnly.choices[0]!.text, PROMPT);
    assert.equal(promptOnly.choices[0]!.finish_reason, "length");
    assert.deepEqual(
      promptOnly.choices[0]!.logprobs!.token_logprobs,
      logprobs.token_logprobs!.slice(0, promptTokens),
    );
    assert.equal(promptOnly.usage!.completion_tokens, 0);
    assert.equal(promptOnly.usage!.prompt_tokens, promptTokens);
    const textOnly = await complete({ max_tokens: 3, temperature: 0, echo: true });
    assert.ok(textOnly.choices[0]!.text.startsWith(PROMPT));
    assert.equal(textOnly.choices[0]!.logprobs, null);

    const stream = await client.completions.create({
      model: MODEL,
      prompt: PROMPT,
      max_tokens: 6,
      temperature: 0,
      echo: true,
      logprobs: 2,
      stream: true,
    });
    let text = "";
    const tokens: string[] = [];
    const tokenLogprobs: (number | null)[] = [];
    const offsets: number[] = [];
    for await (const chunk of stream) {
      const piece = chunk.choices[0]!;
      text += piece.text;
      tokens.push(...(piece.logprobs?.tokens ?? []));
      tokenLogprobs.push(...(piece.logprobs?.token_logprobs ?? []));
      offsets.push(...(piece.logprobs?.text_offset ?? []));
    }
    assert.equal(text, choice.text);
    assert.deepEqual(tokens, logprobs.tokens);
    assert.deepEqual(tokenLogprobs, logprobs.token_logprobs);
    assert.deepEqual(offsets, logprobs.text_offset, "text offsets run on from piece to piece");
  });

  test("n: seeded choices are reproducible one by one, the first is the n = 1 answer, streamed alike", async () => {
    const params = { max_tokens: 20, temperature: 1, seed: 11 };
    const single = await complete(params);
    const [three, again] = [await complete({ ...params, n: 3 }), await complete({ ...params, n: 3 })];
    assert.deepEqual(
      three.choices.map((choice) => choice.index),
      [0, 1, 2],
    );
    assert.equal(three.choices[0]!.text, single.choices[0]!.text);
    assert.deepEqual(
      again.choices.map((choice) => choice.text),
      three.choices.map((choice) => choice.text),
    );
    assert.ok(new Set(three.choices.map((choice) => choice.text)).size > 1, "choices sample differently");
    const usage = three.usage!;
    assert.equal(usage.prompt_tokens, single.usage!.prompt_tokens, "the prompt counts once");
    assert.ok(usage.completion_tokens > single.usage!.completion_tokens);

    const stream = await client.completions.create({
      model: MODEL,
      prompt: PROMPT,
      ...params,
      n: 3,
      stream: true,
      stream_options: { include_usage: true },
    });
    const texts = ["", "", ""];
    const finished: number[] = [];
    let streamedUsage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      if (chunk.usage) streamedUsage = chunk.usage;
      for (const choice of chunk.choices) {
        texts[choice.index] += choice.text;
        if (choice.finish_reason) finished.push(choice.index);
      }
    }
    assert.deepEqual(
      texts,
      three.choices.map((choice) => choice.text),
    );
    assert.deepEqual(finished.sort(), [0, 1, 2], "each choice finishes once");
    assert.equal(streamedUsage!.completion_tokens, usage.completion_tokens);
  });

  test("n: the choices after the first reuse the prompt's KV through the target's prefix cache", async () => {
    const prefixHits = () =>
      new Promise<number>((resolve, reject) => {
        const target = new TargetServiceClient(serve.grpcAddress("target"), credentials.createInsecure());
        target.info({}, (error, info) => {
          target.close();
          if (error) reject(error);
          else resolve(info.cache!.prefixHitTokens);
        });
      });
    // A prompt of three full 16-token blocks and some, new to the cache.
    const prompt = Array.from({ length: 56 }, (_, i) => 3 + ((i * 97 + 41) % 3000));
    const before = await prefixHits();
    const completion = await complete({ prompt, n: 3, max_tokens: 4, temperature: 1, seed: 5 });
    assert.equal(completion.choices.length, 3);
    assert.equal(
      (await prefixHits()) - before,
      2 * 48,
      "two choices each found the prompt's 3 blocks cached",
    );
  });

  test("several prompts: n choices each, indexed prompt by prompt", async () => {
    const prompts = [PROMPT, "import os\n"];
    const both = await complete({ prompt: prompts, n: 2, max_tokens: 8, temperature: 1, seed: 3 });
    assert.deepEqual(
      both.choices.map((choice) => choice.index),
      [0, 1, 2, 3],
    );
    const second = await complete({ prompt: prompts[1], max_tokens: 8, temperature: 1, seed: 3 });
    assert.equal(both.choices[2]!.text, second.choices[0]!.text, "choice 0 of prompt 1 is at index 2");
    const promptTokens = prompts.reduce((sum, prompt) => sum + tokenizer.encode(prompt).length, 0);
    assert.equal(both.usage!.prompt_tokens, promptTokens);
  });

  test("best_of returns the runs of the highest cumulative log-probability", async () => {
    const params = { max_tokens: 10, temperature: 1.2, seed: 21, logprobs: 0 };
    const runs = await complete({ ...params, n: 4 });
    const cumulative = runs.choices.map((choice) =>
      (choice.logprobs!.token_logprobs as number[]).reduce((a, b) => a + b, 0),
    );
    const ranked = [...cumulative.keys()].sort((a, b) => cumulative[b]! - cumulative[a]!);
    const best = await complete({ ...params, n: 2, best_of: 4 });
    assert.deepEqual(
      best.choices.map((choice) => choice.index),
      [0, 1],
    );
    assert.deepEqual(
      best.choices.map((choice) => choice.text),
      ranked.slice(0, 2).map((run) => runs.choices[run]!.text),
    );
    assert.equal(best.usage!.completion_tokens, runs.usage!.completion_tokens, "every run counts");
    const hidden = await complete({ ...params, logprobs: undefined, n: 1, best_of: 4 });
    assert.equal(hidden.choices[0]!.text, runs.choices[ranked[0]!]!.text);
    assert.equal(hidden.choices[0]!.logprobs, null, "scores ranked, not returned");
  });

  test("chat: logprobs and top_logprobs per choice, the same in every mode, streamed alike", async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: PROMPT }];
    const params = {
      model: MODEL,
      messages,
      max_tokens: 10,
      temperature: 0.7,
      seed: 9,
      n: 2,
      logprobs: true,
      top_logprobs: 2,
    };
    const results = [];
    for (const decoding of DECODINGS) {
      results.push(
        await client.chat.completions.create({
          ...params,
          decoding,
        } as OpenAI.ChatCompletionCreateParamsNonStreaming),
      );
    }
    results.forEach((result, i) => {
      const drafted = (result.usage as unknown as { draft_tokens: number }).draft_tokens;
      assert.equal(drafted > 0, DECODINGS[i] !== "ar", `${DECODINGS[i]} drafted ${drafted} tokens`);
    });
    for (const result of results.slice(1)) {
      assert.deepEqual(
        result.choices.map((choice) => [choice.message.content, choice.logprobs]),
        results[0]!.choices.map((choice) => [choice.message.content, choice.logprobs]),
      );
    }
    const chat = results[0]!;
    assert.equal(chat.choices.length, 2);
    for (const choice of chat.choices) {
      const content = choice.logprobs!.content!;
      assert.ok(content.length > 0);
      for (const entry of content) {
        assert.equal(entry.top_logprobs.length, 2);
        assert.ok(entry.top_logprobs[0]!.logprob >= entry.top_logprobs[1]!.logprob);
        assert.ok(entry.logprob <= entry.top_logprobs[0]!.logprob);
        assert.deepEqual(entry.bytes, [...Buffer.from(entry.token, "utf8")]);
      }
    }
    // The scores are the completion's of the rendered prompt: the same rows of the same target.
    const prompt = chatTemplate.render([{ role: "user", content: PROMPT }]);
    const completion = await complete({
      prompt: tokenizer.encode(prompt, { addSpecialTokens: false }),
      max_tokens: 10,
      temperature: 0.7,
      seed: 9,
      logprobs: 2,
    });
    assert.deepEqual(
      chat.choices[0]!.logprobs!.content!.map((entry) => entry.logprob),
      completion.choices[0]!.logprobs!.token_logprobs,
    );

    const stream = await client.chat.completions.create({ ...params, stream: true });
    const streamed: { content: string; logprobs: OpenAI.ChatCompletionTokenLogprob[] }[] = [
      { content: "", logprobs: [] },
      { content: "", logprobs: [] },
    ];
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        streamed[choice.index]!.content += choice.delta.content ?? "";
        streamed[choice.index]!.logprobs.push(...(choice.logprobs?.content ?? []));
      }
    }
    assert.deepEqual(
      streamed,
      chat.choices.map((choice) => ({ content: choice.message.content, logprobs: choice.logprobs!.content })),
    );
  });

  test("POST /tokenize, POST /detokenize and GET /version, as vLLM serves them", async () => {
    const post = async (path: string, body: unknown) => {
      const response = await fetch(`${rootUrl}${path}`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      return { status: response.status, body: (await response.json()) as Record<string, unknown> };
    };
    const ids = tokenizer.encode(PROMPT);
    const tokenized = await post("/tokenize", { model: MODEL, prompt: PROMPT, return_token_strs: true });
    assert.equal(tokenized.status, 200);
    assert.deepEqual(tokenized.body, {
      count: ids.length,
      max_model_len: 512,
      tokens: ids,
      token_strs: ids.map((id) => tokenizer.tokenString(id)),
    });
    const messages = [{ role: "user", content: PROMPT }];
    const chat = await post("/tokenize", { messages });
    assert.deepEqual(
      chat.body.tokens,
      tokenizer.encode(chatTemplate.render(messages), { addSpecialTokens: false }),
    );
    assert.equal(chat.body.token_strs, null);
    assert.deepEqual((await post("/detokenize", { tokens: ids })).body, { prompt: PROMPT });
    const version = await fetch(`${rootUrl}/version`);
    assert.deepEqual(await version.json(), { version: packageVersion() });

    for (const [path, body, param] of [
      ["/tokenize", { model: "gpt-4", prompt: "x" }, "model"],
      ["/tokenize", { prompt: 5 }, "prompt"],
      ["/detokenize", { tokens: [1, 999999] }, "tokens"],
      ["/detokenize", { tokens: "abc" }, "tokens"],
    ] as const) {
      const refused = await post(path, body);
      assert.equal(refused.status, 400, JSON.stringify(body));
      assert.equal((refused.body.error as { param: string }).param, param);
    }
  });
});
