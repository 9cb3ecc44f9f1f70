// gRPC plumbing shared by the three services: a server with standard health checking and server
// reflection, client channel options, and a graceful shutdown.
import { join } from "node:path";
import {
  type ChannelOptions,
  Server,
  ServerCredentials,
  type ServerInterceptor,
  type ServiceDefinition,
  status,
  type UntypedServiceImplementation,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import { HealthImplementation } from "grpc-health-check";
import { packageRoot } from "./paths.js";

export { status as GrpcStatus };

/** Keepalive pings notice a peer that vanished without closing its connection. A service that comes back
 * is reconnected to within two seconds (grpc-js would otherwise back off to two minutes). */
export const CHANNEL_OPTIONS: ChannelOptions = {
  "grpc.keepalive_time_ms": 15_000,
  "grpc.keepalive_timeout_ms": 5_000,
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.initial_reconnect_backoff_ms": 200,
  "grpc.max_reconnect_backoff_ms": 2_000,
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
};

const SERVER_OPTIONS: ChannelOptions = {
  "grpc.keepalive_permit_without_calls": 1,
  "grpc.http2.min_ping_interval_without_data_ms": 10_000,
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
};

export function protoRoot(): string {
  return join(packageRoot(), "proto");
}

export interface ServiceRegistration {
  /** Fully qualified, e.g. "pearl.v1.DraftService". */
  name: string;
  /** Path under proto/, e.g. "pearl/v1/draft.proto", for reflection. */
  protoFile: string;
  definition: ServiceDefinition;
  implementation: UntypedServiceImplementation;
}

export interface RunningGrpcServer {
  server: Server;
  port: number;
  health: HealthImplementation;
  /** Reports NOT_SERVING, lets calls in progress finish for up to graceMs, then closes whatever is left. */
  shutdown(graceMs?: number): Promise<void>;
}

export interface GrpcServerOptions {
  /** Default: plaintext. */
  credentials?: ServerCredentials;
  /** Run before every call (authentication). */
  interceptors?: ServerInterceptor[];
  /** Largest message a client may send; larger ones end the call with RESOURCE_EXHAUSTED. */
  maxReceiveBytes?: number;
}

export async function startGrpcServer(
  host: string,
  port: number,
  services: ServiceRegistration[],
  options: GrpcServerOptions = {},
): Promise<RunningGrpcServer> {
  const server = new Server({
    ...SERVER_OPTIONS,
    ...(options.maxReceiveBytes !== undefined
      ? { "grpc.max_receive_message_length": options.maxReceiveBytes }
      : {}),
    interceptors: options.interceptors ?? [],
  });
  for (const service of services) server.addService(service.definition, service.implementation);

  const health = new HealthImplementation({
    "": "SERVING",
    ...Object.fromEntries(services.map((service) => [service.name, "SERVING" as const])),
  });
  health.addToServer(server);

  const packageDefinition = loadSync(
    services.map((service) => service.protoFile),
    { includeDirs: [protoRoot()], keepCase: true, longs: Number, enums: String, defaults: true },
  );
  new ReflectionService(packageDefinition).addToServer(server);

  const address = host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
  const boundPort = await new Promise<number>((resolve, reject) => {
    server.bindAsync(
      address,
      options.credentials ?? ServerCredentials.createInsecure(),
      (error, actualPort) =>
        error ? reject(new Error(`cannot listen on ${address}: ${error.message}`)) : resolve(actualPort),
    );
  });

  return {
    server,
    port: boundPort,
    health,
    shutdown: (graceMs = 2000) =>
      new Promise<void>((resolve) => {
        health.setStatus("", "NOT_SERVING");
        for (const service of services) health.setStatus(service.name, "NOT_SERVING");
        // tryShutdown waits for every call to end, and a client that keeps a stream open never lets it.
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      }),
  };
}

/** `host:port` a client uses to reach a server bound to `host`. */
export function clientAddress(host: string, port: number): string {
  const reachable = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
  return reachable.includes(":") ? `[${reachable}]:${port}` : `${reachable}:${port}`;
}
