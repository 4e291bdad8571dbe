#!/usr/bin/env bash
# The main job: fine-tune the embedded SmolLM2-135M-Instruct on the bundled Spanish support-triage
# dataset, then answer held-out prompts with the base and the tuned model side by side.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/afinar" demo "$@"
