#!/usr/bin/env bash
# Fetch, into .whl/ (git-ignored), the wheels that benchmarks/gpu_check.sh installs on the offline
# device machine (Python 3.12, x86-64): what the GPU tests import that its image lacks or holds too old.
# The image has torch, triton, numpy, pytest, safetensors, tokenizers, jinja2, huggingface-hub and
# transformers 5.17 (/work/.library/device/KINDS.md); the oracle tests (tests/reference.py) need the
# step3p7 model of transformers >= 5.23, whose own requirements the image meets; the structured-output
# tests need llguidance and jsonschema (with the four packages jsonschema imports).
# Run from anywhere, on a machine that reaches PyPI; the call to the device then carries [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 llguidance==1.9.1 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py attrs)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
du -ch .whl/*.whl
