"""Where the kernel tests run their Triton kernels, and in which dtypes: on a CUDA GPU (compiled
kernels, which need CUDA tensors) when there is one, else on the CPU under TRITON_INTERPRET=1 (set
in conftest.py). bf16 only on a GPU: the interpreter computes in numpy, which has no bf16.

Tests build their inputs on the CPU with seeded generators (the same values everywhere), run the
PyTorch twins there, and move the kernel's inputs with `on_kernel_device`; results come back with
`.cpu()`. A plain module rather than conftest.py, which pytest does not mean to be imported."""

import torch

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def on_kernel_device(*tensors):
    """The tensors on KERNEL_DEVICE (the same objects on the CPU); None stays None. One tensor in,
    one out; several in, a tuple out."""
    moved = tuple(None if t is None else t.to(KERNEL_DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved
