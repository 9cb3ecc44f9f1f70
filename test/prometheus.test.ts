// Operating pearl with Prometheus: a real Prometheus server scrapes all three services of `pearl serve`
// and answers a PromQL query for the acceptance rate, and every query of the Grafana dashboard; promtool
// accepts every service's /metrics; the deploy/ files validate. Without the prometheus binary the
// Prometheus tests skip, except in CI (CI=true), where .ci/run installs it and its absence is a failure.
import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { packageRoot } from "../lib/paths.js";
import { PearlServe } from "./helpers/pearl_serve.js";

const IN_CI = process.env.CI === "true";

function findBinary(name: string): string | undefined {
  const found = spawnSync("sh", ["-c", `command -v ${name}`], { encoding: "utf8" });
  return found.status === 0 ? found.stdout.trim() : undefined;
}

const PROMETHEUS = findBinary("prometheus");
const PROMTOOL = findBinary("promtool");
const DOCKER_COMPOSE = findBinary("docker-compose");

/** A skip message when the binary is missing outside CI; in CI a missing binary fails the test. */
function needs(binary: string, path: string | undefined, debianPackage = "prometheus"): string | false {
  if (path !== undefined || IN_CI) return false;
  return `${binary} is not installed (apt-get install ${debianPackage}); CI installs it`;
}

function requireBinary(binary: string, path: string | undefined, debianPackage = "prometheus"): string {
  if (path === undefined)
    throw new Error(`${binary} is not installed: .ci/run must install it (apt-get install ${debianPackage})`);
  return path;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address ? address.port : 0));
    });
  });
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  while (Date.now() < deadline) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (error) {
      lastError = error;
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`${what} within ${timeoutMs} ms${lastError ? `: ${String(lastError)}` : ""}`);
}

interface PromVectorSample {
  metric: Record<string, string>;
  value: [number, string];
}

class PrometheusServer {
  private readonly output: string[] = [];

  private constructor(
    private readonly child: ChildProcess,
    readonly url: string,
    private readonly dataDir: string,
  ) {
    child.stdout?.on("data", (chunk: Buffer) => this.output.push(chunk.toString()));
    child.stderr?.on("data", (chunk: Buffer) => this.output.push(chunk.toString()));
  }

  static async start(binary: string, scrapeTargets: string[]): Promise<PrometheusServer> {
    const dataDir = mkdtempSync(join(tmpdir(), "pearl-prometheus-"));
    const config = [
      "global:",
      "  scrape_interval: 1s",
      "  evaluation_interval: 1s",
      "scrape_configs:",
      "  - job_name: pearl",
      "    static_configs:",
      `      - targets: [${scrapeTargets.map((target) => `"${target}"`).join(", ")}]`,
      "",
    ].join("\n");
    writeFileSync(join(dataDir, "prometheus.yml"), config);
    const port = await freePort();
    const child = spawn(
      binary,
      [
        `--config.file=${join(dataDir, "prometheus.yml")}`,
        `--storage.tsdb.path=${join(dataDir, "data")}`,
        `--web.listen-address=127.0.0.1:${port}`,
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    const server = new PrometheusServer(child, `http://127.0.0.1:${port}`, dataDir);
    try {
      await until("prometheus ready", 20_000, async () => {
        if (child.exitCode !== null) throw new Error(`prometheus exited (${child.exitCode})`);
        const response = await fetch(`${server.url}/-/ready`);
        return response.ok ? true : undefined;
      });
    } catch (error) {
      await server.stop();
      throw new Error(`${(error as Error).message}\n${server.output.join("").slice(-3000)}`);
    }
    return server;
  }

  async query(promql: string): Promise<PromVectorSample[]> {
    const response = await fetch(`${this.url}/api/v1/query?query=${encodeURIComponent(promql)}`);
    const body = (await response.json()) as {
      status: string;
      error?: string;
      data?: { resultType: string; result: PromVectorSample[] };
    };
    if (body.status !== "success" || !body.data) throw new Error(`query ${promql} failed: ${body.error}`);
    assert.equal(body.data.resultType, "vector");
    return body.data.result;
  }

  async stop(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((resolve) => this.child.once("exit", resolve));
      this.child.kill("SIGTERM");
      await exited;
    }
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

const DEPLOY = join(packageRoot(), "deploy");
const DASHBOARD = join(DEPLOY, "grafana", "dashboards", "pearl.json");

interface DashboardPanel {
  type: string;
  id: number;
  title: string;
  datasource?: { type: string; uid: string };
  gridPos: { h: number; w: number; x: number; y: number };
  targets?: { refId: string; expr: string; datasource?: { uid: string } }[];
}

function dashboardPanels(): DashboardPanel[] {
  return (JSON.parse(readFileSync(DASHBOARD, "utf8")) as { panels: DashboardPanel[] }).panels;
}

/** Every PromQL expression of the dashboard, with Grafana's $__rate_interval as Grafana would fill it in. */
function dashboardQueries(): string[] {
  return dashboardPanels()
    .flatMap((panel) => panel.targets ?? [])
    .map((target) => target.expr.replaceAll("$__rate_interval", "1m"));
}

/** The metric names a query reads (a histogram's _bucket/_sum/_count series included as written). */
function metricNames(query: string): string[] {
  return [...new Set(query.match(/\bpearl_[a-z0-9_]+/g) ?? [])];
}

/** The metric family a series belongs to. */
function familyOf(name: string): string {
  return name.replace(/_(bucket|sum|count)$/, "");
}

describe("metrics with a real Prometheus (pearl serve)", { skip: needs("prometheus", PROMETHEUS) }, () => {
  let serve: PearlServe;
  let prometheus: PrometheusServer | undefined;

  before(async () => {
    serve = await PearlServe.start();
  });

  after(async () => {
    await prometheus?.stop();
    if (serve) await serve.stop();
  });

  test("Prometheus scrapes all three services and answers the acceptance rate", async () => {
    const services = ["draft", "target", "gateway"] as const;
    prometheus = await PrometheusServer.start(
      requireBinary("prometheus", PROMETHEUS),
      services.map((service) => serve.httpUrl(service).replace("http://", "")),
    );
    const server = prometheus;
    // Every service scraped once before any request, so that the rates below see the counters rise.
    await until("all three services up", 20_000, async () => {
      const up = await server.query('sum(up{job="pearl"})');
      return up[0]?.value[1] === "3" ? true : undefined;
    });
    const gateway = `${serve.httpUrl("gateway")}/v1/completions`;
    for (let i = 0; i < 6; i++) {
      const response = await fetch(gateway, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          model: "pearl-code",
          prompt: `def function_${i}(values):\n`,
          max_tokens: 48,
          temperature: 0,
          decoding: "pearl",
        }),
      });
      assert.equal(response.status, 200, await response.text());
    }
    const acceptance =
      "sum(rate(pearl_spec_accepted_tokens_total[1m])) / sum(rate(pearl_spec_draft_tokens_total[1m]))";
    const rate = await until("a positive acceptance rate", 20_000, async () => {
      const value = Number((await server.query(acceptance))[0]?.value[1]);
      return value > 0 ? value : undefined;
    });
    assert.ok(rate > 0 && rate <= 1, `the acceptance rate ${rate} is a fraction`);

    const byService = await server.query('count by (service) ({__name__=~"pearl_.+"})');
    assert.deepEqual(byService.map((sample) => sample.metric.service).sort(), ["draft", "gateway", "target"]);
    const steps = await server.query('sum by (service) (pearl_target_steps_total{service="gateway"})');
    assert.ok(Number(steps[0]?.value[1]) > 0, "the gateway counted target steps");
  });

  test("every query of the Grafana dashboard parses in Prometheus and reads metrics the services export", async () => {
    const server = prometheus;
    assert.ok(server, "the test above started Prometheus and sent requests");
    const declared = new Set<string>();
    for (const service of ["draft", "target", "gateway"] as const) {
      const text = await (await fetch(`${serve.httpUrl(service)}/metrics`)).text();
      for (const match of text.matchAll(/^# TYPE (\S+) /gm)) declared.add(match[1]!);
    }
    const queries = dashboardQueries();
    assert.ok(queries.length >= 20, `${queries.length} queries`);
    for (const query of queries) {
      // A query Prometheus cannot parse or evaluate fails here, with its error.
      const result = await server.query(query);
      const names = metricNames(query);
      assert.ok(names.length > 0, `${query} reads a pearl_ metric`);
      let allScraped = true;
      for (const name of names) {
        assert.ok(declared.has(familyOf(name)), `${name} (in ${query}) is exported by a service`);
        const series = await server.query(`count({__name__="${name}"})`);
        allScraped &&= series.length > 0;
      }
      // Labelled counters that never counted (draft fallbacks, say) have no series yet; the rest must show
      // once a series has two scrapes for rate() to read.
      if (allScraped && result.length === 0) {
        await until(`${query} returning data`, 10_000, async () =>
          (await server.query(query)).length > 0 ? true : undefined,
        );
      }
    }
  });

  test("promtool check metrics passes on every service, apart from prom-client's nodejs_* gauges", async () => {
    const promtool = requireBinary("promtool", PROMTOOL);
    for (const service of ["draft", "target", "gateway"] as const) {
      const text = await (await fetch(`${serve.httpUrl(service)}/metrics`)).text();
      assert.match(text, /^# HELP pearl_/m, `${service} exports pearl_ metrics`);
      const check = spawnSync(promtool, ["check", "metrics"], { input: text, encoding: "utf8" });
      const problems = `${check.stdout}${check.stderr}`
        .split("\n")
        .map((line) => line.trim())
        .filter((line) => line !== "");
      // Exit 3 is lint findings only (exit 1 would be text Prometheus cannot parse).
      assert.ok(
        check.status === 0 || check.status === 3,
        `${service}: promtool exit ${check.status}: ${problems}`,
      );
      const ours = problems.filter((line) => !line.startsWith("nodejs_"));
      assert.deepEqual(ours, [], `${service}: promtool findings outside prom-client's defaults`);
    }
  });
});

describe("deploy files", () => {
  const deploy = DEPLOY;

  test(
    "docker-compose.yml validates",
    { skip: needs("docker-compose", DOCKER_COMPOSE, "docker-compose") },
    () => {
      const dockerCompose = requireBinary("docker-compose", DOCKER_COMPOSE, "docker-compose");
      for (const profile of ["cpu", "cuda"]) {
        const result = spawnSync(
          dockerCompose,
          ["-f", join(deploy, "docker-compose.yml"), "--profile", profile, "config", "-q"],
          { encoding: "utf8" },
        );
        assert.equal(result.status, 0, `profile ${profile}: ${result.stderr}`);
      }
    },
  );

  test("the Grafana dashboard is valid, covers what operators watch, and is provisioned by the compose file", () => {
    const panels = dashboardPanels();
    const ids = panels.map((panel) => panel.id);
    assert.equal(new Set(ids).size, ids.length, "panel ids are unique");
    const datasources = readFileSync(
      join(deploy, "grafana", "provisioning", "datasources", "prometheus.yml"),
      "utf8",
    );
    const uid = /^\s+uid: (\S+)$/m.exec(datasources)?.[1];
    assert.ok(uid, "the provisioned datasource has a uid");
    assert.match(datasources, /url: http:\/\/prometheus:9090$/m, "it is the compose stack's Prometheus");
    for (const panel of panels) {
      const { x, w, h } = panel.gridPos;
      assert.ok(x >= 0 && w > 0 && x + w <= 24 && h > 0, `${panel.title}: inside the 24-column grid`);
      if (panel.type === "row") continue;
      assert.ok(["timeseries", "stat"].includes(panel.type), `${panel.title}: ${panel.type}`);
      assert.equal(panel.datasource?.uid, uid, `${panel.title} reads the provisioned datasource`);
      assert.ok((panel.targets ?? []).length > 0, `${panel.title} has queries`);
      for (const target of panel.targets!) assert.equal(target.datasource?.uid, uid);
    }
    const read = new Set(dashboardQueries().flatMap(metricNames).map(familyOf));
    for (const watched of [
      "pearl_generation_tokens_total",
      "pearl_spec_accepted_tokens_total",
      "pearl_spec_draft_tokens_total",
      "pearl_spec_accepted_tokens_per_position_total",
      "pearl_target_steps_total",
      "pearl_time_to_first_token_seconds",
      "pearl_inter_token_latency_seconds",
      "pearl_kv_cache_usage_ratio",
      "pearl_requests_running_requests",
      "pearl_sessions_waiting_sessions",
    ]) {
      assert.ok(read.has(watched), `the dashboard shows ${watched}`);
    }
    // The compose file mounts the provisioning and the dashboards where the provider looks for them.
    const compose = readFileSync(join(deploy, "docker-compose.yml"), "utf8");
    const provider = readFileSync(join(deploy, "grafana", "provisioning", "dashboards", "pearl.yml"), "utf8");
    const dashboardsPath = /^\s+path: (\S+)$/m.exec(provider)?.[1];
    assert.ok(compose.includes("./grafana/provisioning:/etc/grafana/provisioning:ro"));
    assert.ok(
      compose.includes(`./grafana/dashboards:${dashboardsPath}:ro`),
      `dashboards mounted at ${dashboardsPath}`,
    );
    assert.ok(existsSync(join(deploy, "grafana", "dashboards", "pearl.json")));
  });

  test("prometheus.yml validates", { skip: needs("promtool", PROMTOOL) }, () => {
    const result = spawnSync(
      requireBinary("promtool", PROMTOOL),
      ["check", "config", "--syntax-only", join(deploy, "prometheus.yml")],
      { encoding: "utf8" },
    );
    assert.equal(result.status, 0, `${result.stdout}${result.stderr}`);
  });
});
