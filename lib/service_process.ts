// Running `pearl draft|target|gateway` as a child process and knowing when it is ready: every service logs
// one JSON line {"message":"listening","grpcPort":..,"httpPort":..} once it takes requests (ports picked
// by the system when 0 was asked for are in it).
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { packageRoot } from "./paths.js";

export interface ServicePorts {
  grpcPort: number;
  httpPort: number;
}

export interface ServiceProcess {
  child: ChildProcess;
  /** Resolves with the ports once the service listens; rejects if it exits first. */
  ready: Promise<ServicePorts>;
  /** Resolves with the exit code (or signal name) when the process ends. */
  exited: Promise<number | string>;
}

export interface SpawnServiceOptions {
  env?: NodeJS.ProcessEnv;
  /** Every stdout line of the child (its JSON logs); default: passed through to this process's stdout. */
  onLine?: (line: string) => void;
  /** Where the child's stderr goes; default: this process's stderr. */
  stderr?: "inherit" | "ignore" | "pipe";
}

/** Set in the environment of a service started by spawnService. */
export const SUPERVISED_ENV = "PEARL_SUPERVISED";

/** The command line that runs the pearl CLI: under tsx from source, or the compiled build. */
export function pearlCommand(): { command: string; args: string[] } {
  const root = packageRoot();
  if (import.meta.url.endsWith(".ts")) {
    return { command: process.execPath, args: ["--import", "tsx", join(root, "cli", "pearl.ts")] };
  }
  const compiled = join(root, "dist", "cli", "pearl.js");
  if (!existsSync(compiled)) throw new Error(`${compiled} is missing: run npm run build`);
  return { command: process.execPath, args: [compiled] };
}

export function spawnService(subcommand: string[], options: SpawnServiceOptions = {}): ServiceProcess {
  const { command, args } = pearlCommand();
  // The child stops when its stdin closes, which happens however this process ends (even SIGKILL):
  // no orphaned service keeps its port.
  const child = spawn(command, [...args, ...subcommand], {
    env: { ...(options.env ?? process.env), [SUPERVISED_ENV]: "1" },
    stdio: ["pipe", "pipe", options.stderr ?? "inherit"],
  });
  const exited = new Promise<number | string>((resolve) => {
    child.once("exit", (code, signal) => resolve(code ?? signal ?? "unknown"));
  });
  const ready = new Promise<ServicePorts>((resolve, reject) => {
    const lines = createInterface({ input: child.stdout! });
    lines.on("line", (line) => {
      if (options.onLine) options.onLine(line);
      else process.stdout.write(line + "\n");
      const ports = listeningPorts(line);
      if (ports) resolve(ports);
    });
    void exited.then((code) =>
      reject(new Error(`pearl ${subcommand[0]} exited (${code}) before it was ready`)),
    );
  });
  // A rejection nobody awaits (the child exiting after it was ready) must not crash the parent.
  ready.catch(() => undefined);
  return { child, ready, exited };
}

function listeningPorts(line: string): ServicePorts | undefined {
  if (!line.startsWith("{")) return undefined;
  try {
    const record = JSON.parse(line) as Record<string, unknown>;
    if (record.message === "listening" && typeof record.grpcPort === "number") {
      return {
        grpcPort: record.grpcPort,
        httpPort: typeof record.httpPort === "number" ? record.httpPort : -1,
      };
    }
  } catch {
    // Not a JSON log line.
  }
  return undefined;
}
