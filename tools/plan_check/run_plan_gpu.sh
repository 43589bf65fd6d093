#!/usr/bin/env bash
# Runs on the GPU host, from the repository root, after tools/plan_check/prepare_plan_gpu.sh made artifacts/plan_check
# on the development machine (carry it: carry=["artifacts/plan_check"]). Needs python3 with torch, transformers 5.17,
# peft 0.21 and accelerate; no network, no moelora binary.
#   tools/plan_check/run_plan_gpu.sh [tiny|mid|all]      (default: all)
#   tiny  the generated tiny plan folder, as written, with `accelerate launch` (1 process) on the tiny preset's base
#         model, starting from the C# trainer's initial LoRA: losses compared step by step with the C# CPU run
#         (bounds as tools/gpu_smoke: step 1 < 1e-4 relative, steps 1-10 < 1e-3; the whole run is reported), and the
#         saved adapter loaded by PEFT on the whole model with exactly the C# adapter's keys and shapes
#   mid   (MID_PLANS picks some of the three) a random-weight Qwen/Qwen1.5-MoE-A2.7B-Chat checkpoint (bf16, written to local disk), then three plan
#         folders with `accelerate launch` for 3 steps each (circuit breaker: ddp and FSDP with one process; LoRA:
#         ddp): every GPU's peak torch.cuda.max_memory_allocated() against the plan's prediction (goal: within 5%)
# Results go to $OUT (the device machine's output folder) or /tmp/moelora-plan-gpu/results: summary.txt, the logs,
# each run's metrics.jsonl, and plan_gpu.json (one object per run).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
stage=${1:-all}
art=$root/artifacts/plan_check
work=${TMPDIR:-/tmp}/moelora-plan-gpu
results=${OUT:-$work/results}
mkdir -p "$work" "$results"
summary=$results/summary.txt
log() { echo "$*" | tee -a "$summary"; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# train.py prints allocated and peak-so-far memory after each phase (the logs show which phase sets the peak).
export MOELORA_MEMTRACE=${MOELORA_MEMTRACE:-1}
failures=0
[ -d "$art/tiny_plan" ] || { echo "no $art (run tools/plan_check/prepare_plan_gpu.sh on the development machine and carry it)" >&2; exit 2; }
launch() { if command -v accelerate >/dev/null; then accelerate launch "$@"; else python3 -m accelerate.commands.launch "$@"; fi; }

log "== $(date -u +%FT%TZ) stage $stage on $(hostname)"
log "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
log "python: $(python3 -c 'import torch, transformers, peft, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)' 2>&1 | tail -n 1)"
log "deepspeed: $(python3 -c 'import deepspeed; print(deepspeed.__version__)' 2>&1 | tail -n 1)"

# Runs plan folder $1 (copied, so the committed artifacts stay as prepared) as the user would: from inside the folder.
run_plan() {
  local name=$1; shift
  rm -rf "$work/$name" "$work/$name-out"
  cp -r "$art/$name" "$work/$name"
  ( cd "$work/$name" && launch --config_file accelerate_config.yaml train.py --output "$work/$name-out" "$@" ) \
    >"$results/$name.log" 2>&1
  local rc=$?
  [ -f "$work/$name-out/metrics.jsonl" ] && cp "$work/$name-out/metrics.jsonl" "$results/$name-metrics.jsonl"
  return $rc
}

tiny() {
  if ! run_plan tiny_plan --model "$art/tiny_base" --init-adapter "$art/tiny_init"; then
    log "tiny: FAIL ($(tail -n 2 "$results/tiny_plan.log" | tr '\n' ' '))"; failures=$((failures + 1)); return
  fi
  python3 tools/plan_check/compare_runs.py "$art/cpu_tiny" "$work/tiny_plan-out" "$art/tiny_base" "$results/plan_gpu.json" \
    | tee -a "$summary" || failures=$((failures + 1))
}

mid() {
  local ckpt=$work/qwen15moe-random
  if [ ! -f "$ckpt/config.json" ]; then
    python3 tools/plan_check/make_random_checkpoint.py src/MoeLora.Core/Catalog/configs/Qwen__Qwen1.5-MoE-A2.7B-Chat.json \
      "$ckpt" "$art/tiny_base/tokenizer.json" >"$results/checkpoint.log" 2>&1 \
      || { log "mid: FAIL making the checkpoint ($(tail -n 1 "$results/checkpoint.log"))"; failures=$((failures + 1)); return; }
  fi
  for name in ${MID_PLANS:-qwen15_cb_ddp qwen15_cb_fsdp qwen15_lora_ddp}; do
    if run_plan "$name" --model "$ckpt" --max-steps 3; then
      python3 tools/plan_check/compare_runs.py --memory "$name" "$work/$name-out" "$results/plan_gpu.json" | tee -a "$summary" \
        || failures=$((failures + 1))
    else
      log "$name: FAIL ($(grep -m1 -iE 'error|out of memory' "$results/$name.log" | cut -c1-300))"; failures=$((failures + 1))
    fi
  done
}

case "$stage" in
  tiny) tiny ;;
  mid) mid ;;
  all) tiny; mid ;;
  *) echo "usage: $0 [tiny|mid|all]" >&2; exit 2 ;;
esac
log "== stage $stage: $failures failing check(s)"
exit $(( failures > 0 ? 1 : 0 ))
