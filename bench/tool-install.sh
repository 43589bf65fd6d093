#!/usr/bin/env bash
# Packs moelora as a .NET tool and installs it into a temporary tool path, then runs it from outside the repository
# (issue 12). About 4 minutes and 1.1 GB of disk while it runs (the CPU libtorch), so it is not part of the test run.
#   bash bench/tool-install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dotnet pack src/MoeLora.Cli -c Release >/dev/null
pkg=$(ls -t nupkg/moelora.*.nupkg | head -1)
echo "package: $pkg ($(du -h "$pkg" | cut -f1))"
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
dotnet tool install --tool-path "$tools" --add-source ./nupkg moelora >/dev/null
cd "$tools"
./moelora --version
HF_HUB_OFFLINE=1 ./moelora report deepseek-ai/DeepSeek-V3 --format json | head -c 200 | grep -q '"schema": "moelora.report/1"'
echo "report --format json: ok"
./moelora train --preset tiny -o "$tools/run" --total-steps 1 --checkpoint-every 0 >/dev/null
test -f "$tools/run/adapter_model.safetensors"
echo "train --preset tiny (TorchSharp + libtorch from the tool package): ok"
