// Token scores as the gateway passes them on: the target's TokenLogprobs (proto/pearl/v1/common.proto) of a
// run of committed tokens, cut and joined as the tokens are.
import type { TokenLogprobs } from "../../proto/gen/pearl/v1/common.js";

/** The most likely tokens a request may ask to see beside each scored one (OpenAI's and vLLM's limit). */
export const MAX_TOP_LOGPROBS = 20;

/** The scores of tokens [from, to). */
export function sliceLogprobs(scores: TokenLogprobs, from: number, to: number): TokenLogprobs {
  const k = scores.topK;
  return {
    tokenIds: scores.tokenIds.slice(from, to),
    logprobs: scores.logprobs.slice(from, to),
    topK: k,
    topTokenIds: scores.topTokenIds.slice(from * k, to * k),
    topLogprobs: scores.topLogprobs.slice(from * k, to * k),
  };
}

/** The `index`-th token's most likely tokens, most likely first. */
export function topOf(scores: TokenLogprobs, index: number): { tokenId: number; logprob: number }[] {
  const k = scores.topK;
  return scores.topTokenIds
    .slice(index * k, (index + 1) * k)
    .map((tokenId, i) => ({ tokenId, logprob: scores.topLogprobs[index * k + i]! }));
}
