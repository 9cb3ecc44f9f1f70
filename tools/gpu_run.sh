#!/usr/bin/env bash
# One command on the CUDA machine: build the CUDA addon, run the GPU tests, write random-weight checkpoints
# of real shapes (with the transformers baseline, kept beside them), benchmark them. Results go under $OUT
# (default ./gpu-results): card.txt, build.log, test.log, shapes.log, bench.log, bench-<shape>.json.
#
#   bash tools/gpu_run.sh [stage ...]   stages: build test bench-1b bench-8b bench-qwen profile-8b timeline-8b
#                                       (default: all, in that order)
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
[ ${#stages[@]} -eq 0 ] && stages=(build test bench-1b bench-8b bench-qwen profile-8b timeline-8b)
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

# Where a replayed 8B decode step (batch 1, CUDA graph) spends its time: Nsight Systems traces the graph's
# kernels; per kernel name, the time per step and the gaps between kernels, medians over the bench's decode
# steps. Appended to bench.log.
timeline_decode() {
  local shape=$1
  command -v nsys >/dev/null || { fail "nsys is not installed"; return; }
  make_shape "$shape" || { fail "make_shapes $shape"; return; }
  note "nsys timeline of $shape"
  rm -f "$SHAPES_DIR/timeline.nsys-rep" "$SHAPES_DIR/timeline.sqlite"
  timeout 240 nsys profile --cuda-graph-trace=node --trace=cuda -o "$SHAPES_DIR/timeline" \
    node --import tsx bench/gpu.ts --models "$SHAPES_DIR/$shape" --batch 1 --windows 2 --steps 16 \
    --prefill-length 16 >"$SHAPES_DIR/timeline.log" 2>&1 &&
    timeout 120 nsys export --type sqlite -o "$SHAPES_DIR/timeline.sqlite" "$SHAPES_DIR/timeline.nsys-rep" \
      >>"$SHAPES_DIR/timeline.log" 2>&1 || {
    tail -20 "$SHAPES_DIR/timeline.log"
    fail "nsys $shape"
    return
  }
  python3 - "$SHAPES_DIR/timeline.sqlite" >>"$OUT/bench.log" <<'PY'
import collections, sqlite3, statistics, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute(
    "SELECT k.start, k.end, s.value FROM CUPTI_ACTIVITY_KIND_KERNEL k JOIN StringIds s ON k.shortName = s.id "
    "ORDER BY k.start").fetchall()
# A step ends with choose_token_rows; decode steps at batch 1 are the most common step length.
steps, current = [], []
for start, end, name in rows:
    current.append((start, end, name))
    if name.startswith("choose_token_rows"):
        steps.append(current)
        current = []
length = statistics.mode(len(step) for step in steps)
decode = [step for step in steps if len(step) == length][2:]
print(f"nsys: {len(decode)} decode steps of {length} kernels")
spans, gaps, per_name = [], [], collections.defaultdict(list)
for step in decode:
    spans.append((step[-1][1] - step[0][0]) / 1e3)
    gap = 0
    for (_, previous_end, _), (start, _, _) in zip(step, step[1:]):
        gap += max(0, start - previous_end)
    gaps.append(gap / 1e3)
    totals = collections.Counter()
    for start, end, name in step:
        totals[name.split("<")[0]] += (end - start) / 1e3
    for name, total in totals.items():
        per_name[name].append(total)
print(f"step span {statistics.median(spans):.1f} us, gaps between kernels {statistics.median(gaps):.1f} us")
print("| kernel | us per step (median) |")
print("| --- | --- |")
for name, totals in sorted(per_name.items(), key=lambda item: -statistics.median(item[1])):
    print(f"| {name} | {statistics.median(totals):.1f} |")
PY
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      run_stage 420 "$OUT/build.log" node node_modules/cmake-js/bin/cmake-js compile -d native --CDPEARL_CUDA=ON || { fail "build"; break; }
      ;;
    test)
      # test/gpu/*.test.ts includes serve.test.ts: `pearl serve` on cuda (PEARL_TEST_BACKEND, default cuda)
      # answering REST requests, two stacks started.
      run_stage 300 "$OUT/test.log" node --import tsx --test --test-force-exit --test-concurrency=1 test/gpu/*.test.ts || fail "GPU tests"
      grep -E "^# (tests|pass|fail)" "$OUT/test.log"
      grep -E "^not ok|^ +not ok" "$OUT/test.log" | head -20
      ;;
    bench-1b) bench_shape llama-3.2-1b default,no-pdl ;;
    bench-8b) bench_shape llama-3.1-8b default,no-pdl,deterministic,no-graphs ;;
    bench-qwen) bench_shape qwen2.5-7b default --batch 1,16 --windows 8 ;;
    profile-8b) profile_decode llama-3.1-8b 518 291 ;;
    timeline-8b) timeline_decode llama-3.1-8b ;;
    *) fail "unknown stage $stage (build, test, bench-1b, bench-8b, bench-qwen, profile-8b, timeline-8b)" ;;
  esac
done
[ -f "$OUT/bench.log" ] && grep -E "^\||^ncu:|^nsys:|^step span" "$OUT/bench.log"
exit "$status"
