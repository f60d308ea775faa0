#!/usr/bin/env bash
# Before/after: the same micro-benchmarks and served encoder load on an older commit and on the
# working tree, interleaved round by round so that machine noise hits both alike.
#
#   benchmarks/before_after.sh OLD_COMMIT [ROUNDS] [MODEL_DIR_OR_BUILTIN ...]
#
# The old commit is checked out in a git worktree and its packages go first on PYTHONPATH (the
# environment stays this checkout's .venv). Results land in $OUT (default /tmp/before-after):
# micro-{before,after}-N.json (pytest-benchmark) and load-NAME-{v1,v2}-{before,after}-N.json
# (encoder_load.py). Servers listen on 127.0.0.1:18080 only.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: before_after.sh OLD_COMMIT [ROUNDS] [MODEL ...]}
rounds=${2:-2}
shift $(( $# > 1 ? 2 : 1 ))
models=("$@")
OUT=${OUT:-/tmp/before-after}
PY=$PWD/.venv/bin/python
tree=$OUT/tree
mkdir -p "$OUT"
[ -d "$tree" ] || git worktree add -q --detach "$tree" "$old"
OLD_PATH=$(printf "$tree/packages/%s/src:" server core protocols backend-hf backend-vllm)

pythonpath() { if [ "$1" = before ]; then echo "$OLD_PATH"; fi; }

for round in $(seq "$rounds"); do
  for v in before after; do
    root=$PWD; [ "$v" = before ] && root=$tree
    (cd "$root" && PYTHONPATH=$(pythonpath $v) "$PY" -m pytest -q -p no:randomly -o addopts="" \
        --rootdir="$root" --benchmark-only --benchmark-json="$OUT/micro-$v-$round.json" \
        benchmarks/micro/test_sse.py benchmarks/micro/test_v2_codec.py >/dev/null)
  done
done

for model in "${models[@]}"; do
  if [ -d "$model" ]; then src=(--model_dir "$model"); else src=(--model_id "$model"); fi
  name=$(basename "$model")
  for round in $(seq "$rounds"); do
    for v in before after; do
      PYTHONPATH=$(pythonpath $v) "$PY" -m lmserve_server "${src[@]}" --model_name model \
          --http_port 18080 --enable_grpc false >"$OUT/server-$v.log" 2>&1 &
      pid=$!
      for _ in $(seq 180); do
        curl -sf http://127.0.0.1:18080/v2/health/ready >/dev/null && break; sleep 1
      done
      for proto in v1 v2; do
        (cd benchmarks && "$PY" encoder_load.py --base-url http://127.0.0.1:18080 --model model \
            --protocol $proto --concurrency 8 --requests 1500 --warmup 100 \
            --json-out "$OUT/load-$name-$proto-$v-$round.json" >/dev/null)
      done
      kill -INT $pid; wait $pid || true
    done
  done
done
echo "results in $OUT"
