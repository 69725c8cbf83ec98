#!/bin/bash
# Issue 24's before/after: the same quick suites from 50ebc7b (before the layout change) and from this
# checkout (after), alternating order between rounds. Run from the repository root after
#   git worktree add --detach /tmp/before 50ebc7b
# Results: bench/results/layout_ab/r<round>/<before|after>/<suite>/ (the suite's result.json and table.md).
PY=${PY:-$PWD/.venv/bin/python}
AFTER=$PWD
OUT=$PWD/bench/results/layout_ab
run() { side=$1; suite=$2; round=$3
  if [ "$side" = before ]; then dir=/tmp/before; else dir=$AFTER; fi
  echo "== round $round $side $suite $(date +%T)"
  (cd "$dir" && PYTHONPATH=$dir timeout 900 "$PY" -m "bench.$suite" --quick --out "$OUT/r$round/$side/$suite" 2>&1 \
    | grep -E "^\| .* x \||Command" | head -6)
}
run before head_of_line 1; run after head_of_line 1
run before multi_adapter 1; run after multi_adapter 1
run after head_of_line 2; run before head_of_line 2
run after multi_adapter 2; run before multi_adapter 2
echo DONE "$(date +%T)"
