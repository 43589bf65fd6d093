# Sourced (not run) by the GPU-host scripts, from the repository root: the bundle tools/gpu_smoke/pack.sh made
# (artifacts/gpu_smoke/moelora-linux-x64.tar.xz, or $MOELORA_SMOKE_TARBALL) unpacked once under $work, $bin its moelora,
# $results the output folder ($OUT on the device machine), log() a line on stdout and in $results/summary.txt. No
# LD_LIBRARY_PATH: moelora finds the host's PyTorch CUDA libtorch itself.
tarball=${MOELORA_SMOKE_TARBALL:-$PWD/artifacts/gpu_smoke/moelora-linux-x64.tar.xz}
work=${TMPDIR:-/tmp}/moelora-gpu-smoke
results=${OUT:-$work/results}
mkdir -p "$work" "$results"
summary=$results/summary.txt
log() { echo "$*" | tee -a "$summary"; }
unset LD_LIBRARY_PATH
export HF_HUB_OFFLINE=1 DOTNET_NOLOGO=1

if [ ! -x "$work/moelora/moelora" ]; then
  [ -f "$tarball" ] || { echo "no bundle at $tarball (run tools/gpu_smoke/pack.sh on the development machine)" >&2; exit 2; }
  tar -xJf "$tarball" -C "$work"
fi
bin=$work/moelora/moelora
