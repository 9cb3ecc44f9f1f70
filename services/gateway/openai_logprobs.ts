// The logprobs objects of OpenAI responses, from the target's scores (services/gateway/logprobs.ts).
//
// Completions (`logprobs: k`): {tokens, token_logprobs, top_logprobs, text_offset}, where top_logprobs maps
// the k most likely tokens' texts, and always the chosen token's, to their log-probabilities; with echo
// the prompt's tokens come first, the first of them unscored (null). Chat (`logprobs: true, top_logprobs:
// k`): {content: [{token, logprob, bytes, top_logprobs: [k × {token, logprob, bytes}]}]}. A token's text is
// its own decoding (tokenText); text_offset counts Unicode code points of those texts, as vLLM does. A
// log-probability of -inf (a token a top-k/top-p cut removed) is sent as -9999, JSON having no -Infinity.
import type { TokenLogprobs } from "../../proto/gen/pearl/v1/common.js";
import type { TextTokenizer } from "../../lib/tokenizer.js";
import { topOf } from "./logprobs.js";

/** One token and its scores; null scores for a prompt's first token, which nothing precedes. */
export interface ScoredToken {
  tokenId: number;
  logprob: number | null;
  top: { tokenId: number; logprob: number }[] | null;
}

/** The lowest log-probability a response carries (OpenAI's and vLLM's stand-in for -inf). */
const LOWEST_LOGPROB = -9999;

function finite(logprob: number): number {
  return Math.max(logprob, LOWEST_LOGPROB);
}

/** The scored tokens of a run of generated tokens. */
export function scoredTokens(scores: TokenLogprobs): ScoredToken[] {
  return scores.tokenIds.map((tokenId, i) => ({
    tokenId,
    logprob: scores.logprobs[i]!,
    top: topOf(scores, i),
  }));
}

/** The scored tokens of a prompt: the first unscored, the others from the target's prompt scores. */
export function scoredPrompt(promptTokenIds: readonly number[], scores: TokenLogprobs): ScoredToken[] {
  return [{ tokenId: promptTokenIds[0]!, logprob: null, top: null }, ...scoredTokens(scores)];
}

/** Turns a choice's scored tokens into its logprobs object, piece by piece when streamed (the text offsets
 * of a piece continue the earlier pieces'). */
export interface LogprobsFormat {
  format(tokens: readonly ScoredToken[]): unknown;
}

export function completionLogprobs(tokenizer: TextTokenizer): LogprobsFormat {
  let textOffset = 0;
  return {
    format(tokens) {
      const texts = tokens.map((token) => tokenizer.tokenText(token.tokenId));
      const offsets = texts.map((text) => {
        const offset = textOffset;
        textOffset += [...text].length;
        return offset;
      });
      return {
        tokens: texts,
        token_logprobs: tokens.map((token) => (token.logprob === null ? null : finite(token.logprob))),
        top_logprobs: tokens.map((token) => {
          if (token.top === null || token.logprob === null) return null;
          const top: Record<string, number> = {};
          for (const entry of token.top) top[tokenizer.tokenText(entry.tokenId)] = finite(entry.logprob);
          top[tokenizer.tokenText(token.tokenId)] ??= finite(token.logprob);
          return top;
        }),
        text_offset: offsets,
      };
    },
  };
}

export function chatLogprobs(tokenizer: TextTokenizer): LogprobsFormat {
  const entry = (tokenId: number, logprob: number) => {
    const token = tokenizer.tokenText(tokenId);
    return { token, logprob: finite(logprob), bytes: [...Buffer.from(token, "utf8")] };
  };
  return {
    format(tokens) {
      return {
        content: tokens.map((token) => ({
          ...entry(token.tokenId, token.logprob ?? 0),
          top_logprobs: (token.top ?? []).map((top) => entry(top.tokenId, top.logprob)),
        })),
      };
    },
  };
}
