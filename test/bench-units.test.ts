// `pearl bench`'s arithmetic: the analytic ideal it reports beside each measurement, the speedups over ar
// and sd of the same run, its table, and the prompt file it sends by default.
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import {
  type BenchRow,
  compareRows,
  expectedTokensPerStep,
  formatBench,
  idealSpeedup,
  loadPrompts,
} from "../cli/bench.js";
import { packageRoot } from "../lib/paths.js";
import { TextTokenizer } from "../lib/tokenizer.js";

const close = (actual: number, expected: number, what: string): void =>
  assert.ok(Math.abs(actual - expected) < 1e-9, `${what}: ${actual}, expected ${expected}`);

function row(fields: Partial<BenchRow> & Pick<BenchRow, "mode" | "tokensPerSecond">): BenchRow {
  return {
    concurrency: 1,
    temperature: 0,
    requests: 1,
    tokens: 1,
    seconds: 1,
    meanAcceptedLength: 1,
    acceptance: 0,
    meanTtftMs: 1,
    ...fields,
  };
}

describe("pearl bench", () => {
  test("tokens per verify step: 1 + a + a^2 + ... + a^g", () => {
    close(expectedTokensPerStep(3, 0.5), 1 + 0.5 + 0.25 + 0.125, "g 3, a 0.5");
    close(expectedTokensPerStep(4, 1), 5, "every draft accepted");
    close(expectedTokensPerStep(4, 0), 1, "none accepted: the target's own token");
  });

  test("the ideal: Leviathan's E/(gc+1) for sd, drafting hidden, E/max(1, gc), for pearl", () => {
    // A verify step as long as a decode step, drafts a fifth of it: c = 0.2.
    const measured = { acceptance: 0.8, window: 4, verifyMs: 10, draftMs: 2, arStepMs: 10 };
    const tokens = expectedTokensPerStep(4, 0.8);
    close(idealSpeedup("sd", measured), tokens / (4 * 0.2 + 1), "sd");
    close(idealSpeedup("pearl", measured), tokens / Math.max(1, 4 * 0.2), "pearl, g c < 1");
    // Drafting longer than verifying: pearl waits for the draft, g c > 1.
    close(idealSpeedup("pearl", { ...measured, draftMs: 5 }), tokens / (4 * 0.5), "pearl, g c > 1");
    // A verify step that costs twice a decode step halves both.
    close(idealSpeedup("pearl", { ...measured, verifyMs: 20 }), tokens / 2, "slower verify");
  });

  test("speedups compare rows of the same concurrency and temperature; the ideal needs every figure", () => {
    const rows = [
      row({ mode: "ar", tokensPerSecond: 100, targetStepMs: 10 }),
      row({ mode: "sd", tokensPerSecond: 150 }),
      row({
        mode: "pearl",
        tokensPerSecond: 300,
        tokenAcceptance: 0.8,
        meanWindow: 4,
        targetStepMs: 10,
        draftStepMs: 2,
      }),
      row({ mode: "ar", tokensPerSecond: 400, concurrency: 4 }),
      row({ mode: "pearl", tokensPerSecond: 200, concurrency: 4 }),
      row({ mode: "ar", tokensPerSecond: 50, temperature: 0.8 }),
    ];
    compareRows(rows);
    const [ar, sd, pearl, ar4, pearl4, arHot] = rows;
    assert.equal(ar!.speedupOverAr, 1);
    close(ar!.speedupOverSd!, 100 / 150, "ar over sd");
    close(sd!.speedupOverAr!, 1.5, "sd over ar");
    close(pearl!.speedupOverAr!, 3, "pearl over ar");
    close(pearl!.speedupOverSd!, 2, "pearl over sd");
    close(pearl!.idealSpeedupOverAr!, expectedTokensPerStep(4, 0.8), "pearl's ideal");
    assert.equal(sd!.idealSpeedupOverAr, undefined, "sd has no acceptance or step times here");
    close(pearl4!.speedupOverAr!, 0.5, "at concurrency 4, against ar at 4");
    assert.equal(pearl4!.speedupOverSd, undefined, "no sd at concurrency 4");
    assert.equal(pearl4!.idealSpeedupOverAr, undefined);
    assert.equal(ar4!.speedupOverAr, 1);
    assert.equal(arHot!.speedupOverSd, undefined, "no sd at temperature 0.8");
  });

  test("the table is markdown: a header, an alignment rule, a line per row; – where nothing was measured", () => {
    const rows = [
      row({ mode: "ar", tokensPerSecond: 100, targetStepMs: 10 }),
      row({ mode: "pearl", tokensPerSecond: 250 }),
    ];
    compareRows(rows);
    const lines = formatBench(rows).split("\n");
    assert.equal(lines.length, 4);
    assert.match(lines[0]!, /^\| +T \| concurrency \| mode +\| tok\/s \|/);
    assert.match(lines[1]!, /^\| -+: \| -+: \| -+ \| -+: \|/);
    const cells = (line: string): string[] =>
      line
        .split("|")
        .slice(1, -1)
        .map((cell) => cell.trim());
    assert.deepEqual(cells(lines[2]!).slice(0, 5), ["0", "1", "ar", "100", "1.00"]);
    assert.deepEqual(cells(lines[3]!).slice(2, 5), ["pearl", "250", "2.50"]);
    assert.equal(cells(lines[3]!).at(-1), "–", "no ideal without acceptance and step times");
  });

  test("the default prompts: 128 held-out code prompts that leave room for 128 tokens in 512", () => {
    const prompts = loadPrompts(join(packageRoot(), "bench", "heldout_prompts.json"));
    assert.equal(prompts.length, 128);
    assert.equal(new Set(prompts).size, 128, "no prompt twice");
    const tokenizer = TextTokenizer.load(join(packageRoot(), "models", "target"))!;
    for (const prompt of prompts) {
      const tokens = tokenizer.encode(prompt).length;
      assert.ok(tokens >= 60 && tokens <= 160, `${tokens} tokens: ${prompt.slice(-60)}`);
      assert.match(prompt, /def \w+\(.*:$/, "ends with a def line, for the model to write its body");
    }
  });
});
