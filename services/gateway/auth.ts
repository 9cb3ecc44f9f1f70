// API keys on the gateway's REST and gRPC APIs, as vLLM's --api-key: a client presents one as
// `Authorization: Bearer <key>` (HTTP header or gRPC metadata); a missing or wrong one is refused with 401
// (OpenAI's error body) or UNAUTHENTICATED. No key is ever logged or echoed back.
import { createHash, timingSafeEqual } from "node:crypto";
import {
  type Metadata,
  type ServerInterceptingCallInterface,
  ServerInterceptingCall,
  type ServerInterceptor,
  type ServerMethodDefinition,
} from "@grpc/grpc-js";
import type { FastifyReply, FastifyRequest } from "fastify";
import { GrpcStatus } from "../../lib/grpc.js";
import type { Logger } from "../../lib/logging.js";
import { OpenAIError } from "./openai_schema.js";

/** Equal-length digests, so that comparing them takes the same time whatever the presented key. */
function digest(key: string): Buffer {
  return createHash("sha256").update(key, "utf8").digest();
}

export class ApiKeys {
  private readonly digests: Buffer[];

  constructor(keys: readonly string[]) {
    this.digests = keys.map(digest);
  }

  get enabled(): boolean {
    return this.digests.length > 0;
  }

  /** Compared with every key, in constant time, without stopping at the first match: the time taken
   * tells nothing about which key matched or how much of one did. */
  accepts(presented: string | undefined): boolean {
    if (presented === undefined) return false;
    const candidate = digest(presented);
    let match = false;
    for (const key of this.digests) match = timingSafeEqual(key, candidate) || match;
    return match;
  }
}

/** The key of an `Authorization: Bearer <key>` value; undefined for anything else. */
export function bearerToken(authorization: unknown): string | undefined {
  if (typeof authorization !== "string") return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
  return match?.[1];
}

export type Exempt = ReadonlySet<"health" | "metrics">;

export interface AuthOptions {
  keys: ApiKeys;
  exempt: Exempt;
  logger: Logger;
  /** Counts a refused request. */
  rejected: () => void;
}

function refusal(presented: boolean): string {
  return presented
    ? "Incorrect API key provided."
    : "You didn't provide an API key: send it as `Authorization: Bearer <key>`.";
}

/** fastify onRequest hook for every route of the gateway's HTTP server. */
export function restAuthentication(
  options: AuthOptions,
): (request: FastifyRequest, reply: FastifyReply) => Promise<void> {
  return async (request, reply) => {
    // The query string is never looked at nor logged: a client may have put a key there.
    const path = request.url.split("?", 1)[0];
    if (
      (path === "/health" && options.exempt.has("health")) ||
      (path === "/metrics" && options.exempt.has("metrics"))
    ) {
      return;
    }
    const header = request.headers.authorization;
    if (options.keys.accepts(bearerToken(header))) return;
    options.rejected();
    options.logger.warn("request rejected: unauthenticated", {
      method: request.method,
      path,
      remoteAddress: request.ip,
      keyPresented: header !== undefined,
    });
    const error = new OpenAIError(
      401,
      refusal(header !== undefined),
      "invalid_request_error",
      null,
      "invalid_api_key",
    );
    await reply.code(401).header("www-authenticate", "Bearer").send(error.body());
  };
}

const HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/";

/** The same check on every gRPC call (reflection included; the health service when exempt is not). */
export function grpcAuthentication(options: AuthOptions): ServerInterceptor {
  return (method: ServerMethodDefinition<unknown, unknown>, call: ServerInterceptingCallInterface) =>
    new ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata: Metadata, proceed: (metadata: Metadata) => void) => {
            const [authorization] = metadata.get("authorization");
            const exempt = options.exempt.has("health") && method.path.startsWith(HEALTH_SERVICE_PREFIX);
            if (exempt || options.keys.accepts(bearerToken(authorization))) {
              proceed(metadata);
              return;
            }
            options.rejected();
            options.logger.warn("request rejected: unauthenticated", {
              method: method.path,
              peer: call.getPeer(),
              keyPresented: authorization !== undefined,
            });
            call.sendStatus({
              code: GrpcStatus.UNAUTHENTICATED,
              details: refusal(authorization !== undefined),
            });
          },
        }),
    });
}
