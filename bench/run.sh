#!/usr/bin/env bash
# Publishes moelora as a user installs it (the default `dotnet publish`: Native AOT) and runs the analysis benchmark against it.
set -euo pipefail
cd "$(dirname "$0")/.."
dotnet publish src/MoeLora.Cli -c Release -o bench/out/moelora >/dev/null
dotnet run -c Release --project bench/MoeLora.Bench -- --moelora bench/out/moelora/moelora "$@"
