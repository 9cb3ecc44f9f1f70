// Server side of the long-lived bidi streams that carry many sessions: decode each request, hand it to
// the service, and end the stream's sessions when the stream goes away (gateway gone, connection lost).
import type { ServerDuplexStream } from "@grpc/grpc-js";
import { errorMessage, type Logger } from "./logging.js";

export interface SessionStreamHandlers<Request> {
  onRequest(request: Request): void;
  /**
   * onRequest threw: end the session the request names and tell the gateway, through the stream's
   * session-failed event, so that its request fails with the message instead of waiting forever.
   */
  onRequestFailed(request: Request, message: string): void;
  /** The stream is over (ended, cancelled or failed): close every session it opened. */
  onClosed(): void;
}

export function serveSessionStream<Request, Event>(
  call: ServerDuplexStream<Request, Event>,
  logger: Logger,
  makeHandlers: (send: (event: Event) => void) => SessionStreamHandlers<Request>,
): void {
  let open = true;
  const send = (event: Event): void => {
    if (open) call.write(event);
  };
  const handlers = makeHandlers(send);
  const finish = (): void => {
    if (!open) return;
    open = false;
    handlers.onClosed();
  };
  call.on("data", (request: Request) => {
    // A request still buffered when the stream closed would open a session nobody can close.
    if (!open) return;
    try {
      handlers.onRequest(request);
    } catch (error) {
      const message = `the service failed to handle a request: ${errorMessage(error)}`;
      logger.error("session stream request failed", { error: message });
      handlers.onRequestFailed(request, message);
    }
  });
  call.on("end", () => {
    finish();
    call.end();
  });
  call.on("cancelled", finish);
  call.on("error", (error: Error) => {
    logger.debug("session stream error", { error: error.message });
    finish();
  });
  call.on("close", finish);
}
