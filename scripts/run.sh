#!/usr/bin/env bash
# The project's main job on a fresh machine: install what is missing, start tritonserver with the
# default model (converted once), start the OpenAI-compatible front beside it (port 9000,
# `--no-openai` turns it off), stream one demo request (answer + reasoning side by side), then
# keep serving until Ctrl-C. Extra arguments go to `python -m launcher`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec python3 -m launcher --demo "$@"
