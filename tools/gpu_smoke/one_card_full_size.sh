#!/usr/bin/env bash
# The whole Qwen3-30B-A3B on one 80 GB card, in one device call: every pairing of the two sides that the card can hold.
#   1. MoeLora's default steps (no checkpointing): LoRA and circuit breaker.
#   2. PEFT's default LoRA step (no checkpointing): 135.5 GiB on an H200, so on an 80 GB card it records where it
#      ran out of memory.
#   3. Both sides with gradient checkpointing: the fastest PEFT step that fits this card, against ours.
# Then, if PARITY=1, fp32 parity of every runtime fixture on CUDA (call with `tools/device_slim.sh out step3p7 minimax`
# so that the tree and the bundle fit the device's 64 MiB; the moved fixtures are not checked).
# Run on the device machine from the repository root, with the bundle carried (tools/gpu_smoke/pack.sh):
#   OUT=$OUT tools/gpu_smoke/one_card_full_size.sh       (MODES=lora for the LoRA step alone)
# Each part writes under $OUT/<part>/ (results.tar.gz, batch.txt); the comparison tables print at the end.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
: "${OUT:=/tmp/moelora-device-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/gpu: /'
BENCH_MODES="${MODES:-lora cb}" OUT=$OUT/ours LIMIT_ours=150 tools/device_batch.sh ours >"$OUT/ours.txt" 2>&1
BENCH_MODES=lora OUT=$OUT/peft LIMIT_peft=200 tools/device_batch.sh peft >"$OUT/peft.txt" 2>&1
BENCH_CHECKPOINTING=1 BENCH_MODES="${MODES:-lora cb}" OUT=$OUT/gc LIMIT_bench=300 tools/device_batch.sh bench >"$OUT/gc.txt" 2>&1
[ "${PARITY:-0}" = 1 ] && PARITY_DTYPES=fp32 OUT=$OUT/parity LIMIT_parity=240 tools/device_batch.sh parity >"$OUT/parity.txt" 2>&1
for part in ours peft gc parity; do
  [ -f "$OUT/$part.txt" ] || continue
  echo "== $part"
  grep -hE '^\| (lora|cb)|ours-|peft-|blocks|FAIL|exit|passed' "$OUT/$part.txt"
done
