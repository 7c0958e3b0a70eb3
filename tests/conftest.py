"""Triton kernels run in its interpreter on machines without a GPU. Triton reads TRITON_INTERPRET when
its own library functions (tl.sum, tl.sigmoid, ...) are defined, i.e. at its first import, which some
other import may trigger before tests/test_kernels.py runs: so it is set here, before any test module.
With CUDA the kernels are compiled and run on the GPU: tests/kernel_env.py says where and in which dtypes."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
