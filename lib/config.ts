// Configuration of the three services. Each setting is declared once, below, and the declaration gives
// everything about it: the command-line flag, the environment variable (PEARL_*; the flag wins), the
// --help line, the parser and, through the parser, its type in the config the services read (ConfigOf).
// The same variable configures a setting whichever command reads it, so `pearl serve --draft-port` and
// `pearl draft --port` both read PEARL_DRAFT_PORT.
import { type Command, InvalidArgumentError, Option } from "commander";
import { DECODING_MODE_NAMES } from "./decoding_modes.js";
import { isLogLevel, type LogLevel } from "./logging.js";
import type { Backend } from "./native.js";

/** One setting, whose value has type T. */
export interface OptionSpec<T> {
  /** The flag without dashes, e.g. "port"; `pearl serve` may prefix it ("draft-port"). */
  flag: string;
  /** Placeholder of the value in --help. */
  valueName: string;
  env: string;
  description: string;
  defaultValue: T;
  parse: (raw: string) => T;
  /** The flag's text for a value, for a child process (default: lists joined by commas, "off" if empty). */
  format?(value: T): string;
  /** A switch: the flag alone means true; a value (as the environment variable gives) may follow it. */
  valueOptional?: boolean;
  /** A list that repeating the flag extends. */
  repeatable?: boolean;
  /** Never put on a command line (where `ps` shows it): a child process gets it in its environment. */
  secret?: boolean;
}

/** Settings by config key. */
export type OptionSet = Record<string, OptionSpec<unknown>>;

/** The config that a set of settings yields. */
export type ConfigOf<Options extends OptionSet> = {
  [Key in keyof Options]: Options[Key] extends OptionSpec<infer T> ? T : never;
};

/** Declares one setting; the parser fixes its type, which the default must have. */
function option<T>(spec: Omit<OptionSpec<T>, "defaultValue"> & { defaultValue: NoInfer<T> }): OptionSpec<T> {
  return spec;
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

// ---- parsers ------------------------------------------------------------------------------------------

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

function formatHttpPort(port: number): string {
  return port === -1 ? "off" : String(port);
}

/** A flag naming a PEM file; its variable is `env` followed by the flag in capitals. */
function pemFile(flag: string, env: string, description: string): OptionSpec<string> {
  const variable = `${env}${flag.toUpperCase().replaceAll("-", "_")}`;
  return option({ flag, valueName: "file", env: variable, description, defaultValue: "", parse: text });
}

/** The PEM files of a server's TLS ("": plaintext; a client CA makes it mutual TLS); `env` is the
 * variables' prefix (PEARL_DRAFT_, ...). */
function tlsServerOptions(env: string, port: string) {
  return {
    tlsCert: pemFile("tls-cert", env, `PEM certificate chain: serve the ${port} over TLS`),
    tlsKey: pemFile("tls-key", env, "PEM private key of that certificate"),
    tlsClientCa: pemFile("tls-client-ca", env, "PEM CA bundle: require client certificates it signed"),
  };
}

// ---- settings -----------------------------------------------------------------------------------------

const SHARED_OPTIONS = {
  host: option({
    flag: "host",
    valueName: "address",
    env: "PEARL_HOST",
    description: "address the servers bind to",
    defaultValue: DEFAULT_HOST,
    parse: text,
  }),
  logLevel: option({
    flag: "log-level",
    valueName: "level",
    env: "PEARL_LOG_LEVEL",
    description: "error, warn, info or debug",
    defaultValue: "info",
    parse: logLevel,
  }),
};

/** The settings every service has, which `pearl serve` takes once for all three. */
export const SHARED_OPTION_KEYS = Object.keys(SHARED_OPTIONS) as (keyof typeof SHARED_OPTIONS)[];

/** The settings of a draft or target service: one model, one engine, one gRPC server. */
function modelServiceOptions(role: "draft" | "target", grpcPort: number, httpPort: number) {
  const env = `PEARL_${role.toUpperCase()}_`;
  return {
    modelDir: option({
      flag: "model",
      valueName: "dir",
      env: `${env}MODEL`,
      description: `${role} model folder (Hugging Face layout: config.json + *.safetensors)`,
      defaultValue: "",
      parse: text,
    }),
    modelId: option({
      flag: "model-id",
      valueName: "name",
      env: `${env}MODEL_ID`,
      description: "model name reported to clients (default: the folder's name)",
      defaultValue: "",
      parse: text,
    }),
    backend: option({
      flag: "backend",
      valueName: "cpu|cuda|auto",
      env: `${env}BACKEND`,
      description: "compute backend",
      defaultValue: "auto",
      parse: oneOf(BACKENDS),
    }),
    numThreads: option({
      flag: "threads",
      valueName: "n",
      env: `${env}THREADS`,
      description: "CPU backend threads (0: all cores)",
      defaultValue: 0,
      parse: integerIn(0, 1024),
    }),
    // Empty: automatic (`pearl serve` places the models, a service started alone takes GPU 0).
    devices: option({
      flag: "devices",
      valueName: "list",
      env: `${env}DEVICES`,
      description:
        "CUDA devices, comma-separated, one per tensor-parallel rank (e.g. 1,2,3: tensor parallelism over " +
        "3 GPUs; cuda backend only; default: placed by pearl serve, GPU 0 for a service started alone)",
      defaultValue: [],
      parse: parseDevices,
    }),
    numBlocks: option({
      flag: "kv-blocks",
      valueName: "n",
      env: `${env}KV_BLOCKS`,
      description: "KV cache capacity in blocks (0: the engine's default)",
      defaultValue: 0,
      parse: integerIn(0, 1 << 24),
    }),
    blockSize: option({
      flag: "block-size",
      valueName: "tokens",
      env: `${env}BLOCK_SIZE`,
      description: "tokens per KV block",
      defaultValue: 16,
      parse: integerIn(1, 1024),
    }),
    deterministic: option({
      flag: "deterministic",
      valueName: "bool",
      valueOptional: true,
      env: `${env}DETERMINISTIC`,
      description:
        "batch-invariant numerics, so that greedy pearl/sd output equals ar whatever shares a step (the cpu " +
        "backend always is; on cuda it slows steps of more than 16 rows)",
      defaultValue: false,
      parse: parseBoolean,
    }),
    grpcPort: option({
      flag: "port",
      valueName: "port",
      env: `${env}PORT`,
      description: "gRPC port (0: any free port, logged at start-up)",
      defaultValue: grpcPort,
      parse: parsePort,
    }),
    httpPort: option({
      flag: "http-port",
      valueName: "port|off",
      env: `${env}HTTP_PORT`,
      description: "HTTP port of /metrics and /health (0: any free port)",
      defaultValue: httpPort,
      parse: parseHttpPort,
      format: formatHttpPort,
    }),
    // Longer prompts take several steps.
    prefillChunk: option({
      flag: "prefill-chunk",
      valueName: "tokens",
      env: `${env}PREFILL_CHUNK`,
      description: "most prompt tokens prefilled per step over all sessions",
      defaultValue: 256,
      parse: integerIn(1, 1 << 20),
    }),
    maxBatch: option({
      flag: "max-batch",
      valueName: "n",
      env: `${env}MAX_BATCH`,
      description: "most sessions advanced by one step",
      defaultValue: 256,
      parse: integerIn(1, 1 << 16),
    }),
    // Sizes left out are measured online anyway.
    profileBatchSizes: option({
      flag: "profile",
      valueName: "sizes|off",
      env: `${env}PROFILE`,
      description: "batch sizes whose step time is measured at start-up, comma-separated",
      defaultValue: [1, 2, 4, 8],
      parse: parseBatchSizes,
    }),
    ...tlsServerOptions(env, "gRPC port"),
    ...SHARED_OPTIONS,
  };
}

export const DRAFT_SERVICE_OPTIONS = modelServiceOptions(
  "draft",
  DEFAULT_PORTS.draftGrpc,
  DEFAULT_PORTS.draftHttp,
);

export const TARGET_SERVICE_OPTIONS = {
  ...modelServiceOptions("target", DEFAULT_PORTS.targetGrpc, DEFAULT_PORTS.targetHttp),
  maxVerifyWindow: option({
    flag: "max-verify-window",
    valueName: "tokens",
    env: "PEARL_TARGET_MAX_VERIFY_WINDOW",
    description: "most proposed tokens verified per session per step",
    defaultValue: 32,
    parse: integerIn(1, 1024),
  }),
};

export const GATEWAY_OPTIONS = {
  grpcPort: option({
    flag: "port",
    valueName: "port",
    env: "PEARL_GATEWAY_PORT",
    description: "gRPC port of the Generate API (0: any free port)",
    defaultValue: DEFAULT_PORTS.gatewayGrpc,
    parse: parsePort,
  }),
  httpPort: option({
    flag: "http-port",
    valueName: "port|off",
    env: "PEARL_GATEWAY_HTTP_PORT",
    description: "HTTP port of /metrics and /health (0: any free port)",
    defaultValue: DEFAULT_PORTS.gatewayHttp,
    parse: parseHttpPort,
    format: formatHttpPort,
  }),
  draftAddress: option({
    flag: "draft",
    valueName: "host:port",
    env: "PEARL_DRAFT_ADDRESS",
    description: "the draft service",
    defaultValue: `localhost:${DEFAULT_PORTS.draftGrpc}`,
    parse: text,
  }),
  targetAddress: option({
    flag: "target",
    valueName: "host:port",
    env: "PEARL_TARGET_ADDRESS",
    description: "the target service",
    defaultValue: `localhost:${DEFAULT_PORTS.targetGrpc}`,
    parse: text,
  }),
  defaultMode: option({
    flag: "mode",
    valueName: "pearl|sd|ar",
    env: "PEARL_MODE",
    description: "decoding mode of requests that do not choose one",
    defaultValue: "pearl",
    parse: oneOf(DECODING_MODE_NAMES),
  }),
  lookahead: option({
    flag: "lookahead",
    valueName: "tokens",
    env: "PEARL_LOOKAHEAD",
    description: "pin how far the draft runs past the last verified token (0: from measured step times)",
    defaultValue: 0,
    parse: integerIn(0, 1024),
  }),
  verifyWindow: option({
    flag: "verify-window",
    valueName: "tokens",
    env: "PEARL_VERIFY_WINDOW",
    description: "pin the most proposed tokens per verify step (0: from measured step times)",
    defaultValue: 0,
    parse: integerIn(0, 1024),
  }),
  maxGamma: option({
    flag: "max-gamma",
    valueName: "tokens",
    env: "PEARL_MAX_GAMMA",
    description: "upper bound of the automatic draft length",
    defaultValue: 16,
    parse: integerIn(1, 1024),
  }),
  minGamma: option({
    flag: "min-gamma",
    valueName: "tokens",
    env: "PEARL_MIN_GAMMA",
    description:
      "lower bound of the automatic draft length (0: pearl requests run on the target alone while the " +
      "measured step times and acceptance say drafting does not pay; 1: always draft)",
    defaultValue: 0,
    parse: integerIn(0, 1024),
  }),
  sdGamma: option({
    flag: "sd-gamma",
    valueName: "tokens",
    env: "PEARL_SD_GAMMA",
    description: "draft length of mode sd, vanilla speculative decoding (0: from measured step times)",
    defaultValue: 4,
    parse: integerIn(0, 1024),
  }),
  draftTemperature: option({
    flag: "draft-temperature",
    valueName: "t",
    env: "PEARL_DRAFT_TEMPERATURE",
    description: "draft sampling temperature (0: greedy draft)",
    defaultValue: 0,
    parse: numberIn(0, 100),
  }),
  draftTopK: option({
    flag: "draft-top-k",
    valueName: "k",
    env: "PEARL_DRAFT_TOP_K",
    description: "size of a sampled draft's distribution q sent to the target",
    defaultValue: 16,
    parse: integerIn(1, 1024),
  }),
  defaultMaxTokens: option({
    flag: "max-tokens",
    valueName: "n",
    env: "PEARL_MAX_TOKENS",
    description: "max_tokens of requests that do not set it",
    defaultValue: 256,
    parse: integerIn(1, 1 << 24),
  }),
  // A folder with tokenizer.json (and tokenizer_config.json).
  tokenizerDir: option({
    flag: "tokenizer",
    valueName: "dir",
    env: "PEARL_TOKENIZER",
    description: "folder with tokenizer.json for text prompts (default: none, token ids only)",
    defaultValue: "",
    parse: text,
  }),
  servedModelName: option({
    flag: "served-model-name",
    valueName: "name",
    env: "PEARL_SERVED_MODEL_NAME",
    description:
      "model name of the OpenAI API, which requests must give as `model` (default: the target's model id, " +
      "its folder name; pearl serve on the embedded pair: pearl-code)",
    defaultValue: "",
    parse: text,
  }),
  connectTimeoutSeconds: option({
    flag: "connect-timeout",
    valueName: "seconds",
    env: "PEARL_CONNECT_TIMEOUT",
    description: "how long to wait for the draft and target services at start-up",
    defaultValue: 60,
    parse: numberIn(0, 86400),
  }),
  apiKeys: option({
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
  }),
  apiKeyExempt: option({
    flag: "api-key-exempt",
    valueName: "health,metrics|off",
    env: "PEARL_API_KEY_EXEMPT",
    description: "endpoints that stay open without a key (health: /health and the gRPC health service)",
    defaultValue: ["health", "metrics"],
    parse: parseExempt,
  }),
  ...tlsServerOptions("PEARL_GATEWAY_", "REST and gRPC ports"),
  // A CA turns TLS towards the draft and target services on; cert and key authenticate the gateway.
  linkTlsCa: pemFile(
    "link-tls-ca",
    "PEARL_",
    "PEM CA bundle: reach the draft and target services over TLS, verifying them with it",
  ),
  linkTlsCert: pemFile("link-tls-cert", "PEARL_", "PEM client certificate for those links"),
  linkTlsKey: pemFile("link-tls-key", "PEARL_", "PEM private key of --link-tls-cert"),
  maxNumSeqs: option({
    flag: "max-num-seqs",
    valueName: "n",
    env: "PEARL_MAX_NUM_SEQS",
    description: "most requests running at once; later ones wait",
    defaultValue: 256,
    parse: integerIn(1, 1 << 20),
  }),
  maxWaiting: option({
    flag: "max-waiting",
    valueName: "n",
    env: "PEARL_MAX_WAITING",
    description: "most requests waiting to run; beyond it: 429 (gRPC RESOURCE_EXHAUSTED) with Retry-After",
    defaultValue: 1024,
    parse: integerIn(0, 1 << 20),
  }),
  maxBodyBytes: option({
    flag: "max-body-bytes",
    valueName: "bytes",
    env: "PEARL_MAX_BODY_BYTES",
    description: "largest request body (REST: 413) or message (gRPC: RESOURCE_EXHAUSTED)",
    defaultValue: 4 * 1024 * 1024,
    parse: integerIn(1024, 1 << 30),
  }),
  maxPromptTokens: option({
    flag: "max-prompt-tokens",
    valueName: "n",
    env: "PEARL_MAX_PROMPT_TOKENS",
    description: "longest prompt; longer ones: 400 (0: the target's context length less one)",
    defaultValue: 0,
    parse: integerIn(0, 1 << 24),
  }),
  // Slow senders are how a slowloris client holds connections open.
  bodyTimeoutSeconds: option({
    flag: "body-timeout",
    valueName: "seconds",
    env: "PEARL_BODY_TIMEOUT",
    description: "most seconds a REST client may take to send its request; slower ones get 408",
    defaultValue: 30,
    parse: numberIn(1, 3600),
  }),
  shutdownTimeoutSeconds: option({
    flag: "shutdown-timeout",
    valueName: "seconds",
    env: "PEARL_SHUTDOWN_TIMEOUT",
    description: "on SIGTERM: how long requests in flight may take to finish before they are cancelled",
    defaultValue: 30,
    parse: numberIn(0, 3600),
  }),
  ...SHARED_OPTIONS,
};

/** How `pearl serve` (and `generate --local`, `bench --local`) places the draft and the target on GPUs,
 * beyond each one's --devices. */
export const PLACEMENT_OPTIONS = {
  // Several tensor-parallel ranks on one GPU exercise the tensor-parallel code on a single card.
  allowSharedDevices: option({
    flag: "allow-shared-devices",
    valueName: "bool",
    valueOptional: true,
    env: "PEARL_ALLOW_SHARED_DEVICES",
    description:
      "let --draft-devices and --target-devices overlap, or a list name a GPU twice (the models then " +
      "compete for that GPU, which costs PEARL its parallelism)",
    defaultValue: false,
    parse: parseBoolean,
  }),
};

export type DraftServiceConfig = ConfigOf<typeof DRAFT_SERVICE_OPTIONS>;
export type TargetServiceConfig = ConfigOf<typeof TARGET_SERVICE_OPTIONS>;
/** What the draft and the target service share. */
export type ModelServiceConfig = DraftServiceConfig;
export type GatewayConfig = ConfigOf<typeof GATEWAY_OPTIONS>;
export type PlacementConfig = ConfigOf<typeof PLACEMENT_OPTIONS>;

function defaults<Options extends OptionSet>(options: Options): ConfigOf<Options> {
  return Object.fromEntries(
    Object.entries(options).map(([key, spec]) => [key, spec.defaultValue]),
  ) as ConfigOf<Options>;
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

/** The settings of `keys` alone. */
export function pickOptions<Options extends OptionSet, Key extends keyof Options & string>(
  options: Options,
  keys: readonly Key[],
): Pick<Options, Key> {
  return Object.fromEntries(keys.map((key) => [key, options[key]])) as Pick<Options, Key>;
}

/** The settings less those of `keys`. */
export function omitOptions<Options extends OptionSet, Key extends keyof Options & string>(
  options: Options,
  keys: readonly Key[],
): Omit<Options, Key> {
  return Object.fromEntries(
    Object.entries(options).filter(([key]) => !(keys as readonly string[]).includes(key)),
  ) as Omit<Options, Key>;
}

/** "" or an empty list: a text or list setting left unset. */
function isEmpty(value: unknown): boolean {
  return value === "" || (Array.isArray(value) && value.length === 0);
}

function isEmptyDefault(spec: OptionSpec<unknown>): boolean {
  return isEmpty(spec.defaultValue);
}

function camelCase(flag: string): string {
  return flag.replace(/-([a-z])/g, (_, letter: string) => letter.toUpperCase());
}

/** Adds the settings' flags to a command, each prefixed with `prefix` (e.g. "draft-"). */
export function addOptions(command: Command, options: OptionSet, prefix = ""): void {
  const existing = new Set(command.options.map((known) => known.long));
  for (const spec of Object.values(options)) {
    const long = `--${prefix}${spec.flag}`;
    if (existing.has(long)) continue;
    const value = spec.valueOptional ? `[${spec.valueName}]` : `<${spec.valueName}>`;
    const flag = new Option(`${long} ${value}`, spec.description)
      .env(spec.env)
      .argParser((raw: string, previous: unknown) =>
        spec.repeatable && Array.isArray(previous) && previous !== spec.defaultValue
          ? [...(previous as unknown[]), ...(spec.parse(raw) as unknown[])]
          : spec.parse(raw),
      );
    // An empty default means "not set" (readOptions falls back to it); --help need not show it.
    if (!isEmptyDefault(spec)) {
      flag.default(
        spec.defaultValue,
        Array.isArray(spec.defaultValue) ? spec.defaultValue.join(",") : undefined,
      );
    }
    command.addOption(flag);
  }
}

/** Reads back what addOptions added into a typed config. */
export function readOptions<Options extends OptionSet>(
  values: Record<string, unknown>,
  options: Options,
  prefix = "",
): ConfigOf<Options> {
  const config: Record<string, unknown> = defaults(options);
  for (const [key, spec] of Object.entries(options)) {
    const value = values[camelCase(`${prefix}${spec.flag}`)];
    if (value !== undefined) config[key] = value;
  }
  return config as ConfigOf<Options>;
}

function formatValue(spec: OptionSpec<unknown>, value: unknown): string {
  if (spec.format) return spec.format(value);
  if (Array.isArray(value)) return value.length > 0 ? value.join(",") : "off";
  return String(value);
}

/** The flags that reproduce a config, for starting a service as a child process. */
export function toArgs<Options extends OptionSet>(config: ConfigOf<Options>, options: Options): string[] {
  const args: string[] = [];
  for (const [key, spec] of Object.entries(options)) {
    const value: unknown = config[key];
    if (value === undefined || spec.secret) continue;
    // A text or list left at an empty default stays out: the child falls back to the same default ("off"
    // means an empty list to --profile, but is no device list).
    if (isEmptyDefault(spec) && isEmpty(value)) continue;
    args.push(`--${spec.flag}`, formatValue(spec, value));
  }
  return args;
}

/** The environment variables that carry a config's secrets to a child process (see toArgs). */
export function secretEnv<Options extends OptionSet>(
  config: ConfigOf<Options>,
  options: Options,
): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [key, spec] of Object.entries(options)) {
    const value: unknown = config[key];
    if (!spec.secret || value === undefined || isEmpty(value)) continue;
    env[spec.env] = formatValue(spec, value);
  }
  return env;
}
