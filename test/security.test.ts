// API keys and TLS on a real stack: the gateway serves REST and gRPC over TLS and asks for a key; the
// gateway reaches draft and target over mutual TLS. Certificates are made by openssl for this run.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type ChannelCredentials, credentials, Metadata, status } from "@grpc/grpc-js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { pearlCommand } from "../lib/service_process.js";
import { GatewayClient } from "../proto/gen/pearl/v1/gateway.js";
import { TargetServiceClient } from "../proto/gen/pearl/v1/target.js";
import { type Certificates, makeCertificates } from "./helpers/certs.js";
import { request, type TlsClient } from "./helpers/http.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";
import { collect, generateRequest, grpcHealthStatus, metricValue, Stack } from "./helpers/stack.js";

const KEYS = ["sk-test-alpha-7f3a91", "sk-test-beta-22c0e4"];
const WRONG_KEY = "sk-wrong-gamma-5d18b7";

function runPearl(args: string[]): { status: number | null; output: string } {
  const { command, args: base } = pearlCommand();
  const result = spawnSync(command, [...base, ...args], { encoding: "utf8", timeout: 30_000 });
  return { status: result.status, output: result.stdout + result.stderr };
}

describe("API keys and TLS", () => {
  let certs: Certificates;
  let stack: Stack;
  let tls: TlsClient;
  let base: string;

  before(async () => {
    certs = makeCertificates();
    tls = { ca: certs.read(certs.ca) };
    const serverTls = ["--tls-cert", certs.serverCert, "--tls-key", certs.serverKey];
    const mutual = [...serverTls, "--tls-client-ca", certs.ca];
    stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
      draftArgs: mutual,
      targetArgs: mutual,
      gatewayArgs: [
        ...serverTls,
        ...[
          "--link-tls-ca",
          certs.ca,
          "--link-tls-cert",
          certs.clientCert,
          "--link-tls-key",
          certs.clientKey,
        ],
        ...["--tokenizer", join(EMBEDDED_MODELS, "target"), "--api-key-exempt", "health"],
        ...KEYS.flatMap((key) => ["--api-key", key]),
      ],
      gatewayCredentials: credentials.createSsl(certs.read(certs.ca)),
      serviceCredentials: credentials.createSsl(
        certs.read(certs.ca),
        certs.read(certs.clientKey),
        certs.read(certs.clientCert),
      ),
    });
    base = `https://127.0.0.1:${stack.gateway.httpPort}`;
  });

  after(async () => {
    await stack?.stop();
    certs?.remove();
  });

  const completion = JSON.stringify({ model: "target", prompt: "def add(a, b):", max_tokens: 4 });

  test("REST over TLS: each key is accepted, a missing or wrong one gets OpenAI's 401", async () => {
    for (const key of KEYS) {
      const ok = await request(`${base}/v1/completions`, {
        body: completion,
        headers: { authorization: `Bearer ${key}` },
        tls,
      });
      assert.equal(ok.status, 200, ok.text);
      assert.equal((ok.json() as { usage: { completion_tokens: number } }).usage.completion_tokens, 4);
    }
    const refusals: [string, Record<string, string>, RegExp][] = [
      ["no key", {}, /didn't provide an API key/],
      ["a wrong key", { authorization: `Bearer ${WRONG_KEY}` }, /Incorrect API key/],
      ["a key's prefix", { authorization: `Bearer ${KEYS[0]!.slice(0, -1)}` }, /Incorrect API key/],
      ["a key with more after it", { authorization: `Bearer ${KEYS[0]}x` }, /Incorrect API key/],
      ["another scheme", { authorization: `Basic ${KEYS[0]}` }, /Incorrect API key/],
    ];
    for (const [what, headers, message] of refusals) {
      const refused = await request(`${base}/v1/completions`, { body: completion, headers, tls });
      assert.equal(refused.status, 401, what);
      assert.equal(refused.headers["www-authenticate"], "Bearer");
      const { error } = refused.json() as { error: Record<string, unknown> };
      assert.deepEqual(Object.keys(error).sort(), ["code", "message", "param", "type"]);
      assert.equal(error.code, "invalid_api_key");
      assert.match(error.message as string, message, what);
    }
    // A key in the query string is not a key.
    const inQuery = await request(`${base}/v1/models?api_key=${KEYS[0]}`, { tls });
    assert.equal(inQuery.status, 401);
    const models = await request(`${base}/v1/models`, {
      headers: { authorization: `Bearer ${KEYS[1]}` },
      tls,
    });
    assert.equal(models.status, 200);
  });

  test("/health is open as configured, /metrics is not, and refusals are counted", async () => {
    assert.equal((await request(`${base}/health`, { tls })).status, 200);
    assert.equal((await request(`${base}/metrics`, { tls })).status, 401);
    const metrics = await request(`${base}/metrics`, {
      headers: { authorization: `Bearer ${KEYS[0]}` },
      tls,
    });
    assert.equal(metrics.status, 200);
    // Five refusals above, the query-string one and the /metrics one.
    assert.ok(metricValue(metrics.text, "pearl_requests_rejected_total", { reason: "unauthenticated" }) >= 7);
  });

  test("plaintext HTTP on the TLS port gets no answer", async () => {
    await assert.rejects(request(`http://127.0.0.1:${stack.gateway.httpPort}/health`));
  });

  test("gRPC over TLS: Generate and reflection need a key, the health service does not", async () => {
    const request = generateRequest({ prompt: "def add(a, b):", maxTokens: 3, temperature: 0 });
    const withKey = (key: string): Metadata => {
      const metadata = new Metadata();
      metadata.set("authorization", `Bearer ${key}`);
      return metadata;
    };
    const result = await collect(stack.client.generate(request, withKey(KEYS[1]!)));
    assert.equal(result.tokenIds.length, 3);
    for (const metadata of [new Metadata(), withKey(WRONG_KEY)]) {
      await assert.rejects(collect(stack.client.generate(request, metadata)), (error: { code: number }) => {
        assert.equal(error.code, status.UNAUTHENTICATED);
        return true;
      });
    }
    assert.equal(
      await grpcHealthStatus(stack.gateway.address, credentials.createSsl(certs.read(certs.ca))),
      "SERVING",
    );
    const plaintext = new GatewayClient(stack.gateway.address, credentials.createInsecure(), CHANNEL_OPTIONS);
    try {
      await assert.rejects(
        collect(plaintext.generate(request, withKey(KEYS[0]!))),
        (error: { code: number }) => {
          assert.equal(error.code, status.UNAVAILABLE, "plaintext to a TLS port");
          return true;
        },
      );
    } finally {
      plaintext.close();
    }
  });

  test("the draft and target links are mutual TLS: no client certificate, or a stranger's, is refused", async () => {
    const info = (channel: ChannelCredentials) =>
      new Promise<void>((resolve, reject) => {
        const client = new TargetServiceClient(stack.target.address, channel);
        client.info({}, new Metadata(), { deadline: Date.now() + 5000 }, (error) => {
          client.close();
          if (error) reject(error);
          else resolve();
        });
      });
    const ca = certs.read(certs.ca);
    await info(credentials.createSsl(ca, certs.read(certs.clientKey), certs.read(certs.clientCert)));
    await assert.rejects(info(credentials.createSsl(ca)), "no client certificate");
    await assert.rejects(
      info(credentials.createSsl(ca, certs.read(certs.rogueClientKey), certs.read(certs.rogueClientCert))),
      "a client certificate from another CA",
    );
    await assert.rejects(info(credentials.createInsecure()), "plaintext");
    // The gateway itself got through (it generated above); its draft is in use too.
    const info2 = await stack.draftInfo();
    assert.ok(info2.model);
  });

  test("no key, right or wrong, appears in any service's logs", () => {
    const logs = stack.logs.join("\n");
    assert.match(logs, /request rejected: unauthenticated/);
    for (const key of [...KEYS, WRONG_KEY, KEYS[0]!.slice(0, -1)]) assert.ok(!logs.includes(key), key);
  });
});

describe("bad TLS files stop a service at start-up with a clear message", () => {
  let certs: Certificates;

  before(() => {
    certs = makeCertificates();
  });

  after(() => certs?.remove());

  test("missing, not PEM, a key of another certificate, half a pair", () => {
    const notPem = join(certs.dir, "not.pem");
    writeFileSync(notPem, "hello\n");
    const cases: [string[], RegExp][] = [
      [
        ["gateway", "--tls-cert", join(certs.dir, "missing.pem"), "--tls-key", certs.serverKey],
        /--tls-cert .*missing\.pem: cannot read it \(ENOENT/,
      ],
      [
        ["gateway", "--tls-cert", notPem, "--tls-key", certs.serverKey],
        /--tls-cert .*not\.pem: not a PEM file/,
      ],
      [
        ["gateway", "--tls-cert", certs.serverCert, "--tls-key", certs.clientKey],
        /--tls-key .*client\.key does not fit the certificate of --tls-cert/,
      ],
      [["gateway", "--tls-cert", certs.serverCert], /--tls-cert and --tls-key go together/],
      [["gateway", "--tls-key", certs.ca], /--tls-cert and --tls-key go together/],
      [
        ["gateway", "--link-tls-ca", join(certs.dir, "nope.pem")],
        /--link-tls-ca .*nope\.pem: cannot read it/,
      ],
      [
        ["gateway", "--link-tls-cert", certs.clientCert, "--link-tls-key", certs.clientKey],
        /need --link-tls-ca/,
      ],
      [
        ["target", "--tls-cert", certs.serverCert, "--tls-key", certs.serverKey, "--tls-client-ca", notPem],
        /--tls-client-ca .*not\.pem: not a PEM file/,
      ],
      [
        ["draft", "--tls-cert", certs.serverKey, "--tls-key", certs.serverKey],
        /--tls-cert .*: no valid certificate/,
      ],
    ];
    for (const [args, message] of cases) {
      const connectTimeout = args[0] === "gateway" ? ["--connect-timeout", "1"] : [];
      const result = runPearl([...args, "--port", "0", "--http-port", "off", ...connectTimeout]);
      assert.equal(result.status, 1, args.join(" "));
      assert.match(result.output, message, args.join(" "));
    }
  });
});
