// Which GPUs the draft and the target run on. PEARL gains only while the two models compute at the same
// time, so by default they get GPUs of their own: the draft (small: one GPU) on GPU 0, the target on as
// many of the others as its tensor parallelism can use. Pure functions of what the caller measured (GPU
// count, KV heads), so that CI tests every case without a GPU.
import type { Backend } from "./native.js";

/** Most tensor-parallel ranks the native runtime takes (kMaxTensorParallel in native/src). */
export const MAX_TENSOR_PARALLEL = 8;

export interface DeviceRequest {
  backend: Backend;
  /** CUDA ordinals the user gave; empty: placed automatically. */
  devices: readonly number[];
}

/** How a command spells the two settings in its messages. */
export interface DeviceFlags {
  devices: string;
  backend: string;
}

export interface PlacementRequest {
  /** CUDA devices visible to this process and to the services it starts. */
  gpuCount: number;
  draft: DeviceRequest;
  target: DeviceRequest;
  /** The target's num_key_value_heads, which bounds its tensor parallelism; asked for only when the
   * target's group is chosen automatically among several GPUs (reading it means reading config.json). */
  targetKvHeads: () => number;
  allowSharedDevices: boolean;
}

/** Each model's GPUs, one per tensor-parallel rank; empty: it runs on the cpu backend. */
export interface Placement {
  draft: number[];
  target: number[];
}

type Role = "draft" | "target";

const ROLE_FLAGS: Record<Role, DeviceFlags> = {
  draft: { devices: "--draft-devices", backend: "--draft-backend" },
  target: { devices: "--target-devices", backend: "--target-backend" },
};

/** What backend "auto" resolves to, as native/src/backend.cpp decides it. */
export function usesCuda(backend: Backend, gpuCount: number): boolean {
  return backend === "cuda" || (backend === "auto" && gpuCount > 0);
}

function visibleDevices(gpuCount: number): string {
  return gpuCount === 0
    ? "no CUDA device is visible (no GPU or driver, or a build of pearl without CUDA)"
    : `${gpuCount} CUDA device${gpuCount === 1 ? " is" : "s are"} visible`;
}

/**
 * Refuses a device list the backend cannot take: devices on the cpu backend, or an ordinal this host does
 * not have. A service started alone needs no more: sharing is a question only where one command places
 * both models.
 */
export function checkDevices(request: DeviceRequest, gpuCount: number, flags: DeviceFlags): void {
  if (request.devices.length === 0) return;
  if (!usesCuda(request.backend, gpuCount)) {
    throw new Error(
      request.backend === "cpu"
        ? `${flags.devices} needs the cuda backend (${flags.backend} is cpu)`
        : `${flags.devices} needs the cuda backend, and ${flags.backend} auto chose cpu: ` +
            visibleDevices(gpuCount),
    );
  }
  const missing = request.devices.find((device) => device >= gpuCount);
  if (missing !== undefined) {
    throw new Error(
      `${flags.devices} ${request.devices.join(",")}: device ${missing} does not exist; ` +
        visibleDevices(gpuCount),
    );
  }
}

function repeatedDevice(devices: readonly number[]): number | undefined {
  return devices.find((device, index) => devices.indexOf(device) !== index);
}

/**
 * The GPUs of both models. Automatic groups take the GPUs the other group leaves free (the draft first
 * when neither is given); when none is free, an automatic group shares GPUs, which needs
 * allowSharedDevices unless the host has only one GPU. Explicit groups that overlap, or name a GPU twice,
 * need allowSharedDevices. Throws an Error naming the flag to change.
 */
export function placeModels(request: PlacementRequest): Placement {
  const { gpuCount, allowSharedDevices } = request;
  for (const role of ["draft", "target"] as const) {
    checkDevices(request[role], gpuCount, ROLE_FLAGS[role]);
    if (usesCuda(request[role].backend, gpuCount) && gpuCount === 0) {
      throw new Error(`${ROLE_FLAGS[role].backend} cuda needs a CUDA device, and ${visibleDevices(0)}`);
    }
    const repeated = repeatedDevice(request[role].devices);
    if (repeated !== undefined && !allowSharedDevices) {
      throw new Error(
        `${ROLE_FLAGS[role].devices} ${request[role].devices.join(",")} names device ${repeated} twice: ` +
          "tensor-parallel ranks sharing a GPU need --allow-shared-devices",
      );
    }
  }
  const explicitDraft = [...request.draft.devices];
  const explicitTarget = [...request.target.devices];
  const shared = explicitDraft.find((device) => explicitTarget.includes(device));
  if (shared !== undefined && !allowSharedDevices) {
    throw new Error(
      `--draft-devices ${explicitDraft.join(",")} and --target-devices ${explicitTarget.join(",")} share ` +
        `device ${shared}: the models run at the same time and should not compete for a GPU; pass ` +
        "--allow-shared-devices to share it anyway",
    );
  }

  const allGpus = Array.from({ length: gpuCount }, (_, device) => device);
  const freeOf = (taken: readonly number[]): number[] => allGpus.filter((device) => !taken.includes(device));
  const whenNoneFree = (automatic: Role, other: Role, devices: readonly number[]): void => {
    if (gpuCount === 1 || allowSharedDevices) return;
    throw new Error(
      `${ROLE_FLAGS[other].devices} ${devices.join(",")} leaves no GPU for the ${automatic} ` +
        `(${visibleDevices(gpuCount)}): give it its own with ${ROLE_FLAGS[automatic].devices}, or share ` +
        "with --allow-shared-devices",
    );
  };
  const draftOnCuda = usesCuda(request.draft.backend, gpuCount);
  const targetOnCuda = usesCuda(request.target.backend, gpuCount);

  let draft: number[] = [];
  if (draftOnCuda) {
    draft = explicitDraft;
    if (draft.length === 0) {
      const free = freeOf(explicitTarget);
      if (free.length === 0) whenNoneFree("draft", "target", explicitTarget);
      draft = [free[0] ?? 0];
    }
  }

  let target: number[] = [];
  if (targetOnCuda) {
    target = explicitTarget;
    if (target.length === 0) {
      let free = freeOf(draft);
      if (free.length === 0) {
        whenNoneFree("target", "draft", draft);
        free = allGpus;
      }
      const ranks =
        free.length === 1
          ? 1
          : Math.min(free.length, MAX_TENSOR_PARALLEL, Math.max(1, request.targetKvHeads()));
      target = free.slice(0, ranks);
    }
  }
  return { draft, target };
}

function describeGroup(devices: readonly number[]): string {
  if (devices.length === 0) return "the CPU";
  if (devices.length === 1) return `GPU ${devices[0]}`;
  return `GPUs ${devices.join(",")} (tensor parallel ${devices.length})`;
}

/** The one log line `pearl serve` prints about placement: a sentence and its fields. */
export function describePlacement(placement: Placement): { text: string; fields: Record<string, unknown> } {
  const group = (devices: readonly number[]): string => (devices.length === 0 ? "cpu" : devices.join(","));
  return {
    text: `placement: draft on ${describeGroup(placement.draft)}, target on ${describeGroup(placement.target)}`,
    fields: {
      draftDevices: group(placement.draft),
      targetDevices: group(placement.target),
      draftTensorParallel: Math.max(1, placement.draft.length),
      targetTensorParallel: Math.max(1, placement.target.length),
    },
  };
}
