#!/usr/bin/env bash
# The demo: a small Self-Instruct job on the embedded models (SmolLM2-135M
# generates, MiniLM + FAISS keeps only diverse instructions), run by
# `autodidact run` on an in-process stack over real gRPC. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

rm -rf .demo && mkdir -p .demo
echo "== autodidact run examples/self_instruct.yaml (generator, dedup and coordinator in this process)"
$BIN/autodidact run examples/self_instruct.yaml --data-dir .demo/state --out .demo/dataset --log-level warning

echo
echo "== the new instructions, with one instance each (.demo/dataset/instances.jsonl)"
$BIN/python - <<'PY'
import json
for line in open(".demo/dataset/instances.jsonl"):
    row = json.loads(line)
    print(f"* {row['instruction']}")
    if row["input"]:
        print(f"    input:  {row['input'][:150]!r}")
    print(f"    output: {row['output'][:150]!r}")
PY
echo
echo "== why candidates were dropped (.demo/dataset/lineage.jsonl)"
$BIN/python - <<'PY'
import json
for line in open(".demo/dataset/lineage.jsonl"):
    row = json.loads(line)
    if not row["kept"]:
        drop = next(d for d in row["lineage"] if not d["kept"])
        print(f"- {row['data'].get('instruction', '')[:70]!r}: {drop['stage']}/{drop['filter']}: {drop.get('reason', '')}")
PY
