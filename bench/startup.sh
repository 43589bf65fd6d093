#!/usr/bin/env bash
# Cold start of the analysis path against the .NET floor, same machine, same run (issue 12; BENCHMARKS.md).
#   bash bench/startup.sh [RUNS]
# Publishes moelora with the project's default `dotnet publish` (Native AOT) and a Native-AOT
# hello world (bench/AotHello), then times RUNS alternating cold processes of each:
#   moelora report deepseek-ai/DeepSeek-V3 --format json   (HF_HUB_OFFLINE=1: embedded catalog config)
#   AotHello
# and prints min/median wall milliseconds and the ratio of the medians.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-15}
out=bench/out/startup
dotnet publish src/MoeLora.Cli -c Release -o "$out/moelora" >/dev/null
dotnet publish bench/AotHello -c Release -r "$(dotnet --info | sed -n 's/^ *RID: *//p' | head -1)" -o "$out/aot" >/dev/null
export HF_HUB_OFFLINE=1 NO_COLOR=1
ms() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000000)); }
stats() { sort -n | awk '{a[NR]=$1} END {printf "min %d ms, median %d ms", a[1], (NR % 2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }
"$out/moelora/moelora" report deepseek-ai/DeepSeek-V3 --format json >/dev/null   # warm the file cache once
"$out/aot/AotHello" >/dev/null
: > "$out/moelora.ms"; : > "$out/aot.ms"
for _ in $(seq "$runs"); do
  ms "$out/moelora/moelora" report deepseek-ai/DeepSeek-V3 --format json >> "$out/moelora.ms"
  ms "$out/aot/AotHello" >> "$out/aot.ms"
done
m=$(stats < "$out/moelora.ms"); a=$(stats < "$out/aot.ms")
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load: $(cut -d' ' -f1-3 /proc/loadavg); .NET $(dotnet --version)"
echo "moelora report deepseek-ai/DeepSeek-V3 --format json: $m ($runs cold runs)"
echo "Native-AOT hello world:                               $a ($runs cold runs)"
echo "ratio of medians: $(awk -v x="$(sort -n "$out/moelora.ms" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')" -v y="$(sort -n "$out/aot.ms" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')" 'BEGIN {printf "%.1f", x / (y > 0 ? y : 1)}')"
