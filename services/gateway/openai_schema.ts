// The OpenAI request bodies pearl accepts, checked field by field so that every mistake is answered with
// a 400 naming the field (OpenAI's error shape: {error: {message, type, param, code}}). Unknown fields
// are ignored, as OpenAI-compatible servers do; fields that would change the answer in a way pearl does
// not implement (tools, penalties...) are refused rather than silently dropped.
import { DECODING_MODE_NAMES, type DecodingModeName, isDecodingModeName } from "../../lib/decoding_modes.js";
import type { ChatMessage } from "../../lib/chat_template.js";
import { topLogprobsProblem } from "../../lib/sampling_params.js";
import { MAX_TOP_LOGPROBS } from "./logprobs.js";

export class OpenAIError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
  }

  body(): { error: { message: string; type: string; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

export function invalidRequest(message: string, param: string | null = null, code: string | null = null) {
  return new OpenAIError(400, message, "invalid_request_error", param, code);
}

/** What both endpoints share. */
export interface GenerationFields {
  model: string;
  /** undefined: the server's default (bounded by the context). */
  maxTokens: number | undefined;
  temperature: number | undefined;
  topP: number | undefined;
  topK: number | undefined;
  seed: number | undefined;
  stop: string[];
  mode: DecodingModeName | undefined;
  stream: boolean;
  includeUsage: boolean;
  /** Choices per prompt. */
  n: number;
  /** Set: every choice scores its tokens, with this many most likely tokens' beside. */
  logprobs: number | undefined;
}

export interface CompletionRequest extends GenerationFields {
  /** One or more prompts, each text or token ids; n choices each. */
  prompts: (string | number[])[];
  /** The text starts with the prompt (and, with logprobs, the scores with the prompt's scores). */
  echo: boolean;
  /** Set: this many choices run per prompt, and the n of the highest cumulative log-probability are
   * returned. */
  bestOf: number | undefined;
}

export interface ChatCompletionRequest extends GenerationFields {
  messages: ChatMessage[];
}

export const MAX_STOP_STRINGS = 4;
/** Choices a request may ask for, over n (or best_of) and its prompts: each is a session on both services. */
export const MAX_CHOICES = 128;

type Body = Record<string, unknown>;

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  return typeof value === "object" ? "an object" : `${typeof value} ${JSON.stringify(value)}`;
}

export function requestObject(body: unknown): Body {
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw invalidRequest(`the request body must be a JSON object, got ${describe(body)}`);
  }
  return body as Body;
}

/** null and absent mean the same (clients send `"seed": null` for "not set"). */
function present(body: Body, name: string): unknown {
  const value = body[name];
  return value === null ? undefined : value;
}

function requiredString(body: Body, name: string): string {
  const value = present(body, name);
  if (value === undefined) throw invalidRequest(`missing required field: ${name}`, name);
  if (typeof value !== "string")
    throw invalidRequest(`${name} must be a string, got ${describe(value)}`, name);
  return value;
}

function optionalBoolean(body: Body, name: string, param = name): boolean | undefined {
  const value = present(body, name);
  if (value === undefined || typeof value === "boolean") return value;
  throw invalidRequest(`${param} must be a boolean, got ${describe(value)}`, param);
}

interface NumberRule {
  integer?: boolean;
  min?: number;
  max?: number;
}

function optionalNumber(body: Body, name: string, rule: NumberRule = {}): number | undefined {
  const value = present(body, name);
  if (value === undefined) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value)) {
    throw invalidRequest(`${name} must be a number, got ${describe(value)}`, name);
  }
  if (rule.integer && !Number.isSafeInteger(value)) {
    throw invalidRequest(`${name} must be an integer, got ${value}`, name);
  }
  const { min, max } = rule;
  if ((min !== undefined && value < min) || (max !== undefined && value > max)) {
    const bounds = [min !== undefined && `>= ${min}`, max !== undefined && `<= ${max}`].filter(Boolean);
    throw invalidRequest(`${name} must be ${bounds.join(" and ")}, got ${value}`, name);
  }
  return value;
}

/** Fields pearl does not implement are accepted only with the value that means "off". */
function refuseUnless(body: Body, name: string, isOff: (value: unknown) => boolean, what: string): void {
  const value = present(body, name);
  if (value !== undefined && !isOff(value)) {
    throw invalidRequest(`${name} is not supported: ${what}`, name, "unsupported_parameter");
  }
}

const isFalse = (value: unknown): boolean => value === false;
const isZero = (value: unknown): boolean => value === 0;
const isOne = (value: unknown): boolean => value === 1;
const isEmpty = (value: unknown): boolean =>
  value === "" ||
  (Array.isArray(value) && value.length === 0) ||
  (typeof value === "object" && value !== null && Object.keys(value).length === 0);

function refuseUnsupported(body: Body): void {
  refuseUnless(body, "suffix", isEmpty, "insertion (suffix) is not supported");
  refuseUnless(body, "presence_penalty", isZero, "penalties would change the target's distribution");
  refuseUnless(body, "frequency_penalty", isZero, "penalties would change the target's distribution");
  refuseUnless(body, "logit_bias", isEmpty, "logit bias would change the target's distribution");
  refuseUnless(body, "tools", isEmpty, "tool calling is not supported");
  refuseUnless(body, "functions", isEmpty, "function calling is not supported");
  refuseUnless(body, "tool_choice", (value) => value === "none", "tool calling is not supported");
  refuseUnless(
    body,
    "response_format",
    (value) => typeof value === "object" && value !== null && (value as { type?: unknown }).type === "text",
    'only {"type": "text"} is supported',
  );
}

function stopStrings(body: Body): string[] {
  const value = present(body, "stop");
  if (value === undefined) return [];
  const list = typeof value === "string" ? [value] : value;
  if (!Array.isArray(list) || list.some((item) => typeof item !== "string")) {
    throw invalidRequest(`stop must be a string or a list of strings, got ${describe(value)}`, "stop");
  }
  const strings = list as string[];
  if (strings.length > MAX_STOP_STRINGS) {
    throw invalidRequest(`stop takes at most ${MAX_STOP_STRINGS} strings, got ${strings.length}`, "stop");
  }
  if (strings.some((item) => item === "")) throw invalidRequest("stop strings must not be empty", "stop");
  return strings;
}

function decodingMode(body: Body): DecodingModeName | undefined {
  const value = present(body, "decoding");
  if (value === undefined) return undefined;
  if (!isDecodingModeName(value)) {
    throw invalidRequest(
      `decoding must be one of ${DECODING_MODE_NAMES.map((mode) => `"${mode}"`).join(", ")}, got ${describe(value)}`,
      "decoding",
    );
  }
  return value;
}

function includeUsage(body: Body, stream: boolean): boolean {
  const options = present(body, "stream_options");
  if (options === undefined) return false;
  if (typeof options !== "object" || Array.isArray(options)) {
    throw invalidRequest(`stream_options must be an object, got ${describe(options)}`, "stream_options");
  }
  if (!stream) throw invalidRequest("stream_options is only allowed with stream: true", "stream_options");
  return optionalBoolean(options as Body, "include_usage", "stream_options.include_usage") ?? false;
}

function generationFields(
  body: Body,
  maxTokens: number | undefined,
  logprobs: number | undefined,
): GenerationFields {
  refuseUnsupported(body);
  const stream = optionalBoolean(body, "stream") ?? false;
  return {
    model: requiredString(body, "model"),
    maxTokens,
    // Their ranges are the gateway's to check (lib/sampling_params.ts), for this API and gRPC alike.
    temperature: optionalNumber(body, "temperature"),
    topP: optionalNumber(body, "top_p"),
    topK: optionalNumber(body, "top_k"),
    seed: optionalNumber(body, "seed"),
    stop: stopStrings(body),
    mode: decodingMode(body),
    stream,
    includeUsage: includeUsage(body, stream),
    n: optionalNumber(body, "n", { integer: true, min: 1, max: MAX_CHOICES }) ?? 1,
    logprobs,
  };
}

/** A count of most likely tokens to score (completions' `logprobs`, chat's `top_logprobs`), its range
 * checked where every API's is (lib/sampling_params.ts). */
function topLogprobsField(body: Body, name: string): number | undefined {
  const value = optionalNumber(body, name);
  const problem = topLogprobsProblem(value, MAX_TOP_LOGPROBS, name);
  if (problem) throw invalidRequest(problem, name);
  return value;
}

const maxTokensRule: NumberRule = { integer: true, min: 1 };

export function parseCompletionRequest(raw: unknown): CompletionRequest {
  const body = requestObject(raw);
  const echo = optionalBoolean(body, "echo") ?? false;
  // Only the prompt's scores are wanted (lm-evaluation-harness's loglikelihood requests): max_tokens 0.
  const maxTokens = optionalNumber(body, "max_tokens", { integer: true, min: echo ? 0 : 1 });
  // The legacy API's logprobs is the count of most likely tokens; false (some clients) means none.
  const logprobs = present(body, "logprobs") === false ? undefined : topLogprobsField(body, "logprobs");
  const fields = generationFields(body, maxTokens, logprobs);
  const prompts = completionPrompts(body);
  const bestOf = optionalNumber(body, "best_of", { integer: true, min: fields.n, max: MAX_CHOICES });
  if (bestOf !== undefined && bestOf > 1 && fields.stream) {
    throw invalidRequest(
      "best_of cannot be used with stream: the best choices are known only at the end",
      "best_of",
    );
  }
  const choices = prompts.length * (bestOf ?? fields.n);
  if (choices > MAX_CHOICES) {
    throw invalidRequest(
      `${prompts.length} prompts with ${bestOf ?? fields.n} choices each make ${choices} choices, more than ` +
        `the ${MAX_CHOICES} a request may ask for`,
      bestOf !== undefined ? "best_of" : "n",
    );
  }
  return { ...fields, prompts, echo, bestOf };
}

/** A string, token ids, or a non-empty list of either (several prompts). */
function completionPrompts(body: Body): (string | number[])[] {
  const prompt = present(body, "prompt");
  if (prompt === undefined) throw invalidRequest("missing required field: prompt", "prompt");
  const isList = Array.isArray(prompt) && prompt.length > 0;
  const prompts: unknown[] =
    isList && prompt.every((item) => typeof item === "string" || Array.isArray(item)) ? prompt : [prompt];
  return prompts.map((item, index) => {
    const param = prompts.length > 1 ? `prompt[${index}]` : "prompt";
    if (typeof item === "string") {
      if (item === "") throw invalidRequest(`${param} must not be empty`, param);
      return item;
    }
    if (Array.isArray(item) && item.length > 0 && item.every((id) => Number.isSafeInteger(id) && id >= 0)) {
      return item as number[];
    }
    throw invalidRequest(
      `${param} must be a non-empty string or a non-empty list of token ids, got ${describe(item)}`,
      param,
    );
  });
}

const CHAT_ROLES = new Set(["system", "developer", "user", "assistant"]);

export function parseChatCompletionRequest(raw: unknown): ChatCompletionRequest {
  const body = requestObject(raw);
  refuseUnless(body, "echo", isFalse, "the chat API does not echo the messages");
  refuseUnless(body, "best_of", isOne, "the chat API has no best_of (use n)");
  // max_completion_tokens replaces max_tokens in the chat API; either is accepted.
  const maxTokens =
    optionalNumber(body, "max_completion_tokens", maxTokensRule) ??
    optionalNumber(body, "max_tokens", maxTokensRule);
  const logprobs = optionalBoolean(body, "logprobs") ?? false;
  const topLogprobs = topLogprobsField(body, "top_logprobs");
  if (!logprobs && topLogprobs !== undefined && topLogprobs > 0) {
    throw invalidRequest("top_logprobs needs logprobs: true", "top_logprobs");
  }
  const fields = generationFields(body, maxTokens, logprobs ? (topLogprobs ?? 0) : undefined);
  return { ...fields, messages: chatMessages(body) };
}

function chatMessages(body: Body): ChatMessage[] {
  const value = present(body, "messages");
  if (value === undefined) throw invalidRequest("missing required field: messages", "messages");
  if (!Array.isArray(value))
    throw invalidRequest(`messages must be a list, got ${describe(value)}`, "messages");
  if (value.length === 0) throw invalidRequest("messages must not be empty", "messages");
  return value.map((item: unknown, index) => chatMessage(item, `messages[${index}]`));
}

function chatMessage(item: unknown, param: string): ChatMessage {
  if (typeof item !== "object" || item === null || Array.isArray(item)) {
    throw invalidRequest(`${param} must be an object with role and content, got ${describe(item)}`, param);
  }
  const message = item as Body;
  const role = message.role;
  if (typeof role !== "string" || !CHAT_ROLES.has(role)) {
    throw invalidRequest(
      `${param}.role must be one of ${[...CHAT_ROLES].join(", ")}, got ${describe(role)}`,
      `${param}.role`,
    );
  }
  const name = present(message, "name");
  if (name !== undefined && typeof name !== "string") {
    throw invalidRequest(`${param}.name must be a string, got ${describe(name)}`, `${param}.name`);
  }
  return {
    // Templates know "system"; "developer" is OpenAI's newer name for it.
    role: role === "developer" ? "system" : role,
    content: messageContent(message.content, `${param}.content`),
    ...(name !== undefined ? { name: name as string } : {}),
  };
}

/** A string, or a list of text parts [{type: "text", text}] joined in order. */
function messageContent(content: unknown, param: string): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) {
    throw invalidRequest(
      `${param} must be a string or a list of text parts, got ${describe(content)}`,
      param,
    );
  }
  return content
    .map((part: unknown, index) => {
      const partParam = `${param}[${index}]`;
      if (typeof part !== "object" || part === null || (part as Body).type !== "text") {
        throw invalidRequest(`${partParam} must be a text part {"type": "text", "text": ...}`, partParam);
      }
      const text = (part as Body).text;
      if (typeof text !== "string") {
        throw invalidRequest(
          `${partParam}.text must be a string, got ${describe(text)}`,
          `${partParam}.text`,
        );
      }
      return text;
    })
    .join("");
}

/** POST /tokenize (vLLM's): a completion prompt or chat messages. */
export type TokenizeRequest = { model: string | undefined; returnTokenStrs: boolean } & (
  | { prompt: string; addSpecialTokens: boolean }
  | { messages: ChatMessage[]; addGenerationPrompt: boolean; addSpecialTokens: boolean }
);

function optionalModel(body: Body): string | undefined {
  return present(body, "model") === undefined ? undefined : requiredString(body, "model");
}

export function parseTokenizeRequest(raw: unknown): TokenizeRequest {
  const body = requestObject(raw);
  const common = {
    model: optionalModel(body),
    returnTokenStrs: optionalBoolean(body, "return_token_strs") ?? false,
  };
  if (present(body, "messages") !== undefined) {
    return {
      ...common,
      messages: chatMessages(body),
      addGenerationPrompt: optionalBoolean(body, "add_generation_prompt") ?? true,
      // The template writes the special tokens itself.
      addSpecialTokens: optionalBoolean(body, "add_special_tokens") ?? false,
    };
  }
  return {
    ...common,
    prompt: requiredString(body, "prompt"),
    addSpecialTokens: optionalBoolean(body, "add_special_tokens") ?? true,
  };
}

/** POST /detokenize (vLLM's). */
export function parseDetokenizeRequest(raw: unknown): { model: string | undefined; tokens: number[] } {
  const body = requestObject(raw);
  const tokens = present(body, "tokens");
  if (tokens === undefined) throw invalidRequest("missing required field: tokens", "tokens");
  if (!Array.isArray(tokens) || !tokens.every((id) => Number.isSafeInteger(id) && id >= 0)) {
    throw invalidRequest(`tokens must be a list of token ids, got ${describe(tokens)}`, "tokens");
  }
  return { model: optionalModel(body), tokens: tokens as number[] };
}
