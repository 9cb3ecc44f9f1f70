// A model service whose request handler throws: the session it names fails through the protocol's
// session-failed event, so the client's request ends with a clear error instead of hanging, the session's
// KV is freed on both services, and the gateway keeps serving.
//
// No request a gateway sends makes a handler throw today (handlers validate and change session state; the
// engine runs in the loop, whose step failures are isolated per session), so the target service here is
// the real one with its propose handler replaced by one that throws: a stand-in for a future bug.
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { after, before, describe, test } from "node:test";
import { credentials, status } from "@grpc/grpc-js";
import winston from "winston";
import { draftServiceDefaults, gatewayDefaults, targetServiceDefaults } from "../lib/config.js";
import { CHANNEL_OPTIONS } from "../lib/grpc.js";
import { type RunningService, startModelService } from "../lib/model_service.js";
import type { ServiceInfo } from "../proto/gen/pearl/v1/common.js";
import { DraftServiceClient } from "../proto/gen/pearl/v1/draft.js";
import { GatewayClient } from "../proto/gen/pearl/v1/gateway.js";
import { TargetServiceClient } from "../proto/gen/pearl/v1/target.js";
import { startDraftService } from "../services/draft/server.js";
import { startGatewayService } from "../services/gateway/server.js";
import { targetServiceRole } from "../services/target/server.js";
import { fixtureDir } from "./helpers/models.js";
import { PROTO_MODES } from "../lib/decoding_modes.js";
import { collect, generateRequest, randomPrompts } from "./helpers/stack.js";

const MODEL = fixtureDir("llama-gqa-f32");
const BUG = "proposal handler bug";

/** The handler's error line is expected here; nothing else of the services' logs is of interest. */
const silent = winston.createLogger({ silent: true });

describe("a request handler that throws", () => {
  const services: RunningService[] = [];
  let target: RunningService;
  let draft: RunningService;
  let client: GatewayClient;

  before(async () => {
    const modelService = {
      modelDir: MODEL,
      grpcPort: 0,
      httpPort: -1,
      numThreads: 1,
      profileBatchSizes: [1],
    };
    const targetConfig = { ...targetServiceDefaults(), ...modelService };
    const role = targetServiceRole(targetConfig);
    target = await startModelService(
      targetConfig,
      {
        ...role,
        requestHandler(verifier, registry) {
          const handle = role.requestHandler(verifier, registry);
          return (sink, request) => {
            if (request.propose) throw new Error(BUG);
            handle(sink, request);
          };
        },
      },
      silent,
    );
    services.push(target);
    draft = await startDraftService({ ...draftServiceDefaults(), ...modelService }, silent);
    services.push(draft);
    const gateway = await startGatewayService(
      {
        ...gatewayDefaults(),
        grpcPort: 0,
        httpPort: -1,
        draftAddress: `127.0.0.1:${draft.grpcPort}`,
        targetAddress: `127.0.0.1:${target.grpcPort}`,
        // Pearl requests draft whatever the tuner measures, so the target gets proposals.
        minGamma: 1,
      },
      silent,
    );
    services.push(gateway);
    client = new GatewayClient(
      `127.0.0.1:${gateway.grpcPort}`,
      credentials.createInsecure(),
      CHANNEL_OPTIONS,
    );
  });

  after(async () => {
    client?.close();
    for (const service of services.reverse()) await service.close();
  });

  // Without the failure path the request would wait forever: the timeout makes that a failure.
  test(
    "fails the session: the client gets the handler's error and both services free it",
    { timeout: 20_000 },
    async () => {
      const started = performance.now();
      const outcome = await collect(
        client.generate(
          generateRequest({
            promptTokenIds: randomPrompts(1, 12, 12, 5)[0]!,
            maxTokens: 64,
            temperature: 0,
            mode: PROTO_MODES.pearl,
          }),
        ),
      ).then(
        () => assert.fail("the request finished although the target could not take its proposals"),
        (error: { code: number; details: string }) => error,
      );
      assert.equal(outcome.code, status.UNAVAILABLE);
      assert.match(outcome.details, /^target: the service failed to handle a request: proposal handler bug$/);
      assert.ok(performance.now() - started < 10_000, "the error came at once, not after a timeout");

      // The target ended the session; the gateway closed the draft's side.
      for (;;) {
        const infos = await Promise.all([
          serviceInfo(TargetServiceClient, target),
          serviceInfo(DraftServiceClient, draft),
        ]);
        if (infos.every((info) => info.activeSessions === 0 && info.cache!.sequences === 0)) break;
        assert.ok(performance.now() - started < 10_000, `sessions still open: ${JSON.stringify(infos)}`);
        await sleep(20);
      }
    },
  );

  test("the gateway keeps serving: a request that sends no proposals completes", async () => {
    const generated = await collect(
      client.generate(
        generateRequest({
          promptTokenIds: randomPrompts(1, 12, 12, 6)[0]!,
          maxTokens: 8,
          temperature: 0,
          mode: PROTO_MODES.ar,
        }),
      ),
    );
    assert.equal(generated.tokenIds.length, 8);
  });
});

function serviceInfo(
  Client: typeof TargetServiceClient | typeof DraftServiceClient,
  service: RunningService,
): Promise<ServiceInfo> {
  const client = new Client(`127.0.0.1:${service.grpcPort}`, credentials.createInsecure());
  return new Promise((resolve, reject) =>
    client.info({}, (error, info) => {
      client.close();
      if (error) reject(error);
      else resolve(info);
    }),
  );
}
