// The OpenAI-compatible REST API as a user meets it: `pearl serve` on the embedded model pair, the official
// `openai` npm package as the client (raw fetch where a client would refuse to send the mistake).
import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import OpenAI from "openai";
import { ChatTemplate } from "../lib/chat_template.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import type { Usage } from "../services/gateway/openai.js";
import { metricValue, Stack } from "./helpers/stack.js";
import { EMBEDDED_MODELS, PearlServe } from "./helpers/pearl_serve.js";

/** What `pearl serve` calls the embedded target in the OpenAI API. */
const MODEL = "pearl-code";
const CODE_PROMPT = "def add(a, b):\n    return";
/** The embedded models write CJK (and, sampled, the odd invalid byte) after a prompt like this one. */
const MULTIBYTE_PROMPT = "# 你好，世界 😀 日本語のテキスト\n# 中文注释：";

type Decoding = "pearl" | "sd" | "ar";

function assertUsage(usage: unknown, expected: { promptTokens?: number; maxTokens?: number }): Usage {
  const value = usage as Usage;
  for (const key of [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "draft_tokens",
    "accepted_tokens",
    "target_steps",
    "mean_accepted_length",
  ] as const) {
    assert.equal(typeof value[key], "number", `usage.${key}`);
  }
  assert.equal(value.total_tokens, value.prompt_tokens + value.completion_tokens);
  if (expected.promptTokens !== undefined) assert.equal(value.prompt_tokens, expected.promptTokens);
  if (expected.maxTokens !== undefined) assert.ok(value.completion_tokens <= expected.maxTokens);
  assert.ok(value.completion_tokens >= 1);
  assert.ok(value.accepted_tokens <= value.draft_tokens);
  assert.ok(value.target_steps >= 1 && value.target_steps <= value.completion_tokens);
  assert.ok(Math.abs(value.mean_accepted_length - value.completion_tokens / value.target_steps) < 1e-9);
  return value;
}

describe("OpenAI REST API (pearl serve, openai client)", () => {
  let serve: PearlServe;
  let client: OpenAI;
  let baseUrl: string;
  const tokenizer = TextTokenizer.load(join(EMBEDDED_MODELS, "target"))!;
  const chatTemplate = ChatTemplate.load(join(EMBEDDED_MODELS, "target"));

  before(async () => {
    serve = await PearlServe.start();
    baseUrl = `${serve.httpUrl("gateway")}/v1`;
    client = new OpenAI({ baseURL: baseUrl, apiKey: "unused", maxRetries: 0 });
  });

  after(async () => {
    if (serve) assert.equal(await serve.stop(), 0);
  });

  function complete(params: Partial<OpenAI.CompletionCreateParamsNonStreaming> & { decoding?: Decoding }) {
    return client.completions.create({
      model: MODEL,
      prompt: CODE_PROMPT,
      ...params,
    } as OpenAI.CompletionCreateParamsNonStreaming);
  }

  async function completeStreamed(
    params: Partial<OpenAI.CompletionCreateParamsStreaming> & { decoding?: Decoding },
  ): Promise<{ texts: string[]; finishReason: string | null; usage: unknown }> {
    const stream = await client.completions.create({
      model: MODEL,
      prompt: CODE_PROMPT,
      ...params,
      stream: true,
      stream_options: { include_usage: true },
    } as OpenAI.CompletionCreateParamsStreaming);
    const texts: string[] = [];
    let finishReason: string | null = null;
    let usage: unknown;
    for await (const chunk of stream) {
      assert.equal(chunk.object, "text_completion");
      if (chunk.usage) {
        assert.deepEqual(chunk.choices, [], "the usage chunk has no choices");
        usage = chunk.usage;
        continue;
      }
      const choice = chunk.choices[0]!;
      assert.equal(finishReason, null, "nothing after the finish reason but usage");
      if (choice.text !== "") texts.push(choice.text);
      finishReason = choice.finish_reason;
    }
    return { texts, finishReason, usage };
  }

  async function postJson(path: string, body: string, headers: Record<string, string> = {}) {
    const response = await fetch(`${baseUrl}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body,
    });
    return { status: response.status, headers: response.headers, body: (await response.json()) as unknown };
  }

  test("GET /v1/models lists the target model under its served name", async () => {
    const models = [];
    for await (const model of client.models.list()) models.push(model);
    assert.deepEqual(
      models.map((model) => [model.id, model.object, model.owned_by]),
      [[MODEL, "model", "pearl"]],
    );
    assert.equal((await client.models.retrieve(MODEL)).id, MODEL);
    const missing = await fetch(`${baseUrl}/models/target`);
    assert.equal(missing.status, 404, "the folder name is not the served name");
    const { error } = (await missing.json()) as { error: { code: string; param: string } };
    assert.equal(error.code, "model_not_found");
  });

  test("completions: greedy text, finish reasons and usage; every mode gives the same text", async () => {
    const maxTokens = 24;
    const results = [];
    for (const decoding of ["ar", "pearl", "sd"] as const) {
      const completion = await complete({ max_tokens: maxTokens, temperature: 0, decoding });
      assert.equal(completion.object, "text_completion");
      assert.equal(completion.model, MODEL);
      assert.match(completion.id, /^cmpl-/);
      assert.equal(completion.choices.length, 1);
      const usage = assertUsage(completion.usage, {
        promptTokens: tokenizer.encode(CODE_PROMPT).length,
        maxTokens,
      });
      const choice = completion.choices[0]!;
      assert.equal(choice.finish_reason, usage.completion_tokens === maxTokens ? "length" : "stop");
      if (decoding === "ar") {
        assert.equal(usage.draft_tokens, 0);
        assert.equal(usage.mean_accepted_length, 1);
      } else {
        assert.ok(usage.draft_tokens > 0, `${decoding} drafted`);
      }
      results.push(choice.text);
    }
    assert.ok(results[0]!.length > 0);
    assert.equal(results[1], results[0]);
    assert.equal(results[2], results[0]);
  });

  test("completions: streamed pieces reassemble to the non-streamed text, with the same usage", async () => {
    const params = { max_tokens: 40, temperature: 0 };
    const whole = await complete(params);
    const streamed = await completeStreamed(params);
    assert.ok(streamed.texts.length > 1, "streamed in several pieces");
    assert.equal(streamed.texts.join(""), whole.choices[0]!.text);
    assert.equal(streamed.finishReason, whole.choices[0]!.finish_reason);
    const usage = assertUsage(streamed.usage, { maxTokens: 40 });
    assert.equal(usage.completion_tokens, whole.usage!.completion_tokens);
  });

  test("a prompt of token ids is served like its text", async () => {
    const byText = await complete({ max_tokens: 12, temperature: 0 });
    const byIds = await complete({ prompt: tokenizer.encode(CODE_PROMPT), max_tokens: 12, temperature: 0 });
    assert.equal(byIds.choices[0]!.text, byText.choices[0]!.text);
  });

  test("chat: the template renders the messages; streamed deltas equal the whole message", async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: "system", content: "add two numbers" },
      { role: "user", content: CODE_PROMPT },
    ];
    const promptTokens = tokenizer.encode(
      chatTemplate.render(messages.map((m) => ({ role: m.role, content: m.content as string }))),
      { addSpecialTokens: false },
    ).length;
    const whole = await client.chat.completions.create({
      model: MODEL,
      messages,
      max_completion_tokens: 30,
      temperature: 0,
    });
    assert.equal(whole.object, "chat.completion");
    assert.match(whole.id, /^chatcmpl-/);
    const message = whole.choices[0]!.message;
    assert.equal(message.role, "assistant");
    assert.ok((message.content ?? "").length > 0);
    assertUsage(whole.usage, { promptTokens, maxTokens: 30 });

    const stream = await client.chat.completions.create({
      model: MODEL,
      messages,
      max_tokens: 30,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    const deltas: OpenAI.ChatCompletionChunk.Choice.Delta[] = [];
    let finishReason: string | null = null;
    let usage: unknown;
    for await (const chunk of stream) {
      assert.equal(chunk.object, "chat.completion.chunk");
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices[0];
      if (!choice) continue;
      deltas.push(choice.delta);
      finishReason = choice.finish_reason ?? finishReason;
    }
    assert.equal(deltas[0]!.role, "assistant", "the first delta announces the role");
    assert.ok(deltas.slice(1).every((delta) => delta.role === undefined));
    assert.equal(deltas.map((delta) => delta.content ?? "").join(""), message.content);
    assert.equal(finishReason, whole.choices[0]!.finish_reason);
    assert.equal(assertUsage(usage, { promptTokens }).completion_tokens, whole.usage!.completion_tokens);
  });

  test("stop strings end the text before them, streamed or not, and end the generation", async () => {
    const full = (await complete({ max_tokens: 60, temperature: 0 })).choices[0]!.text;
    // A stop string that starts inside the text and spans several tokens.
    const stopAt = full.indexOf("(", 2);
    assert.ok(stopAt > 0, `the greedy text has a "(" to stop at: ${JSON.stringify(full)}`);
    const stop = full.slice(stopAt, stopAt + 4);
    for (const stops of [stop, ["never appears", stop]]) {
      const whole = await complete({ max_tokens: 60, temperature: 0, stop: stops });
      assert.equal(whole.choices[0]!.text, full.slice(0, stopAt));
      assert.equal(whole.choices[0]!.finish_reason, "stop");
      const usage = assertUsage(whole.usage, {});
      assert.ok(usage.completion_tokens < 60, "generation stopped at the stop string");
      const streamed = await completeStreamed({ max_tokens: 60, temperature: 0, stop: stops });
      assert.equal(streamed.texts.join(""), full.slice(0, stopAt));
      assert.equal(streamed.finishReason, "stop");
      assert.equal(assertUsage(streamed.usage, {}).completion_tokens, usage.completion_tokens);
    }
  });

  test("seeds: the same seed gives the same sampled text, in every mode", async () => {
    const params = { max_tokens: 32, temperature: 1, top_p: 0.95, seed: 1234 };
    const first = await complete({ ...params, decoding: "ar" });
    for (const decoding of ["ar", "pearl", "sd"] as const) {
      const again = await complete({ ...params, decoding });
      assert.equal(again.choices[0]!.text, first.choices[0]!.text, decoding);
    }
    const texts = new Set<string>();
    for (const seed of [1, 2, 3]) texts.add((await complete({ ...params, seed })).choices[0]!.text);
    assert.ok(texts.size > 1, "different seeds sample different texts");
  });

  test("multi-byte text (CJK, emoji) streams in pieces that reassemble exactly", async () => {
    let nonAscii = 0;
    for (const seed of [1, 2, 3]) {
      const params = { prompt: MULTIBYTE_PROMPT, max_tokens: 60, temperature: 1, seed };
      const whole = (await complete(params)).choices[0]!.text;
      const streamed = await completeStreamed(params);
      assert.equal(streamed.texts.join(""), whole, `seed ${seed}`);
      for (const piece of streamed.texts) {
        assert.ok(!/[\uD800-\uDBFF]$/.test(piece), "no piece ends in half a surrogate pair");
      }
      nonAscii += [...whole].filter((char) => char.codePointAt(0)! > 0x7f && char !== "\uFFFD").length;
    }
    assert.ok(nonAscii > 10, `the outputs hold multi-byte characters (${nonAscii})`);
  });

  test("the incremental decoder never splits a multi-byte character across pieces", () => {
    const text = "x = '😀 你好，世界 — naïve café 日本語' # ✓\n";
    const ids = tokenizer.encode(text);
    assert.equal(tokenizer.decode(ids), text);
    const splitsACharacter = ids.some((id) => tokenizer.decode([id]).includes("\uFFFD"));
    assert.ok(splitsACharacter, "some token holds only part of a character");
    for (const step of [1, 2, 3]) {
      const decoder = tokenizer.streamDecoder();
      const pieces: string[] = [];
      for (let i = 0; i < ids.length; i += step) pieces.push(decoder.push(ids.slice(i, i + step)));
      pieces.push(decoder.flush());
      assert.equal(pieces.join(""), text, `${step} token(s) at a time`);
      assert.ok(
        pieces.every((piece) => !piece.includes("\uFFFD")),
        "no replacement characters",
      );
    }
  });

  test("x-request-id is returned and names the request in the log lines of all three services", async () => {
    const { status, headers } = await postJson(
      "/completions",
      JSON.stringify({ model: MODEL, prompt: CODE_PROMPT, max_tokens: 8, temperature: 0, decoding: "pearl" }),
      { "x-request-id": "openai-test-42" },
    );
    assert.equal(status, 200);
    assert.equal(headers.get("x-request-id"), "openai-test-42");
    const generated = await postJson(
      "/completions",
      JSON.stringify({ model: MODEL, prompt: "x", max_tokens: 2 }),
    );
    assert.match(generated.headers.get("x-request-id") ?? "", /^[0-9a-f-]{36}$/, "one is made up");
    const deadline = Date.now() + 5000;
    let record: Record<string, unknown> | undefined;
    while (!record && Date.now() < deadline) {
      record = serve.logRecords("request").find((line) => line.requestId === "openai-test-42");
      if (!record) await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.ok(record, "the gateway logged the request");
    assert.equal(record.mode, "pearl");
    assert.equal(record.completionTokens, 8);
    for (const key of ["promptTokens", "draftTokens", "acceptedTokens", "meanAcceptedLength", "seconds"]) {
      assert.equal(typeof record[key], "number", key);
    }
    // The draft and target log each session they served, named by the request's id.
    for (const service of ["draft", "target"]) {
      let session: Record<string, unknown> | undefined;
      while (!session && Date.now() < deadline) {
        session = serve
          .logRecords("session")
          .find((line) => line.service === service && line.requestId === "openai-test-42");
        if (!session) await new Promise((resolve) => setTimeout(resolve, 50));
      }
      assert.ok(session, `the ${service} logged the session`);
      assert.equal(typeof session.seconds, "number");
    }
  });

  test("a client that goes away cancels its generation", async () => {
    const metricsUrl = `${serve.httpUrl("gateway")}/metrics`;
    const cancelledBefore = metricValue(await (await fetch(metricsUrl)).text(), "pearl_requests_total", {
      finish_reason: "cancelled",
    });
    const abort = new AbortController();
    const response = await fetch(`${baseUrl}/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: MODEL,
        prompt: CODE_PROMPT,
        max_tokens: 400,
        temperature: 0,
        stream: true,
      }),
      signal: abort.signal,
    });
    const reader = response.body!.getReader();
    await reader.read();
    abort.abort();
    const deadline = Date.now() + 5000;
    let metrics = "";
    do {
      await new Promise((resolve) => setTimeout(resolve, 50));
      metrics = await (await fetch(metricsUrl)).text();
    } while (
      metricValue(metrics, "pearl_requests_total", { finish_reason: "cancelled" }) === cancelledBefore &&
      Date.now() < deadline
    );
    assert.equal(
      metricValue(metrics, "pearl_requests_total", { finish_reason: "cancelled" }),
      cancelledBefore + 1,
    );
    assert.equal(metricValue(metrics, "pearl_requests_running_requests"), 0);
  });

  describe("bad input: an OpenAI error body naming the problem, and the server keeps serving", () => {
    const valid = { model: MODEL, prompt: CODE_PROMPT, max_tokens: 4 };
    const chat = { model: MODEL, messages: [{ role: "user", content: "x = 1" }] };
    const cases: {
      name: string;
      path?: string;
      body: string;
      headers?: Record<string, string>;
      status?: number;
      param: string | null;
      code?: string;
      message: RegExp;
    }[] = [
      {
        name: "malformed JSON",
        body: '{"model": "target", "prompt": ',
        param: null,
        message: /not valid JSON/,
      },
      { name: "empty body", body: "", param: null, message: /not valid JSON/ },
      { name: "a JSON list", body: "[1, 2]", param: null, message: /must be a JSON object/ },
      { name: "missing model", body: JSON.stringify({ prompt: "x" }), param: "model", message: /model/ },
      { name: "missing prompt", body: JSON.stringify({ model: MODEL }), param: "prompt", message: /prompt/ },
      {
        name: "missing messages",
        path: "/chat/completions",
        body: JSON.stringify({ model: MODEL }),
        param: "messages",
        message: /messages/,
      },
      {
        name: "empty messages",
        path: "/chat/completions",
        body: JSON.stringify({ ...chat, messages: [] }),
        param: "messages",
        message: /must not be empty/,
      },
      {
        name: "a message without a role",
        path: "/chat/completions",
        body: JSON.stringify({ ...chat, messages: [{ content: "x" }] }),
        param: "messages[0].role",
        message: /role/,
      },
      {
        name: "prompt of the wrong type",
        body: JSON.stringify({ ...valid, prompt: 42 }),
        param: "prompt",
        message: /prompt must be/,
      },
      {
        name: "max_tokens of the wrong type",
        body: JSON.stringify({ ...valid, max_tokens: "10" }),
        param: "max_tokens",
        message: /must be a number/,
      },
      {
        name: "stream of the wrong type",
        body: JSON.stringify({ ...valid, stream: "yes" }),
        param: "stream",
        message: /boolean/,
      },
      {
        name: "max_tokens beyond the context",
        body: JSON.stringify({ ...valid, max_tokens: 600 }),
        param: "max_tokens",
        message: /maximum context length is 512/,
      },
      {
        name: "a prompt longer than the context",
        body: JSON.stringify({ ...valid, prompt: "word ".repeat(2000) }),
        param: "prompt",
        message: /maximum context length is 512/,
      },
      {
        name: "unknown model",
        body: JSON.stringify({ ...valid, model: "gpt-4" }),
        param: "model",
        code: "model_not_found",
        message: /does not exist: this server serves `pearl-code`/,
      },
      {
        name: "negative temperature",
        body: JSON.stringify({ ...valid, temperature: -0.5 }),
        param: "temperature",
        message: />= 0/,
      },
      { name: "top_p 0", body: JSON.stringify({ ...valid, top_p: 0 }), param: "top_p", message: /> 0/ },
      {
        name: "top_p above 1",
        body: JSON.stringify({ ...valid, top_p: 1.5 }),
        param: "top_p",
        message: /<= 1/,
      },
      {
        name: "top_k below -1",
        body: JSON.stringify({ ...valid, top_k: -2 }),
        param: "top_k",
        message: /top_k must be an integer >= 0 \(0 or -1: no top-k cut\), got -2/,
      },
      {
        // Past the wire's int32 (and a temperature past its 32-bit float): refused, not sent.
        name: "a top_k of 1e20",
        body: JSON.stringify({ ...valid, top_k: 1e20 }),
        param: "top_k",
        message: /at most 2147483647/,
      },
      {
        name: "a temperature of 1e308",
        body: JSON.stringify({ ...valid, temperature: 1e308 }),
        param: "temperature",
        message: /32-bit float/,
      },
      {
        name: "a fractional top_k",
        body: JSON.stringify({ ...valid, top_k: 2.5 }),
        param: "top_k",
        message: /integer/,
      },
      {
        name: "a negative seed",
        body: JSON.stringify({ ...valid, seed: -1 }),
        param: "seed",
        message: /seed/,
      },
      {
        // JSON has no NaN: the closest a client comes is a string.
        name: 'temperature "NaN"',
        body: JSON.stringify({ ...valid, temperature: "NaN" }),
        param: "temperature",
        message: /temperature must be a number, got string "NaN"/,
      },
      {
        name: "a bare NaN (not JSON)",
        body: `{"model": "${MODEL}", "prompt": "x", "temperature": NaN}`,
        param: null,
        message: /not valid JSON/,
      },
      {
        name: "five stop strings",
        body: JSON.stringify({ ...valid, stop: ["a", "b", "c", "d", "e"] }),
        param: "stop",
        message: /at most 4/,
      },
      { name: "n = 0", body: JSON.stringify({ ...valid, n: 0 }), param: "n", message: />= 1/ },
      {
        name: "best_of below n",
        body: JSON.stringify({ ...valid, n: 3, best_of: 2 }),
        param: "best_of",
        message: />= 3/,
      },
      {
        name: "best_of with stream",
        body: JSON.stringify({ ...valid, best_of: 2, stream: true }),
        param: "best_of",
        message: /stream/,
      },
      {
        name: "logprobs above 20",
        body: JSON.stringify({ ...valid, logprobs: 21 }),
        param: "logprobs",
        message: /<= 20/,
      },
      {
        name: "max_tokens 0 without echo",
        body: JSON.stringify({ ...valid, max_tokens: 0 }),
        param: "max_tokens",
        message: />= 1/,
      },
      {
        name: "echo in chat",
        path: "/chat/completions",
        body: JSON.stringify({ ...chat, echo: true }),
        param: "echo",
        message: /echo/,
      },
      {
        name: "top_logprobs without logprobs",
        path: "/chat/completions",
        body: JSON.stringify({ ...chat, top_logprobs: 2 }),
        param: "top_logprobs",
        message: /logprobs: true/,
      },
      {
        name: "unknown decoding mode",
        body: JSON.stringify({ ...valid, decoding: "fast" }),
        param: "decoding",
        message: /"pearl", "sd", "ar"/,
      },
      {
        name: "JSON sent as text/plain",
        body: JSON.stringify(valid),
        headers: { "content-type": "text/plain" },
        param: null,
        message: /Content-Type: application\/json/,
      },
      {
        name: "a form instead of JSON",
        body: "model=target&prompt=x",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        status: 415,
        param: null,
        message: /Content-Type: application\/json/,
      },
      {
        name: "a malformed x-request-id",
        body: JSON.stringify(valid),
        headers: { "x-request-id": "has spaces in it" },
        param: "x-request-id",
        message: /visible ASCII/,
      },
      {
        name: "a body over the size limit",
        body: JSON.stringify({ ...valid, prompt: "x".repeat(5 * 1024 * 1024) }),
        status: 413,
        param: null,
        message: /larger than the limit/,
      },
    ];
    for (const testCase of cases) {
      test(testCase.name, async () => {
        const { status, body } = await postJson(
          testCase.path ?? "/completions",
          testCase.body,
          testCase.headers,
        );
        assert.equal(status, testCase.status ?? 400);
        const error = (
          body as { error: { message: string; type: string; param: string | null; code: string | null } }
        ).error;
        assert.equal(error.type, "invalid_request_error");
        assert.equal(error.param, testCase.param);
        assert.match(error.message, testCase.message);
        if (testCase.code !== undefined) assert.equal(error.code, testCase.code);
      });
    }

    test("the openai client reports the error as a BadRequestError", async () => {
      await assert.rejects(complete({ temperature: -1 }), (error: unknown) => {
        assert.ok(error instanceof OpenAI.BadRequestError);
        assert.equal(error.status, 400);
        assert.equal(error.param, "temperature");
        return true;
      });
    });

    test("top_k -1 turns the top-k cut off, and a temperature above OpenAI's 2 is taken", async () => {
      const text = async (fields: Record<string, number>): Promise<string> => {
        const { status, body } = await postJson("/completions", JSON.stringify({ ...valid, ...fields }));
        assert.equal(status, 200, JSON.stringify(body));
        return (body as { choices: { text: string }[] }).choices[0]!.text;
      };
      const sampled = { max_tokens: 6, temperature: 0.9, seed: 3 };
      assert.equal(await text({ ...sampled, top_k: -1 }), await text({ ...sampled, top_k: 0 }));
      await text({ temperature: 2.5, seed: 3 });
    });

    test("after all of them a good request succeeds", async () => {
      const completion = await complete({ max_tokens: 4, temperature: 0 });
      assert.equal(completion.usage!.completion_tokens, 4);
    });
  });
});

describe("OpenAI REST API with a served model name, without a chat template, and without a target", () => {
  test("--served-model-name names the model; chat answers 400 without a template; with the target gone, requests get 503 and the gateway lives", async () => {
    // The gateway gets the tokenizer from a folder with no chat template in it.
    const servedName = "my-coder";
    const tokenizerDir = mkdtempSync(join(tmpdir(), "pearl-no-template-"));
    copyFileSync(join(EMBEDDED_MODELS, "target", "tokenizer.json"), join(tokenizerDir, "tokenizer.json"));
    const stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
      gatewayArgs: ["--tokenizer", tokenizerDir, "--served-model-name", servedName],
    });
    try {
      const client = new OpenAI({
        baseURL: `http://127.0.0.1:${stack.gateway.httpPort}/v1`,
        apiKey: "unused",
        maxRetries: 0,
      });
      assert.deepEqual(
        (await client.models.list()).data.map((model) => model.id),
        [servedName],
      );
      // The target's folder name is not the served name.
      await assert.rejects(
        client.completions.create({ model: "target", prompt: CODE_PROMPT, max_tokens: 3 }),
        (error: unknown) => {
          assert.ok(error instanceof OpenAI.BadRequestError);
          assert.equal(error.code, "model_not_found");
          assert.equal(error.param, "model");
          return true;
        },
      );
      await assert.rejects(
        client.chat.completions.create({ model: servedName, messages: [{ role: "user", content: "x" }] }),
        (error: unknown) => {
          assert.ok(error instanceof OpenAI.BadRequestError);
          assert.match(error.message, /no chat template/);
          return true;
        },
      );
      const completion = await client.completions.create({
        model: servedName,
        prompt: CODE_PROMPT,
        max_tokens: 3,
        temperature: 0,
      });
      assert.equal(completion.usage!.completion_tokens, 3);
      assert.equal(completion.model, servedName);

      stack.target.process.child.kill("SIGKILL");
      await stack.target.process.exited;
      await assert.rejects(
        client.completions.create({ model: servedName, prompt: CODE_PROMPT, max_tokens: 3 }),
        (error: unknown) => {
          assert.ok(error instanceof OpenAI.APIError);
          assert.equal(error.status, 503);
          return true;
        },
      );
      const health = await fetch(`http://127.0.0.1:${stack.gateway.httpPort}/health`);
      assert.equal(health.status, 503);
      const models = await client.models.list();
      assert.equal(models.data[0]!.id, servedName, "the gateway still answers");
    } finally {
      await stack.stop();
      rmSync(tokenizerDir, { recursive: true, force: true });
    }
  });
});
