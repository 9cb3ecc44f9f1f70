// The gateway's connections to the draft and target services. Each is ONE long-lived bidi stream that
// carries every session of this gateway (docs/design.md §2, the session protocol); events are routed to
// the session's listener by id. When the stream breaks, every session on it hears about it and the next
// session opens a new stream.
import { type ChannelCredentials, type ClientDuplexStream, credentials } from "@grpc/grpc-js";
import type { ServiceInfo } from "../../proto/gen/pearl/v1/common.js";
import {
  type DraftCorrect,
  type DraftEvent,
  type DraftOpen,
  type DraftRequest,
  DraftServiceClient,
} from "../../proto/gen/pearl/v1/draft.js";
import {
  type TargetEvent,
  type TargetOpen,
  type TargetPropose,
  type TargetRequest,
  TargetServiceClient,
  type TargetUpdate,
} from "../../proto/gen/pearl/v1/target.js";
import { CHANNEL_OPTIONS } from "../../lib/grpc.js";
import type { Logger } from "../../lib/logging.js";

export interface SessionListener<Event> {
  onEvent(event: Event): void;
  /** The stream broke: the service may have forgotten the session. */
  onLinkLost(error: Error): void;
}

class SessionStreamLink<Request, Event> {
  private call: ClientDuplexStream<Request, Event> | undefined;
  private readonly listeners = new Map<number, SessionListener<Event>>();

  constructor(
    private readonly name: string,
    private readonly openCall: () => ClientDuplexStream<Request, Event>,
    private readonly sessionOf: (event: Event) => number | undefined,
    private readonly logger: Logger,
    private readonly onLost: (error: Error) => void = () => undefined,
  ) {}

  register(sessionId: number, listener: SessionListener<Event>): void {
    this.listeners.set(sessionId, listener);
    this.ensureCall();
  }

  /** Removes the session's listener; false when it was not registered (never, or its stream broke). */
  unregister(sessionId: number): boolean {
    return this.listeners.delete(sessionId);
  }

  send(request: Request): void {
    this.ensureCall().write(request);
  }

  /** Ends the stream (the services close its sessions). */
  close(): void {
    const call = this.call;
    this.call = undefined;
    call?.end();
    call?.cancel();
  }

  private ensureCall(): ClientDuplexStream<Request, Event> {
    if (this.call) return this.call;
    const call = this.openCall();
    this.call = call;
    call.on("data", (event: Event) => {
      const sessionId = this.sessionOf(event);
      if (sessionId !== undefined) this.listeners.get(sessionId)?.onEvent(event);
    });
    const lost = (error: Error): void => {
      if (this.call !== call) return;
      this.call = undefined;
      this.logger.warn(`${this.name} stream lost`, { error: error.message });
      const listeners = [...this.listeners.values()];
      this.listeners.clear();
      for (const listener of listeners) listener.onLinkLost(error);
      this.onLost(error);
    };
    call.on("error", lost);
    call.on("end", () => lost(new Error(`the ${this.name} service ended the stream`)));
    return call;
  }
}

function infoOf(
  client: { info: (request: object, callback: (error: Error | null, info: ServiceInfo) => void) => unknown },
  deadlineMs: number,
): Promise<ServiceInfo> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer within ${deadlineMs} ms`)), deadlineMs);
    client.info({}, (error, info) => {
      clearTimeout(timer);
      if (error) reject(error);
      else resolve(info);
    });
  });
}

export class TargetLink {
  readonly client: TargetServiceClient;
  private readonly stream: SessionStreamLink<TargetRequest, TargetEvent>;

  /** @param onStreamLost hears of every break of the session stream (the target may be down) */
  constructor(
    readonly address: string,
    logger: Logger,
    channelCredentials: ChannelCredentials = credentials.createInsecure(),
    onStreamLost: (error: Error) => void = () => undefined,
  ) {
    this.client = new TargetServiceClient(address, channelCredentials, CHANNEL_OPTIONS);
    this.stream = new SessionStreamLink(
      "target",
      () => this.client.session(),
      (event) => event.verdict?.sessionId ?? event.failed?.sessionId,
      logger,
      onStreamLost,
    );
  }

  info(deadlineMs = 5000): Promise<ServiceInfo> {
    return infoOf(this.client, deadlineMs);
  }

  open(request: TargetOpen, listener: SessionListener<TargetEvent>): void {
    this.stream.register(request.sessionId, listener);
    this.stream.send({ open: request });
  }

  propose(request: TargetPropose): void {
    this.stream.send({ propose: request });
  }

  update(request: TargetUpdate): void {
    this.stream.send({ update: request });
  }

  close(sessionId: number): void {
    if (this.stream.unregister(sessionId)) this.stream.send({ close: { sessionId } });
  }

  /** Forgets the session without telling the service (it ended the session itself). */
  forget(sessionId: number): void {
    this.stream.unregister(sessionId);
  }

  shutdown(): void {
    this.stream.close();
    this.client.close();
  }
}

export class DraftLink {
  readonly client: DraftServiceClient;
  private readonly stream: SessionStreamLink<DraftRequest, DraftEvent>;

  constructor(
    readonly address: string,
    logger: Logger,
    channelCredentials: ChannelCredentials = credentials.createInsecure(),
  ) {
    this.client = new DraftServiceClient(address, channelCredentials, CHANNEL_OPTIONS);
    this.stream = new SessionStreamLink(
      "draft",
      () => this.client.session(),
      (event) => event.tokens?.sessionId ?? event.failed?.sessionId,
      logger,
    );
  }

  info(deadlineMs = 5000): Promise<ServiceInfo> {
    return infoOf(this.client, deadlineMs);
  }

  open(request: DraftOpen, listener: SessionListener<DraftEvent>): void {
    this.stream.register(request.sessionId, listener);
    this.stream.send({ open: request });
  }

  advance(sessionId: number, verifiedLength: number, lookahead: number): void {
    this.stream.send({ advance: { sessionId, verifiedLength, lookahead } });
  }

  correct(request: DraftCorrect): void {
    this.stream.send({ correct: request });
  }

  close(sessionId: number): void {
    if (this.stream.unregister(sessionId)) this.stream.send({ close: { sessionId } });
  }

  shutdown(): void {
    this.stream.close();
    this.client.close();
  }
}
