// The import rules `npm run lint` enforces on the TypeScript tree:
//   - no import cycles, type-only imports included: ESLint's import plugins skip those, but two modules
//     that need each other's types are still one module in two files;
//   - no service imports another service's files, and lib/ imports no service: each service is deployed
//     on its own, and what two of them share belongs in lib/.
// Run it as a script (it exits 1 and names every violation) or call importProblems().
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const SOURCE_DIRS = ["lib", "services", "cli", "test", "bench", "tools"];
const SKIPPED_DIRS = new Set(["node_modules", "fixtures"]);

/** Every TypeScript file under the source folders, and the files of the tree each one imports (paths
 * relative to the root, with "/" separators). */
export function importGraph(root: string): Map<string, string[]> {
  const files = SOURCE_DIRS.flatMap((dir) => typeScriptFiles(root, dir));
  const known = new Set(files);
  const graph = new Map<string, string[]>();
  for (const file of files) {
    const imported = ts
      .preProcessFile(readFileSync(join(root, file), "utf8"), true, true)
      .importedFiles.map((entry) => entry.fileName)
      .filter((specifier) => specifier.startsWith("."))
      .map((specifier) => resolveImport(file, specifier))
      .filter((target) => known.has(target));
    graph.set(file, [...new Set(imported)]);
  }
  return graph;
}

/** What breaks the rules, one message each; empty when the tree follows them. */
export function importProblems(root: string): string[] {
  const graph = importGraph(root);
  const problems: string[] = [];
  for (const [file, imports] of graph) {
    for (const target of imports) {
      const from = serviceOf(file);
      const to = serviceOf(target);
      if (from !== undefined && to !== undefined && from !== to) {
        problems.push(`${file} imports ${target}: a service must not import another service's files`);
      } else if (file.startsWith("lib/") && to !== undefined) {
        problems.push(`${file} imports ${target}: lib/ is shared by every service and must not import one`);
      }
    }
  }
  for (const cycle of importCycles(graph)) problems.push(`import cycle: ${cycle.join(" -> ")}`);
  return problems;
}

/** One cycle per group of files that import each other (directly or not), from its first file back to
 * it. */
export function importCycles(graph: Map<string, string[]>): string[][] {
  return stronglyConnected(graph)
    .filter((group) => group.length > 1 || graph.get(group[0]!)!.includes(group[0]!))
    .map((group) => cycleThrough(graph, new Set(group), group[0]!));
}

function typeScriptFiles(root: string, dir: string): string[] {
  let entries: string[];
  try {
    entries = readdirSync(join(root, dir));
  } catch {
    return [];
  }
  return entries.sort().flatMap((name) => {
    const path = `${dir}/${name}`;
    if (statSync(join(root, path)).isDirectory()) {
      return SKIPPED_DIRS.has(name) ? [] : typeScriptFiles(root, path);
    }
    return name.endsWith(".ts") && !name.endsWith(".d.ts") ? [path] : [];
  });
}

/** ESM imports name the compiled ".js"; the source beside it is the ".ts". */
function resolveImport(file: string, specifier: string): string {
  const path = join(dirname(file), specifier).split(sep).join("/");
  return path.endsWith(".js") ? `${path.slice(0, -3)}.ts` : path;
}

function serviceOf(file: string): string | undefined {
  return /^services\/([^/]+)\//.exec(file)?.[1];
}

/** Tarjan's algorithm: the groups of files that reach each other. */
function stronglyConnected(graph: Map<string, string[]>): string[][] {
  const index = new Map<string, number>();
  const lowLink = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const groups: string[][] = [];
  const visit = (file: string): void => {
    index.set(file, index.size);
    lowLink.set(file, index.get(file)!);
    stack.push(file);
    onStack.add(file);
    for (const target of graph.get(file)!) {
      if (!index.has(target)) {
        visit(target);
        lowLink.set(file, Math.min(lowLink.get(file)!, lowLink.get(target)!));
      } else if (onStack.has(target)) {
        lowLink.set(file, Math.min(lowLink.get(file)!, index.get(target)!));
      }
    }
    if (lowLink.get(file) !== index.get(file)) return;
    const group: string[] = [];
    let member: string;
    do {
      member = stack.pop()!;
      onStack.delete(member);
      group.push(member);
    } while (member !== file);
    groups.push(group.sort());
  };
  for (const file of graph.keys()) if (!index.has(file)) visit(file);
  return groups;
}

/** The shortest path of imports inside `group` from `start` back to `start`. */
function cycleThrough(graph: Map<string, string[]>, group: Set<string>, start: string): string[] {
  const previous = new Map<string, string>();
  const queue = [start];
  while (queue.length > 0) {
    const file = queue.shift()!;
    for (const target of graph.get(file)!) {
      if (!group.has(target)) continue;
      if (target === start) {
        const path: string[] = [];
        for (let at = file; at !== start; at = previous.get(at)!) path.unshift(at);
        return [start, ...path, start];
      }
      if (!previous.has(target)) {
        previous.set(target, file);
        queue.push(target);
      }
    }
  }
  throw new Error(`${start} is in no cycle of its group`);
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const problems = importProblems(resolve(dirname(fileURLToPath(import.meta.url)), ".."));
  for (const problem of problems) console.error(problem);
  process.exitCode = problems.length > 0 ? 1 : 0;
}
