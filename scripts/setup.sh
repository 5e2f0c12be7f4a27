#!/usr/bin/env bash
# Set up .venv with lmforge; `--dev` adds the test tools. Safe to run again (fast when done).
#
#   PYTHON=python3.12 bash scripts/setup.sh        # choose the interpreter (default python3.11, else python3)
#   LMFORGE_TORCH='torch==2.5.1' bash scripts/setup.sh   # another torch build (e.g. a CUDA one on a GPU box)
#
# torch is installed first, pinned: asking pip for an unpinned torch pulls the newest CUDA build
# (several GB) even on a CPU-only machine. pyproject.toml states the supported range.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="[rag,serve,export]"  # the quickstart indexes its corpus, serves its fine-tuned model and exports it to GGUF
[ "${1:-}" = "--dev" ] && extras="[dev]"
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
torch_spec=${LMFORGE_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $torch_spec"
    pip install "$torch_spec"
fi
echo "setup: installing lmforge$extras"
pip install -e ".$extras"
echo "setup: done (.venv/bin/lmforge --help)"
