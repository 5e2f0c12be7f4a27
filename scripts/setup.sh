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
if [ "$extras" = "[dev]" ]; then
    # llama-cpp-python is the tests' reference for GGUF files and builds llama.cpp from its sdist. Its default build
    # is -march=native, which on an Intel CPU with AMX compiles llama.cpp's AMX kernels; inside VMs those fault at
    # `ldtilecfg` on every quantized GGUF and take the test run down (SIGSEGV). So: GGML_NATIVE off, this CPU's
    # vector extensions named one by one, AMX never (docs/export.md). A build that has AMX in it is rebuilt.
    llama_pin=$(grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | tr -d '"')
    if .venv/bin/python -c "import llama_cpp, sys; sys.exit('AMX' in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
        :
    else
        flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null) "
        cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
        if [ "$(uname -m)" = x86_64 ]; then
            for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 bmi2:BMI2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 \
                        avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
                case "$flags" in *" ${pair%%:*} "*) on=ON ;; *) on=OFF ;; esac
                cmake_args="$cmake_args -DGGML_${pair#*:}=$on"
            done
        fi
        echo "setup: building $llama_pin from its sdist (llama.cpp, the reference the GGUF tests read files with;"
        echo "       about 10 minutes on 2 cores, once) with CMAKE_ARGS=\"$cmake_args\""
        .venv/bin/python -m pip uninstall -y -q llama-cpp-python 2>/dev/null || true
        # the build prints nothing for minutes: say that it is still going; --no-cache-dir so that a wheel built
        # earlier with other flags is not reused
        started=$SECONDS
        ( while sleep 60; do echo "setup: still building llama-cpp-python ($(( (SECONDS - started) / 60 )) min)"; done ) &
        ticker=$!
        CMAKE_ARGS="$cmake_args" pip install --no-cache-dir "$llama_pin" || { kill $ticker; exit 1; }
        kill $ticker
    fi
fi
echo "setup: installing lmforge$extras"
pip install -e ".$extras"
command -v bwrap >/dev/null || echo "setup: note: bubblewrap is not installed, so the agents' Python tool will refuse to run model-written code (apt-get install bubblewrap; docs/prompting.md)"
echo "setup: done (.venv/bin/lmforge --help)"
