// `pearl serve` on the embedded model pair as a child process, exactly as a user starts it (npm start runs
// the same command), on free ports; its children's "listening" lines say where each service landed.
import { join } from "node:path";
import { packageRoot } from "../../lib/paths.js";
import { type ServiceProcess, spawnService } from "../../lib/service_process.js";
import { ALWAYS_DRAFT } from "./stack.js";

export const EMBEDDED_MODELS = join(packageRoot(), "models");

export interface ServicePorts {
  grpcPort: number;
  httpPort: number;
}

export class PearlServe {
  /** Every line the stack printed (JSON logs of all three services and of pearl serve itself). */
  readonly lines: string[] = [];
  readonly ports: Partial<Record<"draft" | "target" | "gateway", ServicePorts>> = {};

  private constructor(readonly process: ServiceProcess) {}

  /** Starts the stack and resolves once the gateway listens. Two cores: one engine thread each; pearl
   * requests always draft (see ALWAYS_DRAFT). */
  static async start(extraArgs: string[] = [], timeoutMs = 60_000): Promise<PearlServe> {
    let gatewayListening: () => void = () => undefined;
    const listening = new Promise<void>((resolve) => (gatewayListening = resolve));
    const serve: PearlServe = new PearlServe(
      spawnService(
        [
          "serve",
          ...["--port", "0", "--http-port", "0"],
          ...["--draft-port", "0", "--draft-http-port", "0", "--draft-threads", "1", "--draft-profile", "1"],
          ...[
            "--target-port",
            "0",
            "--target-http-port",
            "0",
            "--target-threads",
            "1",
            "--target-profile",
            "1",
          ],
          ...ALWAYS_DRAFT,
          ...extraArgs,
        ],
        { stderr: "pipe", onLine: (line) => serve.onLine(line, gatewayListening) },
      ),
    );
    serve.process.child.stderr?.on("data", (chunk: Buffer) => serve.lines.push(chunk.toString().trimEnd()));
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        listening,
        serve.process.exited.then((code) => {
          throw new Error(`pearl serve exited (${code})`);
        }),
        new Promise((_resolve, reject) => {
          timer = setTimeout(() => reject(new Error(`pearl serve not ready in ${timeoutMs} ms`)), timeoutMs);
        }),
      ]);
    } catch (error) {
      await serve.stop();
      throw new Error(`${(error as Error).message}\n--- output ---\n${serve.lines.slice(-40).join("\n")}`);
    } finally {
      clearTimeout(timer);
    }
    return serve;
  }

  private onLine(line: string, gatewayListening: () => void): void {
    this.lines.push(line);
    const record = parseRecord(line) as { message?: string; service?: string } & Partial<ServicePorts>;
    if (record.message !== "listening") return;
    const service = record.service;
    if (service !== "draft" && service !== "target" && service !== "gateway") return;
    this.ports[service] = { grpcPort: record.grpcPort ?? -1, httpPort: record.httpPort ?? -1 };
    if (service === "gateway") gatewayListening();
  }

  httpUrl(service: "draft" | "target" | "gateway"): string {
    return `http://127.0.0.1:${this.announcedPorts(service).httpPort}`;
  }

  grpcAddress(service: "draft" | "target" | "gateway"): string {
    return `127.0.0.1:${this.announcedPorts(service).grpcPort}`;
  }

  private announcedPorts(service: "draft" | "target" | "gateway"): ServicePorts {
    const ports = this.ports[service];
    if (!ports) throw new Error(`the ${service} service has not announced its ports`);
    return ports;
  }

  /** The JSON log lines of one kind ("message" field). */
  logRecords(message: string): Record<string, unknown>[] {
    return this.lines.map(parseRecord).filter((record) => record.message === message);
  }

  /** SIGTERM, as Ctrl-C would; resolves with the exit code. */
  async stop(): Promise<number | string> {
    this.process.child.kill("SIGTERM");
    return this.process.exited;
  }
}

/** A JSON log line as an object; {} for anything else the stack printed. */
function parseRecord(line: string): Record<string, unknown> {
  if (!line.startsWith("{")) return {};
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return {};
  }
}
