// Structured logs: one JSON object per line on stdout, so that a log collector (or `pearl serve`, which
// reads its children's start-up line) can parse every line.
import winston from "winston";

export type Logger = winston.Logger;

export const LOG_LEVELS = ["error", "warn", "info", "debug"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function isLogLevel(value: string): value is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(value);
}

export function createLogger(service: string, level: LogLevel = "info"): Logger {
  return winston.createLogger({
    level,
    defaultMeta: { service },
    format: winston.format.combine(
      winston.format.timestamp(),
      winston.format.errors(),
      winston.format.json(),
    ),
    transports: [new winston.transports.Console()],
  });
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * The start-up line {"message":"listening",...}: printed whatever the log level, because `pearl serve`
 * and other supervisors wait for it to learn that a service is ready and which ports it got.
 */
export function announceListening(service: string, fields: Record<string, unknown>): void {
  process.stdout.write(
    JSON.stringify({
      level: "info",
      message: "listening",
      service,
      timestamp: new Date().toISOString(),
      // Lets a supervisor or an operator signal the service itself.
      pid: process.pid,
      ...fields,
    }) + "\n",
  );
}
