#!/usr/bin/env bash
# One command on the CUDA machine: build the CUDA addon, run the GPU tests, write random-weight checkpoints
# of real shapes (with the transformers baseline, kept beside them), benchmark them. Results go under $OUT
# (default ./gpu-results): card.txt, build.log, test.log, shapes.log, bench.log, bench-<shape>.json.
#
#   bash tools/gpu_run.sh [stage ...]   stages: build shapes-8b test bench-1b bench-8b bench-tp bench-qwen
#                                       profile-8b timeline-8b bench-pair (default: all, in that order)
#
# PEARL_GPU_TESTS narrows the test stage to some of test/gpu/*.test.ts (a shell glob, default all); the
# real-shape pair test uses the checkpoints bench-pair writes.
#
# Node must be on PATH (the device recipe unpacks it from .gpu/); npm need not be: the stages run the
# commands of package.json's build:cuda, test:gpu and bench:gpu scripts directly. Each stage has its own time limit so
# that a slow or failing stage still leaves the others' results; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-results}
SHAPES_DIR=${PEARL_SHAPES_DIR:-/tmp/pearl-shapes}
mkdir -p "$OUT" "$SHAPES_DIR"
export NCCL_NVLS_ENABLE=0
export PATH=/usr/local/cuda/bin:$PATH
export CUDACXX=${CUDACXX:-/usr/local/cuda/bin/nvcc}
export PYTHONUNBUFFERED=1
export PEARL_CUDA_LOG_TUNING=1  # each engine prints its skinny-GEMM timings per weight shape (bench.log)

stages=("$@")
[ ${#stages[@]} -eq 0 ] &&
  stages=(build shapes-8b test bench-1b bench-8b bench-tp bench-qwen profile-8b timeline-8b bench-pair)
status=0

note() { echo "[gpu_run $(date +%H:%M:%S)] $*"; }
fail() {
  note "FAILED: $*"
  [ "$status" -eq 0 ] && status=1
}
# run_stage LIMIT_S LOG COMMAND...: appends to LOG, prints its tail on failure.
run_stage() {
  local limit=$1 log=$2
  shift 2
  note "$* (limit ${limit}s, log $(basename "$log"))"
  if ! timeout "$limit" "$@" >>"$log" 2>&1; then
    tail -40 "$log"
    return 1
  fi
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  node --version
  nvcc --version | tail -1
} >"$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

make_shape() {
  local shape=$1
  [ -f "$SHAPES_DIR/$shape/config.json" ] && return 0
  run_stage 300 "$OUT/shapes.log" python3 tools/make_shapes.py --out-dir "$SHAPES_DIR" --shapes "$shape" \
    --baseline-json "$SHAPES_DIR/hf-$shape.json"
}

# bench_shape SHAPE VARIANTS [bench/gpu.ts options...]
bench_shape() {
  local shape=$1 variants=$2
  shift 2
  make_shape "$shape" || { fail "make_shapes $shape"; return; }
  run_stage 240 "$OUT/bench.log" node --import tsx bench/gpu.ts --models "$SHAPES_DIR/$shape" --variants "$variants" \
    --baseline "$SHAPES_DIR/hf-$shape.json" --json "$OUT/bench-$shape.json" "$@" || fail "bench $shape"
}

# pearl bench on the real-shape pair (docs/real-shape-pair.md): the trained embedded pair written into the
# Llama-3.2-1B and 3.1-8B shapes, padded ids masked so that sampling cannot draw them. Deterministic
# numerics, so that greedy outputs must agree across modes at every concurrency. With two or more GPUs the
# draft runs on GPU 0 and the target on GPU 1; with one, they share it.
bench_pair() {
  local pair=$SHAPES_DIR/real-pair
  for role in draft:llama-3.2-1b target:llama-3.1-8b; do
    local dir="$pair/${role%%:*}-${role##*:}"
    [ -f "$dir/config.json" ] && continue
    run_stage 300 "$OUT/shapes.log" python3 tools/embed_pair.py --source "models/${role%%:*}" \
      --shape "${role##*:}" --out "$dir" --mask-padded-ids || { fail "embed_pair $role"; return; }
  done
  local placement=()
  [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && placement=(--draft-devices 0 --target-devices 1)
  run_stage 420 "$OUT/bench.log" node --import tsx cli/pearl.ts bench --local --no-progress \
    --draft-model "$pair/draft-llama-3.2-1b" --target-model "$pair/target-llama-3.1-8b" \
    --draft-backend cuda --target-backend cuda --draft-deterministic --target-deterministic "${placement[@]}" \
    --modes ar,sd,pearl --concurrency 1,4,16 --temperatures 0,0.8 --requests 32 --rounds 2 --max-tokens 128 ||
    fail "pearl bench on the real-shape pair"
}

# Kernel durations and DRAM traffic of one eager 8B decode step (batch 1) under Nsight Compute, summed per
# kernel and grid; appended to bench.log. Clocks are left as the card runs them (--clock-control none).
# The launch counts: a step is 9 kernels a layer (2 RMSNorm, 4 GEMMs, RoPE, attention split and merge)
# plus the embedding, the final norm and the lm_head (291 for 32 layers); skipped before it: the load-time
# GEMM tuning (200), the 16-token prefill (291) and 27 other matched launches (counts last checked with 11
# kernels a layer: 582 / 355).
profile_decode() {
  local shape=$1 skip=$2 count=$3
  make_shape "$shape" || { fail "make_shapes $shape"; return; }
  note "ncu profile of $shape (launch-skip $skip, count $count)"
  PEARL_CUDA_GRAPHS=0 timeout 240 ncu --clock-control none --print-units base --print-kernel-base function --csv \
    --kernel-name regex:'skinny|attention|rmsnorm|rope|silu|embedding|add_bias' \
    --launch-skip "$skip" --launch-count "$count" --metrics gpu__time_duration.sum,dram__bytes_read.sum \
    node --import tsx bench/gpu.ts --models "$SHAPES_DIR/$shape" --batch 1 --windows 2 --steps 2 \
    --prefill-length 16 >"$SHAPES_DIR/ncu-$shape.csv" 2>"$SHAPES_DIR/ncu-$shape.err" || {
    tail -20 "$SHAPES_DIR/ncu-$shape.err"
    fail "ncu $shape"
    return
  }
  python3 - "$SHAPES_DIR/ncu-$shape.csv" >>"$OUT/bench.log" <<'PY'
import csv, collections, re, sys
rows = [line for line in open(sys.argv[1]) if line.startswith('"')]
kernels = collections.defaultdict(dict)
for row in csv.DictReader(rows):
    kernels[row["ID"]]["name"] = re.sub(r"\(.*", "", row["Kernel Name"]).split("::")[-1][:40] + " " + row["Grid Size"]
    kernels[row["ID"]][row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
groups = collections.defaultdict(lambda: [0, 0.0, 0.0])
for kernel in kernels.values():
    group = groups[kernel["name"]]
    group[0] += 1
    group[1] += kernel.get("gpu__time_duration.sum", 0.0)
    group[2] += kernel.get("dram__bytes_read.sum", 0.0)
total = sum(g[1] for g in groups.values())
print(f"ncu: {len(kernels)} kernels, {total / 1e3:.1f} us of kernel time")
print("| kernel grid | count | total us | us each | DRAM read MB | GB/s |")
print("| --- | --- | --- | --- | --- | --- |")
for name, (count, ns, dram) in sorted(groups.items(), key=lambda item: -item[1][1]):
    print(f"| {name} | {count} | {ns / 1e3:.1f} | {ns / count / 1e3:.2f} | {dram / 1e6:.1f} | {dram / ns if ns else 0:.0f} |")
PY
}

# Where a replayed 8B decode step (batch 1, CUDA graph) spends its time, without Nsight Systems: the CUPTI
# injection library of tools/cupti_trace records every kernel the bench runs, graph nodes included, and the
# analysis below splits the trace into steps (each ends with choose_token_rows) and keeps the batch-1 decode
# steps. Per kernel name and grid: the time per step and the idle gaps before it; then the largest gaps by
# position in the step; medians over the decode steps. Appended to bench.log. CUPTI's own cost per kernel
# makes the gaps an upper bound: compare the step span with the bench's untraced ms per step.
timeline_decode() {
  local shape=$1
  make_shape "$shape" || { fail "make_shapes $shape"; return; }
  note "CUPTI kernel timeline of $shape"
  rm -f "$SHAPES_DIR/timeline.csv"
  timeout 120 bash tools/cupti_trace/build.sh "$SHAPES_DIR/libcupti_trace.so" >"$SHAPES_DIR/timeline.log" 2>&1 &&
    CUDA_INJECTION64_PATH="$SHAPES_DIR/libcupti_trace.so" PEARL_CUPTI_TRACE="$SHAPES_DIR/timeline.csv" \
      timeout 240 node --import tsx bench/gpu.ts --models "$SHAPES_DIR/$shape" --batch 1 --windows 2 --steps 16 \
      --prefill-length 16 >>"$SHAPES_DIR/timeline.log" 2>&1 || {
    tail -20 "$SHAPES_DIR/timeline.log"
    fail "CUPTI timeline $shape"
    return
  }
  grep "^cupti_trace:" "$SHAPES_DIR/timeline.log" >>"$OUT/bench.log"
  python3 - "$SHAPES_DIR/timeline.csv" >>"$OUT/bench.log" <<'PY' || fail "timeline analysis $shape"
import collections, csv, statistics, sys
from statistics import median

def short_name(name):
    """The kernel's own name: argument and template lists (and "(anonymous namespace)") dropped, then the
    return type and the namespaces."""
    outside, depth = [], 0
    for char in name:
        if char in "(<":
            depth += 1
        elif char in ")>":
            depth = max(0, depth - 1)
        elif depth == 0:
            outside.append(char)
    words = "".join(outside).split()
    return words[-1].split("::")[-1] if words else name

Kernel = collections.namedtuple("Kernel", "start end graph short group")
kernels = []
with open(sys.argv[1], newline="") as trace:
    for row in csv.DictReader(trace):
        short = short_name(row["name"])
        group = f'{short} ({row["grid_x"]}, {row["grid_y"]}, {row["grid_z"]})'
        kernels.append(Kernel(int(row["start_ns"]), int(row["end_ns"]), int(row["graph_id"]), short, group))
kernels.sort(key=lambda kernel: kernel.start)
steps, current = [], []
for kernel in kernels:
    current.append(kernel)
    if kernel.short.startswith("choose_token_rows"):
        steps.append(current)
        current = []
if not steps:
    sys.exit(f"cupti: no choose_token_rows kernel among the {len(kernels)} kernels of {sys.argv[1]}")
# Decode steps at batch 1 are the most common step length. The verify steps (window 2) may have as many
# kernels, but each bucket replays its own graph and the bench decodes first: keep the first graph's steps.
length = statistics.mode(len(step) for step in steps)
same_length = [index for index, step in enumerate(steps) if len(step) == length]
# A step's upload kernel runs before its graph, outside it: a replayed step is one most of whose kernels
# belong to the graph.
graph = next((kernel.graph for index in same_length for kernel in steps[index] if kernel.graph), 0)
kept = [index for index in same_length if sum(kernel.graph == graph for kernel in steps[index]) > length // 2][2:]
if not kept:
    sys.exit(f"cupti: fewer than 3 steps of {length} kernels from graph {graph} in {sys.argv[1]}")
decode = [steps[index] for index in kept]
signatures = {tuple(kernel.group for kernel in step) for step in decode}
print(f"cupti: {len(kernels)} kernels in {len(steps)} steps; {len(decode)} decode steps of {length} kernels "
      f"(graph {graph}), {len(same_length) - len(kept)} other steps of that length left out, "
      f"{len(signatures)} distinct kernel sequence(s) among those kept")

spans, busy, gap_totals = [], [], []
per_group = collections.defaultdict(lambda: {"us": [], "count": [], "gap": [], "extends": []})
position_gaps = [[] for _ in range(length)]
for step in decode:
    # Idle time is measured from the latest end so far: with programmatic dependent launch a kernel may
    # start before the one launched before it ends.
    busy_until, gaps, extends = step[0].start, [], []
    for kernel in step:
        gaps.append(max(0, kernel.start - busy_until) / 1e3)
        extends.append(max(0, kernel.end - busy_until) / 1e3)
        busy_until = max(busy_until, kernel.end)
    spans.append((busy_until - step[0].start) / 1e3)
    busy.append(sum(kernel.end - kernel.start for kernel in step) / 1e3)
    gap_totals.append(sum(gaps))
    us, count, gap_before, extended = (collections.Counter() for _ in range(4))
    for position, (kernel, gap, extend) in enumerate(zip(step, gaps, extends)):
        position_gaps[position].append(gap)
        us[kernel.group] += (kernel.end - kernel.start) / 1e3
        count[kernel.group] += 1
        gap_before[kernel.group] += gap
        extended[kernel.group] += extend
    for group in count:
        per_group[group]["us"].append(us[group])
        per_group[group]["count"].append(count[group])
        per_group[group]["gap"].append(gap_before[group])
        per_group[group]["extends"].append(extended[group])
between = [(steps[index][0].start - max(kernel.end for kernel in steps[index - 1])) / 1e3
           for index in kept if index - 1 in kept]
between_text = f", {median(between):.1f} us from one step's end to the next one's start" if between else ""
print(f"step span {median(spans):.1f} us, kernel time {median(busy):.1f} us, gaps between kernels "
      f"{median(gap_totals):.1f} us (medians of {len(decode)} decode steps of {length} kernels){between_text}")
# "Extends the step": how far each kernel's end lies past every earlier kernel's end. Kernels that launch
# early (programmatic dependents) overlap the ones before them, so their durations add up to more than the
# step; these increments add up to its span, and give each kernel's share of the critical path.
print("| kernel grid | per step | us per step (median) | us each | extends the step, us each (median) | "
      "gap before, us per step (median) |")
print("| --- | --- | --- | --- | --- | --- |")
for group, values in sorted(per_group.items(), key=lambda item: -median(item[1]["us"])):
    count = median(values["count"])
    print(f'| {group} | {count:g} | {median(values["us"]):.1f} | {median(values["us"]) / count:.2f} | '
          f'{median(values["extends"]) / count:.2f} | {median(values["gap"]):.1f} |')
print("| largest gaps: kernel before -> kernel after | position in step | us (median) |")
print("| --- | --- | --- |")
largest = sorted(range(1, length), key=lambda position: -median(position_gaps[position]))[:10]
for position in largest:
    before, after = decode[0][position - 1].group, decode[0][position].group
    print(f"| {before} -> {after} | {position} | {median(position_gaps[position]):.2f} |")
PY
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      run_stage 420 "$OUT/build.log" node node_modules/cmake-js/bin/cmake-js compile -d native --CDPEARL_CUDA=ON || { fail "build"; break; }
      ;;
    shapes-8b) make_shape llama-3.1-8b || fail "make_shapes llama-3.1-8b" ;;
    test)
      # test/gpu/*.test.ts includes serve.test.ts: `pearl serve` on cuda (PEARL_TEST_BACKEND, default cuda)
      # answering REST requests, two stacks started, and tensor_parallel.test.ts, which splits the 8B shape
      # when shapes-8b has written it (PEARL_SHAPES_DIR).
      run_stage 60 "$OUT/test.log" native/build/cuda_ops_test || fail "CUDA op tests"
      # shellcheck disable=SC2086 # the glob is meant to expand
      PEARL_SHAPES_DIR="$SHAPES_DIR" PEARL_REAL_PAIR_DIR="$SHAPES_DIR/real-pair" run_stage 480 "$OUT/test.log" node --import tsx --test --test-force-exit \
        --test-concurrency=1 ${PEARL_GPU_TESTS:-test/gpu/*.test.ts} || fail "GPU tests"
      grep -E "^# (tests|pass|fail)|^[0-9]+ tests, " "$OUT/test.log"
      grep -E "^not ok|^ +not ok" "$OUT/test.log" | head -20
      ;;
    bench-1b) bench_shape llama-3.2-1b default,no-pdl ;;
    bench-8b) bench_shape llama-3.1-8b default,no-pdl,deterministic,no-graphs ;;
    # Tensor parallelism over GPUs 0..k-1 (sizes beyond the machine's GPU count are skipped).
    bench-tp) bench_shape llama-3.1-8b default --tp 1,2,4 --batch 1,16,64 --windows 8 ;;
    bench-qwen) bench_shape qwen2.5-7b default --batch 1,16 --windows 8 ;;
    profile-8b) profile_decode llama-3.1-8b 518 291 ;;
    timeline-8b) timeline_decode llama-3.1-8b ;;
    bench-pair) bench_pair ;;
    *) fail "unknown stage $stage (build, shapes-8b, test, bench-1b, bench-8b, bench-tp, bench-qwen, profile-8b, timeline-8b, bench-pair)" ;;
  esac
done
[ -f "$OUT/bench.log" ] && grep -E "^\||^ncu:|^cupti:|^step span" "$OUT/bench.log"
exit "$status"
