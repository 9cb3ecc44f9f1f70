// The small HTTP side of every service: Prometheus /metrics and a /health probe. The gateway adds its
// REST API to the same server.
import Fastify, { type FastifyInstance } from "fastify";
import type { Registry } from "prom-client";

export interface HttpServerOptions {
  host: string;
  port: number;
  registry: Registry;
  /** null when healthy, else why not (answered with 503). */
  unhealthyReason: () => string | null;
  /** Adds routes before the server starts listening. */
  configure?: (app: FastifyInstance) => void | Promise<void>;
}

export interface RunningHttpServer {
  app: FastifyInstance;
  port: number;
  close(): Promise<void>;
}

export async function startHttpServer(options: HttpServerOptions): Promise<RunningHttpServer> {
  // fastify's own logger is off: requests are logged by the services themselves.
  const app = Fastify({ logger: false });
  app.get("/metrics", async (_request, reply) => {
    const body = await options.registry.metrics();
    return reply.header("content-type", options.registry.contentType).send(body);
  });
  app.get("/health", async (_request, reply) => {
    const reason = options.unhealthyReason();
    return reason === null
      ? reply.send({ status: "ok" })
      : reply.code(503).send({ status: "unavailable", reason });
  });
  await options.configure?.(app);
  await app.listen({ host: options.host, port: options.port });
  const address = app.server.address();
  const port = typeof address === "object" && address ? address.port : options.port;
  return { app, port, close: () => app.close() };
}
