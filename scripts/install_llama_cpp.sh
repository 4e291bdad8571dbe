#!/usr/bin/env bash
# Real llama.cpp for the GGUF export tests and for `afinar export --verify`: llama-cpp-python,
# which has no Linux wheel on PyPI and compiles llama.cpp from source (about 4 minutes on 2 cores;
# pip keeps the built wheel in its cache, so a new venv reuses it). Does nothing when the pinned
# version is already importable. Only the Python bindings are built (no llava/multimodal tools).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
want="0.3.36"
if "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$want')" >/dev/null 2>&1; then
  exit 0
fi
echo "[afinar] building llama-cpp-python==$want (compiles llama.cpp; a few minutes, once)" >&2
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$root/.venv/bin/pip" install -q \
  --disable-pip-version-check "llama-cpp-python==$want"
