#!/usr/bin/env bash
# Run, on a machine with CUDA, every CUDA path that the CPU test suite cannot:
#
#   bash scripts/gpu_check.sh                 # logs in a new temporary directory
#   OUT=/some/dir bash scripts/gpu_check.sh   # logs in $OUT (as on the project's device machine)
#
# Checks, in this order; each is a subcommand of scripts/gpu_checks.py, run under its own time
# limit, all of them within 8 minutes (BUDGET_S, then the summary):
#   nccl_whitening   global advantage whitening all-reduced over NCCL (torchrun, min(2, GPUs)
#                    ranks) equals one process on the concatenated batch
#   generation_cuda  the transformers generation server on CUDA (fp32): greedy tokens equal
#                    direct model.generate, logprobs equal a direct forward
#   preference_bf16  the preference reward server in bf16 against fp32, both on CUDA, over gRPC
#   pytest_gpu       python -m pytest -m gpu: the tests marked `gpu` (the one marker for CUDA
#                    tests, declared in pyproject.toml); the vLLM file is left to vllm_backend
#   tiny_train_bf16  rpp-train fit on configs/tiny.yaml, 3 iterations, FSDP2 with bf16 mixed
#                    precision on CUDA, its local generation server on CUDA, rollouts
#                    overlapping the updates (max_staleness 1)
#   vllm_backend     tests/test_generation_vllm.py on CUDA (contract, weight pushes, a training
#                    run) when a CUDA build of vLLM imports, else skipped
#
# Prints one line per check, `check NAME: passed|failed|skipped (DETAIL)`, then, as its last
# line, one JSON object: {"cuda": ..., "checks": {NAME: "passed: DETAIL", ...}, "passed": N,
# "failed": N, "skipped": N, "wall_s": S, "probe": {...}, "logs": DIR}.
# Logs: gpu_check_NAME.log for each check and gpu_check.json, 7 files (the device machine
# returns at most 8). Without CUDA every check is skipped at once, saying why.
# Exit code: 0 when no check failed (skips are fine), 1 when one did.
# GPU_CHECK_DEVICE=cpu runs the checks' logic on CPU instead (gloo for NCCL; pytest_gpu skips,
# vllm_backend runs where vLLM's CPU build imports): a way to test this script itself on a
# machine without a GPU.

set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET_S=460   # probe and checks, kill margins included; with the summary (~1 s) < 8 minutes
CHECKS="nccl_whitening:60 generation_cuda:75 preference_bf16:90 pytest_gpu:90
        tiny_train_bf16:150 vllm_backend:240"   # NAME:LIMIT_S; the last takes what is left
START=$SECONDS
LOGS=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$LOGS"
LINES=$(mktemp)
trap 'rm -f "$LINES"' EXIT

# One JSON line: CUDA or not (and why not), devices, NCCL and package versions.
probe=$(timeout 30 "$PYTHON" scripts/gpu_checks.py probe 2>"$LOGS/gpu_check_probe.log" | tail -n 1)
case "$probe" in
    "{"*"}") rm -f "$LOGS/gpu_check_probe.log" ;;  # kept only when the probe failed
    *) probe="" ;;
esac
reason=$(printf '%s' "$probe" | sed -n 's/.*"reason": "\([^"]*\)".*/\1/p')
if [ "$DEVICE" = cpu ]; then
    reason=""
fi

for entry in $CHECKS; do
    name=${entry%%:*}
    limit=${entry##*:}
    log="$LOGS/gpu_check_$name.log"
    ran=0
    if [ -z "$probe" ]; then
        line="check $name: failed (the probe failed: see $LOGS/gpu_check_probe.log)"
    elif [ -n "$reason" ]; then
        line="check $name: skipped ($reason)"
    else
        left=$((BUDGET_S - (SECONDS - START) - 10))  # 10 s for timeout's --kill-after
        if [ "$limit" -gt "$left" ]; then
            limit=$left
        fi
        if [ "$limit" -lt 30 ]; then
            line="check $name: failed (not run: the 8-minute budget is spent)"
        else
            # The check stops its own children after LIMIT - 15 s and reports; timeout is the
            # backstop, and kills the check's whole process group.
            ran=1
            timeout --kill-after=10 "$limit" \
                "$PYTHON" scripts/gpu_checks.py "$name" --device "$DEVICE" \
                --timeout-s $((limit - 15)) >"$log" 2>&1
            rc=$?
            line=$(grep -E "^check $name: (passed|failed|skipped)" "$log" | tail -n 1)
            if [ -z "$line" ] && { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; }; then
                line="check $name: failed (killed after ${limit}s: see $log)"
            elif [ -z "$line" ]; then
                line="check $name: failed (exit $rc without a result line: see $log)"
            fi
            grep -qxF "$line" "$log" || echo "$line" >>"$log"
        fi
    fi
    [ "$ran" = 1 ] || echo "$line" >"$log"  # not run: the log says why
    echo "$line"
    echo "$line" >>"$LINES"
done

"$PYTHON" scripts/gpu_checks.py summary --lines "$LINES" --probe-json "$probe" \
    --wall-s $((SECONDS - START)) --logs "$LOGS" | tee "$LOGS/gpu_check.json"
exit "${PIPESTATUS[0]}"
