// vLLM's utility endpoints beside the OpenAI API, at the server's root: POST /tokenize (a prompt, or chat
// messages through the chat template, exactly as the generation endpoints tokenize them), POST /detokenize
// and GET /version. Errors have the OpenAI shape, like the rest of the API.
import type { ChatTemplate } from "../../lib/chat_template.js";
import { packageVersion } from "../../lib/paths.js";
import type { TextTokenizer } from "../../lib/tokenizer.js";
import { invalidRequest, parseDetokenizeRequest, parseTokenizeRequest } from "./openai_schema.js";

/** What the endpoints need of the server. */
export interface TokenizeContext {
  tokenizer: TextTokenizer;
  chatTemplate: ChatTemplate | undefined;
  contextLength: number;
  vocabSize: number;
  /** Throws the API's error for a model other than the served one. */
  checkModel(id: string): void;
}

export interface TokenizeResponse {
  count: number;
  max_model_len: number;
  tokens: number[];
  /** With return_token_strs: the vocabulary's string of each token. */
  token_strs: string[] | null;
}

export function tokenize(body: unknown, context: TokenizeContext): TokenizeResponse {
  const request = parseTokenizeRequest(body);
  if (request.model !== undefined) context.checkModel(request.model);
  let text: string;
  if ("messages" in request) {
    if (!context.chatTemplate) throw invalidRequest("this server has no chat template", "messages");
    text = context.chatTemplate.render(request.messages, {
      addGenerationPrompt: request.addGenerationPrompt,
    });
  } else {
    text = request.prompt;
  }
  const tokens = context.tokenizer.encode(text, { addSpecialTokens: request.addSpecialTokens });
  return {
    count: tokens.length,
    max_model_len: context.contextLength,
    tokens,
    token_strs: request.returnTokenStrs ? tokens.map((id) => context.tokenizer.tokenString(id) ?? "") : null,
  };
}

export function detokenize(body: unknown, context: TokenizeContext): { prompt: string } {
  const request = parseDetokenizeRequest(body);
  if (request.model !== undefined) context.checkModel(request.model);
  const bad = request.tokens.findIndex((id) => id >= context.vocabSize);
  if (bad >= 0) {
    throw invalidRequest(
      `tokens[${bad}] = ${request.tokens[bad]} is outside the vocabulary [0, ${context.vocabSize})`,
      "tokens",
    );
  }
  return { prompt: context.tokenizer.decode(request.tokens) };
}

export function version(): { version: string } {
  return { version: packageVersion() };
}
