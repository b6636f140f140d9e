#!/usr/bin/env bash
# Fresh `headstart run` of the demo at two revisions, alternating, in fresh clones of this
# repository (each with `dvc pull data.dvc`): wall seconds per run. Compare ratios within pairs.
#   bench/ab.sh bc3011a HEAD 2      # round 1 vs now, 2 pairs
set -uo pipefail
old=${1:?old revision}; new=${2:?new revision}; pairs=${3:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.venv/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for pair in $(seq "$pairs"); do
  for rev in "$old" "$new"; do
    clone="$work/$rev"
    rm -rf "$clone" && git clone -q "$root" "$clone" && git -C "$clone" checkout -q "$rev"
    (cd "$clone" && "$bin/dvc" pull -q data.dvc) || exit 1
    start=$(date +%s.%N)
    (cd "$clone" && PATH="$bin:$PATH" PYTHONPATH="$clone" headstart run > "$work/$rev.log" 2>&1)
    status=$?
    end=$(date +%s.%N)
    printf 'pair %s %s exit %s %.1f s\n' "$pair" "$rev" "$status" "$(echo "$end - $start" | bc)"
  done
done
