#!/usr/bin/env bash
# The Ollama template test renders each Modelfile TEMPLATE with Go's own text/template (Ollama
# is written in Go; no Ollama binary can be installed here): Debian's golang package. Does
# nothing when a go command is already there.
set -euo pipefail
if command -v go >/dev/null 2>&1; then
  exit 0
fi
bash "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh" golang "the Ollama template test"
