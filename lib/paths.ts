// The package's own folders, found from lib/ (run from source under tsx) or dist/lib/ (compiled).
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The folder that holds package.json and proto/. */
export function packageRoot(): string {
  let directory = dirname(fileURLToPath(import.meta.url));
  for (let depth = 0; depth < 4; depth++) {
    if (existsSync(join(directory, "package.json")) && existsSync(join(directory, "proto"))) return directory;
    directory = dirname(directory);
  }
  throw new Error(
    `the pearl package root (package.json + proto/) was not found above ${fileURLToPath(import.meta.url)}`,
  );
}

/** The version in package.json (`pearl --version`, GET /version). */
export function packageVersion(): string {
  const manifest = JSON.parse(readFileSync(join(packageRoot(), "package.json"), "utf8")) as {
    version: string;
  };
  return manifest.version;
}
