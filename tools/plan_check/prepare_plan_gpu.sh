#!/usr/bin/env bash
# Runs on the development machine (CPU, no torch needed) before the GPU session; writes artifacts/plan_check/
# (git-ignored: pass it to the device with carry=["artifacts/plan_check"]):
#   tiny_base/   the tiny preset's base model (random Mixtral-style MoE, seed 0, 6 blocks) as a Hub checkpoint with its
#                tokenizer.json (tools/peft_check save-base), so PyTorch and the C# trainer train the same weights
#   tiny_init/   the C# trainer's initial LoRA for that model (--init-lora-weights false, lora_dropout 0): one step at
#                lr 1e-30 moves no fp32 weight (|update| <= 1e-30, below half an ulp of any weight above ~1e-23)
#   cpu_tiny/    the C# reference run: `moelora train --preset tiny --model tiny_base`, same init, 150 steps, on CPU
#   tiny_plan/   `moelora plan tiny_base -o ...` with the reference run's LoRA; its train_settings.json takes the
#                run's own settings (checkpoint/trainer_state.json), so train.py runs exactly that recipe
#   qwen15_*/    plans of Qwen/Qwen1.5-MoE-A2.7B-Chat (14.3B, mid-size) from the embedded catalog: circuit breaker
#                with one process under ddp and under FSDP, and plain LoRA; trained on the GPU with random weights
# Usage: tools/plan_check/prepare_plan_gpu.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
out=artifacts/plan_check
export HF_HUB_OFFLINE=1 DOTNET_NOLOGO=1
rm -rf "$out"
mkdir -p "$out"

echo "== build moelora and the peft_check helper"
dotnet build src/MoeLora.Cli -c Release -v quiet -nologo
dotnet build tools/peft_check/PeftCheck.csproj -c Release -v quiet -nologo
bin=src/MoeLora.Cli/bin/Release/net10.0/moelora

echo "== tiny preset base model as a checkpoint"
dotnet tools/peft_check/bin/Release/net10.0/PeftCheck.dll save-base "$out/tiny_base"

# Dropout 0 and a non-zero lora_B: with PEFT's default B = 0 the first step sits on the cos = 1 stationary point and
# its gradient is rounding noise, so two implementations part ways at once (seen between CPU and CUDA, gpu_smoke).
common=(train --preset tiny --model "$out/tiny_base" --device cpu --lora-dropout 0 --init-lora-weights false --checkpoint-every 0)
echo "== the C# trainer's initial adapter"
"$bin" "${common[@]}" --total-steps 1 --lr 1e-30 -o "$out/tiny_init" >"$out/tiny_init.log"
echo "== CPU reference run (150 steps)"
"$bin" "${common[@]}" -o "$out/cpu_tiny" | tee "$out/cpu_tiny.log" | tail -n 3

echo "== plans"
"$bin" plan "$out/tiny_base" --mode circuit-breaker --dtype fp32 --lora-config "$out/tiny_init" --cb-target-layers 2,4 \
  --batch-size 4 --seq-length 144 -o "$out/tiny_plan" >"$out/tiny_plan.log"
python3 - "$out/cpu_tiny/checkpoint/trainer_state.json" "$out/tiny_plan/train_settings.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))["settings"]["run"]
s = json.load(open(sys.argv[2]))
s.update({k: run[k] for k in ("total_steps", "seed", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
                              "loss_weighting", "cb_alpha", "gradient_accumulation", "batch_size", "cb_target_layers")})
s["lengths"] = dict(request=run["request_length"], response=run["response_length"], retain=run["retain_length"])
json.dump(s, open(sys.argv[2], "w"), indent=2)
print("tiny_plan/train_settings.json: the reference run's settings", {k: s[k] for k in ("total_steps", "lr", "batch_size", "lengths")})
PY
mid=Qwen/Qwen1.5-MoE-A2.7B-Chat
shape=(--batch-size 4 --seq-length 1024 --gradient-checkpointing)
"$bin" plan "$mid" --mode circuit-breaker "${shape[@]}" -o "$out/qwen15_cb_ddp" >"$out/qwen15_cb_ddp.log"
"$bin" plan "$mid" --mode circuit-breaker "${shape[@]}" --sharding fsdp --gpus 1 -o "$out/qwen15_cb_fsdp" >"$out/qwen15_cb_fsdp.log"
"$bin" plan "$mid" --mode lora "${shape[@]}" -o "$out/qwen15_lora_ddp" >"$out/qwen15_lora_ddp.log"
grep -h '^fits' "$out"/qwen15_*.log
du -sh "$out"
