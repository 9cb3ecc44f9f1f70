// GPU placement of the draft and the target (lib/placement.ts), decided without a GPU: the automatic
// split on hosts of 1 to 16 GPUs, explicit groups, and every refusal naming the flag to change. Also the
// --devices syntax and its trip through flags to a child service.
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import { readKvHeads } from "../cli/stack.js";
import {
  parseDevices,
  readOptions,
  TARGET_SERVICE_OPTIONS,
  targetServiceDefaults,
  toArgs,
} from "../lib/config.js";
import type { Backend } from "../lib/native.js";
import { checkDevices, describePlacement, type Placement, placeModels } from "../lib/placement.js";
import { fixtureDir } from "./helpers/models.js";

interface Case {
  name: string;
  gpus: number;
  draft?: number[];
  target?: number[];
  draftBackend?: Backend;
  targetBackend?: Backend;
  kvHeads?: number;
  allowShared?: boolean;
  expected: Placement | RegExp;
}

const CASES: Case[] = [
  { name: "no GPU: both on the CPU", gpus: 0, expected: { draft: [], target: [] } },
  { name: "one GPU: both on it", gpus: 1, expected: { draft: [0], target: [0] } },
  { name: "two GPUs: one each", gpus: 2, expected: { draft: [0], target: [1] } },
  {
    name: "four GPUs: the target over three",
    gpus: 4,
    kvHeads: 8,
    expected: { draft: [0], target: [1, 2, 3] },
  },
  {
    name: "eight GPUs: the target over seven (padding makes 7 work)",
    gpus: 8,
    kvHeads: 8,
    expected: { draft: [0], target: [1, 2, 3, 4, 5, 6, 7] },
  },
  {
    name: "eight GPUs, 4 KV heads: the target over four, three GPUs idle",
    gpus: 8,
    kvHeads: 4,
    expected: { draft: [0], target: [1, 2, 3, 4] },
  },
  { name: "one KV head: no tensor parallelism", gpus: 4, kvHeads: 1, expected: { draft: [0], target: [1] } },
  {
    name: "sixteen GPUs: at most eight ranks",
    gpus: 16,
    kvHeads: 32,
    expected: { draft: [0], target: [1, 2, 3, 4, 5, 6, 7, 8] },
  },
  {
    name: "a draft on the CPU leaves every GPU to the target",
    gpus: 4,
    kvHeads: 8,
    draftBackend: "cpu",
    expected: { draft: [], target: [0, 1, 2, 3] },
  },
  {
    name: "a target on the CPU: the draft on GPU 0",
    gpus: 4,
    targetBackend: "cpu",
    expected: { draft: [0], target: [] },
  },
  {
    name: "an explicit split is taken as given",
    gpus: 4,
    draft: [0],
    target: [1, 2, 3],
    expected: { draft: [0], target: [1, 2, 3] },
  },
  {
    name: "explicit target: the draft takes the first free GPU",
    gpus: 4,
    target: [0, 1],
    expected: { draft: [2], target: [0, 1] },
  },
  {
    name: "explicit draft: the target takes the free GPUs",
    gpus: 4,
    kvHeads: 8,
    draft: [3],
    expected: { draft: [3], target: [0, 1, 2] },
  },
  {
    name: "one GPU, explicit target: the draft shares it (there is no other)",
    gpus: 1,
    target: [0],
    expected: { draft: [0], target: [0] },
  },
  {
    name: "explicit groups that overlap are refused",
    gpus: 2,
    draft: [0],
    target: [0, 1],
    expected:
      /--draft-devices 0 and --target-devices 0,1 share device 0: .*pass --allow-shared-devices to share it anyway/,
  },
  {
    name: "explicit groups that overlap, allowed",
    gpus: 2,
    draft: [0],
    target: [0, 1],
    allowShared: true,
    expected: { draft: [0], target: [0, 1] },
  },
  {
    name: "one GPU, both explicit: sharing it is still asked for",
    gpus: 1,
    draft: [0],
    target: [0],
    expected: /share device 0/,
  },
  {
    name: "a GPU named twice in one group is refused",
    gpus: 2,
    draft: [0],
    target: [1, 1],
    expected: /--target-devices 1,1 names device 1 twice: .*need --allow-shared-devices/,
  },
  {
    name: "two ranks on one GPU, allowed (the one-card tensor-parallel test)",
    gpus: 1,
    target: [0, 0],
    allowShared: true,
    expected: { draft: [0], target: [0, 0] },
  },
  {
    name: "a target on every GPU leaves none for the draft",
    gpus: 2,
    target: [0, 1],
    expected:
      /--target-devices 0,1 leaves no GPU for the draft \(2 CUDA devices are visible\): .*--draft-devices/,
  },
  {
    name: "a target on every GPU, sharing allowed: the draft on GPU 0",
    gpus: 2,
    target: [0, 1],
    allowShared: true,
    expected: { draft: [0], target: [0, 1] },
  },
  {
    name: "a draft on every GPU leaves none for the target",
    gpus: 2,
    draft: [0, 1],
    expected: /--draft-devices 0,1 leaves no GPU for the target .*--target-devices/,
  },
  {
    name: "an ordinal the host does not have",
    gpus: 4,
    draft: [0],
    target: [1, 2, 4],
    expected: /--target-devices 1,2,4: device 4 does not exist; 4 CUDA devices are visible/,
  },
  {
    name: "an ordinal on a host without GPUs",
    gpus: 0,
    targetBackend: "cuda",
    target: [0],
    expected: /--target-devices 0: device 0 does not exist; no CUDA device is visible/,
  },
  {
    name: "devices on the cpu backend",
    gpus: 2,
    draftBackend: "cpu",
    draft: [0],
    expected: /--draft-devices needs the cuda backend \(--draft-backend is cpu\)/,
  },
  {
    name: "devices where auto chooses cpu",
    gpus: 0,
    target: [0],
    expected: /--target-devices needs the cuda backend, and --target-backend auto chose cpu: no CUDA device/,
  },
  {
    name: "the cuda backend on a host without GPUs",
    gpus: 0,
    draftBackend: "cuda",
    expected: /--draft-backend cuda needs a CUDA device, and no CUDA device is visible/,
  },
];

describe("GPU placement", () => {
  for (const testCase of CASES) {
    test(testCase.name, () => {
      const place = (): Placement =>
        placeModels({
          gpuCount: testCase.gpus,
          draft: { backend: testCase.draftBackend ?? "auto", devices: testCase.draft ?? [] },
          target: { backend: testCase.targetBackend ?? "auto", devices: testCase.target ?? [] },
          targetKvHeads: () => testCase.kvHeads ?? 8,
          allowSharedDevices: testCase.allowShared ?? false,
        });
      if (testCase.expected instanceof RegExp) assert.throws(place, testCase.expected);
      else assert.deepEqual(place(), testCase.expected);
    });
  }

  test("KV heads are read only when they bound an automatic target group", () => {
    const unreadable = (): number => {
      throw new Error("config.json read");
    };
    for (const [gpus, target] of [
      [0, []],
      [1, []],
      [2, []],
      [4, [1, 2]],
    ] as const) {
      placeModels({
        gpuCount: gpus,
        draft: { backend: "auto", devices: [] },
        target: { backend: "auto", devices: target },
        targetKvHeads: unreadable,
        allowSharedDevices: false,
      });
    }
    assert.throws(
      () =>
        placeModels({
          gpuCount: 3,
          draft: { backend: "auto", devices: [] },
          target: { backend: "auto", devices: [] },
          targetKvHeads: unreadable,
          allowSharedDevices: false,
        }),
      /config\.json read/,
    );
  });

  test("a service started alone takes repeated GPUs, but not the cpu backend or a missing GPU", () => {
    const flags = { devices: "--devices", backend: "--backend" };
    checkDevices({ backend: "cuda", devices: [0, 0] }, 1, flags);
    checkDevices({ backend: "cpu", devices: [] }, 0, flags);
    assert.throws(
      () => checkDevices({ backend: "cpu", devices: [0] }, 1, flags),
      /^Error: --devices needs the cuda backend \(--backend is cpu\)$/,
    );
    assert.throws(
      () => checkDevices({ backend: "cuda", devices: [1] }, 1, flags),
      /^Error: --devices 1: device 1 does not exist; 1 CUDA device is visible$/,
    );
  });

  test("the placement log line names each group and its tensor-parallel size", () => {
    assert.deepEqual(describePlacement({ draft: [0], target: [1, 2, 3] }), {
      text: "placement: draft on GPU 0, target on GPUs 1,2,3 (tensor parallel 3)",
      fields: { draftDevices: "0", targetDevices: "1,2,3", draftTensorParallel: 1, targetTensorParallel: 3 },
    });
    assert.deepEqual(describePlacement({ draft: [], target: [] }), {
      text: "placement: draft on the CPU, target on the CPU",
      fields: { draftDevices: "cpu", targetDevices: "cpu", draftTensorParallel: 1, targetTensorParallel: 1 },
    });
  });

  test("the target's KV heads come from its config.json", () => {
    assert.equal(readKvHeads(fixtureDir("llama-gqa-f32")), 2);
    assert.throws(
      () => readKvHeads(join(fixtureDir("llama-gqa-f32"), "missing")),
      /cannot read .*config\.json/,
    );
  });
});

describe("--devices", () => {
  test("takes comma-separated ordinals; empty or auto means automatic", () => {
    assert.deepEqual(parseDevices("0"), [0]);
    assert.deepEqual(parseDevices(" 1, 2 ,3 "), [1, 2, 3]);
    assert.deepEqual(parseDevices("0,0"), [0, 0]);
    assert.deepEqual(parseDevices(""), []);
    assert.deepEqual(parseDevices("auto"), []);
    for (const bad of ["1,,2", "-1", "1.5", "gpu0", "0;1", "1e3", "0,"]) {
      assert.throws(() => parseDevices(bad), /expected CUDA device ordinals separated by commas/, bad);
    }
  });

  test("reaches a child service as --devices, and not at all when automatic", () => {
    const placed = { ...targetServiceDefaults(), devices: [1, 2, 3] };
    const args = toArgs(placed, TARGET_SERVICE_OPTIONS);
    assert.deepEqual(args.slice(args.indexOf("--devices"), args.indexOf("--devices") + 2), [
      "--devices",
      "1,2,3",
    ]);
    assert.ok(!toArgs(targetServiceDefaults(), TARGET_SERVICE_OPTIONS).includes("--devices"));
    assert.deepEqual(readOptions({ devices: [1, 2, 3] }, TARGET_SERVICE_OPTIONS).devices, [1, 2, 3]);
  });
});
