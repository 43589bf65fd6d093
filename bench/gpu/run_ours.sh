#!/usr/bin/env bash
# Our side of the GPU step benchmark. Runs ON THE GPU HOST from the repository root, with the self-contained bundle
# tools/gpu_smoke/pack.sh makes (artifacts/gpu_smoke/moelora-linux-x64.tar.xz, or $MOELORA_SMOKE_TARBALL); moelora
# finds the host's PyTorch CUDA libtorch itself (no LD_LIBRARY_PATH).
#
#   bench/gpu/run_ours.sh            -> $OUT/ours-qwen3-30b.json (+ .log) and a summary line per step
#
# The same work as bench/gpu/peft_step.py (its defaults): Qwen3-30B-A3B built with random weights on the GPU in
# bf16; LoRA r=16, lora_alpha=16, lora_dropout=0 on the seed targets (q/k/v/o_proj, and gate/up/down_proj rewritten
# onto the fused experts' gate_up_proj/down_proj as PEFT 0.21 does); a LoRA step (cross-entropy, backward, AdamW)
# and a circuit-breaker step on the model truncated to max(target)+1 = 21 blocks with targets 10,20 (peft_step.py's
# --target-layers 10,20; the report's own default would be L/4, L/2 = 12,24), coefficients 0.5 / 4.5; one warm-up
# step and BENCH_STEPS (default 4, peft_step.py's --steps) timed ones; batch BENCH_BATCH (1) × BENCH_TOKENS (1024);
# BENCH_MODES (default "lora cb", as tools/gpu_smoke/run_gpu.sh spells it); BENCH_CHECKPOINTING=1 adds --gradient-checkpointing.
# BENCH_MODEL (a folder with config.json) replaces Qwen/Qwen3-30B-A3B: tools/gpu_smoke/run_gpu.sh sets it for BENCH_LAYERS.
# Compare with: python3 bench/gpu/compare.py $OUT/ours-qwen3-30b.json $OUT/peft-lora-b1.json $OUT/peft-cb-b1.json
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
. tools/gpu_smoke/bundle.sh
json=$results/ours-qwen3-30b.json

# One process per step: TorchSharp 0.107 has no empty_cache, so blocks libtorch's caching allocator reserved for one
# step stay reserved for the next, and the measured figure (device memory in use, cudaMemGetInfo) of a later step in
# the same process would include them. The per-mode JSON files are merged into one (measured.steps.<mode>).
failed=0
for mode in ${BENCH_MODES:-lora cb}; do
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-500}" "$bin" report "${BENCH_MODEL:-Qwen/Qwen3-30B-A3B}" --load-model --init random --device cuda --dtype bf16 \
    --rank 16 --alpha 16 --cb-target-layers 10,20 \
    --measure-steps "$mode" --step-tokens "${BENCH_TOKENS:-1024}" --step-batch "${BENCH_BATCH:-1}" \
    --step-repeats "${BENCH_STEPS:-4}" ${BENCH_CHECKPOINTING:+--gradient-checkpointing} --format json -o "$results/ours-qwen3-30b-$mode.json" >"$results/ours-qwen3-30b-$mode.log" 2>&1
  rc=$?
  log "ours-$mode: report --measure-steps $mode exit $rc after $(( $(date +%s) - start ))s"
  if [ "$rc" -ne 0 ] || [ ! -f "$results/ours-qwen3-30b-$mode.json" ]; then
    log "ours-$mode: FAIL ($(tail -n 3 "$results/ours-qwen3-30b-$mode.log" | tr '\n' ' '))"
    failed=1
  fi
done
python3 - "$json" "$results"/ours-qwen3-30b-*.json <<'PY'
import json, sys
merged = None
for path in sys.argv[2:]:
    doc = json.load(open(path))
    if merged is None:
        merged = doc
    else:
        merged["measured"].setdefault("steps", {}).update(doc["measured"].get("steps", {}))
if merged is not None:
    json.dump(merged, open(sys.argv[1], "w"), indent=1)
PY
[ -f "$json" ] || exit 1
python3 - "$json" <<'PY' | tee -a "$summary"
import json, sys
steps = json.load(open(sys.argv[1]))["measured"].get("steps", {})
for mode in ("lora", "cb"):
    s = steps.get(mode)
    if s is None:
        continue
    if not s.get("ok"):
        print(f"ours-{mode}: FAILED {s.get('error')}")
        continue
    gib = 1 << 30
    print(f"ours-{mode}: {s['tokens_per_s']:.0f} tokens/s ({s['step_s']:.3f} s/step), peak {s['peak_bytes'] / gib:.2f} GiB "
          f"(predicted {s['predicted_bytes'] / gib:.2f} GiB, {s['measured_over_predicted']:.2f}x), "
          f"after build {s['used_after_build_bytes'] / gib:.2f} GiB, {s['layers']} blocks, loss {s['loss']:.4f}")
PY
exit "$failed"
