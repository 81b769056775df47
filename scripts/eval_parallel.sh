#!/usr/bin/env bash
# Runs `kvcompact eval` as N processes over disjoint document shards (a GPU has room for several copies of a small
# model, and the eval is bound by per-token decoding), all filling OUT's result cache; then writes the report from
# that cache.
#   usage: scripts/eval_parallel.sh N OUT [eval arguments...]
#   e.g.   scripts/eval_parallel.sh 6 eval_out/niah --dataset ../shared/data/ruler_niah.jsonl --limit 20 --methods full am
# KVC_PYTHON picks the interpreter (default .venv/bin/python); KVC_SHARD_TIMEOUT (seconds) stops the shards early,
# and the report then covers what they finished. Each shard logs to OUT/shard-I.log.
set -u
shards=$1 out=$2
shift 2
python=${KVC_PYTHON:-.venv/bin/python}
limit=${KVC_SHARD_TIMEOUT:-0}
mkdir -p "$out"
pids=()
for i in $(seq 0 $((shards - 1))); do
    timeout "$limit" "$python" -m workers.cli eval --out "$out" --shard "$i/$shards" "$@" >"$out/shard-$i.log" 2>&1 &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { failed=$((failed + 1)); echo "shard $i stopped early: see $out/shard-$i.log" >&2; }
done
"$python" -m workers.cli eval --out "$out" --report-only "$@" || exit 1
exit $((failed > 0))
