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
    format: winston.format.combine(winston.format.timestamp(), winston.format.errors(), winston.format.json()),
    transports: [new winston.transports.Console()],
  });
}

export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
