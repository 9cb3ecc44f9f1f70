// Configuration of the three services. Every setting is a command-line flag and an environment variable
// (PEARL_*); the flag wins. The same variable configures a setting whichever command reads it, so
// `pearl serve --draft-port` and `pearl draft --port` both read PEARL_DRAFT_PORT.
import { type Command, InvalidArgumentError, Option } from "commander";
import { DECODING_MODE_NAMES, type DecodingModeName } from "./decoding_modes.js";
import { isLogLevel, type LogLevel } from "./logging.js";
import type { Backend } from "./native.js";

/** Settings shared by the draft and the target service: one model, one engine, one gRPC server. */
export interface ModelServiceConfig {
  modelDir: string;
  /** Shown to clients; "" means the model folder's name. */
  modelId: string;
  backend: Backend;
  /** CPU backend threads; 0: all cores. */
  numThreads: number;
  /** CUDA device ordinals, one per tensor-parallel rank; empty: automatic (`pearl serve` places the
   * models, a service started alone takes the engine's default GPU). */
  devices: number[];
  /** KV cache capacity in blocks; 0: the engine's default. */
  numBlocks: number;
  blockSize: number;
  /** Batch-invariant numerics on the cuda backend (greedy pearl/sd equals ar whatever shares a step);
   * the cpu backend always is. */
  deterministic: boolean;
  host: string;
  /** 0 picks a free port (logged at start-up). */
  grpcPort: number;
  /** /metrics and /health; 0 picks a free port, -1 disables. */
  httpPort: number;
  /** Most prompt tokens prefilled per step, over all sessions; longer prompts take several steps. */
  prefillChunk: number;
  /** Most sessions advanced by one step. */
  maxBatch: number;
  /** Batch sizes whose step time is measured at start-up (empty: none; measured online anyway). */
  profileBatchSizes: number[];
  logLevel: LogLevel;
  /** PEM files of the gRPC port's TLS ("": plaintext); a client CA makes it mutual TLS. */
  tlsCert: string;
  tlsKey: string;
  tlsClientCa: string;
}

export type DraftServiceConfig = ModelServiceConfig;

export interface TargetServiceConfig extends ModelServiceConfig {
  /** Most proposed tokens one session gets verified in one step. */
  maxVerifyWindow: number;
}

export interface GatewayConfig {
  host: string;
  grpcPort: number;
  httpPort: number;
  draftAddress: string;
  targetAddress: string;
  defaultMode: DecodingModeName;
  /** Draft tokens past the last verified position; 0: set from measured step times. */
  lookahead: number;
  /** Most proposed tokens per verify step; 0: set from measured step times. */
  verifyWindow: number;
  /** Upper bound of the automatic draft length. */
  maxGamma: number;
  /** Lower bound of the automatic draft length; 0 lets pearl requests run on the target alone while
   * drafting does not pay. */
  minGamma: number;
  /** The fixed draft length of mode sd; 0: chosen like pearl's, for sequential drafting. */
  sdGamma: number;
  draftTemperature: number;
  /** Size of a sampled draft's sparse distribution q. */
  draftTopK: number;
  defaultMaxTokens: number;
  /** A folder with tokenizer.json (and tokenizer_config.json); "": token ids only. */
  tokenizerDir: string;
  /** The model name of the OpenAI API; "": the target's model id (its folder name unless configured). */
  servedModelName: string;
  /** How long to wait for the target (and draft) service at start-up. */
  connectTimeoutSeconds: number;
  logLevel: LogLevel;
  /** Keys a client must present (Authorization: Bearer); empty: no authentication. */
  apiKeys: string[];
  /** What stays open without a key. */
  apiKeyExempt: ("health" | "metrics")[];
  /** PEM files of TLS on the REST and gRPC ports ("": plaintext); a client CA makes it mutual TLS. */
  tlsCert: string;
  tlsKey: string;
  tlsClientCa: string;
  /** TLS towards the draft and target services: a CA turns it on, cert and key authenticate the gateway. */
  linkTlsCa: string;
  linkTlsCert: string;
  linkTlsKey: string;
  /** Most requests running at once, and waiting for one of those places; beyond both: 429. */
  maxNumSeqs: number;
  maxWaiting: number;
  /** Largest request body (REST) or message (gRPC); larger ones: 413 / RESOURCE_EXHAUSTED. */
  maxBodyBytes: number;
  /** Longest prompt; 0: the target's context length less one. */
  maxPromptTokens: number;
  /** Most seconds a client may take to send its request; slower ones get 408 (slowloris). */
  bodyTimeoutSeconds: number;
  /** On SIGTERM: how long requests in flight may take to finish before they are cancelled. */
  shutdownTimeoutSeconds: number;
}

export const DEFAULT_HOST = "127.0.0.1";
export const DEFAULT_PORTS = {
  gatewayGrpc: 50051,
  draftGrpc: 50052,
  targetGrpc: 50053,
  gatewayHttp: 8000,
  draftHttp: 8001,
  targetHttp: 8002,
} as const;

// ---- option specs -------------------------------------------------------------------------------------

export interface OptionSpec<Config> {
  key: keyof Config & string;
  /** The flag without dashes, e.g. "port"; `pearl serve` may prefix it ("draft-port"). */
  flag: string;
  /** Placeholder of the value in --help. */
  valueName: string;
  /** A switch: the flag alone means true; a value (as the environment variable gives) may follow it. */
  valueOptional?: boolean;
  /** A list that repeating the flag extends. */
  repeatable?: boolean;
  /** Never put on a command line (where `ps` shows it): a child process gets it in its environment. */
  secret?: boolean;
  env: string;
  description: string;
  defaultValue: unknown;
  parse: (raw: string) => unknown;
}

function integerIn(min: number, max: number): (raw: string) => number {
  return (raw) => {
    const value = Number(raw);
    if (!Number.isInteger(value) || value < min || value > max) {
      throw new InvalidArgumentError(`expected an integer in [${min}, ${max}], got "${raw}"`);
    }
    return value;
  };
}

function numberIn(min: number, max: number): (raw: string) => number {
  return (raw) => {
    const value = Number(raw);
    if (raw.trim() === "" || !Number.isFinite(value) || value < min || value > max) {
      throw new InvalidArgumentError(`expected a number in [${min}, ${max}], got "${raw}"`);
    }
    return value;
  };
}

function oneOf<T extends string>(values: readonly T[]): (raw: string) => T {
  return (raw) => {
    if (!(values as readonly string[]).includes(raw)) {
      throw new InvalidArgumentError(`expected one of ${values.join(", ")}, got "${raw}"`);
    }
    return raw as T;
  };
}

function text(raw: string): string {
  return raw;
}

function logLevel(raw: string): LogLevel {
  if (!isLogLevel(raw)) throw new InvalidArgumentError(`expected error, warn, info or debug, got "${raw}"`);
  return raw;
}

const TRUE_WORDS = ["true", "1", "on", "yes"];
const FALSE_WORDS = ["false", "0", "off", "no"];

function parseBoolean(raw: string): boolean {
  const word = raw.trim().toLowerCase();
  if (TRUE_WORDS.includes(word)) return true;
  if (FALSE_WORDS.includes(word)) return false;
  throw new InvalidArgumentError(
    `expected ${TRUE_WORDS.join(", ")} or ${FALSE_WORDS.join(", ")}, got "${raw}"`,
  );
}

const parsePort = integerIn(0, 65535);

function parseHttpPort(raw: string): number {
  return raw === "off" ? -1 : parsePort(raw);
}

/** "0" or "1,2,3"; "" and "auto" mean automatic placement. */
export function parseDevices(raw: string): number[] {
  const list = raw.trim();
  if (list === "" || list === "auto") return [];
  return list.split(",").map((part) => {
    const ordinal = part.trim();
    if (!/^\d+$/.test(ordinal) || !Number.isSafeInteger(Number(ordinal))) {
      throw new InvalidArgumentError(
        `expected CUDA device ordinals separated by commas (e.g. 0 or 1,2,3) or auto, got "${raw}"`,
      );
    }
    return Number(ordinal);
  });
}

function parseBatchSizes(raw: string): number[] {
  if (raw === "" || raw === "off") return [];
  return raw.split(",").map((part) => integerIn(1, 4096)(part.trim()));
}

const BACKENDS: readonly Backend[] = ["cpu", "cuda", "auto"];

function parseApiKeys(raw: string): string[] {
  const keys = raw.split(",");
  // The message must not echo the value: it is a secret.
  if (keys.some((key) => key.trim() === "")) throw new InvalidArgumentError("an API key must not be empty");
  return keys;
}

function parseExempt(raw: string): ("health" | "metrics")[] {
  if (raw === "off" || raw === "none") return [];
  return raw.split(",").map((part) => oneOf(["health", "metrics"] as const)(part.trim()));
}

/** A flag naming a PEM file; its variable is `env` followed by the flag in capitals. */
function pemFileSpec<Config>(key: keyof Config & string, flag: string, env: string, description: string) {
  const variable = `${env}${flag.toUpperCase().replaceAll("-", "_")}`;
  return { key, flag, valueName: "file", env: variable, description, defaultValue: "", parse: text };
}

/** The PEM files of a server's TLS; `env` is the variables' prefix (PEARL_DRAFT_, ...). */
function tlsServerSpecs<Config extends { tlsCert: string; tlsKey: string; tlsClientCa: string }>(
  env: string,
  port: string,
): OptionSpec<Config>[] {
  return [
    pemFileSpec<Config>("tlsCert", "tls-cert", env, `PEM certificate chain: serve the ${port} over TLS`),
    pemFileSpec<Config>("tlsKey", "tls-key", env, "PEM private key of that certificate"),
    pemFileSpec<Config>(
      "tlsClientCa",
      "tls-client-ca",
      env,
      "PEM CA bundle: require client certificates it signed",
    ),
  ];
}

function modelServiceSpecs(
  role: "draft" | "target",
  grpcPort: number,
  httpPort: number,
): OptionSpec<TargetServiceConfig>[] {
  const env = `PEARL_${role.toUpperCase()}_`;
  return [
    {
      key: "modelDir",
      flag: "model",
      valueName: "dir",
      env: `${env}MODEL`,
      description: `${role} model folder (Hugging Face layout: config.json + *.safetensors)`,
      defaultValue: "",
      parse: text,
    },
    {
      key: "modelId",
      flag: "model-id",
      valueName: "name",
      env: `${env}MODEL_ID`,
      description: "model name reported to clients (default: the folder's name)",
      defaultValue: "",
      parse: text,
    },
    {
      key: "backend",
      flag: "backend",
      valueName: "cpu|cuda|auto",
      env: `${env}BACKEND`,
      description: "compute backend",
      defaultValue: "auto",
      parse: oneOf(BACKENDS),
    },
    {
      key: "numThreads",
      flag: "threads",
      valueName: "n",
      env: `${env}THREADS`,
      description: "CPU backend threads (0: all cores)",
      defaultValue: 0,
      parse: integerIn(0, 1024),
    },
    {
      key: "devices",
      flag: "devices",
      valueName: "list",
      env: `${env}DEVICES`,
      description:
        "CUDA devices, comma-separated, one per tensor-parallel rank (e.g. 1,2,3: tensor parallelism over " +
        "3 GPUs; cuda backend only; default: placed by pearl serve, GPU 0 for a service started alone)",
      defaultValue: [],
      parse: parseDevices,
    },
    {
      key: "numBlocks",
      flag: "kv-blocks",
      valueName: "n",
      env: `${env}KV_BLOCKS`,
      description: "KV cache capacity in blocks (0: the engine's default)",
      defaultValue: 0,
      parse: integerIn(0, 1 << 24),
    },
    {
      key: "blockSize",
      flag: "block-size",
      valueName: "tokens",
      env: `${env}BLOCK_SIZE`,
      description: "tokens per KV block",
      defaultValue: 16,
      parse: integerIn(1, 1024),
    },
    {
      key: "deterministic",
      flag: "deterministic",
      valueName: "bool",
      valueOptional: true,
      env: `${env}DETERMINISTIC`,
      description:
        "batch-invariant numerics, so that greedy pearl/sd output equals ar whatever shares a step (the cpu " +
        "backend always is; on cuda it slows steps of more than 16 rows)",
      defaultValue: false,
      parse: parseBoolean,
    },
    {
      key: "grpcPort",
      flag: "port",
      valueName: "port",
      env: `${env}PORT`,
      description: "gRPC port (0: any free port)",
      defaultValue: grpcPort,
      parse: parsePort,
    },
    {
      key: "httpPort",
      flag: "http-port",
      valueName: "port|off",
      env: `${env}HTTP_PORT`,
      description: "HTTP port of /metrics and /health (0: any free port)",
      defaultValue: httpPort,
      parse: parseHttpPort,
    },
    {
      key: "prefillChunk",
      flag: "prefill-chunk",
      valueName: "tokens",
      env: `${env}PREFILL_CHUNK`,
      description: "most prompt tokens prefilled per step over all sessions",
      defaultValue: 256,
      parse: integerIn(1, 1 << 20),
    },
    {
      key: "maxBatch",
      flag: "max-batch",
      valueName: "n",
      env: `${env}MAX_BATCH`,
      description: "most sessions advanced by one step",
      defaultValue: 256,
      parse: integerIn(1, 1 << 16),
    },
    {
      key: "profileBatchSizes",
      flag: "profile",
      valueName: "sizes|off",
      env: `${env}PROFILE`,
      description: "batch sizes whose step time is measured at start-up, comma-separated",
      defaultValue: [1, 2, 4, 8],
      parse: parseBatchSizes,
    },
    ...tlsServerSpecs<TargetServiceConfig>(env, "gRPC port"),
  ];
}

const HOST_SPEC = {
  key: "host",
  flag: "host",
  valueName: "address",
  env: "PEARL_HOST",
  description: "address the servers bind to",
  defaultValue: DEFAULT_HOST,
  parse: text,
} as const;

const LOG_LEVEL_SPEC = {
  key: "logLevel",
  flag: "log-level",
  valueName: "level",
  env: "PEARL_LOG_LEVEL",
  description: "error, warn, info or debug",
  defaultValue: "info",
  parse: logLevel,
} as const;

export const DRAFT_SERVICE_OPTIONS: OptionSpec<DraftServiceConfig>[] = [
  ...(modelServiceSpecs(
    "draft",
    DEFAULT_PORTS.draftGrpc,
    DEFAULT_PORTS.draftHttp,
  ) as OptionSpec<DraftServiceConfig>[]),
  HOST_SPEC,
  LOG_LEVEL_SPEC,
];

export const TARGET_SERVICE_OPTIONS: OptionSpec<TargetServiceConfig>[] = [
  ...modelServiceSpecs("target", DEFAULT_PORTS.targetGrpc, DEFAULT_PORTS.targetHttp),
  {
    key: "maxVerifyWindow",
    flag: "max-verify-window",
    valueName: "tokens",
    env: "PEARL_TARGET_MAX_VERIFY_WINDOW",
    description: "most proposed tokens verified per session per step",
    defaultValue: 32,
    parse: integerIn(1, 1024),
  },
  HOST_SPEC,
  LOG_LEVEL_SPEC,
];

export const GATEWAY_OPTIONS: OptionSpec<GatewayConfig>[] = [
  {
    key: "grpcPort",
    flag: "port",
    valueName: "port",
    env: "PEARL_GATEWAY_PORT",
    description: "gRPC port of the Generate API (0: any free port)",
    defaultValue: DEFAULT_PORTS.gatewayGrpc,
    parse: parsePort,
  },
  {
    key: "httpPort",
    flag: "http-port",
    valueName: "port|off",
    env: "PEARL_GATEWAY_HTTP_PORT",
    description: "HTTP port of /metrics and /health (0: any free port)",
    defaultValue: DEFAULT_PORTS.gatewayHttp,
    parse: parseHttpPort,
  },
  {
    key: "draftAddress",
    flag: "draft",
    valueName: "host:port",
    env: "PEARL_DRAFT_ADDRESS",
    description: "the draft service",
    defaultValue: `localhost:${DEFAULT_PORTS.draftGrpc}`,
    parse: text,
  },
  {
    key: "targetAddress",
    flag: "target",
    valueName: "host:port",
    env: "PEARL_TARGET_ADDRESS",
    description: "the target service",
    defaultValue: `localhost:${DEFAULT_PORTS.targetGrpc}`,
    parse: text,
  },
  {
    key: "defaultMode",
    flag: "mode",
    valueName: "pearl|sd|ar",
    env: "PEARL_MODE",
    description: "decoding mode of requests that do not choose one",
    defaultValue: "pearl",
    parse: oneOf(DECODING_MODE_NAMES),
  },
  {
    key: "lookahead",
    flag: "lookahead",
    valueName: "tokens",
    env: "PEARL_LOOKAHEAD",
    description: "pin how far the draft runs past the last verified token (0: from measured step times)",
    defaultValue: 0,
    parse: integerIn(0, 1024),
  },
  {
    key: "verifyWindow",
    flag: "verify-window",
    valueName: "tokens",
    env: "PEARL_VERIFY_WINDOW",
    description: "pin the most proposed tokens per verify step (0: from measured step times)",
    defaultValue: 0,
    parse: integerIn(0, 1024),
  },
  {
    key: "maxGamma",
    flag: "max-gamma",
    valueName: "tokens",
    env: "PEARL_MAX_GAMMA",
    description: "upper bound of the automatic draft length",
    defaultValue: 16,
    parse: integerIn(1, 1024),
  },
  {
    key: "minGamma",
    flag: "min-gamma",
    valueName: "tokens",
    env: "PEARL_MIN_GAMMA",
    description:
      "lower bound of the automatic draft length (0: pearl requests run on the target alone while the " +
      "measured step times and acceptance say drafting does not pay; 1: always draft)",
    defaultValue: 0,
    parse: integerIn(0, 1024),
  },
  {
    key: "sdGamma",
    flag: "sd-gamma",
    valueName: "tokens",
    env: "PEARL_SD_GAMMA",
    description: "draft length of mode sd, vanilla speculative decoding (0: from measured step times)",
    defaultValue: 4,
    parse: integerIn(0, 1024),
  },
  {
    key: "draftTemperature",
    flag: "draft-temperature",
    valueName: "t",
    env: "PEARL_DRAFT_TEMPERATURE",
    description: "draft sampling temperature (0: greedy draft)",
    defaultValue: 0,
    parse: numberIn(0, 100),
  },
  {
    key: "draftTopK",
    flag: "draft-top-k",
    valueName: "k",
    env: "PEARL_DRAFT_TOP_K",
    description: "size of a sampled draft's distribution q sent to the target",
    defaultValue: 16,
    parse: integerIn(1, 1024),
  },
  {
    key: "defaultMaxTokens",
    flag: "max-tokens",
    valueName: "n",
    env: "PEARL_MAX_TOKENS",
    description: "max_tokens of requests that do not set it",
    defaultValue: 256,
    parse: integerIn(1, 1 << 24),
  },
  {
    key: "tokenizerDir",
    flag: "tokenizer",
    valueName: "dir",
    env: "PEARL_TOKENIZER",
    description: "folder with tokenizer.json for text prompts (default: none, token ids only)",
    defaultValue: "",
    parse: text,
  },
  {
    key: "servedModelName",
    flag: "served-model-name",
    valueName: "name",
    env: "PEARL_SERVED_MODEL_NAME",
    description:
      "model name of the OpenAI API, which requests must give as `model` (default: the target's model id, " +
      "its folder name; pearl serve on the embedded pair: pearl-code)",
    defaultValue: "",
    parse: text,
  },
  {
    key: "connectTimeoutSeconds",
    flag: "connect-timeout",
    valueName: "seconds",
    env: "PEARL_CONNECT_TIMEOUT",
    description: "how long to wait for the draft and target services at start-up",
    defaultValue: 60,
    parse: numberIn(0, 86400),
  },
  {
    key: "apiKeys",
    flag: "api-key",
    valueName: "key",
    repeatable: true,
    secret: true,
    env: "PEARL_API_KEY",
    description:
      "require this key (Authorization: Bearer <key>) on the REST and gRPC APIs; repeat the flag or " +
      "separate keys with commas to accept several",
    defaultValue: [],
    parse: parseApiKeys,
  },
  {
    key: "apiKeyExempt",
    flag: "api-key-exempt",
    valueName: "health,metrics|off",
    env: "PEARL_API_KEY_EXEMPT",
    description: "endpoints that stay open without a key (health: /health and the gRPC health service)",
    defaultValue: ["health", "metrics"],
    parse: parseExempt,
  },
  ...tlsServerSpecs<GatewayConfig>("PEARL_GATEWAY_", "REST and gRPC ports"),
  pemFileSpec<GatewayConfig>(
    "linkTlsCa",
    "link-tls-ca",
    "PEARL_",
    "PEM CA bundle: reach the draft and target services over TLS, verifying them with it",
  ),
  pemFileSpec<GatewayConfig>(
    "linkTlsCert",
    "link-tls-cert",
    "PEARL_",
    "PEM client certificate for those links",
  ),
  pemFileSpec<GatewayConfig>("linkTlsKey", "link-tls-key", "PEARL_", "PEM private key of --link-tls-cert"),
  {
    key: "maxNumSeqs",
    flag: "max-num-seqs",
    valueName: "n",
    env: "PEARL_MAX_NUM_SEQS",
    description: "most requests running at once; later ones wait",
    defaultValue: 256,
    parse: integerIn(1, 1 << 20),
  },
  {
    key: "maxWaiting",
    flag: "max-waiting",
    valueName: "n",
    env: "PEARL_MAX_WAITING",
    description: "most requests waiting to run; beyond it: 429 (gRPC RESOURCE_EXHAUSTED) with Retry-After",
    defaultValue: 1024,
    parse: integerIn(0, 1 << 20),
  },
  {
    key: "maxBodyBytes",
    flag: "max-body-bytes",
    valueName: "bytes",
    env: "PEARL_MAX_BODY_BYTES",
    description: "largest request body (REST: 413) or message (gRPC: RESOURCE_EXHAUSTED)",
    defaultValue: 4 * 1024 * 1024,
    parse: integerIn(1024, 1 << 30),
  },
  {
    key: "maxPromptTokens",
    flag: "max-prompt-tokens",
    valueName: "n",
    env: "PEARL_MAX_PROMPT_TOKENS",
    description: "longest prompt; longer ones: 400 (0: the target's context length less one)",
    defaultValue: 0,
    parse: integerIn(0, 1 << 24),
  },
  {
    key: "bodyTimeoutSeconds",
    flag: "body-timeout",
    valueName: "seconds",
    env: "PEARL_BODY_TIMEOUT",
    description: "most seconds a REST client may take to send its request; slower ones get 408",
    defaultValue: 30,
    parse: numberIn(1, 3600),
  },
  {
    key: "shutdownTimeoutSeconds",
    flag: "shutdown-timeout",
    valueName: "seconds",
    env: "PEARL_SHUTDOWN_TIMEOUT",
    description: "on SIGTERM: how long requests in flight may take to finish before they are cancelled",
    defaultValue: 30,
    parse: numberIn(0, 3600),
  },
  HOST_SPEC,
  LOG_LEVEL_SPEC,
];

/** How `pearl serve` (and `generate --local`, `bench --local`) places the draft and the target on GPUs,
 * beyond each one's --devices. */
export interface PlacementConfig {
  /** Lets the draft's and the target's GPU groups overlap, and one group name a GPU twice (several
   * tensor-parallel ranks on one GPU, which exercises the tensor-parallel code on a single card). */
  allowSharedDevices: boolean;
}

export const PLACEMENT_OPTIONS: OptionSpec<PlacementConfig>[] = [
  {
    key: "allowSharedDevices",
    flag: "allow-shared-devices",
    valueName: "bool",
    valueOptional: true,
    env: "PEARL_ALLOW_SHARED_DEVICES",
    description:
      "let --draft-devices and --target-devices overlap, or a list name a GPU twice (the models then " +
      "compete for that GPU, which costs PEARL its parallelism)",
    defaultValue: false,
    parse: parseBoolean,
  },
];

function defaults<Config>(specs: OptionSpec<Config>[]): Config {
  return Object.fromEntries(specs.map((spec) => [spec.key, spec.defaultValue])) as Config;
}

export function draftServiceDefaults(): DraftServiceConfig {
  return defaults(DRAFT_SERVICE_OPTIONS);
}

export function targetServiceDefaults(): TargetServiceConfig {
  return defaults(TARGET_SERVICE_OPTIONS);
}

export function gatewayDefaults(): GatewayConfig {
  return defaults(GATEWAY_OPTIONS);
}

// ---- commander glue -----------------------------------------------------------------------------------

function isEmptyDefault<Config>(spec: OptionSpec<Config>): boolean {
  return spec.defaultValue === "" || (Array.isArray(spec.defaultValue) && spec.defaultValue.length === 0);
}

function camelCase(flag: string): string {
  return flag.replace(/-([a-z])/g, (_, letter: string) => letter.toUpperCase());
}

/**
 * Adds the specs' flags to a command, each prefixed with `prefix` (e.g. "draft-"), except the keys in
 * `skip` (settings the command derives itself).
 */
export function addOptions<Config>(
  command: Command,
  specs: OptionSpec<Config>[],
  prefix = "",
  skip: ReadonlySet<string> = new Set(),
): void {
  const existing = new Set(command.options.map((option) => option.long));
  for (const spec of specs) {
    if (skip.has(spec.key)) continue;
    const long = `--${prefix}${spec.flag}`;
    if (existing.has(long)) continue;
    const value = spec.valueOptional ? `[${spec.valueName}]` : `<${spec.valueName}>`;
    const option = new Option(`${long} ${value}`, spec.description)
      .env(spec.env)
      .argParser((raw: string, previous: unknown) =>
        spec.repeatable && Array.isArray(previous) && previous !== spec.defaultValue
          ? [...(previous as unknown[]), ...(spec.parse(raw) as unknown[])]
          : spec.parse(raw),
      );
    // An empty default means "not set" (readOptions falls back to it); --help need not show it.
    if (!isEmptyDefault(spec)) {
      option.default(
        spec.defaultValue,
        Array.isArray(spec.defaultValue) ? spec.defaultValue.join(",") : undefined,
      );
    }
    command.addOption(option);
  }
}

/** Reads back what addOptions added into a typed config. */
export function readOptions<Config>(
  values: Record<string, unknown>,
  specs: OptionSpec<Config>[],
  prefix = "",
): Config {
  const config = defaults(specs) as Record<string, unknown>;
  for (const spec of specs) {
    const value = values[camelCase(`${prefix}${spec.flag}`)];
    if (value !== undefined) config[spec.key] = value;
  }
  return config as Config;
}

/** The flags that reproduce a config, for starting a service as a child process. */
export function toArgs<Config>(config: Config, specs: OptionSpec<Config>[]): string[] {
  const args: string[] = [];
  for (const spec of specs) {
    const value = (config as Record<string, unknown>)[spec.key];
    if (value === undefined || spec.secret) continue;
    let raw: string;
    if (Array.isArray(value)) raw = value.length > 0 ? value.join(",") : "off";
    else if (spec.key === "httpPort" && value === -1) raw = "off";
    else raw = String(value);
    // A text or list left at an empty default stays out: the child falls back to the same default ("off"
    // means an empty list to --profile, but is no device list).
    if (isEmptyDefault(spec) && (raw === "" || (Array.isArray(value) && value.length === 0))) continue;
    args.push(`--${spec.flag}`, raw);
  }
  return args;
}

/** The environment variables that carry a config's secrets to a child process (see toArgs). */
export function secretEnv<Config>(config: Config, specs: OptionSpec<Config>[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const spec of specs) {
    const value = (config as Record<string, unknown>)[spec.key];
    if (!spec.secret || value === undefined || value === "" || (Array.isArray(value) && value.length === 0)) {
      continue;
    }
    env[spec.env] = Array.isArray(value) ? value.join(",") : String(value);
  }
  return env;
}
