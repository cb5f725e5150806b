#!/usr/bin/env bash
# A two-node Ray cluster on one machine (head + one worker), with token auth and metrics export ports set.
#
#   cluster/local.sh start      # head: GCS 6379, dashboard 8265, metrics 8080; worker: metrics 8081
#   cluster/local.sh stop
#
# Then: export RAY_AUTH_MODE=token; ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs...
# Two nodes need Ray's multi-node mode, and in it Ray 2.60 replaces 127.0.0.1 with the machine's address: the nodes
# listen there, behind token auth (a job's own single-node instance, without --address, stays on 127.0.0.1).
# Prometheus finds both nodes through /tmp/ray/prom_metrics_service_discovery.json (cluster/prometheus/).
set -euo pipefail
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
HEAD_CPUS=${HEAD_CPUS:-1}
WORKER_CPUS=${WORKER_CPUS:-1}
case "${1:-}" in
  start)
    unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # single-machine mode refuses a second node
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}  # Ray's default for new clusters, made explicit
    if [ "$RAY_AUTH_MODE" = token ]; then
      "$RAY" get-auth-token --generate >/dev/null  # `ray start` with token auth refuses to start without a token
    fi
    "$RAY" start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus="$HEAD_CPUS" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port=8265 --metrics-export-port=8080 \
      --disable-usage-stats
    "$RAY" start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" \
      --metrics-export-port=8081 --disable-usage-stats
    ;;
  stop)
    "$RAY" stop
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
