#!/usr/bin/env bash
# One device call, many checks: runs the named stages on the GPU host from the repository root and packs what they
# wrote into at most eight files under $OUT (the device returns no more). CPU-only stages run in the background while
# the GPU stages run in the foreground.
#   tools/device_batch.sh STAGE...
# Stages:
#   fixtures     tools/oracle/discover_moe.py --fixtures for every MoE text type, or FIXTURE_TYPES (a,b) [CPU, background]
#   doge         PERTURB_TYPES (default doge) fixtures with --perturb-constants                                     [CPU, background]
#   adapter      tools/adapter_check/check_peft_convert.py (PEFT 0.21 reads our converted adapters)     [CPU, background]
#   rope         tools/rope_check/make_rope_fixtures.py for ROPE_CASES (a,b; default all) and the rope source it
#                checks against (results/rope_fixtures.tar, results/rope_sources.txt)                 [CPU, background]
#   parity train report peft ours bench   tools/gpu_smoke/run_gpu.sh stages (needs artifacts/gpu_smoke, carried) [GPU]
#   plan-tiny plan-mid           tools/plan_check/run_plan_gpu.sh stages (needs artifacts/plan_check)    [GPU]
#   hfcheck      tools/gpu_smoke/hf_cuda_check.py: transformers and MoeLora on CUDA, fp32 and bf16, every fixture
#                or HFCHECK_FIXTURES (hf-moe/afmoe,hf-tiny/mixtral,...)                                    [GPU]
# The travelling tree is capped at 64 MiB: stages that do not read the hf-moe fixtures (all but parity and hfcheck) can
# run with them moved out (tools/device_slim.sh out, then back).
# Files back: results.tar.gz (every log, summary and JSON), batch.txt, fixtures_moe_fixtures_N.tar.gz (parts of at most
# 12 MiB), doge_moe_fixtures_0.tar.gz, sources.tar.gz.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
: "${OUT:=/tmp/moelora-device-out}"
mkdir -p "$OUT"
# A folder of its own, so that two batches in one device call (one in the background) do not clear each other's work.
work=$(mktemp -d /tmp/moelora-batch.XXXXXX)
mkdir -p "$work/results"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$work/results/batch.txt"; }
bg=()
# Per-stage time limit in seconds: LIMIT_<stage> (dashes as underscores), default 300; the whole call has 600.
limit() { local v="LIMIT_${1//-/_}"; echo "${!v:-300}"; }

for stage in "$@"; do
  case "$stage" in
    fixtures)
      stamp "fixtures: start (background)"
      ( timeout 420 python3 tools/oracle/discover_moe.py --out "$work/disc" --workers 10 --deadline 240 --fixtures \
          --no-peft --tree-types none ${FIXTURE_TYPES:+--only "$FIXTURE_TYPES"} >"$work/results/fixtures.log" 2>&1; echo "fixtures exit $?" >>"$work/results/fixtures.log" ) &
      bg+=($!) ;;
    doge)
      stamp "doge: start (background)"
      ( timeout 300 python3 tools/oracle/discover_moe.py --out "$work/disc_doge" --workers 4 --deadline 200 --only "${PERTURB_TYPES:-doge}" \
          --fixtures --perturb-constants --no-peft --no-sources --tree-types none >"$work/results/doge.log" 2>&1 ) &
      bg+=($!) ;;
    adapter)
      stamp "adapter: start (background)"
      ( mkdir -p "$work/results/adapter"; OUT="$work/results/adapter" timeout 300 python3 tools/adapter_check/check_peft_convert.py \
          >"$work/results/adapter/adapter_check.log" 2>&1 ) &
      bg+=($!) ;;
    rope)
      stamp "rope: start (background)"
      ( timeout 300 python3 tools/rope_check/make_rope_fixtures.py "$work/results/rope_fixtures.tar" "${ROPE_CASES:-}" \
          "$work/results/rope_sources.txt" >"$work/results/rope.log" 2>&1; echo "rope exit $?" >>"$work/results/rope.log" ) &
      bg+=($!) ;;
    parity|train|report|peft|ours|bench)
      stamp "$stage: start (limit $(limit "$stage") s)"
      mkdir -p "$work/results/smoke"
      OUT="$work/results/smoke" timeout "$(limit "$stage")" tools/gpu_smoke/run_gpu.sh "$stage" >>"$work/results/smoke/run.log" 2>&1
      stamp "$stage: exit $?" ;;
    plan-tiny|plan-mid)
      stamp "$stage: start (limit $(limit "$stage") s)"
      mkdir -p "$work/results/plan"
      OUT="$work/results/plan" timeout "$(limit "$stage")" tools/plan_check/run_plan_gpu.sh "${stage#plan-}" >>"$work/results/plan/run.log" 2>&1
      stamp "$stage: exit $?" ;;
    hfcheck)
      stamp "hfcheck: start (limit $(limit hfcheck) s)"
      bin=$( (OUT="$work/results/smoke" . tools/gpu_smoke/bundle.sh; echo "$bin") )
      fx=$(for d in tests/MoeLora.Torch.Tests/Data/hf-tiny/* tests/MoeLora.Torch.Tests/Data/hf-moe/*; do
        [ -f "$d/reference.safetensors" ] || continue
        [ -z "${HFCHECK_FIXTURES:-}" ] || [[ ",$HFCHECK_FIXTURES," == *",$(basename "$(dirname "$d")")/$(basename "$d"),"* ]] && echo "$d"
      done)
      ( unset LD_LIBRARY_PATH; timeout "$(limit hfcheck)" python3 tools/gpu_smoke/hf_cuda_check.py "$bin" \
          "$work/results/hf_cuda_check.json" $fx >"$work/results/hf_cuda_check.log" 2>&1 )
      stamp "hfcheck: exit $?" ;;
    *) stamp "unknown stage $stage" ;;
  esac
done

for p in "${bg[@]}"; do wait "$p"; done
stamp "all stages done"

# Pack: the discover runs already split their fixtures into parts of at most 12 MiB (the device returns files of
# at most 16 MiB); keep the parts, prefixed by the run's name.
pack_fixtures() {
  local src=$1 name=$2
  [ -d "$src" ] || return
  cp "$src"/*.json "$work/results/" 2>/dev/null
  for t in "$src"/moe_fixtures_*.tar.gz; do [ -f "$t" ] && cp "$t" "$OUT/${name}_$(basename "$t")"; done
  [ -f "$src/moe_sources.tar.gz" ] && cp "$src/moe_sources.tar.gz" "$OUT/sources.tar.gz"
}
pack_fixtures "$work/disc" fixtures
[ -d "$work/disc_doge" ] && mv "$work/disc_doge/moe_fixtures_index.json" "$work/disc_doge/moe_fixtures_index_doge.json" 2>/dev/null
pack_fixtures "$work/disc_doge" doge
find "$work/results" -name '*.safetensors' -size +2M -delete
tar -czf "$OUT/results.tar.gz" -C "$work" results
cp "$work/results/batch.txt" "$OUT/batch.txt"
cat "$work/results/smoke/summary.txt" "$work/results/plan/summary.txt" "$work/results/smoke/compare.md" 2>/dev/null
ls -la "$OUT"
