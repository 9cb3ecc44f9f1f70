// The prompts `pearl bench` sends to the embedded pair: code the pair never trained on.
//
//   node --import tsx tools/make_bench_prompts.ts [--python python3] [--count 128] [--out bench/heldout_prompts.json]
//
// tools/train_pair.py split its corpus (a Python installation's .py files) by package and held out every
// 20th package by size; models/metrics.json lists them. This script finds those packages in the local
// Python installation (`--python`), which need not be the training machine's: a package held out there was
// never trained on in any version, while another package's code quoted in it is what the training's
// block deduplication could not see either way. Packages that are not installed are skipped and named.
//
// Each prompt is a file cut right after the colon of a `def` line (a function, or a method indented once),
// as train_pair.py cuts its reference prompts: the model is asked for a body. It stops before the newline,
// because byte-level BPE merges a newline with the indentation after it, and it keeps whole lines from the
// end back to at most 160 tokens (at least 60), so that 128 generated tokens fit the 512-token context.
// Packages take turns, each in a seeded order, so that the biggest package does not supply every prompt.
import { spawnSync } from "node:child_process";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { basename, dirname, join, relative } from "node:path";
import { parseArgs } from "node:util";
import { packageRoot } from "../lib/paths.js";
import { TextTokenizer } from "../lib/tokenizer.js";

const MIN_PROMPT_TOKENS = 60;
const MAX_PROMPT_TOKENS = 160;
/** train_pair.py's seed: the order packages' cut points are taken in. */
const SEED = 1234;
const DEF_LINE = /^(?: {4})?(?:async )?def \w+\(.*:\s*$/;

interface Located {
  name: string;
  /** The module file, or the package's folder. */
  path: string;
  isPackage: boolean;
}

/** Where `python` imports each module from (find_spec: nothing is imported). */
function locate(python: string, names: string[]): { version: string; found: Located[] } {
  const script = [
    "import importlib.util, json, sys",
    "names = json.loads(sys.argv[1])",
    "found = []",
    "for name in names:",
    "    spec = importlib.util.find_spec(name)",
    "    if spec is None or spec.origin in (None, 'built-in', 'frozen'):",
    "        continue",
    "    locations = list(spec.submodule_search_locations or [])",
    "    found.append({'name': name, 'path': locations[0] if locations else spec.origin,",
    "                  'isPackage': bool(locations)})",
    "print(json.dumps({'version': sys.version.split()[0], 'found': found}))",
  ].join("\n");
  const result = spawnSync(python, ["-c", script, JSON.stringify(names)], { encoding: "utf8" });
  if (result.status !== 0) throw new Error(`${python} failed: ${result.stderr || result.error?.message}`);
  return JSON.parse(result.stdout) as { version: string; found: Located[] };
}

function pythonFiles(located: Located): string[] {
  if (!located.isPackage) return located.path.endsWith(".py") ? [located.path] : [];
  const files: string[] = [];
  const walk = (directory: string): void => {
    for (const name of readdirSync(directory).sort()) {
      const path = join(directory, name);
      if (statSync(path).isDirectory()) {
        if (name !== "__pycache__") walk(path);
      } else if (name.endsWith(".py")) files.push(path);
    }
  };
  walk(located.path);
  return files;
}

interface Prompt {
  package: string;
  /** Relative to the folder the package is imported from. */
  file: string;
  /** 1-based line of the `def` the prompt ends with. */
  line: number;
  tokens: number;
  text: string;
}

function cutPoints(tokenizer: TextTokenizer, located: Located, file: string): Prompt[] {
  const text = readFileSync(file, "utf8");
  // Not UTF-8: train_pair.py dropped such files, and so does this.
  if (text.includes("\uFFFD")) return [];
  const lines = text.split("\n");
  const prompts: Prompt[] = [];
  lines.forEach((line, index) => {
    if (!DEF_LINE.test(line)) return;
    let start = index;
    let candidate = line;
    // Whole lines back from the def while they fit.
    while (start > 0) {
      const longer = lines.slice(start - 1, index + 1).join("\n");
      if (tokenizer.encode(longer).length > MAX_PROMPT_TOKENS) break;
      start -= 1;
      candidate = longer;
    }
    const tokens = tokenizer.encode(candidate.trimEnd()).length;
    if (tokens < MIN_PROMPT_TOKENS || tokens > MAX_PROMPT_TOKENS) return;
    prompts.push({
      package: located.name,
      file: relative(located.isPackage ? dirname(located.path) : dirname(file), file),
      line: index + 1,
      tokens,
      text: candidate.trimEnd(),
    });
  });
  return prompts;
}

/** mulberry32: a seeded order that does not depend on the JS engine. */
function shuffled<T>(items: T[], seed: number): T[] {
  let state = seed >>> 0;
  const next = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const order = [...items];
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order;
}

function main(): void {
  const { values } = parseArgs({
    options: {
      python: { type: "string", default: "python3" },
      count: { type: "string", default: "128" },
      out: { type: "string", default: join(packageRoot(), "bench", "heldout_prompts.json") },
    },
  });
  const count = Number(values.count);
  if (!Number.isInteger(count) || count < 1) throw new Error(`--count must be a positive integer`);
  const models = join(packageRoot(), "models");
  const metrics = JSON.parse(readFileSync(join(models, "metrics.json"), "utf8")) as {
    corpus: { held_out_bytes_by_package: Record<string, number> };
  };
  const heldOut = Object.keys(metrics.corpus.held_out_bytes_by_package);
  const tokenizer = TextTokenizer.load(join(models, "target"));
  if (!tokenizer) throw new Error(`no tokenizer in ${join(models, "target")}`);
  const { version, found } = locate(values.python, heldOut);

  const queues = found
    .map((located) => {
      const all = pythonFiles(located).flatMap((file) => cutPoints(tokenizer, located, file));
      return { located, queue: shuffled(all, SEED) };
    })
    .filter(({ queue }) => queue.length > 0)
    .sort((a, b) => a.located.name.localeCompare(b.located.name));
  const chosen: Prompt[] = [];
  const seen = new Set<string>();
  while (chosen.length < count && queues.some(({ queue }) => queue.length > 0)) {
    for (const { queue } of queues) {
      if (chosen.length === count) break;
      let prompt = queue.pop();
      // Files repeat themselves (overloads, templates): one copy of a prompt is enough.
      while (prompt && seen.has(prompt.text)) prompt = queue.pop();
      if (!prompt) continue;
      seen.add(prompt.text);
      chosen.push(prompt);
    }
  }
  if (chosen.length < count) {
    throw new Error(
      `only ${chosen.length} prompts found in the held-out packages installed for ${values.python}`,
    );
  }
  const perPackage: Record<string, number> = {};
  for (const prompt of chosen) perPackage[prompt.package] = (perPackage[prompt.package] ?? 0) + 1;
  const installed = new Set(found.map((located) => located.name));
  const output = {
    description:
      "Code completion prompts for `pearl bench` from the packages tools/train_pair.py held out of the " +
      "embedded pair's training (models/metrics.json), made by tools/make_bench_prompts.ts",
    python: version,
    prompts_per_package: perPackage,
    held_out_but_not_installed: heldOut.filter((name) => !installed.has(name)),
    prompts: chosen,
  };
  writeFileSync(values.out, JSON.stringify(output, null, 2) + "\n");
  console.log(
    `${chosen.length} prompts from ${Object.keys(perPackage).length} packages (Python ${version}) ` +
      `-> ${basename(values.out)}`,
  );
}

main();
