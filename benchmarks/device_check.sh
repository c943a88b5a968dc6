#!/usr/bin/env bash
# The GPU device check: one script, at most 8 minutes on one GPU (every step has its own time limit;
# the limits add up to 480 s).  It runs
#   1. the environment line (torch, CUDA, GPU name);
#   2. the CUDA-marked tests (tests/test_cuda.py: training with bf16 autocast and channels_last,
#      compaction and export on the device);
#   3. benchmarks/bench_gate_overhead.py  — gated vs plain training step (ratios);
#   4. benchmarks/bench_compaction.py     — inference speed-up of compacted networks vs their FLOPs ratio;
#   5. `python -m pruning calibrate`      — the latency model of the device (only where the command exists);
#   6. a ResNet-56 run on synthetic CIFAR-shaped data (32x32x3, random labels; a few hundred steps,
#      pruning events) whose report gives the measured training-time ratio, the FLOPs ratios and the
#      inference speed-up on the device (pruning/timing.py).
# and prints a summary (one line per step: exit status and seconds).  Exit status: 0 when every step
# passed, 1 otherwise, 2 when the requested device is not there.  Never part of CI.
#
#   bash benchmarks/device_check.sh                              # on a GPU machine
#   DEVICE_CHECK_DEVICE=cpu bash benchmarks/device_check.sh      # rehearsal on the CPU, tiny sizes (~3-5 min)
#
# Environment: DEVICE_CHECK_DEVICE (cuda | cpu, default cuda), DEVICE_CHECK_OUT (folder for the run and
# its files; default a new temporary folder, kept), PYTHON (default .venv/bin/python, else python).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEV="${DEVICE_CHECK_DEVICE:-cuda}"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY=python; fi
OUT="${DEVICE_CHECK_OUT:-$(mktemp -d -t device_check.XXXXXX)}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

case "$DEV" in
  cuda)
    TEST_DEVICE=cuda
    GATE_ARGS=(--arch resnet20 resnet1d --batch-cifar 128 --repeats 9 --no-diagnostics)
    COMPACT_ARGS=(--arch resnet20 resnet56 --batch 256 --channels-last on --repeats 7)
    CAL_ARGS=(--model resnet56 --out latency_resnet56.json)
    # 5 x 2560 training images at batch 128: 100 steps per epoch, 3 epochs = 300 steps
    R56_PER_BATCH=2560; R56_TEST=1024; R56_SET=(train.epochs=3 train.batch_size=128 train.eval_batch_size=512
      train.prune_every=20 train.timing_steps=10 train.amp_bf16=true train.channels_last=true)
    LIMITS=(30 120 60 60 90 120)
    ;;
  cpu)
    TEST_DEVICE=cpu
    GATE_ARGS=(--arch resnet1d --batch-1d 32 --repeats 3 --warmup 1 --no-diagnostics --threads 1)
    COMPACT_ARGS=(--arch resnet20 --batch 16 --fractions 0.5 --repeats 3 --warmup 1 --threads 1)
    CAL_ARGS=(--model resnet20 --out latency_resnet20.json --quick)
    # ResNet-56 of width 4 at 32x32: 5 x 64 images at batch 32, 10 steps per epoch, 3 epochs
    R56_PER_BATCH=64; R56_TEST=64; R56_SET=(train.epochs=3 train.batch_size=32 train.eval_batch_size=64
      train.prune_every=5 train.timing_steps=3 train.threads=1 "model.kwargs={width = 4}"
      train.amp_bf16=false)  # bf16 on a CPU without bf16 units is emulated (slow); the tests cover it
    LIMITS=(30 240 120 120 120 300)
    ;;
  *) echo "error: DEVICE_CHECK_DEVICE must be cuda or cpu, got '$DEV'" >&2; exit 2 ;;
esac

RESULTS=()
FAILED=0
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo
  echo "=== $name (limit ${limit} s)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local verdict=ok
  [ "$rc" -eq 0 ] || { verdict="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"; FAILED=1; }
  RESULTS+=("$(printf '%-28s %-34s %4d s' "$name" "$verdict" $((SECONDS - t0)))")
}

echo "device check on '$DEV'; files in $OUT"
step environment "${LIMITS[0]}" "$PY" - "$DEV" <<'EOF'
import sys, platform, torch
dev = sys.argv[1]
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else '-'}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch (DEVICE_CHECK_DEVICE=cpu rehearses the check on the CPU)")
EOF
if [ "$FAILED" -ne 0 ] && [ "$DEV" = cuda ]; then
  echo "error: the requested device is not available; nothing else was run" >&2
  exit 2
fi

step "CUDA-marked tests" "${LIMITS[1]}" env PRUNING_TEST_DEVICE="$TEST_DEVICE" \
  "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py

step "gate overhead" "${LIMITS[2]}" "$PY" benchmarks/bench_gate_overhead.py --device "$DEV" "${GATE_ARGS[@]}"

step "compaction speed-up" "${LIMITS[3]}" "$PY" benchmarks/bench_compaction.py --device "$DEV" "${COMPACT_ARGS[@]}"

if "$PY" -m pruning calibrate --help >/dev/null 2>&1; then  # the latency model of this device
  step "latency calibration" "${LIMITS[4]}" bash -c 'cd "$1" && shift && "$@"' _ "$OUT" \
    "$PY" -m pruning calibrate "${CAL_ARGS[@]}" --device "$DEV"
else
  echo
  echo "=== latency calibration: skipped (this checkout has no 'python -m pruning calibrate')"
  RESULTS+=("$(printf '%-28s %-34s %4s' "latency calibration" "skipped (no calibrate command)" "-")")
fi

run_r56() {
  "$PY" - "$OUT/cifar-synthetic" "$R56_PER_BATCH" "$R56_TEST" <<'EOF' || return 1
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from fakedata import write_cifar10  # the exact on-disk format of CIFAR-10's python version

root, per_batch, n_test = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
write_cifar10(root, n_per_batch=per_batch, n_test=n_test, seed=0)
print(f"synthetic CIFAR-10 (random 32x32x3 images, random labels): {5 * per_batch} train, {n_test} test in {root}")
EOF
  # random labels: a high γ and a fast θ make the run prune within a few hundred steps
  "$PY" -m pruning train --config experiments/configs/cifar10_resnet56.toml --out "$OUT/r56" --overwrite \
    --set "data.root=\"$OUT/cifar-synthetic\"" --set data.options.augment=true --set "train.device=\"$DEV\"" \
    --set objective.gamma=0.5 --set optim.theta.lr=0.05 --set train.progress=false --set train.tensorboard=false \
    --set train.log_every=1000 "${R56_SET[@]}" || return 1
  "$PY" - "$OUT/r56/report.json" <<'EOF'
import json, sys

r = json.load(open(sys.argv[1]))
t, inf = r.get("timing") or {}, r.get("inference") or {}
f = lambda x, s=".3f": "–" if x is None else format(x, s)
ms = lambda x: "–" if x is None else f"{1e3 * x:.2f} ms"
print(f"ResNet-56 synthetic CIFAR on {r['device']}: {r['samples']} samples, {r['prune_events']} pruning events, "
      f"{r['layers_left']}/{r['baseline_layers']} layers, fPR {100 * r['fPR']:.1f} %")
print(f"  expected-FLOPs cost ratio (Σ E[F])            {f(r['expected_flops_cost_ratio'])}")
print(f"  executed-FLOPs ratio                          {f(r['executed_flops_ratio'])}")
print(f"  measured training-time ratio (wall clock)     {f(r['measured_train_time_ratio'])}")
print(f"  steady-state training-time ratio              {f(t.get('steady_train_time_ratio'))}")
if t.get("cpu_train_time_ratio") is not None:
    print(f"  CPU-time training-time ratio (CPU runs)       {f(t['cpu_train_time_ratio'])}")
print(f"  whole-loop wall clock / dense reference step  {f(t.get('loop_wall_clock_per_step_ratio'))}")
print(f"  gate overhead at start (gated / plain step)   {f(t.get('gate_overhead_at_start'))}"
      f"  [{ms(t.get('gated_step_s'))} / {ms(t.get('dense_reference_step_s'))}]")
print(f"  inference speed-up (measured, batch {inf.get('batch')})     {f(inf.get('speedup'), '.2f')}"
      f"  [{ms(inf.get('pruned_s'))} vs {ms(inf.get('dense_s'))}]")
for s in t.get("structures", []):
    print(f"    from step {s['start_step']:5d}: {s['steps']:4d} steps, FLOPs ratio {f(s['flops_ratio'])}, "
          f"median step {ms(s['steady_median_s'])}, step / dense reference {f(s['step_time_ratio'])}")
sys.exit(0 if r["prune_events"] > 0 and r["measured_train_time_ratio"] else 1)
EOF
}
R56_SET=("${R56_SET[@]/#/--set=}")
step "ResNet-56 synthetic run" "${LIMITS[5]}" bash -c \
  "$(declare -f run_r56); $(declare -p PY OUT DEV R56_PER_BATCH R56_TEST R56_SET); run_r56"

echo
echo "=== summary (device '$DEV'; files in $OUT)"
printf '%s\n' "${RESULTS[@]}"
exit "$FAILED"
