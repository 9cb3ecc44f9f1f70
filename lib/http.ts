// The small HTTP side of every service: Prometheus /metrics and a /health probe. The gateway adds its
// REST API to the same server, and TLS, authentication and a bound on how long a request may take to
// arrive.
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import type { Registry } from "prom-client";
import type { ServerTls } from "./tls.js";

export interface HttpServerOptions {
  host: string;
  port: number;
  registry: Registry;
  /** null when healthy, else why not (answered with 503). */
  unhealthyReason: () => string | null;
  /** Adds routes before the server starts listening. */
  configure?: (app: FastifyInstance) => void | Promise<void>;
  /** Serve HTTPS (client certificates required when it names a client CA). */
  tls?: ServerTls;
  /** Runs before every route, these included (authentication). */
  onRequest?: (request: FastifyRequest, reply: FastifyReply) => Promise<void>;
  /** Most milliseconds a client may take to send a whole request (headers and body); then 408. Node's
   * default is five minutes, which lets slow clients hold connections open. */
  requestTimeoutMs?: number;
  /** The body of an error fastify answers before any route (a URL that does not decode, an unknown
   * path), so that it has the same shape as the API's own errors. Default: fastify's. */
  errorBody?: (status: number, message: string) => unknown;
}

export interface RunningHttpServer {
  app: FastifyInstance;
  port: number;
  close(): Promise<void>;
}

/** How often Node looks for requests past their timeout (its default, 30 s, would stretch short ones). */
const TIMEOUT_CHECK_INTERVAL_MS = 500;

export async function startHttpServer(options: HttpServerOptions): Promise<RunningHttpServer> {
  const requestTimeout = options.requestTimeoutMs ?? 0;
  const nodeServerOptions = {
    connectionsCheckingInterval: TIMEOUT_CHECK_INTERVAL_MS,
    ...(requestTimeout > 0 ? { requestTimeout, headersTimeout: requestTimeout } : {}),
  };
  const tls = options.tls;
  // fastify's own logger is off: requests are logged by the services themselves.
  const app = Fastify({
    logger: false,
    requestTimeout,
    ...(tls
      ? {
          https: {
            ...nodeServerOptions,
            cert: tls.cert,
            key: tls.key,
            ...(tls.clientCa ? { ca: tls.clientCa, requestCert: true, rejectUnauthorized: true } : {}),
          },
        }
      : { http: nodeServerOptions }),
    ...(options.errorBody
      ? {
          frameworkErrors: (error: Error, _request: FastifyRequest, reply: FastifyReply) => {
            void reply.code(400).send(options.errorBody!(400, error.message));
          },
        }
      : {}),
  }) as unknown as FastifyInstance;
  const errorBody = options.errorBody;
  if (errorBody) {
    app.setNotFoundHandler((request, reply) =>
      reply
        .code(404)
        .send(errorBody(404, `unknown endpoint: ${request.method} ${request.url.split("?", 1)[0]}`)),
    );
  }
  if (options.onRequest) app.addHook("onRequest", options.onRequest);
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
