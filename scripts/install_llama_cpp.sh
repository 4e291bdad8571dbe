#!/usr/bin/env bash
# Real llama.cpp for GGUF export, from ONE pinned source (llama-cpp-python 0.3.36's source
# distribution, which vendors llama.cpp):
# 1. llama-cpp-python, which has no Linux wheel on PyPI and compiles llama.cpp from source (about
#    4 minutes on 2 cores; pip keeps the built wheel in its cache, so a new venv reuses it): the
#    runtime that quantises and verifies exports. Only the Python bindings are built.
# 2. llama.cpp's own HF -> GGUF converter from the same source: convert_hf_to_gguf.py, its
#    conversion/ package, convert_lora_to_gguf.py, the matching gguf-py and llama.cpp's licence,
#    into .venv/share/llama.cpp-VERSION/ (afinar/export/convert.py runs it in a child process).
#    It lives in the venv, beside the runtime it must match: a new venv gets both anew, and tests
#    that point AFINAR_HOME elsewhere still find it.
# Each step does nothing when already done; nothing is fetched at test or run time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"
want="0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz on PyPI: the converter must come from exactly the
# source the runtime was built from.
sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

if ! "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$want')" >/dev/null 2>&1
then
  echo "[afinar] building llama-cpp-python==$want (compiles llama.cpp; a few minutes, once)" >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$venv/bin/pip" install -q \
    --disable-pip-version-check "llama-cpp-python==$want"
fi

share="$venv/share/llama.cpp-$want"
if [ -f "$share/afinar-source.json" ]; then
  exit 0
fi
echo "[afinar] placing llama.cpp's converter from llama-cpp-python==$want's source in $share" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download -q --disable-pip-version-check --no-binary :all: --no-deps \
  -d "$work" "llama-cpp-python==$want"
sdist="$work/llama_cpp_python-$want.tar.gz"
got="$(sha256sum "$sdist" | cut -d' ' -f1)"
if [ "$got" != "$sdist_sha256" ]; then
  echo "[afinar] $sdist has sha256 $got, expected $sdist_sha256: not the pinned source" >&2
  exit 1
fi
top="llama_cpp_python-$want"
src="$top/vendor/llama.cpp"
tar -xzf "$sdist" -C "$work" "$top/CHANGELOG.md" "$src/LICENSE" "$src/convert_hf_to_gguf.py" \
  "$src/convert_lora_to_gguf.py" "$src/conversion" "$src/gguf-py/gguf" "$src/gguf-py/LICENSE" \
  "$src/gguf-py/pyproject.toml"
# The llama.cpp commit this release vendors, as its changelog says ("## [0.3.36]" and the
# "update llama.cpp to ggml-org/llama.cpp@COMMIT" line under it).
commit="$(awk -v v="## [$want]" '$0 == v {found=1; next} found && /^## \[/ {exit}
  found && match($0, /llama\.cpp@[0-9a-f]+/) {print substr($0, RSTART + 10, RLENGTH - 10); exit}' \
  "$work/$top/CHANGELOG.md")"
gguf_py="$(sed -n 's/^version = "\(.*\)"/\1/p' "$work/$src/gguf-py/pyproject.toml" | head -1)"
stage="$work/stage"
mkdir -p "$stage"
mv "$work/$src/LICENSE" "$work/$src/convert_hf_to_gguf.py" "$work/$src/convert_lora_to_gguf.py" \
  "$work/$src/conversion" "$work/$src/gguf-py" "$stage/"
cat > "$stage/afinar-source.json" <<EOF
{"llama_cpp_python": "$want", "llama_cpp_commit": "${commit:-unknown}", "gguf_py": "$gguf_py",
 "sdist": "llama_cpp_python-$want.tar.gz", "sdist_sha256": "$sdist_sha256"}
EOF
mkdir -p "$venv/share"
rm -rf "$share"
mv "$stage" "$share"
