#!/usr/bin/env bash
# A two-node Ray cluster on this one machine (head + a second raylet, one CPU each), then the
# training job submitted with `ray job submit`: its two Train workers land on different nodes,
# and checkpoints go to a storage path both nodes see (a local directory: same machine).
#   bash scripts/two_node_local.sh [extra alro train overrides]
# Prints the node each worker ran on; stops the cluster at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-6390}
DASH=${DASH:-8266}
STORE=${STORE:-/tmp/alro-two-node}
export RAY_ADDRESS="http://127.0.0.1:${DASH}"
cleanup() { ray stop --address "127.0.0.1:${PORT}" >/dev/null 2>&1 || true; }
trap cleanup EXIT
rm -rf "$STORE"
ray start --head --port "$PORT" --num-cpus 1 --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
    --resources '{"node_a": 1}' --disable-usage-stats
ray start --address "127.0.0.1:${PORT}" --num-cpus 1 --resources '{"node_b": 1}' --disable-usage-stats
ray status --address "127.0.0.1:${PORT}" | sed -n '1,20p'
ray job submit --working-dir . --runtime-env-json '{"excludes": [".venv", "runs", ".git"]}' -- \
    python jobs/train.py --config configs/tiny.yaml --output-dir "$STORE" --no-test-summary \
    train.max_steps_per_epoch=2 "$@" | tee "$STORE.log"
nodes=$(grep -o "on node [0-9a-f]*" "$STORE.log" | sort -u | wc -l)
echo "workers ran on $nodes distinct node(s); final ranker in $STORE/final"
test "$nodes" -ge 2
test -f "$STORE/final/ranker.json"
