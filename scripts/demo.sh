#!/usr/bin/env bash
# The main job on embedded data: build a tiny base and three adapters, register them,
# merge them with TIES, quantize the merge to NF4, export it as GGUF, and show the catalog
# and lineage. Safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export ADAPTR_HOME="${ADAPTR_HOME:-$ROOT/.demo/home}"
FIX="$ROOT/.demo/fixtures"

if [ ! -f "$FIX/base/config.json" ]; then
  echo "==> generating a tiny Llama base and three LoRA adapters in $FIX"
  python -c "from adaptr.testing import make_demo_set; make_demo_set('$FIX', tokenizer=True)"
fi

adaptr init
have() { adaptr show "$1" >/dev/null 2>&1; }
have tiny-llama || adaptr base add "$FIX/base" --name tiny-llama --tag demo
for a in chat-r4 code-r8 math-r16-rslora; do
  have "$a" || adaptr adapter add "$FIX/adapters/$a" --base tiny-llama --tag demo
done

# Merges and quantizations with an existing recipe are reused, not recomputed: rerunning is free.
echo "==> TIES merge of the three adapters"
adaptr merge --base tiny-llama --adapter chat-r4 --adapter code-r8 --adapter math-r16-rslora \
  --strategy ties --density 0.5 --seed 0 --name demo-ties

echo "==> NF4 (double quantization) of the TIES merge"
adaptr quantize demo-ties --method nf4 --double-quant --name demo-ties-nf4

echo "==> GGUF (q8_0) of the TIES merge for llama.cpp"
adaptr export demo-ties --format gguf --quant q8_0 --out "$ROOT/.demo/dist/demo-ties-q8_0.gguf"

echo "==> catalog"
adaptr ls
echo "==> lineage"
if have demo-ties; then adaptr lineage demo-ties; else adaptr lineage tiny-llama; fi
adaptr verify

echo "==> the REST API: adaptr serve for a moment, a read token, the catalog through HTTP"
PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
TOKEN="$(adaptr token create --scope read --expires 1h --name demo --json | python -c 'import json, sys; print(json.load(sys.stdin)["token"])')"
adaptr serve --port "$PORT" --log-level warning &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/v1/healthz')" 2>/dev/null && break
  sleep 0.2
done
python - "$PORT" "$TOKEN" <<'PY'
import json, sys, urllib.request

port, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(
    f"http://127.0.0.1:{port}/v1/artifacts?kind=merged", headers={"Authorization": f"Bearer {token}"}
)
body = json.load(urllib.request.urlopen(req))
for a in body["items"]:
    print(f"GET /v1/artifacts?kind=merged -> {a['ref']} {a['content_hash'][:12]} ({a['size_bytes']} bytes)")
PY
kill "$SERVER" && wait "$SERVER" 2>/dev/null || true
trap - EXIT

echo "==> the same as a pipeline, as CI runs it (every step is reused), plus a Hugging Face export"
cat > "$ROOT/.demo/pipeline.yaml" <<'YAML'
version: 1
steps:
  - id: merged
    merge: {base: tiny-llama, adapters: [chat-r4, code-r8, math-r16-rslora], strategy: ties, density: 0.5, name: demo-ties}
  - id: nf4
    quantize: {input: merged, method: nf4, double_quant: true, name: demo-ties-nf4}
  - id: gguf
    export: {input: merged, format: gguf, quant: q8_0, out: dist/demo-ties-q8_0.gguf}
  - id: publish
    export: {input: merged, format: hf, out: dist/demo-ties-hf}
YAML
adaptr run "$ROOT/.demo/pipeline.yaml"
adaptr verify-export "$ROOT/.demo/dist/demo-ties-hf"
echo "==> the export's manifest (first lines)"
head -n 20 "$ROOT/.demo/dist/demo-ties-hf/adaptr-manifest.json"
