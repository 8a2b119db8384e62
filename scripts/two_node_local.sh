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
TMP=${TMP_DIR:-/tmp/alro2n}  # this cluster's own temp dir, so cleanup touches nothing else
# `ray stop` would stop every Ray on the machine: end only this cluster's processes.
cleanup() { pkill -9 -f "$TMP" >/dev/null 2>&1 || true; }
trap cleanup EXIT
rm -rf "$STORE" "$TMP"
# Ray >= 2.59 turns on token authentication: every process of the cluster, and the job client,
# needs the token the head writes (~/.ray/auth_token).
export RAY_AUTH_MODE=token
ray start --head --port "$PORT" --num-cpus 1 --dashboard-host 127.0.0.1 --dashboard-port "$DASH" \
    --resources '{"node_a": 1}' --temp-dir "$TMP" --dashboard-agent-listen-port $((DASH + 100)) \
    --disable-usage-stats
export RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"
# Both raylets share this machine: each dashboard agent needs its own HTTP port (job submission
# goes through the head's).
ray start --address "127.0.0.1:${PORT}" --num-cpus 1 --resources '{"node_b": 1}' \
    --dashboard-agent-listen-port $((DASH + 101)) --disable-usage-stats
export RAY_ADDRESS="http://127.0.0.1:${DASH}"
ray status --address "127.0.0.1:${PORT}" | sed -n '1,20p'
# No --working-dir: both raylets share this machine's temp dir, and the second one's runtime-env
# agent deletes an uploaded working dir it does not use. The checkout is installed on "every node".
submit() {
    ray job submit -- \
        python "$PWD/jobs/train.py" --config "$PWD/configs/tiny.yaml" --output-dir "$STORE" --no-test-summary \
        train.max_steps_per_epoch=2 "$@" > "$STORE.log" 2>&1
}
for _ in $(seq 30); do  # the job agent comes up some seconds after the head
    submit "$@" && break
    grep -q "No available agent" "$STORE.log" || { cat "$STORE.log"; exit 1; }
    sleep 3
done
cat "$STORE.log"
nodes=$(grep -o "on node [0-9a-f]*" "$STORE.log" | sort -u | wc -l)
echo "workers ran on $nodes distinct node(s); final ranker in $STORE/final"
test "$nodes" -ge 2
test -f "$STORE/final/ranker.json"
