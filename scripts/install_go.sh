#!/usr/bin/env bash
# The Ollama template test renders each Modelfile TEMPLATE with Go's own text/template (Ollama
# is written in Go; no Ollama binary can be installed here): Debian's golang package. Does
# nothing when a go command is already there.
set -euo pipefail
if command -v go >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "[afinar] go is missing and this user cannot install it: apt-get install golang" >&2; exit 1; }
  sudo="sudo"
fi
echo "[afinar] installing Debian's golang for the Ollama template test" >&2
$sudo apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq golang >/dev/null
