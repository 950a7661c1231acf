#!/usr/bin/env bash
# The demo: start the local stack (`autodidact up`), wait until the generator
# reports SERVING, sample from the embedded model over gRPC, stop the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

$BIN/autodidact up --log-format console --metrics-port 0 2> .demo-stack.log &
stack=$!
trap 'kill -TERM $stack 2>/dev/null; wait $stack 2>/dev/null || true' EXIT

echo "== autodidact up (pid $stack); log in .demo-stack.log"
echo "== three samples from the embedded SmolLM2-135M-Instruct, over gRPC"
$BIN/autodidact generate --wait 120 --chat -n 3 --seed 7 --max-tokens 80 --temperature 0.8 \
  "Write one new instruction for a task an assistant could help with, like 'Summarize this article in two sentences.'"
echo
echo "== the same call again repeats exactly (same seed): first sample only"
$BIN/autodidact generate --chat -n 1 --seed 7 --max-tokens 80 --temperature 0.8 \
  "Write one new instruction for a task an assistant could help with, like 'Summarize this article in two sentences.'"
