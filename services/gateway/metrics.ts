// The gateway's metrics: the speculative-decoding counters the PEARL loop feeds, the requests' latencies
// and tokens, and the tuner's current choices.
import { LATENCY_BUCKETS_SECONDS, metricsOn, type Registry, TOKENS_BUCKETS } from "../../lib/metrics.js";

export type GatewayMetrics = ReturnType<typeof gatewayMetrics>;
/** What the PEARL loop counts (pearl_loop.ts). */
export type LoopMetrics = GatewayMetrics["loop"];
/** The tuner's choices, as it makes them (tuner.ts). */
export type TunerGauges = GatewayMetrics["tuner"];

export function gatewayMetrics(registry: Registry) {
  const metric = metricsOn(registry);
  return {
    loop: {
      draftTokens: metric.counter("pearl_spec_draft_tokens_total", "Draft tokens the target verified"),
      acceptedTokens: metric.counter("pearl_spec_accepted_tokens_total", "Draft tokens the target accepted"),
      acceptedPerPosition: metric.counter(
        "pearl_spec_accepted_tokens_per_position_total",
        "Accepted draft tokens by their 1-based position in the verify window",
        ["position"],
      ),
      verifySteps: metric.counter(
        "pearl_spec_verify_steps_total",
        "Target steps that verified at least one draft token",
      ),
      targetSteps: metric.counter(
        "pearl_target_steps_total",
        "Target steps that emitted tokens (prefills, verifications and plain decodes)",
      ),
      staleDraftTokens: metric.counter(
        "pearl_spec_stale_draft_tokens_total",
        "Draft tokens dropped on arrival because a correction had made them stale",
      ),
      fallbacks: metric.counter(
        "pearl_draft_fallbacks_total",
        "Requests that went on without the draft (in ar), by reason",
        ["reason"],
      ),
      meanAcceptedLength: metric.histogram(
        "pearl_request_mean_accepted_length_tokens",
        "Per request: tokens committed per target step",
        TOKENS_BUCKETS,
      ),
    },
    requests: metric.counter(
      "pearl_requests_total",
      "Finished requests by the mode they finished in and finish reason",
      ["mode", "finish_reason"],
    ),
    running: metric.gauge("pearl_requests_running_requests", "Requests in progress"),
    waiting: metric.gauge(
      "pearl_requests_waiting_requests",
      "Requests admitted to the queue, waiting for one of the --max-num-seqs places",
    ),
    rejected: metric.counter(
      "pearl_requests_rejected_total",
      "Requests refused before they ran, by reason (queue_full: 429; shutting_down: 503; unauthenticated: 401)",
      ["reason"],
    ),
    timeToFirstToken: metric.histogram(
      "pearl_time_to_first_token_seconds",
      "From request to first committed token",
      LATENCY_BUCKETS_SECONDS,
    ),
    interTokenLatency: metric.histogram(
      "pearl_inter_token_latency_seconds",
      "Between consecutive committed tokens (tokens committed together share the interval)",
      LATENCY_BUCKETS_SECONDS,
    ),
    requestLatency: metric.histogram(
      "pearl_e2e_request_latency_seconds",
      "From request to its last token",
      LATENCY_BUCKETS_SECONDS,
    ),
    promptTokens: metric.counter("pearl_prompt_tokens_total", "Prompt tokens of the requests started"),
    generationTokens: metric.counter(
      "pearl_generation_tokens_total",
      "Tokens the target committed for requests (their throughput)",
    ),
    tuner: {
      lookahead: metric.gauge(
        "pearl_lookahead_tokens",
        "Draft tokens allowed past the last verified position (mode pearl; 0 while it does not draft)",
      ),
      verifyWindow: metric.gauge(
        "pearl_verify_window_tokens",
        "Most draft tokens verified per target step (mode pearl; 0 while it does not draft)",
      ),
      gamma: metric.gauge(
        "pearl_draft_length_tokens",
        "The draft length a pearl request arriving now gets, chosen from measured step times and " +
          "acceptance at the batch size it joins (0: drafting does not pay there, it runs on the target " +
          "alone); each running request's own length follows its own acceptance",
      ),
      acceptance: metric.gauge(
        "pearl_draft_acceptance_ratio",
        "Recent rate at which the target accepts draft tokens, all requests together (kept while " +
          "nobody drafts; each request starts from it)",
      ),
    },
  };
}
