#!/usr/bin/env bash
# The working tree that travels to the device machine is capped at 64 MiB (tracked files plus what `carry` names), and
# the GPU bundle (artifacts/gpu_smoke/moelora-linux-x64.tar.xz, 6.7 MiB) with the repository's 57 MiB is at that edge.
# A call whose stages do not read the hf-moe runtime fixtures (45 MB: bench, ours, peft, train, rope, plan-*) can leave
# them here: this moves that folder out of the working tree before the call and puts it back after.
#   tools/device_slim.sh out                 # before the device call: all hf-moe fixtures
#   tools/device_slim.sh out step3p7 minimax # or only these (parity then runs every other fixture)
#   tools/device_slim.sh back                # after it (also safe to run when nothing was moved)
# parity and hfcheck read the fixtures: call them with the tree whole, or with only the fixtures they need not check
# moved out (the device counts a little more than the files' bytes: 63.5 MiB was refused, 61.4 MiB went).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
fixtures="$root/tests/MoeLora.Torch.Tests/Data/hf-moe"
stash="${MOELORA_SLIM_STASH:-/tmp/moelora-slim-hf-moe}"
case "${1:-}" in
  out)
    if [ -e "$stash" ]; then echo "device_slim: $stash already holds moved fixtures; run 'tools/device_slim.sh back' first" >&2; exit 1; fi
    [ -d "$fixtures" ] || { echo "device_slim: $fixtures is not there (already moved?)" >&2; exit 1; }
    shift
    if [ $# -eq 0 ]; then
      mv "$fixtures" "$stash"
      echo "moved $fixtures to $stash; run 'tools/device_slim.sh back' after the device call"
    else
      for name in "$@"; do [ -d "$fixtures/$name" ] || { echo "device_slim: no fixture $fixtures/$name" >&2; exit 1; }; done
      mkdir -p "$stash/some"
      for name in "$@"; do mv "$fixtures/$name" "$stash/some/"; done
      echo "moved $* to $stash/some; run 'tools/device_slim.sh back' after the device call"
    fi ;;
  back)
    if [ ! -e "$stash" ]; then echo "device_slim: nothing to put back"; exit 0; fi
    if [ -d "$stash/some" ]; then
      for dir in "$stash"/some/*; do
        [ -e "$dir" ] || continue
        if [ -e "$fixtures/$(basename "$dir")" ]; then echo "device_slim: $fixtures/$(basename "$dir") exists again; $stash left as it is" >&2; exit 1; fi
        mv "$dir" "$fixtures/"
      done
      rmdir "$stash/some" "$stash"
      echo "put the moved fixtures back into $fixtures"
      exit 0
    fi
    if [ -e "$fixtures" ]; then echo "device_slim: $fixtures exists again; $stash left as it is" >&2; exit 1; fi
    mv "$stash" "$fixtures"
    echo "put $fixtures back" ;;
  *) echo "usage: tools/device_slim.sh out [FIXTURE...]|back" >&2; exit 2 ;;
esac
