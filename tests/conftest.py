"""Test-wide setup: Triton kernels run under the CPU interpreter unless a GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any Triton kernel module is imported (mhc_kernels imports them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")
