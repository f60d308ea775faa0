#!/usr/bin/env bash
# lmserve in front of a Triton server: export the encoder to an ONNX model repository, let
# Triton run the forward pass, let lmserve tokenize, post-process and speak V1/V2/OpenAI.
# Needs a `tritonserver` on PATH (NVIDIA's container image has one). Then run any client:
#   uv run --no-sync python examples/embeddings.py --url http://127.0.0.1:8080 --model minilm
set -euo pipefail
REPO=${REPO:-./model_repository}

# 1. The model repository (ONNX checked against PyTorch; the tensor names are printed).
uv run lmserve export --model_id all-minilm-l6-v2 --model_name minilm \
  --tensor_input_names input_ids,attention_mask --output "$REPO"

# 2. Triton on it (HTTP 8000, gRPC 8001).
tritonserver --model-repository "$REPO" --http-port 8000 --grpc-port 8001 &
TRITON=$!
trap 'kill $TRITON' EXIT

# 3. lmserve as the transformer: only the tokenizer is loaded, torch is never imported.
uv run lmserve serve --model_id all-minilm-l6-v2 --model_name minilm \
  --predictor_host 127.0.0.1:8001 --predictor_protocol grpc-v2 \
  --tensor_input_names input_ids,attention_mask
