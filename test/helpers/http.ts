// HTTP(S) clients for the tests that fetch cannot express: a CA or client certificate of the test's own,
// a server-sent-event stream read event by event and dropped mid-way, and bytes sent exactly as written.
import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import { connect, type Socket } from "node:net";

export interface TlsClient {
  ca: Buffer;
  cert?: Buffer;
  key?: Buffer;
}

export interface RequestOptions {
  method?: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
  tls?: TlsClient;
}

export interface Response {
  status: number;
  headers: IncomingMessage["headers"];
  text: string;
  json(): unknown;
}

function send(url: string, options: RequestOptions): ReturnType<typeof httpRequest> {
  const target = new URL(url);
  const common = {
    // A connection of its own: one that the server closed after its last answer (431, 408) is not reused.
    agent: false,
    method: options.method ?? (options.body === undefined ? "GET" : "POST"),
    headers: {
      ...(options.body !== undefined ? { "content-type": "application/json" } : {}),
      ...options.headers,
    },
  };
  return target.protocol === "https:"
    ? httpsRequest(target, { ...common, ...options.tls })
    : httpRequest(target, common);
}

export function request(url: string, options: RequestOptions = {}): Promise<Response> {
  return new Promise((resolve, reject) => {
    const outgoing = send(url, options);
    outgoing.on("error", reject);
    outgoing.on("response", (response) => {
      const chunks: Buffer[] = [];
      response.on("data", (chunk: Buffer) => chunks.push(chunk));
      response.on("error", reject);
      response.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        resolve({
          status: response.statusCode!,
          headers: response.headers,
          text,
          json: () => JSON.parse(text),
        });
      });
    });
    outgoing.end(options.body);
  });
}

/** A streamed completion read as it arrives: each `data:` line parsed ("[DONE]" kept as the string). */
export class SseStream {
  readonly events: unknown[] = [];
  /** The status line, once it came. */
  readonly status: Promise<number>;
  /** The first event. */
  readonly started: Promise<void>;
  /** When the response (or the connection) ended, as performance.now(). */
  readonly closed: Promise<number>;
  private readonly outgoing: ReturnType<typeof httpRequest>;

  constructor(url: string, body: unknown, options: Omit<RequestOptions, "body"> = {}) {
    const payload = JSON.stringify(body);
    this.outgoing = send(url, { ...options, body: payload });
    let started: () => void = () => undefined;
    this.started = new Promise((resolve) => (started = resolve));
    let closed: (at: number) => void = () => undefined;
    this.closed = new Promise((resolve) => (closed = resolve));
    this.status = new Promise((resolve, reject) => {
      this.outgoing.on("error", (error) => {
        closed(performance.now());
        reject(error);
      });
      this.outgoing.on("response", (response) => {
        resolve(response.statusCode!);
        let pending = "";
        response.on("data", (chunk: Buffer) => {
          pending += chunk.toString("utf8");
          const lines = pending.split("\n");
          pending = lines.pop()!;
          for (const line of lines) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice("data: ".length);
            this.events.push(data === "[DONE]" ? data : JSON.parse(data));
            started();
          }
        });
        response.on("close", () => closed(performance.now()));
      });
    });
    this.status.catch(() => undefined);
    this.outgoing.end(payload);
  }

  /** The client goes away mid-stream. */
  abort(): void {
    this.outgoing.destroy();
  }

  /** The error event, if the stream carried one. */
  error(): { message: string; code: string | null } | undefined {
    const event = this.events.find(
      (item): item is { error: { message: string; code: string | null } } =>
        typeof item === "object" && item !== null && "error" in item,
    );
    return event?.error;
  }

  text(): string {
    return this.events
      .map((event) => {
        const choice = (event as { choices?: { text?: string }[] }).choices?.[0];
        return choice?.text ?? "";
      })
      .join("");
  }
}

/** A raw TCP connection to an HTTP port: what a client writes goes out byte for byte. */
export class RawConnection {
  private readonly socket: Socket;
  private received = "";
  /** When the server closed the connection (performance.now()). */
  readonly closed: Promise<number>;

  constructor(port: number) {
    this.socket = connect(port, "127.0.0.1");
    this.socket.on("data", (chunk: Buffer) => (this.received += chunk.toString("latin1")));
    this.closed = new Promise((resolve) => {
      this.socket.on("close", () => resolve(performance.now()));
    });
    this.socket.on("error", () => undefined);
  }

  write(data: string | Buffer): void {
    if (!this.socket.destroyed) this.socket.write(data);
  }

  /** The status code of the first response on the connection, or undefined. */
  status(): number | undefined {
    const match = /^HTTP\/1\.1 (\d{3})/.exec(this.received);
    return match ? Number(match[1]) : undefined;
  }

  get response(): string {
    return this.received;
  }

  destroy(): void {
    this.socket.destroy();
  }
}
