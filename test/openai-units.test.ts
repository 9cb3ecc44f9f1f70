// The pieces of the OpenAI API that need no server: stop-string matching over streamed text, chat
// templates as Hugging Face ships them, and request validation.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { ChatTemplate, ChatTemplateError } from "../lib/chat_template.js";
import { StopStringMatcher } from "../services/gateway/stop_strings.js";
import {
  OpenAIError,
  parseChatCompletionRequest,
  parseCompletionRequest,
} from "../services/gateway/openai_schema.js";

/** Feeds `pieces` through a matcher; returns what a client would have seen, piece by piece. */
function scan(stops: string[], pieces: string[]): { seen: string[]; stopped: boolean } {
  const matcher = new StopStringMatcher(stops);
  const seen: string[] = [];
  for (const piece of pieces) {
    const result = matcher.push(piece);
    seen.push(result.text);
    if (result.stopped) return { seen, stopped: true };
  }
  seen.push(matcher.flush());
  return { seen, stopped: false };
}

describe("stop strings", () => {
  test("the text ends just before the first stop string, even one split across pieces", () => {
    assert.deepEqual(scan(["END"], ["abc E", "N", "D tail"]), { seen: ["abc ", "", ""], stopped: true });
    assert.deepEqual(scan(["\n\n", "return"], ["x = 1\n", "ret", "urn\n\n"]), {
      seen: ["x = 1", "\n", ""],
      stopped: true,
    });
  });

  test("of several stop strings the earliest in the text wins", () => {
    assert.deepEqual(scan(["cd", "b"], ["abcd"]), { seen: ["a"], stopped: true });
  });

  test("a held-back tail that does not become a stop string is released", () => {
    assert.deepEqual(scan(["ENDX"], ["abc EN", "D", " more"]), {
      seen: ["abc ", "", "END more", ""],
      stopped: false,
    });
    assert.deepEqual(scan(["ENDX"], ["abc END"]), { seen: ["abc ", "END"], stopped: false });
  });

  test("multi-byte stop strings", () => {
    assert.deepEqual(scan(["😀"], ["你好", "😀", "世界"]), { seen: ["你好", ""], stopped: true });
    assert.deepEqual(scan(["世界!"], ["你好世", "界", "?"]), {
      seen: ["你好", "", "世界?", ""],
      stopped: false,
    });
  });

  test("an empty stop string is refused", () => {
    assert.throws(() => new StopStringMatcher(["a", ""]), /must not be empty/);
  });
});

describe("chat templates", () => {
  const folders: string[] = [];
  after(() => folders.forEach((folder) => rmSync(folder, { recursive: true, force: true })));

  function modelFolder(files: Record<string, unknown>): string {
    const folder = mkdtempSync(join(tmpdir(), "pearl-chat-template-"));
    folders.push(folder);
    for (const [name, content] of Object.entries(files)) {
      writeFileSync(join(folder, name), typeof content === "string" ? content : JSON.stringify(content));
    }
    return folder;
  }

  const LLAMA3_LIKE =
    "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] != 'system' " +
    "and message['role'] != 'user' %}{{ raise_exception('the conversation must start with the user') }}" +
    "{% endif %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}" +
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

  test("renders messages with the special tokens (strings or AddedToken objects) and a generation prompt", () => {
    const folder = modelFolder({
      "tokenizer_config.json": {
        chat_template: LLAMA3_LIKE,
        bos_token: { __type: "AddedToken", content: "<|begin_of_text|>" },
        eos_token: "<|eot_id|>",
      },
    });
    const template = ChatTemplate.load(folder);
    assert.ok(template.available);
    assert.equal(
      template.render([
        { role: "system", content: "Be brief." },
        { role: "user", content: " Hi " },
      ]),
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    );
  });

  test("a template's raise_exception becomes a ChatTemplateError with its message", () => {
    const template = ChatTemplate.load(
      modelFolder({ "tokenizer_config.json": { chat_template: LLAMA3_LIKE } }),
    );
    assert.throws(
      () => template.render([{ role: "assistant", content: "hello" }]),
      (error: unknown) =>
        error instanceof ChatTemplateError && /must start with the user/.test(error.message),
    );
  });

  test("a list of named templates gives the default one; chat_template.jinja is read too", () => {
    const named = modelFolder({
      "tokenizer_config.json": {
        chat_template: [
          { name: "tool_use", template: "TOOLS" },
          { name: "default", template: "{% for m in messages %}[{{ m.content }}]{% endfor %}" },
        ],
      },
    });
    assert.equal(ChatTemplate.load(named).render([{ role: "user", content: "a" }]), "[a]");
    const jinja = modelFolder({
      "tokenizer_config.json": {},
      "chat_template.jinja": "{% for m in messages %}<{{ m.role }}>{% endfor %}",
    });
    assert.equal(ChatTemplate.load(jinja).render([{ role: "user", content: "a" }]), "<user>");
  });

  test("without a template, or with one that does not parse, render says why", () => {
    const missing = ChatTemplate.load(modelFolder({ "tokenizer_config.json": { eos_token: "</s>" } }));
    assert.equal(missing.available, false);
    assert.throws(() => missing.render([{ role: "user", content: "a" }]), /no chat template/);
    const broken = ChatTemplate.load(
      modelFolder({ "tokenizer_config.json": { chat_template: "{% for %}" } }),
    );
    assert.equal(broken.available, false);
    assert.throws(() => broken.render([{ role: "user", content: "a" }]), /does not parse/);
  });
});

describe("request validation", () => {
  function rejects(parse: () => unknown, param: string | null, message: RegExp): void {
    assert.throws(parse, (error: unknown) => {
      assert.ok(error instanceof OpenAIError);
      assert.equal(error.status, 400);
      assert.equal(error.param, param);
      assert.match(error.message, message);
      return true;
    });
  }

  test("completions: defaults, nulls as unset, one or several prompts", () => {
    const request = parseCompletionRequest({
      model: "m",
      prompt: ["hello"],
      seed: null,
      max_tokens: null,
      stop: "\n",
      top_k: -1,
      n: 1,
      echo: false,
      logprobs: null,
    });
    assert.deepEqual(request.prompts, ["hello"]);
    assert.equal(request.seed, undefined);
    assert.equal(request.maxTokens, undefined);
    assert.deepEqual(request.stop, ["\n"]);
    // Passed on as given: the gateway reads -1 as no top-k cut (lib/sampling_params.ts).
    assert.equal(request.topK, -1);
    assert.equal(request.stream, false);
    assert.equal(request.n, 1);
    assert.equal(request.logprobs, undefined);
    assert.equal(request.bestOf, undefined);
    assert.deepEqual(parseCompletionRequest({ model: "m", prompt: [[5, 6, 7]] }).prompts, [[5, 6, 7]]);
    assert.deepEqual(parseCompletionRequest({ model: "m", prompt: [5, 6, 7] }).prompts, [[5, 6, 7]]);
    assert.deepEqual(parseCompletionRequest({ model: "m", prompt: ["a", [1, 2]] }).prompts, ["a", [1, 2]]);
    // lm-evaluation-harness's loglikelihood request: the prompt's scores only.
    const scoring = parseCompletionRequest({
      model: "m",
      prompt: "a b",
      echo: true,
      logprobs: 1,
      max_tokens: 0,
    });
    assert.equal(scoring.maxTokens, 0);
    assert.equal(scoring.echo, true);
    assert.equal(scoring.logprobs, 1);
    assert.equal(parseCompletionRequest({ model: "m", prompt: "a", logprobs: false }).logprobs, undefined);
    assert.equal(parseCompletionRequest({ model: "m", prompt: "a", n: 2, best_of: 3 }).bestOf, 3);
  });

  test("completions: each mistake names its field", () => {
    rejects(() => parseCompletionRequest({ model: "m", prompt: ["a", ""] }), "prompt[1]", /empty/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: [1, -2] }), "prompt", /token ids/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", n: 0 }), "n", />= 1/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", n: 129 }), "n", /<= 128/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: ["a", "b"], n: 65 }), "n", /130 choices/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", n: 3, best_of: 2 }), "best_of", />= 3/);
    rejects(
      () => parseCompletionRequest({ model: "m", prompt: "a", best_of: 2, stream: true }),
      "best_of",
      /stream/,
    );
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", logprobs: 21 }), "logprobs", /<= 20/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", logprobs: true }), "logprobs", /number/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", max_tokens: 0 }), "max_tokens", />= 1/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", echo: "yes" }), "echo", /boolean/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "" }), "prompt", /empty/);
    rejects(() => parseCompletionRequest({ model: 3, prompt: "a" }), "model", /string/);
    rejects(
      () => parseCompletionRequest({ model: "m", prompt: "a", max_tokens: 2.5 }),
      "max_tokens",
      /integer/,
    );
    rejects(
      () => parseCompletionRequest({ model: "m", prompt: "a", temperature: "hot" }),
      "temperature",
      /must be a number/,
    );
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", seed: [1] }), "seed", /must be a number/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", stop: [1] }), "stop", /list of strings/);
    rejects(() => parseCompletionRequest({ model: "m", prompt: "a", stop: "" }), "stop", /empty/);
    rejects(
      () => parseCompletionRequest({ model: "m", prompt: "a", stream_options: { include_usage: true } }),
      "stream_options",
      /stream: true/,
    );
    rejects(
      () =>
        parseCompletionRequest({
          model: "m",
          prompt: "a",
          stream: true,
          stream_options: { include_usage: 1 },
        }),
      "stream_options.include_usage",
      /boolean/,
    );
    rejects(
      () => parseCompletionRequest({ model: "m", prompt: "a", presence_penalty: 0.5 }),
      "presence_penalty",
      /penalt/,
    );
  });

  test("chat: text parts are joined, developer is system, max_completion_tokens wins", () => {
    const request = parseChatCompletionRequest({
      model: "m",
      messages: [
        { role: "developer", content: "rules" },
        {
          role: "user",
          content: [
            { type: "text", text: "a" },
            { type: "text", text: "b" },
          ],
        },
      ],
      max_tokens: 5,
      max_completion_tokens: 7,
      stream: true,
      stream_options: { include_usage: true },
    });
    assert.deepEqual(request.messages, [
      { role: "system", content: "rules" },
      { role: "user", content: "ab" },
    ]);
    assert.equal(request.maxTokens, 7);
    assert.equal(request.includeUsage, true);
  });

  test("chat: each mistake names its field", () => {
    rejects(() => parseChatCompletionRequest({ model: "m", messages: "hi" }), "messages", /list/);
    rejects(
      () => parseChatCompletionRequest({ model: "m", messages: [{ role: "tool", content: "x" }] }),
      "messages[0].role",
      /role/,
    );
    rejects(
      () => parseChatCompletionRequest({ model: "m", messages: [{ role: "user", content: 5 }] }),
      "messages[0].content",
      /string or a list/,
    );
    rejects(
      () =>
        parseChatCompletionRequest({
          model: "m",
          messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }],
        }),
      "messages[0].content[0]",
      /text part/,
    );
    rejects(
      () =>
        parseChatCompletionRequest({ model: "m", messages: [{ role: "user", content: "x" }], tools: [{}] }),
      "tools",
      /tool calling/,
    );
    const messages = [{ role: "user", content: "x" }];
    rejects(
      () => parseChatCompletionRequest({ model: "m", messages, top_logprobs: 2 }),
      "top_logprobs",
      /logprobs: true/,
    );
    rejects(
      () => parseChatCompletionRequest({ model: "m", messages, logprobs: true, top_logprobs: 21 }),
      "top_logprobs",
      /<= 20/,
    );
    rejects(() => parseChatCompletionRequest({ model: "m", messages, logprobs: 2 }), "logprobs", /boolean/);
    rejects(() => parseChatCompletionRequest({ model: "m", messages, echo: true }), "echo", /echo/);
    rejects(() => parseChatCompletionRequest({ model: "m", messages, best_of: 2 }), "best_of", /use n/);
    assert.equal(parseChatCompletionRequest({ model: "m", messages, logprobs: true }).logprobs, 0);
    assert.equal(
      parseChatCompletionRequest({ model: "m", messages, logprobs: true, top_logprobs: 3 }).logprobs,
      3,
    );
    assert.equal(parseChatCompletionRequest({ model: "m", messages, n: 4 }).n, 4);
  });

  test("the body must be an object", () => {
    rejects(() => parseCompletionRequest("text"), null, /JSON object/);
    rejects(() => parseChatCompletionRequest(null), null, /JSON object/);
  });
});
