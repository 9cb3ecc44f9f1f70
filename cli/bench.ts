// `pearl bench`: throughput of each decoding mode at given concurrencies and temperatures, through the
// gateway's gRPC API as a client sees it, against ar and sd measured in the same run, and against what the
// analytic model of speculative decoding promises for the acceptance and step times measured there.
//
// Every mode gets the same prompts and seeds, so at temperature 0 the outputs must be the same token for
// token (checked). With the services' /metrics at hand (a local stack, or their URLs), it also reports the
// engines' step times, the time per target step that the gateway, gRPC and waiting for drafts add, the
// acceptance rate and the mean draft window; the ideal speedup needs those.
import { readFileSync } from "node:fs";
import { credentials } from "@grpc/grpc-js";
import { type DecodingModeName, PROTO_MODES } from "../lib/decoding_modes.js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { sampleValue } from "../lib/metrics.js";
import { FinishReason, type ServiceInfo } from "../proto/gen/pearl/v1/common.js";
import {
  GatewayClient,
  type GatewayInfo,
  type GenerateRequest,
  type GenerateResponse,
} from "../proto/gen/pearl/v1/gateway.js";

export interface BenchOptions {
  modes: DecodingModeName[];
  concurrencies: number[];
  /** Sampling temperatures (0: greedy; outputs are then compared across modes). */
  temperatures: number[];
  /** Requests per (mode, concurrency, temperature), split over `rounds`: at least the concurrency each. */
  requests: number;
  /** Turns each mode takes at each concurrency and temperature. */
  rounds: number;
  maxTokens: number;
  /** Text prompts, used in turn, for a server with a tokenizer. */
  prompts: string[];
  /** Prompt length in tokens when the server has no tokenizer (random ids then). */
  promptTokens: number;
}

/** Where the services' Prometheus text is: each one that is known adds figures. */
export interface MetricsUrls {
  draft?: string;
  target?: string;
  gateway?: string;
}

export interface BenchRow {
  mode: DecodingModeName;
  concurrency: number;
  temperature: number;
  requests: number;
  tokens: number;
  seconds: number;
  tokensPerSecond: number;
  /** Tokens per target step. */
  meanAcceptedLength: number;
  /** Accepted / proposed draft tokens. */
  acceptance: number;
  meanTtftMs: number;
  /** The target engine's mean step, from its /metrics. */
  targetStepMs?: number;
  /** Wall time per target step, minus the engine's step: gateway, gRPC and waiting for drafts. */
  overheadPerTargetStepMs?: number;
  /** The draft engine's mean step, from its /metrics. */
  draftStepMs?: number;
  /** The chance that the target accepts a draft token (Leviathan et al.'s alpha), from the gateway's
   * /metrics: verify steps that accepted their first draft, over all verify steps. Every verify step
   * judges its first draft, whatever its window, so this needs no assumption about windows. */
  tokenAcceptance?: number;
  /** Draft tokens per verify step, from the gateway's /metrics. */
  meanWindow?: number;
  /** tokensPerSecond over ar's and sd's at the same concurrency and temperature. */
  speedupOverAr?: number;
  speedupOverSd?: number;
  /** What the analytic model promises over ar for this row's alpha, window and step times (idealSpeedup). */
  idealSpeedupOverAr?: number;
}

/** Progress of a run: `done` of `total` requests, `label` the cell being measured. */
export type BenchProgress = (done: number, total: number, label: string) => void;

/** The prompt texts of a file made by tools/make_bench_prompts.ts. */
export function loadPrompts(path: string): string[] {
  const file = JSON.parse(readFileSync(path, "utf8")) as { prompts?: { text?: unknown }[] };
  const prompts = (file.prompts ?? []).map((prompt) => prompt.text);
  if (prompts.length === 0 || prompts.some((text) => typeof text !== "string" || text === "")) {
    throw new Error(`${path}: expected {"prompts": [{"text": "..."}, ...]} with at least one prompt`);
  }
  return prompts as string[];
}

/** Tokens a verify step of `window` drafts yields when each is accepted with probability `acceptance`:
 * E = (1 - a^(g+1)) / (1 - a) (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
 * Decoding", arXiv 2211.17192, section 3); g need not be whole (a mean window). */
export function expectedTokensPerStep(window: number, acceptance: number): number {
  if (acceptance >= 1) return window + 1;
  return (1 - Math.pow(acceptance, window + 1)) / (1 - acceptance);
}

/**
 * The most a mode can gain over ar for a measured alpha, window g and step times: E(g) tokens per cycle
 * against ar's one token per plain decode step (t_ar).
 *
 * - sd drafts, then verifies: a cycle is t_verify + g t_draft. With t_verify = t_ar this is Leviathan et
 *   al.'s walltime improvement E(g) / (g c + 1), c = t_draft / t_target (arXiv 2211.17192, section 3.3).
 * - pearl drafts the next window while the target verifies this one (pre-verify and post-verify, Liu et
 *   al., "PEARL: Parallel Speculative Decoding with Adaptive Draft Length", ICLR 2025, arXiv 2408.11850):
 *   fully overlapped, a cycle is max(t_verify, g t_draft), E(g) / max(1, g c) with t_verify = t_ar; the
 *   paper's draft length g = t_target / t_draft is where the two are equal. The paper's abstract states
 *   its analysis as PEARL's mean accepted tokens exceeding draft-then-verify's; the theorem's own text
 *   was not available here to check against, so what is implemented is the bound of the mutual-waiting
 *   argument itself: drafting hidden entirely, which gains at most 2x over sd (at g c = 1).
 *
 * t_verify is the row's own target step, as its windows made it cost; on a GPU it is about t_ar, on a CPU
 * it grows with the rows verified, and the model then promises less than E(g).
 */
export function idealSpeedup(
  mode: "sd" | "pearl",
  measured: { acceptance: number; window: number; verifyMs: number; draftMs: number; arStepMs: number },
): number {
  const tokens = expectedTokensPerStep(measured.window, measured.acceptance);
  const draftingMs = measured.window * measured.draftMs;
  const cycleMs = mode === "sd" ? measured.verifyMs + draftingMs : Math.max(measured.verifyMs, draftingMs);
  return (tokens * measured.arStepMs) / cycleMs;
}

/** Each row's speedups over ar and sd at its concurrency and temperature, and its ideal. */
export function compareRows(rows: BenchRow[]): void {
  const find = (mode: DecodingModeName, row: BenchRow): BenchRow | undefined =>
    rows.find(
      (r) => r.mode === mode && r.concurrency === row.concurrency && r.temperature === row.temperature,
    );
  for (const row of rows) {
    const ar = find("ar", row);
    const sd = find("sd", row);
    if (ar) row.speedupOverAr = row.tokensPerSecond / ar.tokensPerSecond;
    if (sd) row.speedupOverSd = row.tokensPerSecond / sd.tokensPerSecond;
    if (
      row.mode !== "ar" &&
      ar?.targetStepMs !== undefined &&
      row.tokenAcceptance !== undefined &&
      row.meanWindow !== undefined &&
      row.targetStepMs !== undefined &&
      row.draftStepMs !== undefined
    ) {
      row.idealSpeedupOverAr = idealSpeedup(row.mode, {
        acceptance: row.tokenAcceptance,
        window: row.meanWindow,
        verifyMs: row.targetStepMs,
        draftMs: row.draftStepMs,
        arStepMs: ar.targetStepMs,
      });
    }
  }
}

interface Outcome {
  tokenIds: number[];
  targetSteps: number;
  draftTokens: number;
  acceptedTokens: number;
  ttftMs: number;
}

function generate(client: GatewayClient, request: GenerateRequest): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    let ttftMs = -1;
    const tokenIds: number[] = [];
    let last: GenerateResponse | undefined;
    const call = client.generate(request);
    call.on("data", (response: GenerateResponse) => {
      if (ttftMs < 0 && response.tokenIds.length > 0) ttftMs = performance.now() - started;
      tokenIds.push(...response.tokenIds);
      if (response.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED) last = response;
    });
    call.on("error", reject);
    call.on("end", () => {
      const usage = last?.usage;
      if (!usage) return reject(new Error("a response stream ended without usage"));
      resolve({
        tokenIds,
        targetSteps: usage.targetSteps,
        draftTokens: usage.draftTokens,
        acceptedTokens: usage.acceptedTokens,
        ttftMs,
      });
    });
  });
}

function gatewayInfo(client: GatewayClient): Promise<GatewayInfo> {
  return new Promise((resolve, reject) =>
    client.info({}, (error, info) => (error ? reject(error) : resolve(info))),
  );
}

function promptsFor(
  info: GatewayInfo,
  options: BenchOptions,
): Pick<GenerateRequest, "prompt" | "promptTokenIds">[] {
  if (info.hasTokenizer) return options.prompts.map((prompt) => ({ prompt, promptTokenIds: [] }));
  const vocab = (info.target as ServiceInfo | undefined)?.model?.vocabSize ?? 2;
  let state = 12345;
  const next = (): number => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state;
  };
  return Array.from({ length: 8 }, () => ({
    prompt: "",
    promptTokenIds: Array.from({ length: options.promptTokens }, () => next() % vocab),
  }));
}

type Scrape = { draft?: string; target?: string; gateway?: string };

async function scrapeAll(urls: MetricsUrls): Promise<Scrape> {
  const scrape = async (url: string | undefined): Promise<string | undefined> =>
    url === undefined ? undefined : (await fetch(url)).text();
  const [draft, target, gateway] = await Promise.all([
    scrape(urls.draft),
    scrape(urls.target),
    scrape(urls.gateway),
  ]);
  return { draft, target, gateway };
}

/** What the services' counters gained while one mode's round ran (each undefined without its /metrics). */
interface Counted {
  targetSteps?: number;
  targetStepSeconds?: number;
  draftSteps?: number;
  draftStepSeconds?: number;
  verifySteps?: number;
  /** Verify steps that accepted their first draft. */
  firstAccepted?: number;
  draftTokens?: number;
}

function counted(before: Scrape, after: Scrape): Counted {
  const growth = (service: keyof Scrape, name: string, labels: Record<string, string> = {}) => {
    const [from, to] = [before[service], after[service]];
    return from === undefined || to === undefined
      ? undefined
      : sampleValue(to, name, labels) - sampleValue(from, name, labels);
  };
  return {
    targetSteps: growth("target", "pearl_engine_step_duration_seconds_count"),
    targetStepSeconds: growth("target", "pearl_engine_step_duration_seconds_sum"),
    draftSteps: growth("draft", "pearl_engine_step_duration_seconds_count"),
    draftStepSeconds: growth("draft", "pearl_engine_step_duration_seconds_sum"),
    verifySteps: growth("gateway", "pearl_spec_verify_steps_total"),
    firstAccepted: growth("gateway", "pearl_spec_accepted_tokens_per_position_total", { position: "1" }),
    draftTokens: growth("gateway", "pearl_spec_draft_tokens_total"),
  };
}

/** One mode's measurements at one concurrency and temperature, summed over its rounds. */
class Cell {
  readonly outcomes: Outcome[] = [];
  seconds = 0;
  private readonly totals: Counted = {};

  constructor(readonly mode: DecodingModeName) {}

  add(outcomes: Outcome[], seconds: number, gained: Counted): void {
    this.outcomes.push(...outcomes);
    this.seconds += seconds;
    for (const key of Object.keys(gained) as (keyof Counted)[]) {
      const value = gained[key];
      if (value !== undefined) this.totals[key] = (this.totals[key] ?? 0) + value;
    }
  }

  row(concurrency: number, temperature: number): BenchRow {
    const sum = (pick: (o: Outcome) => number): number =>
      this.outcomes.reduce((total, o) => total + pick(o), 0);
    const tokens = sum((o) => o.tokenIds.length);
    const drafted = sum((o) => o.draftTokens);
    const row: BenchRow = {
      mode: this.mode,
      concurrency,
      temperature,
      requests: this.outcomes.length,
      tokens,
      seconds: this.seconds,
      tokensPerSecond: tokens / this.seconds,
      meanAcceptedLength: tokens / sum((o) => o.targetSteps),
      acceptance: drafted > 0 ? sum((o) => o.acceptedTokens) / drafted : 0,
      meanTtftMs: sum((o) => o.ttftMs) / this.outcomes.length,
    };
    const { targetSteps, targetStepSeconds, draftSteps, draftStepSeconds } = this.totals;
    const { verifySteps, firstAccepted, draftTokens } = this.totals;
    if (targetSteps && targetStepSeconds !== undefined) {
      row.targetStepMs = (1000 * targetStepSeconds) / targetSteps;
      row.overheadPerTargetStepMs = (1000 * this.seconds) / targetSteps - row.targetStepMs;
    }
    if (draftSteps && draftStepSeconds !== undefined && this.mode !== "ar") {
      row.draftStepMs = (1000 * draftStepSeconds) / draftSteps;
    }
    if (verifySteps && firstAccepted !== undefined && draftTokens !== undefined) {
      row.tokenAcceptance = firstAccepted / verifySteps;
      row.meanWindow = draftTokens / verifySteps;
    }
    return row;
  }
}

/**
 * Measures every mode at every concurrency and temperature. The modes of one concurrency and temperature
 * take turns, `rounds` times (each round in another order), so that they share the machine's moments: on
 * a machine that others use too, a load that comes and goes would otherwise favour whichever mode ran in
 * the quiet minute.
 */
export async function runBench(
  address: string,
  options: BenchOptions,
  metricsUrls: MetricsUrls = {},
  onProgress: BenchProgress = () => undefined,
): Promise<{ rows: BenchRow[]; outputsAgree: boolean }> {
  const client = new GatewayClient(address, credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    const info = await gatewayInfo(client);
    const promptSet = promptsFor(info, options);
    const requestFor = (
      index: number,
      mode: DecodingModeName,
      temperature: number,
      maxTokens: number,
    ): GenerateRequest => ({
      requestId: "",
      stop: [],
      ...promptSet[index % promptSet.length]!,
      maxTokens,
      temperature,
      seed: index,
      mode: PROTO_MODES[mode],
    });
    const perRound = (concurrency: number): number =>
      Math.max(concurrency, Math.ceil(options.requests / options.rounds));
    const total =
      options.temperatures.length *
      options.modes.length *
      options.rounds *
      options.concurrencies.reduce((sum, concurrency) => sum + perRound(concurrency), 0);
    let done = 0;
    const rows: BenchRow[] = [];
    let outputsAgree = true;
    for (const temperature of options.temperatures) {
      for (const concurrency of options.concurrencies) {
        const cells = options.modes.map((mode) => new Cell(mode));
        // One short request per mode first: connections, first-step costs.
        for (const { mode } of cells) await generate(client, requestFor(0, mode, temperature, 8));
        const count = perRound(concurrency);
        for (let round = 0; round < options.rounds; round++) {
          for (let turn = 0; turn < cells.length; turn++) {
            const cell = cells[(round + turn) % cells.length]!;
            const label = `${cell.mode} at concurrency ${concurrency}, temperature ${temperature}`;
            onProgress(done, total, label);
            const before = await scrapeAll(metricsUrls);
            const outcomes: Outcome[] = new Array<Outcome>(count);
            let next = 0;
            const started = performance.now();
            await Promise.all(
              Array.from({ length: concurrency }, async () => {
                while (next < count) {
                  const i = next++;
                  const request = requestFor(round * count + i, cell.mode, temperature, options.maxTokens);
                  outcomes[i] = await generate(client, request);
                  onProgress(++done, total, label);
                }
              }),
            );
            const seconds = (performance.now() - started) / 1000;
            cell.add(outcomes, seconds, counted(before, await scrapeAll(metricsUrls)));
          }
        }
        // The same prompts and seeds in the same order in every cell: at temperature 0, the same tokens.
        if (temperature === 0) {
          const reference = cells[0]!.outcomes.map((outcome) => outcome.tokenIds.join(","));
          for (const cell of cells.slice(1)) {
            if (cell.outcomes.some((outcome, i) => outcome.tokenIds.join(",") !== reference[i])) {
              outputsAgree = false;
            }
          }
        }
        rows.push(...cells.map((cell) => cell.row(concurrency, temperature)));
      }
    }
    compareRows(rows);
    return { rows, outputsAgree };
  } finally {
    client.close();
  }
}

export function formatBench(rows: BenchRow[]): string {
  const header = [
    "T",
    "concurrency",
    "mode",
    "tok/s",
    "× ar",
    "× sd",
    "tokens/step",
    "α",
    "window",
    "target step ms",
    "draft step ms",
    "overhead/step ms",
    "ideal × ar",
  ];
  const fixed = (value: number | undefined, digits: number): string =>
    value === undefined ? "–" : value.toFixed(digits);
  const lines = rows.map((row) => [
    String(row.temperature),
    String(row.concurrency),
    row.mode,
    fixed(row.tokensPerSecond, 0),
    fixed(row.speedupOverAr, 2),
    fixed(row.speedupOverSd, 2),
    fixed(row.meanAcceptedLength, 2),
    row.mode === "ar" ? "–" : fixed(row.tokenAcceptance, 2),
    row.mode === "ar" ? "–" : fixed(row.meanWindow, 2),
    fixed(row.targetStepMs, 2),
    fixed(row.draftStepMs, 2),
    fixed(row.overheadPerTargetStepMs, 2),
    fixed(row.idealSpeedupOverAr, 2),
  ]);
  // At least 3 wide: a markdown alignment cell needs a dash besides its colon.
  const widths = header.map((title, column) =>
    Math.max(3, title.length, ...lines.map((line) => line[column]!.length)),
  );
  // A markdown table, aligned to read in a terminal too: text columns left, numbers right.
  const numeric = header.map((_, column) => column !== 2);
  const row = (cells: string[]): string =>
    `| ${cells.map((cell, column) => (numeric[column] ? cell.padStart(widths[column]!) : cell.padEnd(widths[column]!))).join(" | ")} |`;
  const rule = `| ${widths.map((width, column) => (numeric[column] ? "-".repeat(width - 1) + ":" : "-".repeat(width))).join(" | ")} |`;
  return [row(header), rule, ...lines.map(row)].join("\n");
}
