# Sourced by every recipe here. Installs moec from this checkout into the machine's Python, logs everything to
# $OUT/log.txt, and keeps tuned tables in moec's cache (~/.cache/moec/tuning): empty, or with SEED_TUNED=1 seeded
# from build/tuned/*.json (copy a table an earlier call returned there, and carry build/tuned).
# OUT: where results go (the device tool sets it; elsewhere: OUT=$(mktemp -d) bash benchmarks/gpu/<recipe>.sh).
set -o pipefail
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to a folder for the results}"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
exec > >(tee -a "$OUT/log.txt") 2>&1
date -u; nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
# moec's user cache overrides the shipped tables in every compiled call (tuning.load_dir), so it starts empty: a
# warm machine keeps an earlier call's cache, and the device keeps an earlier carry of build/tuned, and on
# 2026-12-06 a stale one-token gate/up tile (TMA, hot-picked) from there ran in every compiled decode step of four
# calls. SEED_TUNED=1 seeds it from build/tuned (a tuning call's tables, for the next call of the same work).
TUNED=$HOME/.cache/moec/tuning
rm -rf "$TUNED" && mkdir -p "$TUNED"
if [ -n "$SEED_TUNED" ] && [ -n "$(ls build/tuned/*.json 2>/dev/null)" ]; then
  cp build/tuned/*.json "$TUNED/"
fi
python3 -c "import torch, triton, moec; print('torch', torch.__version__, 'triton', triton.__version__)"

# step SECONDS command...: logged and bounded, so one stuck step never costs the others their time
step() { local t=$1; shift; echo "=== $(date -u +%T) $*"; timeout "$t" "$@"; echo "=== rc $? $(date -u +%T)"; }
save_tuned() { cp "$TUNED"/*.json "$OUT/" 2>/dev/null; }
# SonicMoE's wheels, packed by ../shared/tools/pack_sonicmoe.sh into .peers/ (carry .peers)
use_sonic() {
  mkdir -p .peers/site && tar -C .peers/site -xJf .peers/sonicmoe.tar.xz &&
  export PYTHONPATH=$PWD/.peers/site:$PWD/.peers/site/nvidia_cutlass_dsl/python_packages:$PYTHONPATH
  # QuACK precompiles 9 configs per GEMM (~75 s each on 16 cores): keep them for the next call on this machine
  export QUACK_CACHE_DIR=$HOME/.cache/quack QUACK_CACHE_AUTOTUNING=1
  python3 -c "import sonicmoe; print('sonicmoe', sonicmoe.__version__)"
}
