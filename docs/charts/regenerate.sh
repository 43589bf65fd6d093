#!/usr/bin/env bash
# Redraws the pictures of docs/charts.md with the tool itself (run from the repository root; CPU only, about 3 minutes):
#   routers.png      moelora routers on a small random-weight qwen3_moe (qwen3-moe-12x32/config.json: 12 layers of 32 experts, top-4) with synthetic token-id prompts
#   loss_curves.png  moelora train --preset tiny, 60 steps
#   report-*.svg     the charts embedded in moelora report Qwen/Qwen3-30B-A3B --format html
set -euo pipefail
out=docs/charts
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dotnet build src/MoeLora.Cli -c Release -v q -nologo >/dev/null
moelora=src/MoeLora.Cli/bin/Release/net10.0/moelora

"$moelora" routers "$out/qwen3-moe-12x32" --init random --harmful "$out/qwen3-moe-12x32/harmful.jsonl" --benign "$out/qwen3-moe-12x32/benign.jsonl" \
  --heatmap "$out/routers.png" -o "$tmp/routers.json"
"$moelora" train --preset tiny --total-steps 60 -o "$tmp/run"
cp "$tmp/run/loss_curves.png" "$out/loss_curves.png"

HF_HUB_OFFLINE=1 "$moelora" report Qwen/Qwen3-30B-A3B --format html -o "$tmp/report.html"
for id in chart-adapters chart-layers chart-memory; do
  grep -o "<figure id=\"$id\"><img alt=\"[^\"]*\" src=\"data:image/svg+xml;base64,[A-Za-z0-9+/=]*" "$tmp/report.html" \
    | sed 's/.*base64,//' | base64 -d > "$out/report-${id#chart-}.svg"
done
ls -l "$out"
