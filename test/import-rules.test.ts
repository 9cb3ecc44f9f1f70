// The import rules `npm run lint` enforces (tools/import_rules.ts), on small trees made for the purpose:
// cycles are found whether their imports carry values or only types, and a service may import lib/ and
// its own files but no other service's, while lib/ imports no service.
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, describe, test } from "node:test";
import { importProblems } from "../tools/import_rules.js";

const roots: string[] = [];

/** A tree with these files (path relative to the root: source). */
function tree(files: Record<string, string>): string {
  const root = mkdtempSync(join(tmpdir(), "pearl-imports-"));
  roots.push(root);
  for (const [path, source] of Object.entries(files)) {
    mkdirSync(dirname(join(root, path)), { recursive: true });
    writeFileSync(join(root, path), source);
  }
  return root;
}

describe("import rules", () => {
  after(() => {
    for (const root of roots) rmSync(root, { recursive: true, force: true });
  });

  test("a tree that follows them has no problems", () => {
    const root = tree({
      "lib/shared.ts": 'import { x } from "./leaf.js";\nexport const y = x;\n',
      "lib/leaf.ts": "export const x = 1;\n",
      "services/draft/server.ts": 'import { y } from "../../lib/shared.js";\nimport "./drafter.js";\n',
      "services/draft/drafter.ts": 'import type { y } from "../../lib/shared.js";\n',
      "test/draft.test.ts": 'import "../services/draft/server.js";\nimport "../services/target/server.js";\n',
      "services/target/server.ts": 'import { y } from "../../lib/shared.js";\n',
    });
    assert.deepEqual(importProblems(root), []);
  });

  test("a cycle of type-only imports is a cycle, named file by file", () => {
    const root = tree({
      "lib/a.ts": 'import type { B } from "./b.js";\nexport interface A { b: B }\n',
      "lib/b.ts": 'import type { C } from "./c.js";\nexport interface B { c: C }\n',
      "lib/c.ts": 'import type { A } from "./a.js";\nexport interface C { a?: A }\n',
    });
    assert.deepEqual(importProblems(root), ["import cycle: lib/a.ts -> lib/b.ts -> lib/c.ts -> lib/a.ts"]);
  });

  test("re-exports and dynamic imports count; a file importing itself is a cycle", () => {
    const root = tree({
      "cli/one.ts": 'export * from "./two.js";\n',
      "cli/two.ts": 'export const load = () => import("./one.js");\n',
      "bench/self.ts": 'import "./self.js";\n',
    });
    assert.deepEqual(importProblems(root).sort(), [
      "import cycle: bench/self.ts -> bench/self.ts",
      "import cycle: cli/one.ts -> cli/two.ts -> cli/one.ts",
    ]);
  });

  test("a service importing another service's file, and lib/ importing a service, are refused", () => {
    const root = tree({
      "services/gateway/links.ts": 'import type { Verifier } from "../target/verifier.js";\n',
      "services/target/verifier.ts": "export class Verifier {}\n",
      "lib/engine_loop.ts": 'import { Verifier } from "../services/target/verifier.js";\n',
      // Commented-out imports and strings that look like imports are not imports.
      "services/draft/drafter.ts":
        '// import "../gateway/links.js";\nconst s = \'import "../target/verifier.js"\';\n',
    });
    assert.deepEqual(importProblems(root), [
      "lib/engine_loop.ts imports services/target/verifier.ts: lib/ is shared by every service and must not import one",
      "services/gateway/links.ts imports services/target/verifier.ts: a service must not import another service's files",
    ]);
  });
});
