#!/usr/bin/env bash
# One device call for model types that have no fixture yet: makes them with tools/oracle/discover_moe.py (transformers
# 5.17 on the GPU host's CPU), puts them where the repository keeps fixtures, and runs hf_cuda_check on them
# (transformers and MoeLora on CUDA, fp32 and bf16) together with any fixtures already in the repository named in EXTRA.
#   tools/gpu_smoke/new_fixture_check.sh TYPES [EXTRA]     (TYPES: a,b; EXTRA: hf-moe/a,hf-tiny/b)
# Results: $OUT/make/ (the fixture parts, as device_batch.sh packs them) and $OUT/check/ (hf_cuda_check's JSON and log).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
types=$1 extra=${2:-}
: "${OUT:=/tmp/moelora-device-out}"
mkdir -p "$OUT/make" "$OUT/check"
# SKIP_MAKE=1: the fixtures are already in $OUT/make (made in the background of the same call).
[ -n "${SKIP_MAKE:-}" ] || FIXTURE_TYPES=$types OUT="$OUT/make" tools/device_batch.sh fixtures >/dev/null 2>&1
tmp=$(mktemp -d)
for t in "$OUT"/make/fixtures_moe_fixtures_*.tar.gz; do [ -f "$t" ] && tar -xzf "$t" -C "$tmp"; done
made="" missing=0
for type in ${types//,/ }; do
  if [ -d "$tmp/fixtures/$type" ]; then
    rm -rf "tests/MoeLora.Torch.Tests/Data/hf-moe/$type"
    cp -r "$tmp/fixtures/$type" "tests/MoeLora.Torch.Tests/Data/hf-moe/$type"
    made="${made:+$made,}hf-moe/$type"
  else
    echo "no fixture made for $type"; missing=1
  fi
done
if [ "$missing" = 1 ] && [ -f "$OUT/make/results.tar.gz" ]; then
  echo "errors, from make/results.tar.gz:"
  tar -xzf "$OUT/make/results.tar.gz" -C "$tmp" 2>/dev/null
  grep -h -o "\"error[^}]*" "$tmp"/results/*.json 2>/dev/null | head -c 3000; tail -n 20 "$tmp/results/fixtures.log" 2>/dev/null
fi
extra="$made${extra:+${made:+,}$extra}"
[ -n "$extra" ] && HFCHECK_FIXTURES=$extra LIMIT_hfcheck=${LIMIT_hfcheck:-200} OUT="$OUT/check" tools/device_batch.sh hfcheck 2>&1 | tail -5
python3 - "$OUT/check" <<'P'
import json, sys, tarfile, io, os
p = os.path.join(sys.argv[1], "results.tar.gz")
if os.path.exists(p):
    with tarfile.open(p) as tf:
        for m in tf.getmembers():
            if m.name.endswith("hf_cuda_check.json"):
                d = json.load(tf.extractfile(m))
                print(json.dumps(d, indent=1)[:6000])
P
