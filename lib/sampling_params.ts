// Sampling parameters: what a valid set is, stated once for every place that takes them (the gateway's
// REST and gRPC APIs through Gateway, the draft and target services when a session opens), and how many
// most likely tokens a request may have scored beside each of its tokens (top_logprobs).
//
// Unset versus zero. The client-facing APIs know whether a field was given (JSON; GenerateRequest's
// `optional` fields), so there an unset field takes its default (clientSampling) and a given 0 is a
// value: top_p 0, an empty nucleus, is refused. The services' SamplingParams message (common.proto) has
// no field presence: proto3 sends an unset field as 0, so on the wire 0 means unset for every field that
// has another default (samplingParamsOf): top_p 0 is 1, no nucleus cut. temperature 0 (greedy) and top_k 0
// (no top-k cut) are the defaults anyway, and the gateway always sends a seed.
import type { SamplingParams as SamplingParamsMessage } from "../proto/gen/pearl/v1/common.js";
import type { SamplingParams } from "./native.js";

/** A sampling parameter that is out of range, named as the APIs name it, and why. */
export interface SamplingProblem {
  param: "temperature" | "top_p" | "top_k" | "seed";
  message: string;
}

/** The largest finite 32-bit float: common.proto's temperature is a `float`, larger ones arrive as inf. */
const FLOAT32_MAX = 3.4028234663852886e38;
/** common.proto's top_k is an `int32`. */
const INT32_MAX = 2 ** 31 - 1;

/** Why `temperature` (a sampling or a draft temperature) is invalid, if it is. NaN is refused; there is no
 * upper bound (OpenAI's is 2, vLLM has none): a high temperature only flattens the distribution. Only the
 * wire's: a 32-bit float. */
export function temperatureProblem(temperature: number, name = "temperature"): string | undefined {
  if (!(temperature >= 0 && Number.isFinite(temperature))) {
    return `${name} must be a finite number >= 0, got ${temperature}`;
  }
  return temperature <= FLOAT32_MAX
    ? undefined
    : `${name} must be at most ${FLOAT32_MAX} (a 32-bit float), got ${temperature}`;
}

/** Why `topLogprobs` (how many most likely tokens to score beside each emitted one) is invalid, if it is:
 * an integer from 0 to `max` (the APIs' 20, as OpenAI's and vLLM's; the target service's vocabulary).
 * Unset asks for no scores at all. `name` is the field as the caller's API names it (the legacy
 * completions API calls it `logprobs`). */
export function topLogprobsProblem(
  topLogprobs: number | undefined,
  max: number,
  name = "top_logprobs",
): string | undefined {
  if (topLogprobs === undefined) return undefined;
  return Number.isInteger(topLogprobs) && topLogprobs >= 0 && topLogprobs <= max
    ? undefined
    : `${name} must be an integer >= 0 and <= ${max}, got ${topLogprobs}`;
}

/** The one check: what makes a set of sampling parameters invalid, or undefined when it is valid. */
export function samplingProblem(params: SamplingParams): SamplingProblem | undefined {
  const temperature = temperatureProblem(params.temperature);
  if (temperature) return { param: "temperature", message: temperature };
  if (!(params.topP > 0 && params.topP <= 1)) {
    return { param: "top_p", message: `top_p must be > 0 and <= 1, got ${params.topP}` };
  }
  if (!(Number.isInteger(params.topK) && params.topK >= 0)) {
    return {
      param: "top_k",
      message: `top_k must be an integer >= 0 (0 or -1: no top-k cut), got ${params.topK}`,
    };
  }
  if (params.topK > INT32_MAX) {
    // A top_k at least the vocabulary's size cuts nothing; past the wire's int32 it cannot be sent.
    return { param: "top_k", message: `top_k must be at most ${INT32_MAX}, got ${params.topK}` };
  }
  if (!(Number.isSafeInteger(params.seed) && params.seed >= 0)) {
    return { param: "seed", message: `seed must be an integer in [0, 2^53), got ${params.seed}` };
  }
  return undefined;
}

/** Sampling parameters as a client gives them: undefined is unset. */
export interface ClientSampling {
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number;
}

/**
 * A client's sampling parameters with the defaults of the OpenAI API (temperature 1, no top-p or top-k
 * cut) and `randomSeed` for an unset seed. Check the result with samplingProblem.
 */
export function clientSampling(given: ClientSampling, randomSeed: () => number): SamplingParams {
  return {
    temperature: given.temperature ?? 1,
    topP: given.topP ?? 1,
    topK: topKOf(given.topK ?? 0),
    seed: given.seed ?? randomSeed(),
  };
}

/** The sampling parameters a service's SamplingParams message stands for: its zeros are unset (see the
 * top of this file). Absent, it is greedy. Check the result with samplingProblem. */
export function samplingParamsOf(message: SamplingParamsMessage | undefined): SamplingParams {
  return {
    temperature: message?.temperature ?? 0,
    topK: topKOf(message?.topK ?? 0),
    topP: message?.topP === 0 || message === undefined ? 1 : message.topP,
    seed: message?.seed ?? 0,
  };
}

/** top_k -1 is no cut, as in vLLM, like 0: every API and both services take it. */
function topKOf(topK: number): number {
  return topK === -1 ? 0 : topK;
}
