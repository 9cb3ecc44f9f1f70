// Standard gRPC health checking (grpc.health.v1.Health) and server reflection (grpc.reflection.v1 and
// v1alpha) on the draft, target and gateway services of the embedded pair, through real clients built from
// the .proto files that grpc-health-check and @grpc/reflection ship, and the health status turning
// NOT_SERVING when a service shuts down gracefully.
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fromBinary } from "@bufbuild/protobuf";
import { type FileDescriptorProto, FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import {
  Client,
  type ClientReadableStream,
  credentials,
  type MethodDefinition,
  type ServiceDefinition,
  status,
} from "@grpc/grpc-js";
import { loadSync, type Options } from "@grpc/proto-loader";
import { protoPath as healthProtoPath } from "grpc-health-check";
import { DraftServiceService } from "../proto/gen/pearl/v1/draft.js";
import { GatewayService } from "../proto/gen/pearl/v1/gateway.js";
import { TargetServiceService } from "../proto/gen/pearl/v1/target.js";
import { EMBEDDED_MODELS } from "./helpers/pearl_serve.js";
import { type RunningChild, Stack } from "./helpers/stack.js";

const LOADER_OPTIONS: Options = { enums: String, oneofs: true };

type ServingStatus = "UNKNOWN" | "SERVING" | "NOT_SERVING" | "SERVICE_UNKNOWN";
interface HealthCheckRequest {
  service: string;
}
interface HealthCheckResponse {
  status: ServingStatus;
}

const health = loadSync(healthProtoPath, LOADER_OPTIONS)["grpc.health.v1.Health"] as ServiceDefinition;
const healthCheck = health.Check as MethodDefinition<HealthCheckRequest, HealthCheckResponse>;
const healthWatch = health.Watch as MethodDefinition<HealthCheckRequest, HealthCheckResponse>;

interface ReflectionRequest {
  listServices?: string;
  fileContainingSymbol?: string;
}
interface ReflectionResponse {
  listServicesResponse?: { service: { name: string }[] };
  fileDescriptorResponse?: { fileDescriptorProto: Buffer[] };
  errorResponse?: { errorCode: number; errorMessage: string };
}

/** ServerReflectionInfo of both published versions of the reflection API, from @grpc/reflection's protos. */
const REFLECTION_VERSIONS = ["v1", "v1alpha"].map((version) => {
  const protoDir = join(dirname(createRequire(import.meta.url).resolve("@grpc/reflection")), "..", "proto");
  const service = `grpc.reflection.${version}.ServerReflection`;
  const definition = loadSync(`grpc/reflection/${version}/reflection.proto`, {
    ...LOADER_OPTIONS,
    includeDirs: [protoDir],
  })[service] as ServiceDefinition;
  return {
    service,
    info: definition.ServerReflectionInfo as MethodDefinition<ReflectionRequest, ReflectionResponse>,
  };
});

/** Each service as its generated client sees it: full name, methods and their streaming. */
const SERVICES = (
  [
    { role: "draft", definition: DraftServiceService },
    { role: "target", definition: TargetServiceService },
    { role: "gateway", definition: GatewayService },
  ] as const
).map(({ role, definition }) => {
  const methods = Object.values(definition as ServiceDefinition).map((method) => {
    const [, service, name] = method.path.split("/");
    return {
      service: service!,
      name: name!,
      clientStreaming: method.requestStream,
      serverStreaming: method.responseStream,
    };
  });
  const name = methods[0]!.service;
  const dot = name.lastIndexOf(".");
  return { role, name, packageName: name.slice(0, dot), shortName: name.slice(dot + 1), methods };
});

function check(client: Client, service: string): Promise<ServingStatus> {
  return new Promise((resolve, reject) =>
    client.makeUnaryRequest(
      healthCheck.path,
      healthCheck.requestSerialize,
      healthCheck.responseDeserialize,
      { service },
      (error, response) => (error ? reject(error) : resolve(response!.status)),
    ),
  );
}

/** A Watch stream and every status it has delivered so far. */
function watch(
  client: Client,
  service: string,
): { call: ClientReadableStream<HealthCheckResponse>; seen: ServingStatus[] } {
  const call = client.makeServerStreamRequest(
    healthWatch.path,
    healthWatch.requestSerialize,
    healthWatch.responseDeserialize,
    { service },
  );
  const seen: ServingStatus[] = [];
  call.on("data", (response: HealthCheckResponse) => seen.push(response.status));
  // Cancelling a watch, or the server closing it, ends the stream with an error status.
  call.on("error", () => undefined);
  return { call, seen };
}

async function until(condition: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Sends the requests one by one on one ServerReflectionInfo stream; resolves with the responses in order. */
function reflect(
  client: Client,
  method: MethodDefinition<ReflectionRequest, ReflectionResponse>,
  requests: ReflectionRequest[],
): Promise<ReflectionResponse[]> {
  return new Promise((resolve, reject) => {
    const call = client.makeBidiStreamRequest(
      method.path,
      method.requestSerialize,
      method.responseDeserialize,
    );
    const responses: ReflectionResponse[] = [];
    call.on("data", (response: ReflectionResponse) => responses.push(response));
    call.on("error", reject);
    call.on("end", () => resolve(responses));
    for (const request of requests) call.write(request);
    call.end();
  });
}

describe("standard gRPC health checking and server reflection (embedded pair)", () => {
  let stack: Stack;
  const clients = new Map<string, Client>();

  before(async () => {
    stack = await Stack.start({
      draftModel: join(EMBEDDED_MODELS, "draft"),
      targetModel: join(EMBEDDED_MODELS, "target"),
    });
    for (const { role } of SERVICES) {
      clients.set(role, new Client(stack[role].address, credentials.createInsecure()));
    }
  });

  after(async () => {
    for (const client of clients.values()) client.close();
    await stack?.stop();
  });

  function client(role: string): Client {
    return clients.get(role)!;
  }

  for (const { role, name } of SERVICES) {
    test(`${role}: Health/Check says SERVING overall and for ${name}; NOT_FOUND for a service it lacks`, async () => {
      assert.equal(await check(client(role), ""), "SERVING");
      assert.equal(await check(client(role), name), "SERVING");
      await assert.rejects(check(client(role), "pearl.v1.NoSuchService"), { code: status.NOT_FOUND });
    });

    test(`${role}: Health/Watch streams the current status of ${name}`, async () => {
      const { call, seen } = watch(client(role), name);
      await until(() => seen.length > 0, "the first Watch response");
      call.cancel();
      assert.deepEqual(seen, ["SERVING"]);
    });
  }

  for (const { role, name, packageName, shortName, methods } of SERVICES) {
    for (const { service: reflectionService, info } of REFLECTION_VERSIONS) {
      test(`${role}: ${reflectionService} lists ${name} and describes its methods`, async () => {
        const [listed, described] = await reflect(client(role), info, [
          { listServices: "*" },
          { fileContainingSymbol: name },
        ]);
        assert.ok(listed?.listServicesResponse, JSON.stringify(listed));
        assert.ok(
          listed.listServicesResponse.service.some((service) => service.name === name),
          `listed: ${JSON.stringify(listed.listServicesResponse.service)}`,
        );

        assert.ok(described?.fileDescriptorResponse, JSON.stringify(described?.errorResponse));
        const files: FileDescriptorProto[] = described.fileDescriptorResponse.fileDescriptorProto.map(
          (bytes) => fromBinary(FileDescriptorProtoSchema, bytes),
        );
        const [first] = files;
        assert.equal(first?.package, packageName, "the first file is the one that declares the symbol");
        const declared = first.service.find((service) => service.name === shortName);
        assert.ok(declared, `${first.name} declares ${shortName}`);
        assert.deepEqual(
          declared.method.map((method) => ({
            name: method.name,
            clientStreaming: method.clientStreaming ?? false,
            serverStreaming: method.serverStreaming ?? false,
          })),
          methods.map(({ name: methodName, clientStreaming, serverStreaming }) => ({
            name: methodName,
            clientStreaming,
            serverStreaming,
          })),
        );
        // The response carries the declaring file's dependencies too: every request and response type of the
        // service resolves to a message in one of the returned files.
        const messages = new Set(
          files.flatMap((file) => file.messageType.map((message) => `.${file.package}.${message.name}`)),
        );
        for (const method of declared.method) {
          assert.ok(messages.has(method.inputType), `${method.name}: ${method.inputType} is described`);
          assert.ok(messages.has(method.outputType), `${method.name}: ${method.outputType} is described`);
        }

        const [missing] = await reflect(client(role), info, [
          { fileContainingSymbol: "pearl.v1.NoSuchService" },
        ]);
        assert.equal(missing?.errorResponse?.errorCode, status.NOT_FOUND);
      });
    }
  }

  test("a graceful shutdown turns every service NOT_SERVING before it closes", async () => {
    const watches = SERVICES.map(({ role, name }) => ({ role, ...watch(client(role), name) }));
    await until(() => watches.every(({ seen }) => seen.length > 0), "the first Watch responses");
    // Each watch is cancelled as soon as it reports NOT_SERVING, so the server's graceful close waits for it
    // no longer; the exit codes say every service closed cleanly.
    for (const { call, seen } of watches) {
      call.on("data", () => {
        if (seen.at(-1) === "NOT_SERVING") call.cancel();
      });
    }
    const children: RunningChild[] = SERVICES.map(({ role }) => stack[role]);
    for (const child of children) child.process.child.kill("SIGTERM");
    const exitCodes = await Promise.all(children.map((child) => child.process.exited));
    for (const { role, seen } of watches) assert.deepEqual(seen, ["SERVING", "NOT_SERVING"], role);
    assert.deepEqual(exitCodes, [0, 0, 0]);
  });
});
