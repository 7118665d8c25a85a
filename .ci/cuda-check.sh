#!/usr/bin/env bash
# Checks that the `cuda` feature compiles, on a machine without a GPU: nvcc and the CUDA headers
# come from PyPI's wheels in a virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CANDLEWICK_CUDA_VENV:-$PWD/target/cuda-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvcc nvidia-cuda-cccl
cuda_root=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export PATH="$cuda_root/bin:$PATH"
export CUDA_ROOT="$cuda_root"
# No GPU to ask: name the generation (H100/H200), and the newest toolkit cudarc knows.
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13040
nvcc --version | tail -1
cargo check -p candlewick-server --features cuda --target-dir target/cuda
