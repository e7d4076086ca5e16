#!/usr/bin/env bash
# Regenerate each notebook's .ipynb (with outputs) from its reviewable py:percent source.
# Usage: notebooks/build.sh [NN_name.py ...]   (default: all of them)
set -euo pipefail
cd "$(dirname "$0")"
files=("$@"); [ ${#files[@]} -eq 0 ] && files=([0-9][0-9]_*.py)
for f in "${files[@]}"; do
  nb="${f%.py}.ipynb"
  start=$(date +%s.%N)
  jupytext --quiet --to ipynb --output "$nb" "$f"
  jupyter nbconvert --log-level=WARN --to notebook --execute --inplace "$nb"
  jupytext --quiet --sync "$nb"          # keeps the pair's timestamps consistent
  printf '%s: %.1f s\n' "$f" "$(echo "$(date +%s.%N) - $start" | bc)"
done
