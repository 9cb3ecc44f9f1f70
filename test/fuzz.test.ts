// A battery of bad requests against the gateway's REST and gRPC APIs on a real stack: malformed JSON and
// protobuf, wrong types, huge and negative numbers, unknown fields, invalid UTF-8, 10 MB bodies, 10k-item
// stop lists and slowloris-style slow clients. Every bad case must get a client error (4xx in OpenAI's
// shape; INVALID_ARGUMENT or RESOURCE_EXHAUSTED), and afterwards the stack must still serve, with no
// session or KV block left on either service. Unknown fields on an otherwise valid request are ignored
// (as vLLM and the OpenAI clients expect), so those cases must succeed.
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Client, credentials, Metadata, status } from "@grpc/grpc-js";
import { GenerateRequest } from "../proto/gen/pearl/v1/gateway.js";
import { RawConnection, request } from "./helpers/http.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";
import { generateRequest, Stack } from "./helpers/stack.js";

const MODEL = "target";
const BODY_TIMEOUT_SECONDS = 2;
const VALID_COMPLETION = { model: MODEL, prompt: "def f():", max_tokens: 2 };
const VALID_CHAT = { model: MODEL, messages: [{ role: "user", content: "def f():" }], max_tokens: 2 };
const TEN_MB = 10 * 1024 * 1024;

interface RestCase {
  name: string;
  path?: string;
  method?: string;
  body?: string | Buffer;
  headers?: Record<string, string>;
  /** Default: any 4xx in OpenAI's error shape. */
  expect?: "ok" | number;
}

/** Each field of a valid body replaced by each value that is wrong for it. */
function wrongFields(
  base: Record<string, unknown>,
  path: string,
  fields: Record<string, unknown[]>,
): RestCase[] {
  return Object.entries(fields).flatMap(([field, values]) =>
    values.map((value) => ({
      name: `${path} ${field} = ${JSON.stringify(value)?.slice(0, 40)}`,
      path,
      body: JSON.stringify({ ...base, [field]: value }),
    })),
  );
}

const NUMBERS_OUT_OF_RANGE = [-1, -1e308, 1e308, 2 ** 53 + 2, 1.5, "1", true, [], {}];

function restCases(): RestCase[] {
  const shared: Record<string, unknown[]> = {
    model: [1, true, [], {}, "another-model", ""],
    max_tokens: [0, 100_000, ...NUMBERS_OUT_OF_RANGE],
    // No upper bound but the wire's 32-bit float (lib/sampling_params.ts): 2.5 is a valid temperature.
    temperature: [-0.1, -1e308, 1e308, "0", [], {}],
    top_p: [0, -1, 1.5, 1e308, "1", {}],
    top_k: [-2, 1.5, 1e20, "3"],
    seed: [-1, 1.5, 2 ** 64, -1e308, "1", {}],
    stream: ["yes", 1, [], {}],
    stream_options: [[], "x", 5, { include_usage: "yes" }],
    stop: [
      5,
      [1],
      [""],
      "",
      {},
      [null],
      ["a", 5],
      ["a", "b", "c", "d", "e"],
      Array.from({ length: 10_000 }, (_, i) => `s${i}`),
    ],
    decoding: ["fast", 1, [], {}],
    n: [0, -1, 1.5, 129, "1"],
    presence_penalty: [1, -2],
    frequency_penalty: [0.5],
    logit_bias: [{ "1": 5 }],
    tools: [[{ type: "function" }]],
    response_format: [{ type: "json_object" }, "text"],
  };
  const completion = wrongFields(VALID_COMPLETION, "/v1/completions", {
    ...shared,
    prompt: [5, true, {}, [], [[]], [1.5], [-1], [6144], [1e12], ["a", ""], [null], "", [[1, 2], []], null],
    logprobs: [true, 21, -1, "5"],
    echo: ["yes", 1],
    suffix: ["x"],
    best_of: [0, 129, "3"],
  });
  const chat = wrongFields(VALID_CHAT, "/v1/chat/completions", {
    ...shared,
    messages: [
      "hi",
      [],
      [{}],
      [null],
      [[]],
      [{ role: "x", content: "a" }],
      [{ role: "user", content: 5 }],
      [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }],
      [{ role: "user", content: [{ type: "text", text: 5 }] }],
      [{ role: "user", content: "a", name: 5 }],
      null,
    ],
    max_completion_tokens: [-5, 1e308],
    logprobs: [5, "yes"],
    // 2 without logprobs: true.
    top_logprobs: [2, 21, -1],
    echo: [true],
    best_of: [2],
  });
  const malformed = [
    "{",
    "}",
    '{"model":',
    "[1,2",
    "nul",
    "{'model': 'x'}",
    '{"model": "x",}',
    '{"model": "x"} trailing',
    "",
    " ",
    "\u0000",
    "NaN",
    '{"max_tokens": NaN}',
    '{"max_tokens": Infinity}',
    '{"max_tokens": 01}',
    '"just a string"',
    "123",
    "[]",
    "null",
    "true",
    "[".repeat(100_000) + "]".repeat(100_000),
    '{"a":'.repeat(50_000) + "1" + "}".repeat(50_000),
    "1".repeat(100_000),
    '{"max_tokens": 1e400, "model": "target", "prompt": "x"}',
    `{"__proto__": {"polluted": 1}, "model": "${MODEL}", "prompt": "x", "max_tokens": 1}`,
    `{"constructor": {"prototype": {"polluted": 1}}, "model": "${MODEL}", "prompt": "x"}`,
  ].map((body, i): RestCase => ({ name: `malformed JSON #${i}`, path: "/v1/completions", body }));
  const utf8 = [
    [0xff],
    [0xfe, 0xff],
    [0xc0, 0xaf],
    [0xed, 0xa0, 0x80],
    [0xe2, 0x82],
    [0x80],
    [0xf8, 0x88, 0x80, 0x80, 0x80],
    [0xf4, 0x90, 0x80, 0x80],
  ].flatMap((bytes, i): RestCase[] =>
    ["/v1/completions", "/v1/chat/completions"].map((path) => {
      const template =
        path === "/v1/completions"
          ? '{"model":"target","prompt":"a@b","max_tokens":1}'
          : '{"model":"target","messages":[{"role":"user","content":"a@b"}],"max_tokens":1}';
      const [head, tail] = template.split("@") as [string, string];
      return {
        name: `invalid UTF-8 #${i} on ${path}`,
        path,
        body: Buffer.concat([Buffer.from(head), Buffer.from(bytes), Buffer.from(tail)]),
      };
    }),
  );
  const surrogates = ["\\ud800", "\\udc00", "\\ud800\\ud800", "x\\udfffy"].map((escape, i): RestCase => ({
    name: `lone surrogate #${i}`,
    path: "/v1/completions",
    body: `{"model":"target","prompt":"a${escape}b","max_tokens":1}`,
  }));
  const big: RestCase[] = [
    {
      name: "10 MB prompt",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, prompt: "x".repeat(TEN_MB) }),
      expect: 413,
    },
    { name: "10 MB of garbage", path: "/v1/chat/completions", body: Buffer.alloc(TEN_MB, 0x7b), expect: 413 },
    {
      name: "10 MB of token ids",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, prompt: Array.from({ length: TEN_MB / 4 }, () => 70) }),
      expect: 413,
    },
    {
      name: "100k-token prompt under the body limit",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, prompt: Array.from({ length: 100_000 }, () => 70) }),
    },
    {
      name: "1 MB text prompt under the body limit",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, prompt: "def f():\n".repeat(110_000) }),
    },
    {
      name: "10k chat messages",
      path: "/v1/chat/completions",
      body: JSON.stringify({
        ...VALID_CHAT,
        messages: Array.from({ length: 10_000 }, () => ({ role: "user", content: "def f():" })),
      }),
    },
  ];
  const transport: RestCase[] = [
    {
      name: "text/plain body",
      path: "/v1/completions",
      body: JSON.stringify(VALID_COMPLETION),
      headers: { "content-type": "text/plain" },
    },
    {
      name: "XML content type",
      path: "/v1/completions",
      body: "<a/>",
      headers: { "content-type": "application/xml" },
    },
    { name: "GET on a POST endpoint", path: "/v1/completions", method: "GET" },
    {
      name: "PUT on a POST endpoint",
      path: "/v1/chat/completions",
      method: "PUT",
      body: JSON.stringify(VALID_CHAT),
    },
    { name: "DELETE a model", path: "/v1/models/target", method: "DELETE" },
    { name: "an unknown endpoint", path: "/v1/embeddings", body: "{}" },
    { name: "a path outside the API", path: "/v2/completions", body: "{}" },
    { name: "a path that climbs out", path: "/v1/../../etc/passwd", method: "GET" },
    { name: "a percent-encoding that is not UTF-8", path: "/v1/models/%ff", method: "GET" },
    { name: "an unknown model", path: "/v1/models/nope", method: "GET" },
    {
      name: "a request id with spaces",
      path: "/v1/completions",
      body: JSON.stringify(VALID_COMPLETION),
      headers: { "x-request-id": "a b" },
    },
    {
      name: "a request id of 200 characters",
      path: "/v1/completions",
      body: JSON.stringify(VALID_COMPLETION),
      headers: { "x-request-id": "r".repeat(200) },
    },
    {
      name: "a 20 kB header",
      path: "/v1/models",
      method: "GET",
      headers: { "x-filler": "f".repeat(20_000) },
      expect: 431,
    },
    {
      name: "unknown fields with a bad value",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, max_tokens: -1, whatever: { deep: [1, 2] } }),
    },
  ];
  // vLLM's endpoints beside /v1 take JSON the same way.
  const tokenizing: RestCase[] = [
    { name: "/tokenize without a prompt", path: "/tokenize", body: JSON.stringify({ model: MODEL }) },
    { name: "/tokenize of a number", path: "/tokenize", body: JSON.stringify({ prompt: 5 }) },
    { name: "/tokenize of malformed JSON", path: "/tokenize", body: '{"prompt": ' },
    { name: "/tokenize of a lone surrogate", path: "/tokenize", body: '{"prompt": "a\\ud800b"}' },
    { name: "/detokenize of a negative id", path: "/detokenize", body: JSON.stringify({ tokens: [-1] }) },
    {
      name: "/detokenize past the vocabulary",
      path: "/detokenize",
      body: JSON.stringify({ tokens: [1e12] }),
    },
  ];
  const unknownButValid: RestCase[] = [
    {
      name: "unknown scalar fields",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, foo: 1, bar: "x", baz: null }),
      expect: "ok",
    },
    {
      name: "unknown nested fields",
      path: "/v1/chat/completions",
      body: JSON.stringify({ ...VALID_CHAT, metadata: { a: [1, { b: 2 }] }, user: "u" }),
      expect: "ok",
    },
    {
      name: "an unknown field holding 100k items",
      path: "/v1/completions",
      body: JSON.stringify({ ...VALID_COMPLETION, extra: Array.from({ length: 100_000 }, (_, i) => i) }),
      expect: "ok",
    },
  ];
  return [
    ...completion,
    ...chat,
    ...malformed,
    ...utf8,
    ...surrogates,
    ...big,
    ...transport,
    ...tokenizing,
    ...unknownButValid,
  ];
}

// ---- protobuf by hand: what a well-behaved client library would never send ---------------------------

function varint(value: bigint): number[] {
  const bytes: number[] = [];
  let rest = BigInt.asUintN(64, value);
  do {
    let byte = Number(rest & 0x7fn);
    rest >>= 7n;
    if (rest > 0n) byte |= 0x80;
    bytes.push(byte);
  } while (rest > 0n);
  return bytes;
}

const key = (field: number, wireType: number): number[] => varint(BigInt((field << 3) | wireType));
const lengthDelimited = (field: number, bytes: number[] | Buffer): number[] => [
  ...key(field, 2),
  ...varint(BigInt(bytes.length)),
  ...bytes,
];
const PROMPT_IDS = lengthDelimited(3, [...varint(70n), ...varint(71n)]);

interface GrpcCase {
  name: string;
  bytes: Buffer;
  metadata?: Record<string, string>;
  /** Default INVALID_ARGUMENT. */
  expect?: number | "ok";
}

function encoded(request: Partial<GenerateRequest>): Buffer {
  return Buffer.from(GenerateRequest.encode(generateRequest(request)).finish());
}

function grpcCases(): GrpcCase[] {
  let state = 99;
  const random = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 4294967296;
  };
  const garbage = Array.from({ length: 8 }, (_, i): GrpcCase => ({
    name: `random bytes #${i}`,
    bytes: Buffer.from(
      Array.from({ length: 1 + Math.floor(random() * 200) }, () => Math.floor(random() * 256)),
    ),
  }));
  const raw: [string, number[]][] = [
    ["a truncated varint", [0x20, 0xff]],
    ["a length past the end", [...key(2, 2), ...varint(1000n), 0x61, 0x62]],
    ["wire type 6", [0x16, 0x01]],
    ["wire type 7", [0x1f, 0x01]],
    ["an end-group without a start", [0x1c]],
    ["prompt as a varint", [...key(2, 0), 0x05]],
    ["prompt ids as fixed64", [...key(3, 1), 1, 0, 0, 0, 0, 0, 0, 0]],
    ["a negative prompt id", lengthDelimited(3, varint(-1n))],
    ["a prompt id past the vocabulary", lengthDelimited(3, varint(6144n))],
    ["a prompt id of 2^31-1", lengthDelimited(3, varint(2n ** 31n - 1n))],
    ["max_tokens -1", [...PROMPT_IDS, ...key(4, 0), ...varint(-1n)]],
    ["seed 2^64-1", [...PROMPT_IDS, ...key(8, 0), ...varint(2n ** 64n - 1n)]],
    ["mode 99", [...PROMPT_IDS, ...key(9, 0), ...varint(99n)]],
    ["mode -1", [...PROMPT_IDS, ...key(9, 0), ...varint(-1n)]],
    ["only an unknown field", [...key(99, 0), 0x01]],
    ["invalid UTF-8 in the prompt", lengthDelimited(2, [0x61, 0xff, 0x62])],
    ["a UTF-16 surrogate in UTF-8 in the prompt", lengthDelimited(2, [0xed, 0xa0, 0x80])],
    ["invalid UTF-8 in the request id", [...PROMPT_IDS, ...lengthDelimited(1, [0xc0, 0xaf])]],
    ["invalid UTF-8 in a stop string", [...PROMPT_IDS, ...lengthDelimited(11, [0xe2, 0x82])]],
    ["an empty message", []],
  ];
  const typed: [string, Partial<GenerateRequest>][] = [
    ["prompt and prompt ids", { prompt: "x", promptTokenIds: [70] }],
    ["a prompt of 100k ids", { promptTokenIds: Array.from({ length: 100_000 }, () => 70) }],
    ["a 1 MB text prompt", { prompt: "def f():\n".repeat(110_000) }],
    ["temperature NaN", { promptTokenIds: [70], temperature: Number.NaN }],
    ["temperature -1", { promptTokenIds: [70], temperature: -1 }],
    ["temperature Infinity", { promptTokenIds: [70], temperature: Number.POSITIVE_INFINITY }],
    ["top_p 0", { promptTokenIds: [70], topP: 0 }],
    ["top_p NaN", { promptTokenIds: [70], topP: Number.NaN }],
    ["top_p 2", { promptTokenIds: [70], topP: 2 }],
    ["top_k -2", { promptTokenIds: [70], topK: -2 }],
    ["top_logprobs 21", { promptTokenIds: [70], topLogprobs: 21 }],
    ["draft temperature -1", { promptTokenIds: [70], draftTemperature: -1 }],
    ["draft temperature NaN", { promptTokenIds: [70], draftTemperature: Number.NaN }],
    ["a request id of 200 characters", { promptTokenIds: [70], requestId: "r".repeat(200) }],
    ["a request id with a newline", { promptTokenIds: [70], requestId: "a\nb" }],
    ["10k stop strings", { prompt: "x", stop: Array.from({ length: 10_000 }, (_, i) => `s${i}`) }],
    ["an empty stop string", { prompt: "x", stop: [""] }],
    ["a stop string of 2000 characters", { prompt: "x", stop: ["s".repeat(2000)] }],
  ];
  return [
    ...garbage,
    ...raw.map(([name, bytes]) => ({ name, bytes: Buffer.from(bytes) })),
    ...typed.map(([name, request]) => ({ name, bytes: encoded(request) })),
    { name: "a 10 MB message", bytes: Buffer.alloc(TEN_MB, 0x08), expect: status.RESOURCE_EXHAUSTED },
    { name: "a bad x-request-id", bytes: Buffer.from(PROMPT_IDS), metadata: { "x-request-id": "a b" } },
    {
      name: "an unknown field next to a valid request",
      bytes: Buffer.from([...PROMPT_IDS, ...key(4, 0), 2, ...key(77, 2), 1, 0x41]),
      expect: "ok",
    },
  ];
}

describe("fuzz battery", () => {
  let stack: Stack;

  before(async () => {
    stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
      gatewayArgs: [
        "--tokenizer",
        join(EMBEDDED_MODELS, "target"),
        "--body-timeout",
        String(BODY_TIMEOUT_SECONDS),
      ],
    });
  });

  after(async () => {
    await stack?.stop();
  });

  async function stillServing(): Promise<void> {
    const ok = await request(`${stack.gatewayUrl}/v1/completions`, {
      body: JSON.stringify(VALID_COMPLETION),
    });
    assert.equal(ok.status, 200, ok.text);
    assert.equal(stack.gateway.process.child.exitCode, null, "the gateway is alive");
  }

  test("REST: every bad request gets a 4xx in OpenAI's shape", async (t) => {
    const cases = restCases();
    for (const [i, testCase] of cases.entries()) {
      const response = await request(`${stack.gatewayUrl}${testCase.path}`, {
        method: testCase.method,
        body: testCase.body,
        headers: testCase.headers,
      }).catch((error: Error) => {
        throw new Error(`${testCase.name}: ${error.message}`);
      });
      const what = `${testCase.name}: ${response.status} ${response.text.slice(0, 200)}`;
      if (testCase.expect === "ok") {
        assert.equal(response.status, 200, what);
        continue;
      }
      if (typeof testCase.expect === "number") assert.equal(response.status, testCase.expect, what);
      else assert.ok(response.status >= 400 && response.status < 500, what);
      // Node itself answers an oversized header block, before any route.
      if (response.status !== 431) {
        const { error } = response.json() as { error: Record<string, unknown> };
        assert.deepEqual(Object.keys(error).sort(), ["code", "message", "param", "type"], what);
        assert.equal(typeof error.message, "string", what);
      }
      if (i % 40 === 39) await stillServing();
    }
    await stillServing();
    t.diagnostic(`REST cases: ${cases.length}`);
  });

  test("gRPC: every bad message gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED", async (t) => {
    const client = new Client(stack.gateway.address, credentials.createInsecure());
    const identity = (bytes: Buffer): Buffer => bytes;
    const call = (
      testCase: GrpcCase,
      path = "/pearl.v1.Gateway/Generate",
    ): Promise<{ code: number; details: string }> =>
      new Promise((resolve) => {
        const metadata = new Metadata();
        for (const [name, value] of Object.entries(testCase.metadata ?? {})) metadata.set(name, value);
        const stream = client.makeServerStreamRequest(path, identity, identity, testCase.bytes, metadata, {});
        stream.on("data", () => undefined);
        stream.on("error", (error: { code: number; details: string }) => resolve(error));
        stream.on("end", () => resolve({ code: status.OK, details: "" }));
      });
    const cases = grpcCases();
    try {
      for (const testCase of cases) {
        const { code, details } = await call(testCase);
        const what = `${testCase.name}: ${status[code]} ${details}`;
        if (testCase.expect === "ok") assert.equal(code, status.OK, what);
        else assert.equal(code, testCase.expect ?? status.INVALID_ARGUMENT, what);
      }
      // Info decodes strictly too.
      const info = await new Promise<{ code: number }>((resolve) =>
        client.makeUnaryRequest(
          "/pearl.v1.Gateway/Info",
          identity,
          identity,
          Buffer.from([0x16, 0x01]),
          (error) => resolve({ code: error?.code ?? status.OK }),
        ),
      );
      assert.equal(info.code, status.INVALID_ARGUMENT);
      const unknown = await call(
        { name: "an unknown method", bytes: Buffer.alloc(0) },
        "/pearl.v1.Gateway/Nope",
      );
      assert.equal(unknown.code, status.UNIMPLEMENTED);
    } finally {
      client.close();
    }
    await stillServing();
    t.diagnostic(`gRPC cases: ${cases.length + 2}`);
  });

  test("slowloris: slow headers and slow bodies get 408 and are closed; others are served meanwhile", async (t) => {
    const port = stack.gateway.httpPort;
    const opened = performance.now();
    const slowHeaders = Array.from({ length: 10 }, () => {
      const connection = new RawConnection(port);
      connection.write("POST /v1/completions HTTP/1.1\r\nHost: x\r\n");
      return connection;
    });
    const slowBodies = Array.from({ length: 10 }, () => {
      const connection = new RawConnection(port);
      connection.write(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{",
      );
      return connection;
    });
    const drip = setInterval(() => {
      for (const connection of slowHeaders) connection.write("X-Drip: 1\r\n");
      for (const connection of slowBodies) connection.write(" ");
    }, 300);
    try {
      await stillServing();
      const closedAt = await Promise.all(
        [...slowHeaders, ...slowBodies].map((connection) => connection.closed),
      );
      for (const [i, connection] of [...slowHeaders, ...slowBodies].entries()) {
        assert.equal(connection.status(), 408, connection.response);
        // The timeout, plus Node's check interval and a margin for a busy machine.
        assert.ok(
          closedAt[i]! - opened < BODY_TIMEOUT_SECONDS * 1000 + 2000,
          `closed after ${closedAt[i]! - opened} ms`,
        );
      }
    } finally {
      clearInterval(drip);
      for (const connection of [...slowHeaders, ...slowBodies]) connection.destroy();
    }
    await stillServing();
    t.diagnostic("slowloris cases: 20 connections");
  });

  test("after the battery no session or KV block is left on either service", async () => {
    await stack.kvReleased(1000);
  });
});
