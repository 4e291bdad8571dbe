#!/usr/bin/env bash
# The main job: fine-tune the embedded SmolLM2-135M-Instruct on the bundled Spanish support-triage
# dataset, then answer held-out prompts with the base and the tuned model side by side.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
# The llama.cpp engine answers the evaluation (its converter and llama-server, built once).
bash "$root/scripts/install_llama_cpp.sh" --engine
exec "$root/.venv/bin/afinar" demo "$@"
