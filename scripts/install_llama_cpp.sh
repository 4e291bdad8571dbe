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
# 3. llama.cpp's own server (llama-server) from the same source, for afinar's llama.cpp engine
#    (chat, generate, eval and serve answer through it): built once per CPU kind (about 5 minutes
#    on 2 cores; ggml is compiled for this CPU), kept in ~/.cache/afinar-build so a new venv or
#    clone on this machine copies it, then placed in .venv/share/llama.cpp-VERSION/bin/.
#    Configured without the web UI, without downloads (no prebuilt UI, no curl) and without TLS.
# `--engine` does steps 2 and 3 only (what the llama.cpp engine needs; scripts/demo.sh).
# Each step does nothing when already done; nothing is fetched at test or run time.
set -euo pipefail
engine_only=0
[ "${1:-}" = "--engine" ] && engine_only=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"
want="0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz on PyPI: the converter must come from exactly the
# source the runtime was built from.
sdist_sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

if [ "$engine_only" = 0 ] && \
  ! "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$want')" >/dev/null 2>&1
then
  echo "[afinar] building llama-cpp-python==$want (compiles llama.cpp; a few minutes, once)" >&2
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$venv/bin/pip" install -q \
    --disable-pip-version-check "llama-cpp-python==$want"
fi

share="$venv/share/llama.cpp-$want"
work=""
cleanup() { if [ -n "$work" ]; then rm -rf "$work"; fi; }
trap cleanup EXIT
top="llama_cpp_python-$want"
src="$top/vendor/llama.cpp"

# The pinned source distribution, downloaded once per call that needs it, checked by sha256.
fetch_sdist() {
  if [ -n "$work" ]; then return; fi
  work="$(mktemp -d)"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-binary :all: --no-deps \
    -d "$work" "llama-cpp-python==$want"
  sdist="$work/llama_cpp_python-$want.tar.gz"
  got="$(sha256sum "$sdist" | cut -d' ' -f1)"
  if [ "$got" != "$sdist_sha256" ]; then
    echo "[afinar] $sdist has sha256 $got, expected $sdist_sha256: not the pinned source" >&2
    exit 1
  fi
}

place_converter() {
  echo "[afinar] placing llama.cpp's converter from llama-cpp-python==$want's source in $share" >&2
  fetch_sdist
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
  cp -r "$work/$src/LICENSE" "$work/$src/convert_hf_to_gguf.py" "$work/$src/convert_lora_to_gguf.py" \
    "$work/$src/conversion" "$work/$src/gguf-py" "$stage/"
  cat > "$stage/afinar-source.json" <<EOF2
{"llama_cpp_python": "$want", "llama_cpp_commit": "${commit:-unknown}", "gguf_py": "$gguf_py",
 "sdist": "llama_cpp_python-$want.tar.gz", "sdist_sha256": "$sdist_sha256"}
EOF2
  mkdir -p "$venv/share"
  keep_bin=""
  if [ -d "$share/bin" ]; then keep_bin="$work/bin"; mv "$share/bin" "$keep_bin"; fi
  rm -rf "$share"
  mv "$stage" "$share"
  if [ -n "$keep_bin" ]; then mv "$keep_bin" "$share/bin"; fi
}

# ggml is compiled for this CPU (GGML_NATIVE): the build cache is keyed by the source and by
# the CPU's flags, so a machine of another kind builds its own.
build_server() {
  flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | sort | tr '\n' ' ' || true)"
  key="${sdist_sha256:0:16}-$(printf '%s' "$flags" | sha256sum | cut -c1-12)"
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/afinar-build/llama-server-$key"
  if [ ! -x "$cache/llama-server" ]; then
    echo "[afinar] building llama-server from llama-cpp-python==$want's llama.cpp (about 5 minutes on 2 cores, once per machine kind)" >&2
    fetch_sdist
    tar -xzf "$sdist" -C "$work" "$src"
    cmake -S "$work/$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_CCACHE=OFF \
      $(command -v ninja >/dev/null && echo -G Ninja) >"$work/cmake.log" 2>&1 \
      || { tail -20 "$work/cmake.log" >&2; exit 1; }
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
      || { tail -30 "$work/build.log" >&2; exit 1; }
    mkdir -p "$cache.partial"
    cp "$work/build/bin/llama-server" "$cache.partial/"
    rm -rf "$cache"
    mv "$cache.partial" "$cache"
  fi
  mkdir -p "$share/bin"
  cp "$cache/llama-server" "$share/bin/.llama-server.partial"
  mv "$share/bin/.llama-server.partial" "$share/bin/llama-server"
}

if [ ! -f "$share/afinar-source.json" ]; then
  place_converter
fi
if [ ! -x "$share/bin/llama-server" ]; then
  command -v cmake >/dev/null || bash "$root/scripts/apt_install.sh" cmake "building llama-server"
  command -v c++ >/dev/null || bash "$root/scripts/apt_install.sh" g++ "building llama-server"
  build_server
fi
