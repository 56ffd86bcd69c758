"""mhc_kernels: manifold-constrained hyper-connections (mHC) with fused Triton Sinkhorn-Knopp.

Importable without Triton: the PyTorch reference is the CPU path and the specification.
"""

from .sinkhorn import sinkhorn_knopp

__all__ = ["sinkhorn_knopp"]
__version__ = "0.1.0"
