#!/usr/bin/env bash
# Publishes a ReadyToRun moelora (what a user installs) and runs the analysis benchmark against it.
set -euo pipefail
cd "$(dirname "$0")/.."
dotnet publish src/MoeLora.Cli -c Release -r linux-x64 --self-contained false -p:PublishReadyToRun=true -o bench/out/moelora >/dev/null
dotnet run -c Release --project bench/MoeLora.Bench -- --moelora bench/out/moelora/moelora "$@"
