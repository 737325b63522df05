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
#   weight_transport_cuda  pushes by cuda_ipc and by grpc to that server on CUDA (bf16, a random
#                    Qwen2 of Qwen2-0.5B's dimensions) serve identical log-probs for a fixed
#                    batch; prints the time of each push (GPU_CHECK_DEVICE=cpu: shm for cuda_ipc)
#   preference_bf16  the preference reward server in bf16 against fp32, both on CUDA, over gRPC
#   pytest_gpu       python -m pytest -m gpu: the tests marked `gpu` (the one marker for CUDA
#                    tests, declared in pyproject.toml); the vLLM file is left to vllm_backend
#   tiny_train_bf16  rpp-train fit on configs/tiny.yaml, 3 iterations, FSDP2 with bf16 mixed
#                    precision on CUDA, its local generation server on CUDA, rollouts
#                    overlapping the updates (max_staleness 1)
#   perf_iteration   issue 25's shape: rpp-train fit, 3 iterations (1 warm-up) of a random
#                    358M-parameter Qwen2, 16 prompts x 4 samples x 128 tokens, FSDP2 + bf16,
#                    its local generation server on the same GPU, weight_transport auto; prints
#                    the phase times, the push time and generation tokens/s
#   vllm_backend     tests/test_generation_vllm.py on CUDA (contract, weight pushes, a training
#                    run) when a CUDA build of vLLM imports, else skipped
#
# Prints one line per check, `check NAME: passed|failed|skipped (DETAIL)`, then, as its last
# line, one JSON object: {"cuda": ..., "checks": {NAME: "passed: DETAIL", ...}, "passed": N,
# "failed": N, "skipped": N, "wall_s": S, "probe": {...}, "logs": DIR}.
# Logs: gpu_check_LOG.log per check and gpu_check.json, 8 files: the device machine returns at
# most 8, so the two weight-push checks share gpu_check_weights.log (CHECKS' NAME:LIMIT:LOG; LOG
# is NAME unless given), and a failed probe's output goes into every check's log, not a file of
# its own. Each log ends with the check's result line and its time. Without CUDA every check is
# skipped at once, saying why.
# Exit code: 0 when no check failed (skips are fine), 1 when one did.
# GPU_CHECK_DEVICE=cpu runs the checks' logic on CPU instead (gloo for NCCL; pytest_gpu skips,
# vllm_backend runs where vLLM's CPU build imports; the Qwen2 of the weight-push checks shrinks
# to 2 layers): a way to test this script itself on a machine without a GPU.

set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET_S=460   # probe and checks, kill margins included; with the summary (~1 s) < 8 minutes
# NAME:LIMIT_S[:LOG]; the last takes what is left. The limits are backstops against hangs, their
# sum past the budget: the checks' own times are far below them (the CPU form runs them all in
# ~2 minutes); each log's last line gives its check's time, to re-balance them by.
CHECKS="nccl_whitening:45 generation_cuda:60 weight_transport_cuda:75:weights
        preference_bf16:60 pytest_gpu:75 tiny_train_bf16:120 perf_iteration:150:weights
        vllm_backend:240"
START=$SECONDS
LOGS=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$LOGS"
LINES=$(mktemp)
PROBE_ERR=$(mktemp)
trap 'rm -f "$LINES" "$PROBE_ERR"' EXIT
log_of() {  # the log file of a CHECKS entry
    local rest=${1#*:}
    case "$rest" in
        *:*) echo "$LOGS/gpu_check_${rest#*:}.log" ;;
        *) echo "$LOGS/gpu_check_${1%%:*}.log" ;;
    esac
}
for entry in $CHECKS; do : >"$(log_of "$entry")"; done  # each check appends to its log

# One JSON line: CUDA or not (and why not), devices, NCCL and package versions.
probe=$(timeout 30 "$PYTHON" scripts/gpu_checks.py probe 2>"$PROBE_ERR" | tail -n 1)
case "$probe" in
    "{"*"}") ;;
    *) probe="" ;;
esac
reason=$(printf '%s' "$probe" | sed -n 's/.*"reason": "\([^"]*\)".*/\1/p')
if [ "$DEVICE" = cpu ]; then
    reason=""
fi

for entry in $CHECKS; do
    name=${entry%%:*}
    limit=${entry#*:}
    limit=${limit%%:*}
    log=$(log_of "$entry")
    ran=0
    if [ -z "$probe" ]; then
        line="check $name: failed (the probe failed: its output is in $log)"
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
            began=$SECONDS
            [ -s "$log" ] && printf '\n' >>"$log"  # a shared log: this check's part follows
            echo "=== $name (limit ${limit}s)" >>"$log"
            timeout --kill-after=10 "$limit" \
                "$PYTHON" scripts/gpu_checks.py "$name" --device "$DEVICE" \
                --timeout-s $((limit - 15)) >>"$log" 2>&1
            rc=$?
            line=$(grep -E "^check $name: (passed|failed|skipped)" "$log" | tail -n 1)
            if [ -z "$line" ] && { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; }; then
                line="check $name: failed (killed after ${limit}s: see $log)"
            elif [ -z "$line" ]; then
                line="check $name: failed (exit $rc without a result line: see $log)"
            fi
            grep -qxF "$line" "$log" || echo "$line" >>"$log"
            echo "=== $name took $((SECONDS - began))s of ${limit}s" >>"$log"
        fi
    fi
    if [ "$ran" != 1 ]; then  # not run: the log says why
        echo "$line" >>"$log"
        [ -n "$probe" ] || cat "$PROBE_ERR" >>"$log"
    fi
    echo "$line"
    echo "$line" >>"$LINES"
done

"$PYTHON" scripts/gpu_checks.py summary --lines "$LINES" --probe-json "$probe" \
    --wall-s $((SECONDS - START)) --logs "$LOGS" | tee "$LOGS/gpu_check.json"
exit "${PIPESTATUS[0]}"
