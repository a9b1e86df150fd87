#!/usr/bin/env bash
# One GPU check, under 8 minutes on one GPU; prints one JSON on stdout:
#   gpu_tests       pytest -m gpu (the GPU-marked tests)
#   large_requests  bench/gpu_large_requests.py: a real CUDA out-of-memory answered 503 with
#                   Retry-After and the model serving on; 254 long labels on a 12 MP image,
#                   peak memory with UNet calls bounded and with one call
#   segment         bench/bench_segment.py at 512 px, fp16 and bf16, batches 1, 8 and 32
#   job             bench/bench_job.py: the whole pseudo-label job on 512 generated 512x512
#                   images with SD-1.5-shaped random weights (images/s end to end)
#   segment_additions  bench_segment.py with the test-time additions at batch 8, 30 labels:
#                   --tiles 2, --flip, --presence-threshold 0.5 --reprompt (seconds per image
#                   against the paper's pass)
#   segment_compile bench_segment.py with --compile, fp16 and bf16, in the time that is left
# Each step runs under a time limit; a step that fails or runs out of time is reported as such
# (with what it printed) and the next one runs.
#
#   bench/gpu_check.sh            on a machine with a CUDA GPU
#   bench/gpu_check.sh --smoke    on a CPU with the tiny model: checks that the script runs
#
# Environment: PYTHON (default: python), GPU_CHECK_BUDGET_S (default 430: every step's limit
# comes out of it; a step past its limit gets 15 s more to stop, so the whole check stays under
# 8 minutes).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-430}
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--smoke]" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d -t stableseg-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

if [[ $SMOKE == 1 ]]; then
    DEVICE=cpu
    DTYPES=(fp32 bf16)
    SEGMENT_ARGS=(--tiny --image-size 64 --batch-sizes 1,2 --repeats 1)
    COMPILE_ARGS=(--tiny --image-size 64 --batch-sizes 1 --repeats 1)
    JOB_ARGS=(--tiny --images 16 --size 64 --image-size 64 --batch 4)
    LARGE_ARGS=(--smoke)
    ADDITION_ARGS=(--tiny --image-size 64 --batch-sizes 2 --repeats 1)
else
    DEVICE=cuda
    DTYPES=(fp16 bf16)
    SEGMENT_ARGS=(--image-size 512 --batch-sizes 1,8,32 --repeats 3)
    COMPILE_ARGS=("${SEGMENT_ARGS[@]}")
    JOB_ARGS=(--images 512 --size 512 --image-size 512 --batch 32)
    LARGE_ARGS=()
    ADDITION_ARGS=(--image-size 512 --batch-sizes 8 --repeats 2)
fi
ADDITION_LABELS=person,car,tree,dog,cat,bird,boat,house,road,sky,grass,water,chair,table,bottle
ADDITION_LABELS+=,plant,horse,sheep,cow,bus,train,truck,bicycle,sofa,window,door,wall,floor,sign,fence

# step NAME MAX_SECONDS COMMAND...: run COMMAND for at most MAX_SECONDS (and never past the
# budget), keep its output in $WORK/NAME.{out,err} and its status in $WORK/NAME.status.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "skipped: no time left" >"$WORK/$name.status"
        return
    fi
    local began=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    local rc=$?
    echo "rc=$rc seconds=$((SECONDS - began)) limit=$limit" >"$WORK/$name.status"
    echo "[gpu_check] $name: rc=$rc in $((SECONDS - began)) s" >&2
}

step gpu_tests 90 "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider
step large_requests 120 "$PYTHON" bench/gpu_large_requests.py "${LARGE_ARGS[@]}"
for dtype in "${DTYPES[@]}"; do
    step "segment_$dtype" 100 "$PYTHON" bench/bench_segment.py --device "$DEVICE" \
        --dtype "$dtype" "${SEGMENT_ARGS[@]}"
done
step job 150 "$PYTHON" bench/bench_job.py --device "$DEVICE" --dtype "${DTYPES[0]}" "${JOB_ARGS[@]}"
step segment_additions 100 "$PYTHON" bench/bench_segment.py --device "$DEVICE" \
    --dtype "${DTYPES[0]}" "${ADDITION_ARGS[@]}" --labels "$ADDITION_LABELS" \
    --variant tiles=2 --variant flip=on --variant "presence=0.5 reprompt=on"
for dtype in "${DTYPES[@]}"; do
    step "segment_compile_$dtype" 170 "$PYTHON" bench/bench_segment.py --device "$DEVICE" \
        --dtype "$dtype" --compile "${COMPILE_ARGS[@]}" # what is left of the budget
done

"$PYTHON" - "$WORK" "$SMOKE" "$((SECONDS - START))" <<'EOF'
"""Gather the steps' outputs into one JSON."""
import json
import sys
from pathlib import Path

work, smoke, seconds = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])


def json_lines(text):
    """Every JSON object printed on its own line (bench_segment prints one per batch size)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def last_json(text):
    """The last JSON document printed (bench_segment's report is indented over many lines)."""
    start = text.rfind("\n{\n")
    start = 0 if text.startswith("{") and start < 0 else start
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


report = {"smoke": smoke, "seconds": seconds, "steps": {}}
for status in sorted(work.glob("*.status")):
    name = status.stem
    out = (work / f"{name}.out").read_text() if (work / f"{name}.out").exists() else ""
    err = (work / f"{name}.err").read_text() if (work / f"{name}.err").exists() else ""
    fields = dict(item.split("=", 1) for item in status.read_text().split() if "=" in item)
    entry = {"status": status.read_text().strip()}
    rc = int(fields.get("rc", "-1"))
    entry["ok"] = rc == 0
    entry["timed_out"] = rc in (124, 137)
    if name == "gpu_tests":
        lines = [line for line in out.splitlines() if line.strip()]
        entry["summary"] = lines[-1] if lines else err[-500:]
        entry["ok"] = rc in (0, 5)  # 5: nothing collected (no GPU-marked test ran)
    elif name == "job":
        found = json_lines(out)
        entry["result"] = found[-1] if found else None
    else:
        entry["result"] = last_json(out)
        if not entry["ok"]:
            entry["runs_done"] = json_lines(err)  # what a timed-out run had finished
    if not entry["ok"]:
        entry["error_tail"] = err[-1500:]
    report["steps"][name] = entry
print(json.dumps(report, indent=1))
EOF
