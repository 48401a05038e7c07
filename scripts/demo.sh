#!/usr/bin/env bash
# A tour on a tiny model built here (random weights, a SentencePiece tokenizer trained on
# the text shipped in convcore/testing/data): convert it to every installed format and
# run each result in its own runtime.
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
echo "== building a tiny llama (hidden 256, 2 layers, vocab 1024) in $OUT/tiny-llama"
python -c "from convcore.testing import make_tiny_model; make_tiny_model('$OUT/tiny-llama', 'llama', dtype='bf16')" 2>/dev/null
convcore inspect "$OUT/tiny-llama"
have() { convcore formats --json | python -c "import json,sys; sys.exit(0 if '$1' in {f['format'] for f in json.load(sys.stdin)} else 1)"; }

echo "== hf -> hf f16"
convcore run "$OUT/tiny-llama" -o "$OUT/tiny-f16" --to hf --dtype f16 -q
convcore infer "$OUT/tiny-f16" --tokens 1,20,30,40 2>/dev/null
if have gguf; then
  echo "== hf -> gguf q4_k_m, run in llama.cpp"
  convcore run "$OUT/tiny-llama" -o "$OUT/tiny-q4_k_m.gguf" --to gguf --quant q4_k_m -q
  convcore inspect "$OUT/tiny-q4_k_m.gguf"
  convcore compare "$OUT/tiny-llama" "$OUT/tiny-q4_k_m.gguf" 2>/dev/null
fi
if have mlx; then
  echo "== hf -> mlx int4-g64, run in mlx-lm"
  convcore run "$OUT/tiny-llama" -o "$OUT/tiny-mlx-int4" --to mlx --quant int4-g64 -q
  convcore compare "$OUT/tiny-llama" "$OUT/tiny-mlx-int4" 2>/dev/null
fi
if have npz; then
  echo "== hf -> npz int8-row"
  convcore run "$OUT/tiny-llama" -o "$OUT/tiny-npz" --to npz --quant int8-row -q
  convcore validate "$OUT/tiny-npz"
fi
if have parquet; then
  echo "== hf -> parquet int8-row (a table duckdb or polars can query), and back"
  convcore run "$OUT/tiny-llama" -o "$OUT/tiny-int8.parquet" --to parquet --quant int8-row -q
  convcore inspect "$OUT/tiny-int8.parquet"
  convcore run "$OUT/tiny-int8.parquet" -o "$OUT/tiny-from-parquet" --to hf -q
fi
if have onnx; then
  echo "== hf -> onnx int4-b32 (MatMulNBits), run in onnxruntime"
  convcore run "$OUT/tiny-llama" -o "$OUT/tiny-onnx-int4" --to onnx --quant int4-b32 -q
  convcore validate "$OUT/tiny-onnx-int4"
  convcore compare "$OUT/tiny-llama" "$OUT/tiny-onnx-int4" 2>/dev/null
fi
if have gguf && have mlx; then
  echo "== a fleet: convcore batch (4 jobs, 2 at a time), its registry, a rerun that skips them"
  cat > "$OUT/fleet.toml" <<EOF
[batch]
out = "fleet"
[[model]]
id = "tiny"
source = "tiny-llama"
[[target]]
to = "gguf"
quant = ["q8_0", "q4_k_m"]
[[target]]
to = "mlx"
quant = ["int4-g64", "int8-g64"]
EOF
  convcore batch "$OUT/fleet.toml" --jobs 2 -q
  convcore registry list "$OUT/fleet/model_registry.json"
  convcore batch "$OUT/fleet.toml" -q | tail -1
fi
echo "== plugins"
convcore plugins
echo "demo done: outputs in $OUT/"
