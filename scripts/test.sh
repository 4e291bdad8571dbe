#!/usr/bin/env bash
# Runs the whole test suite (real-model tests included). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
bash "$root/scripts/install_chromium.sh"
bash "$root/scripts/install_go.sh"
bash "$root/scripts/install_llama_cpp.sh"
bash "$root/scripts/install_postgres.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
