"""mhc_kernels: manifold-constrained hyper-connections (mHC) with fused Triton Sinkhorn-Knopp.

Importable without Triton: the PyTorch reference is the CPU path and the specification.
"""

from .layer import HyperConnection, MHCConfig, MHCLayer, collapse_streams, expand_streams
from .metrics import amax_gain
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "HyperConnection",
    "MHCConfig",
    "MHCLayer",
    "amax_gain",
    "collapse_streams",
    "expand_streams",
    "sinkhorn_knopp",
]
__version__ = "0.1.0"
