// The OpenAI-compatible REST API on the gateway's HTTP server: POST /v1/completions, POST
// /v1/chat/completions (both with `stream` as server-sent events) and GET /v1/models. Requests become
// Gateway.generate() calls; every usage object adds pearl's speculative-decoding counters. Errors use
// OpenAI's body {error: {message, type, param, code}} so that OpenAI clients report them as such.
import { randomUUID } from "node:crypto";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { FinishReason } from "../../proto/gen/pearl/v1/common.js";
import { ChatTemplate, ChatTemplateError } from "../../lib/chat_template.js";
import { errorMessage, type Logger } from "../../lib/logging.js";
import type { TextTokenizer } from "../../lib/tokenizer.js";
import { OverloadedError } from "./admission.js";
import {
  CancelledError,
  type Gateway,
  type GenerateChunk,
  type GenerateInput,
  InvalidRequestError,
  isValidRequestId,
  REQUEST_ID_HEADER,
  UnavailableError,
} from "./gateway.js";
import {
  type GenerationFields,
  invalidRequest,
  OpenAIError,
  parseChatCompletionRequest,
  parseCompletionRequest,
} from "./openai_schema.js";

export interface OpenAIApiOptions {
  gateway: Gateway;
  logger: Logger;
  /** The folder with tokenizer_config.json (the chat template); "" when the gateway has no tokenizer. */
  tokenizerDir: string;
  /** Larger bodies are refused with 413 before they are parsed (--max-body-bytes). */
  maxBodyBytes: number;
}

interface ServedModel {
  id: string;
  contextLength: number;
  vocabSize: number;
  /** Unix seconds: when this gateway started serving it. */
  created: number;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  draft_tokens: number;
  accepted_tokens: number;
  target_steps: number;
  mean_accepted_length: number;
}

type OpenAIFinishReason = "stop" | "length";

/** What differs between the two generation endpoints' responses. */
interface ResponseShape {
  idPrefix: string;
  object: string;
  chunkObject: string;
  choice(text: string, finishReason: OpenAIFinishReason): Record<string, unknown>;
  /** The first streamed choice (chat announces the role), or undefined when none is due. */
  openingChunkChoice(): Record<string, unknown> | undefined;
  textChunkChoice(text: string): Record<string, unknown>;
  finishChunkChoice(finishReason: OpenAIFinishReason): Record<string, unknown>;
}

const COMPLETION_SHAPE: ResponseShape = {
  idPrefix: "cmpl-",
  object: "text_completion",
  chunkObject: "text_completion",
  choice: (text, finishReason) => ({ index: 0, text, logprobs: null, finish_reason: finishReason }),
  openingChunkChoice: () => undefined,
  textChunkChoice: (text) => ({ index: 0, text, logprobs: null, finish_reason: null }),
  finishChunkChoice: (finishReason) => ({ index: 0, text: "", logprobs: null, finish_reason: finishReason }),
};

const CHAT_SHAPE: ResponseShape = {
  idPrefix: "chatcmpl-",
  object: "chat.completion",
  chunkObject: "chat.completion.chunk",
  choice: (text, finishReason) => ({
    index: 0,
    message: { role: "assistant", content: text },
    logprobs: null,
    finish_reason: finishReason,
  }),
  openingChunkChoice: () => ({
    index: 0,
    delta: { role: "assistant", content: "" },
    logprobs: null,
    finish_reason: null,
  }),
  textChunkChoice: (text) => ({ index: 0, delta: { content: text }, logprobs: null, finish_reason: null }),
  finishChunkChoice: (finishReason) => ({ index: 0, delta: {}, logprobs: null, finish_reason: finishReason }),
};

export async function registerOpenAIApi(app: FastifyInstance, options: OpenAIApiOptions): Promise<void> {
  const api = await OpenAIApi.create(options);
  await app.register(
    async (scope) => {
      scope.removeContentTypeParser("application/json");
      scope.addContentTypeParser(
        "application/json",
        { parseAs: "buffer", bodyLimit: options.maxBodyBytes },
        strictJsonParser(scope.getDefaultJsonParser("error", "error")),
      );
      scope.addHook("onRequest", async (request, reply) => api.assignRequestId(request, reply));
      scope.setErrorHandler((error, request, reply) => api.sendError(request, reply, error));
      scope.setNotFoundHandler((request, reply) =>
        api.sendError(
          request,
          reply,
          new OpenAIError(404, `unknown endpoint: ${request.method} ${request.url}`, "invalid_request_error"),
        ),
      );
      scope.get("/models", async () => api.modelList());
      scope.get<{ Params: { model: string } }>("/models/:model", async (request) =>
        api.modelObject(request.params.model),
      );
      scope.post("/completions", { bodyLimit: options.maxBodyBytes }, (request, reply) =>
        api.completions(request, reply),
      );
      scope.post("/chat/completions", { bodyLimit: options.maxBodyBytes }, (request, reply) =>
        api.chatCompletions(request, reply),
      );
    },
    { prefix: "/v1" },
  );
}

class OpenAIApi {
  private readonly requestIds = new WeakMap<FastifyRequest, string>();

  private constructor(
    private readonly gateway: Gateway,
    private readonly logger: Logger,
    private readonly model: ServedModel,
    private readonly chatTemplate: ChatTemplate | undefined,
    private readonly maxBodyBytes: number,
  ) {}

  static async create(options: OpenAIApiOptions): Promise<OpenAIApi> {
    const target = (await options.gateway.info()).target.model;
    if (!target) throw new Error("the target service did not describe its model");
    const chatTemplate = options.tokenizerDir !== "" ? ChatTemplate.load(options.tokenizerDir) : undefined;
    if (chatTemplate && !chatTemplate.available) {
      options.logger.warn("chat completions unavailable", { reason: chatTemplate.unavailableReason });
    }
    return new OpenAIApi(
      options.gateway,
      options.logger,
      {
        id: options.gateway.servedModelName,
        contextLength: target.maxPositionEmbeddings,
        vocabSize: target.vocabSize,
        created: Math.floor(Date.now() / 1000),
      },
      chatTemplate,
      options.maxBodyBytes,
    );
  }

  // ---- request ids and errors -------------------------------------------------------------------------

  assignRequestId(request: FastifyRequest, reply: FastifyReply): void {
    const given = request.headers[REQUEST_ID_HEADER];
    const requestId = typeof given === "string" && isValidRequestId(given) ? given : randomUUID();
    this.requestIds.set(request, requestId);
    void reply.header(REQUEST_ID_HEADER, requestId);
    if (given !== undefined && given !== requestId) {
      throw invalidRequest(
        `the ${REQUEST_ID_HEADER} header must be 1 to 128 visible ASCII characters`,
        REQUEST_ID_HEADER,
      );
    }
  }

  private requestId(request: FastifyRequest): string {
    return this.requestIds.get(request) ?? randomUUID();
  }

  sendError(request: FastifyRequest, reply: FastifyReply, error: unknown): FastifyReply {
    const openAIError = toOpenAIError(error, this.maxBodyBytes);
    const fields = {
      requestId: this.requestId(request),
      method: request.method,
      url: request.url,
      status: openAIError.status,
      error: openAIError.message,
    };
    if (openAIError.status >= 500) this.logger.error("request failed", fields);
    else this.logger.info("request rejected", fields);
    reply.code(openAIError.status);
    // As HTTP says of 429 (and OpenAI's clients obey): when to try again.
    if (error instanceof OverloadedError) void reply.header("retry-after", String(error.retryAfterSeconds));
    if (openAIError.code === "request_too_large")
      return sendAfterDraining(request, reply, openAIError.body());
    return reply.send(openAIError.body());
  }

  // ---- models -------------------------------------------------------------------------------------------

  modelList(): { object: "list"; data: Record<string, unknown>[] } {
    return { object: "list", data: [this.modelEntry()] };
  }

  modelObject(id: string): Record<string, unknown> {
    if (id !== this.model.id) {
      throw new OpenAIError(
        404,
        `the model \`${id}\` does not exist: this server serves \`${this.model.id}\``,
        "invalid_request_error",
        "model",
        "model_not_found",
      );
    }
    return this.modelEntry();
  }

  private modelEntry(): Record<string, unknown> {
    return {
      id: this.model.id,
      object: "model",
      created: this.model.created,
      owned_by: "pearl",
      max_model_len: this.model.contextLength,
    };
  }

  /** A generation request naming another model is a bad request (the endpoint exists), hence 400. */
  private checkModel(id: string): void {
    if (id !== this.model.id) {
      throw invalidRequest(
        `the model \`${id}\` does not exist: this server serves \`${this.model.id}\``,
        "model",
        "model_not_found",
      );
    }
  }

  // ---- generation endpoints -----------------------------------------------------------------------------

  async completions(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const body = parseCompletionRequest(jsonBody(request.body));
    this.checkModel(body.model);
    this.requireTokenizer();
    const promptTokenIds =
      typeof body.prompt === "string" ? this.gateway.encodePrompt(body.prompt, "prompt") : body.prompt;
    this.checkPrompt(promptTokenIds, body, "prompt");
    await this.respond(request, reply, body, promptTokenIds, COMPLETION_SHAPE);
  }

  async chatCompletions(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const body = parseChatCompletionRequest(jsonBody(request.body));
    this.checkModel(body.model);
    this.requireTokenizer();
    if (!this.chatTemplate)
      throw invalidRequest("this server has no tokenizer, so no chat template", "messages");
    const prompt = this.chatTemplate.render(body.messages);
    // The template already wrote the special tokens (a BOS, say) where the model expects them.
    const promptTokenIds = this.gateway.encodePrompt(prompt, "messages", { addSpecialTokens: false });
    this.checkPrompt(promptTokenIds, body, "messages");
    await this.respond(request, reply, body, promptTokenIds, CHAT_SHAPE);
  }

  private requireTokenizer(): TextTokenizer {
    const tokenizer = this.gateway.tokenizer;
    if (!tokenizer) {
      throw invalidRequest(
        "this gateway runs without a tokenizer (--tokenizer), and the OpenAI API speaks text: " +
          "use the gRPC Generate API with token ids",
      );
    }
    return tokenizer;
  }

  private checkPrompt(
    promptTokenIds: number[],
    body: GenerationFields,
    promptParam: "prompt" | "messages",
  ): void {
    const context = this.model.contextLength;
    this.gateway.checkPrompt(promptTokenIds, promptParam);
    // OpenAI refuses what the gRPC API would cut short: a completion that cannot fit.
    if (body.maxTokens !== undefined && promptTokenIds.length + body.maxTokens > context) {
      throw invalidRequest(
        `this model's maximum context length is ${context} tokens; you requested ` +
          `${promptTokenIds.length + body.maxTokens} (${promptTokenIds.length} in the ${promptParam}, ` +
          `${body.maxTokens} in the completion): lower max_tokens to at most ` +
          `${context - promptTokenIds.length}`,
        "max_tokens",
        "context_length_exceeded",
      );
    }
  }

  private async respond(
    request: FastifyRequest,
    reply: FastifyReply,
    body: GenerationFields,
    promptTokenIds: number[],
    shape: ResponseShape,
  ): Promise<void> {
    const requestId = this.requestId(request);
    const input: GenerateInput = {
      requestId,
      promptTokenIds,
      maxTokens: body.maxTokens,
      temperature: body.temperature,
      topP: body.topP,
      topK: body.topK,
      seed: body.seed,
      mode: body.mode,
      stop: body.stop,
    };
    const disconnect = abortOnDisconnect(reply);
    const chunks = this.gateway.generate(input, disconnect.signal);
    const header = {
      id: `${shape.idPrefix}${requestId}`,
      created: Math.floor(Date.now() / 1000),
      model: this.model.id,
    };
    try {
      if (body.stream) await this.stream(reply, chunks, shape, header, body.includeUsage, requestId);
      else await this.complete(reply, chunks, shape, header);
    } catch (error) {
      // The client went away: there is no one to answer.
      if (error instanceof CancelledError) {
        if (!reply.sent) reply.hijack();
        return;
      }
      throw error;
    }
  }

  private async complete(
    reply: FastifyReply,
    chunks: AsyncGenerator<GenerateChunk>,
    shape: ResponseShape,
    header: { id: string; created: number; model: string },
  ): Promise<void> {
    let text = "";
    let last: GenerateChunk | undefined;
    for await (const chunk of chunks) {
      text += chunk.text;
      last = chunk;
    }
    const finish = finishOf(last);
    reply.send({
      ...header,
      object: shape.object,
      choices: [shape.choice(text, finish.reason)],
      usage: finish.usage,
    });
  }

  /**
   * Server-sent events. The response starts only once the first tokens are there, so that a request the
   * gateway refuses or cannot run still gets an ordinary error status.
   */
  private async stream(
    reply: FastifyReply,
    chunks: AsyncGenerator<GenerateChunk>,
    shape: ResponseShape,
    header: { id: string; created: number; model: string },
    includeUsage: boolean,
    requestId: string,
  ): Promise<void> {
    const iterator = chunks[Symbol.asyncIterator]();
    let next = await iterator.next();
    reply.hijack();
    const raw = reply.raw;
    raw.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      // Reverse proxies (nginx) would otherwise buffer the events.
      "x-accel-buffering": "no",
      [REQUEST_ID_HEADER]: requestId,
    });
    const send = (choices: Record<string, unknown>[], usage?: Usage): void => {
      const event = {
        ...header,
        object: shape.chunkObject,
        choices,
        ...(includeUsage ? { usage: usage ?? null } : {}),
      };
      raw.write(`data: ${JSON.stringify(event)}\n\n`);
    };
    try {
      const opening = shape.openingChunkChoice();
      if (opening) send([opening]);
      for (; !next.done; next = await iterator.next()) {
        const chunk = next.value;
        if (chunk.text !== "") send([shape.textChunkChoice(chunk.text)]);
        if (chunk.finishReason === undefined) continue;
        const finish = finishOf(chunk);
        send([shape.finishChunkChoice(finish.reason)]);
        if (includeUsage) send([], finish.usage);
      }
    } catch (error) {
      if (error instanceof CancelledError) throw error;
      const openAIError = toOpenAIError(error, this.maxBodyBytes);
      this.logger.error("stream failed", { requestId, error: openAIError.message });
      raw.write(`data: ${JSON.stringify(openAIError.body())}\n\n`);
    } finally {
      if (!raw.destroyed) raw.end("data: [DONE]\n\n");
    }
  }
}

/** Aborts when the client closes the connection before the response is complete. */
function abortOnDisconnect(reply: FastifyReply): AbortController {
  const controller = new AbortController();
  reply.raw.on("close", () => {
    if (!reply.raw.writableFinished) controller.abort();
  });
  return controller;
}

/** A client still uploading a body we refused would see the connection reset (EPIPE) instead of the
 * answer if we replied and closed at once: read the rest (and drop it) up to a bound, then reply. */
const DRAIN_LIMIT_BYTES = 64 * 1024 * 1024;

function sendAfterDraining(request: FastifyRequest, reply: FastifyReply, body: unknown): FastifyReply {
  const upload = request.raw;
  if (upload.readableEnded || upload.destroyed) return reply.send(body);
  let drained = 0;
  const send = (): void => {
    upload.removeListener("data", onData);
    if (!reply.sent) reply.send(body);
  };
  const onData = (chunk: Buffer): void => {
    drained += chunk.length;
    if (drained > DRAIN_LIMIT_BYTES) {
      send();
      upload.destroy();
    }
  };
  upload.on("data", onData);
  upload.once("end", send);
  upload.once("error", send);
  upload.resume();
  return reply;
}

type JsonParser = (
  request: FastifyRequest,
  body: string,
  done: (error: Error | null, value?: unknown) => void,
) => void;

/**
 * JSON as fastify parses it (refusing __proto__ and constructor keys), but only from valid UTF-8 and
 * without lone UTF-16 surrogates ("\ud800"): either would reach the tokenizer as text that no client
 * meant, where a Python server (vLLM) refuses the body.
 */
function strictJsonParser(parseJson: JsonParser) {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  return (
    request: FastifyRequest,
    body: Buffer,
    done: (error: Error | null, value?: unknown) => void,
  ): void => {
    let text: string;
    try {
      text = decoder.decode(body);
    } catch {
      done(invalidRequest("the request body is not valid UTF-8", null, "invalid_json"));
      return;
    }
    parseJson(request, text, (error, value) => {
      if (error) done(error);
      else if (!wellFormed(value)) {
        done(
          invalidRequest(
            "the request body holds a lone UTF-16 surrogate (\\ud800-\\udfff escape)",
            null,
            "invalid_json",
          ),
        );
      } else done(null, value);
    });
  };
}

/** A high surrogate not followed by a low one, or a low one not preceded by a high one. */
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** Every string in a parsed JSON value (keys included) is well-formed Unicode. Iterative: a body may
 * nest deeper than the stack. */
function wellFormed(value: unknown): boolean {
  const pending: unknown[] = [value];
  while (pending.length > 0) {
    const item = pending.pop();
    if (typeof item === "string") {
      if (LONE_SURROGATE.test(item)) return false;
    } else if (Array.isArray(item)) {
      for (const entry of item) pending.push(entry);
    } else if (typeof item === "object" && item !== null) {
      for (const [key, entry] of Object.entries(item)) {
        if (LONE_SURROGATE.test(key)) return false;
        pending.push(entry);
      }
    }
  }
  return true;
}

/** Fastify parses a body sent as text/plain into a string: say which content type JSON needs. */
function jsonBody(body: unknown): unknown {
  if (typeof body === "string") {
    throw invalidRequest("the request body must be JSON sent with Content-Type: application/json");
  }
  return body;
}

function finishOf(chunk: GenerateChunk | undefined): { reason: OpenAIFinishReason; usage: Usage } {
  if (!chunk?.usage || chunk.finishReason === undefined) {
    throw new Error("the generation ended without a finish reason");
  }
  const usage = chunk.usage;
  return {
    reason: chunk.finishReason === FinishReason.FINISH_REASON_LENGTH ? "length" : "stop",
    usage: {
      prompt_tokens: usage.promptTokens,
      completion_tokens: usage.completionTokens,
      total_tokens: usage.promptTokens + usage.completionTokens,
      draft_tokens: usage.draftTokens,
      accepted_tokens: usage.acceptedTokens,
      target_steps: usage.targetSteps,
      mean_accepted_length: usage.meanAcceptedLength,
    },
  };
}

interface FastifyLikeError {
  statusCode?: number;
  code?: string;
}

export function toOpenAIError(error: unknown, maxBodyBytes: number): OpenAIError {
  if (error instanceof OpenAIError) return error;
  if (error instanceof OverloadedError) {
    return new OpenAIError(429, error.message, "requests", null, "rate_limit_exceeded");
  }
  if (error instanceof ChatTemplateError) return invalidRequest(error.message, "messages");
  if (error instanceof InvalidRequestError) return invalidRequest(error.message, error.param, error.code);
  if (error instanceof UnavailableError) {
    return new OpenAIError(503, error.message, "server_error", null, "service_unavailable");
  }
  const { statusCode, code } = error as FastifyLikeError;
  switch (code) {
    case "FST_ERR_CTP_BODY_TOO_LARGE":
      return new OpenAIError(
        413,
        `the request body is larger than the limit of ${maxBodyBytes} bytes`,
        "invalid_request_error",
        null,
        "request_too_large",
      );
    case "FST_ERR_CTP_INVALID_JSON_BODY":
    case "FST_ERR_CTP_EMPTY_JSON_BODY":
      return invalidRequest(
        `the request body is not valid JSON: ${errorMessage(error)}`,
        null,
        "invalid_json",
      );
    case "FST_ERR_CTP_INVALID_MEDIA_TYPE":
      return new OpenAIError(
        415,
        "the request body must be JSON sent with Content-Type: application/json",
        "invalid_request_error",
      );
  }
  if (statusCode !== undefined && statusCode >= 400 && statusCode < 500) {
    return new OpenAIError(statusCode, errorMessage(error), "invalid_request_error");
  }
  return new OpenAIError(500, `internal error: ${errorMessage(error)}`, "server_error");
}
