#!/usr/bin/env bash
# Install llama-cpp-python built for AVX2. Its default native build segfaults on
# quantized models on these CPUs (they report AVX-512/AMX). The wheel is cached under a
# key that includes the build flags, so a wheel from a native build is never reused.
set -euo pipefail
PY=${1:-.venv/bin/python}
VERSION=0.3.36
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
KEY=$(printf '%s %s' "$VERSION" "$FLAGS" | sha256sum | cut -c1-12)
DIR="${CONVCORE_CACHE:-$HOME/.cache/convcore}/wheels/llama-cpp-python-$KEY"
if ! ls "$DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION for AVX2 (about 5 minutes, once)"
  mkdir -p "$DIR"
  CMAKE_ARGS="$FLAGS" "$PY" -m pip wheel --no-deps --no-cache-dir "llama-cpp-python==$VERSION" -w "$DIR.tmp"
  mv "$DIR.tmp"/*.whl "$DIR"/ && rmdir "$DIR.tmp"
fi
"$PY" -m pip install -q --force-reinstall --no-deps "$DIR"/llama_cpp_python-*.whl
"$PY" -m pip install -q "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
