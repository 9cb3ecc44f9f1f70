// The pieces of the PEARL services that are plain functions: exact finish, incremental detokenization,
// decoding modes and their proto values, and configuration from flags and environment (the draft-length
// tuner: pearl-tuner.test.ts).
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { Command } from "commander";
import {
  addOptions,
  DRAFT_SERVICE_OPTIONS,
  GATEWAY_OPTIONS,
  gatewayDefaults,
  omitOptions,
  type OptionSet,
  PLACEMENT_OPTIONS,
  readOptions,
  SHARED_OPTION_KEYS,
  TARGET_SERVICE_OPTIONS,
  targetServiceDefaults,
  toArgs,
} from "../lib/config.js";
import {
  DECODING_MODE_NAMES,
  isDecodingModeName,
  modeFromProto,
  PROTO_MODES,
} from "../lib/decoding_modes.js";
import { packageRoot } from "../lib/paths.js";
import { TextTokenizer } from "../lib/tokenizer.js";
import { FinishReason } from "../proto/gen/pearl/v1/common.js";
import { DecodingMode } from "../proto/gen/pearl/v1/gateway.js";
import { decideEmission } from "../services/target/emission.js";

describe("exact finish", () => {
  const eos = new Set([2]);
  const {
    FINISH_REASON_STOP: STOP,
    FINISH_REASON_LENGTH: LENGTH,
    FINISH_REASON_UNSPECIFIED: GOING,
  } = FinishReason;

  test("emits accepted proposals and the target's token while nothing ends the sequence", () => {
    assert.deepEqual(decideEmission([5, 6, 7], 2, eos, 10), {
      tokens: [5, 6, 7],
      accepted: 2,
      finishReason: GOING,
    });
  });

  test("an accepted EOS is the last token: nothing after it, even the target's own token", () => {
    assert.deepEqual(decideEmission([5, 2, 7, 8], 3, eos, 10), {
      tokens: [5, 2],
      accepted: 2,
      finishReason: STOP,
    });
  });

  test("never more than max_tokens (or the context) allows", () => {
    assert.deepEqual(decideEmission([5, 6, 7, 8], 3, eos, 2), {
      tokens: [5, 6],
      accepted: 2,
      finishReason: LENGTH,
    });
    assert.deepEqual(decideEmission([5, 6, 7], 2, eos, 3), {
      tokens: [5, 6, 7],
      accepted: 2,
      finishReason: LENGTH,
    });
  });

  test("an EOS that is also the last allowed token is a stop", () => {
    assert.deepEqual(decideEmission([5, 2], 1, eos, 2), { tokens: [5, 2], accepted: 1, finishReason: STOP });
  });
});

describe("incremental detokenization", () => {
  const tokenizerDir = join(packageRoot(), "models", "target");

  test(
    "streamed text equals the decoded whole, and never shows half a character",
    { skip: !existsSync(join(tokenizerDir, "tokenizer.json")) },
    () => {
      const tokenizer = TextTokenizer.load(tokenizerDir)!;
      const text = "def naïve(x):\n    return '日本語 — ünïcödé 🙂' * x  # ✓\n";
      const ids = tokenizer.encode(text);
      assert.equal(tokenizer.decode(ids), text);
      const decoder = tokenizer.streamDecoder();
      const pieces = ids.map((id) => decoder.push([id]));
      pieces.push(decoder.flush());
      assert.equal(pieces.join(""), text);
      for (const piece of pieces)
        assert.ok(!piece.includes("\uFFFD"), `a broken character in ${JSON.stringify(piece)}`);
      // Several multi-byte characters span more than one token: some pushes must have held text back.
      assert.ok(pieces.some((piece) => piece === ""));
    },
  );
});

describe("decoding modes", () => {
  test("every mode has its own proto value and comes back from it", () => {
    const values = DECODING_MODE_NAMES.map((mode) => PROTO_MODES[mode]);
    assert.equal(new Set(values).size, DECODING_MODE_NAMES.length);
    assert.ok(!values.includes(DecodingMode.DECODING_MODE_UNSPECIFIED));
    for (const mode of DECODING_MODE_NAMES) assert.equal(modeFromProto(PROTO_MODES[mode]), mode);
  });

  test("UNSPECIFIED (the server's default) and unknown values name no mode", () => {
    assert.equal(modeFromProto(DecodingMode.DECODING_MODE_UNSPECIFIED), undefined);
    assert.equal(modeFromProto(DecodingMode.UNRECOGNIZED), undefined);
    assert.equal(modeFromProto(99 as DecodingMode), undefined);
    assert.ok(isDecodingModeName("sd") && !isDecodingModeName("SD") && !isDecodingModeName(2));
  });
});

describe("configuration", () => {
  function parse(options: OptionSet, argv: string[], env: Record<string, string>): Record<string, unknown> {
    const saved = { ...process.env };
    Object.assign(process.env, env);
    try {
      const command = new Command("t").exitOverride().configureOutput({ writeErr: () => undefined });
      addOptions(command, options);
      command.parse(argv, { from: "user" });
      return command.opts();
    } finally {
      for (const key of Object.keys(env)) delete process.env[key];
      Object.assign(process.env, saved);
    }
  }

  test("every flag has a PEARL_* environment variable, and the flag wins over it", () => {
    for (const spec of [DRAFT_SERVICE_OPTIONS, TARGET_SERVICE_OPTIONS, GATEWAY_OPTIONS].flatMap(
      Object.values,
    )) {
      assert.match(spec.env, /^PEARL_[A-Z_]+$/);
    }
    const values = parse(TARGET_SERVICE_OPTIONS, ["--threads", "3"], {
      PEARL_TARGET_PORT: "1234",
      PEARL_TARGET_THREADS: "1",
      PEARL_TARGET_PROFILE: "off",
    });
    const config = readOptions(values, TARGET_SERVICE_OPTIONS);
    assert.equal(config.grpcPort, 1234);
    assert.equal(config.numThreads, 3);
    assert.deepEqual(config.profileBatchSizes, []);
    assert.equal(config.maxVerifyWindow, targetServiceDefaults().maxVerifyWindow);
  });

  test("a bad value is refused with a message saying what was expected", () => {
    assert.throws(
      () => parse(GATEWAY_OPTIONS, ["--mode", "fast"], {}),
      /expected one of pearl, sd, ar, got "fast"/,
    );
    assert.throws(
      () => parse(GATEWAY_OPTIONS, [], { PEARL_GATEWAY_PORT: "http" }),
      /expected an integer in \[0, 65535\]/,
    );
  });

  test("a config survives the trip through flags to a child process", () => {
    const config = {
      ...gatewayDefaults(),
      grpcPort: 0,
      httpPort: -1,
      defaultMode: "sd" as const,
      tokenizerDir: "/m",
    };
    assert.deepEqual(
      readOptions(parse(GATEWAY_OPTIONS, toArgs(config, GATEWAY_OPTIONS), {}), GATEWAY_OPTIONS),
      config,
    );
  });

  test("each non-empty default reads back from the text a child process is given for it", () => {
    for (const options of [
      DRAFT_SERVICE_OPTIONS,
      TARGET_SERVICE_OPTIONS,
      GATEWAY_OPTIONS,
      PLACEMENT_OPTIONS,
    ]) {
      const defaults = readOptions({}, options);
      const args = toArgs(defaults, options);
      for (const [key, spec] of Object.entries(options)) {
        const at = args.indexOf(`--${spec.flag}`);
        if (spec.secret || (at < 0 && (spec.defaultValue === "" || Array.isArray(spec.defaultValue))))
          continue;
        assert.ok(at >= 0, `${key} is missing from ${args.join(" ")}`);
        assert.deepEqual(spec.parse(args[at + 1] ?? ""), spec.defaultValue, key);
      }
    }
  });

  test("pearl serve's flags and variables name one setting each", () => {
    const served: [string, OptionSet][] = [
      ["draft-", omitOptions(DRAFT_SERVICE_OPTIONS, SHARED_OPTION_KEYS)],
      ["target-", omitOptions(TARGET_SERVICE_OPTIONS, SHARED_OPTION_KEYS)],
      ["", omitOptions(GATEWAY_OPTIONS, ["draftAddress", "targetAddress"])],
      ["", PLACEMENT_OPTIONS],
    ];
    const flags = served.flatMap(([prefix, options]) =>
      Object.values(options).map((spec) => prefix + spec.flag),
    );
    const variables = served.flatMap(([, options]) => Object.values(options).map((spec) => spec.env));
    assert.equal(new Set(flags).size, flags.length, flags.join(" "));
    assert.equal(new Set(variables).size, variables.length, variables.join(" "));
  });
});
