#!/usr/bin/env bash
# The commands behind the README's issue-4 and issue-5 figures, in the order they were run.
# Run from the repository root with ../shared/data beside it. Each suite resumes if interrupted.
# Usage: bash benchmarks/run_suites.sh [strategies|twins|privacy-utility|scaling|privacy-audit|all]
set -euo pipefail
data=../shared/data
run() { echo "+ $*" >&2; "$@"; }
case "${1:-all}" in
  strategies|all)
    run securefed bench strategies --data-dir "$data" --seeds 0,1,2 --device cpu --out bench-out/strategies ;;&
  twins|all)
    # The README's twin table ran on an NVIDIA H200 (--device cuda); on 2 CPU cores use
    # --device cpu and expect about 10 min per no-DP cell.
    run securefed bench twins --seeds 0,1,2 --device "${TWINS_DEVICE:-cuda}" --out bench-out/twins ;;&
  privacy-utility|all)
    # One seed in the README (the default three take ~1 h 50 min on 2 cores).
    run securefed bench privacy-utility --data-dir "$data" --seeds "${PU_SEEDS:-0}" --device cpu \
        --out bench-out/privacy-utility ;;&
  scaling|all)
    run securefed bench scaling --seeds 0,1,2 --device cpu --out bench-out/scaling ;;&
  privacy-audit|all)
    run securefed bench privacy-audit --data-dir "$data" --device cpu --out bench-out/privacy-audit ;;&
  strategies|twins|privacy-utility|scaling|privacy-audit|all) ;;
  *) echo "unknown suite: $1" >&2; exit 2 ;;
esac
