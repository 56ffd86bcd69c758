"""MHCLayer: a manifold-constrained hyper-connection around any residual branch (paper Eq. 7-9).

For streams ``x: (..., n, C)`` and a residual branch ``F: (..., C) -> (..., C)``::

    v      = vec(x)                          (..., n*C), in the coefficient dtype (float32)
    r      = sqrt(mean(v^2) + rms_eps)       one RMS over all n*C features
    H~     = alpha * (v @ phi) / r + b       phi: (n*C, n^2 + 2n) packed [pre | post | res]
    H_pre  = sigmoid(H~_pre)                 (..., n)
    H_post = 2 * sigmoid(H~_post)            (..., n)
    H_res  = sinkhorn_knopp(H~_res)          (..., n, n); constraint="none": H~_res as is
    out_i  = sum_j H_res[i, j] * x_j + H_post[i] * F(sum_j H_pre[j] * x_j)

``alpha`` multiplies only the dynamic term, one scalar per part (pre, post, res). The division by
``r`` after the matmul is the paper's reordering of RMSNorm (its weight folds into ``phi``).

Initialisation ``"identity"`` (for wrapping pretrained models):

* ``b_pre = logit(1/n)`` so H_pre = 1/n each (sums to 1), ``b_post = 0`` so H_post = 1;
* ``b_res = gap * I`` with ``gap = log(9 (n - 1))``: H_res is symmetric, hence exactly doubly
  stochastic, with 0.9 on the diagonal. A finite gap keeps exp from underflowing and leaves the
  Sinkhorn Jacobian well away from zero (trap (a) in FACTS.md §1);
* ``phi`` random with its n per-stream blocks summing to zero (``sum_i phi_i = 0``), ``alpha = 0.01``.
  For identical streams ``v @ phi = sum_i x phi_i = 0``, so the dynamic part vanishes and the layer
  returns exactly ``x + F(x)`` in every stream; yet ``phi`` and ``alpha`` are non-zero, so neither
  factor of the product ``alpha * phi`` blocks the other's gradient.

What identical streams cannot do, whatever the initialisation: a row-stochastic H_res applied to n
equal streams is the identity map, so the gradient reaching the H_res logits is exactly zero, and the
dynamic term (hence ``alpha``) is zero too. Right after expand_streams, at the first step of a wrapped
pretrained model, ``b_pre``, ``b_post`` and the pre/post blocks of ``phi`` learn; the per-stream
gradients of H_post separate the streams at the first update, and from then on every parameter
receives gradient. With different streams every parameter gets gradient at once (tested).

Initialisation ``"paper"``: the paper states only alpha = 0.01. Our choice: ``phi ~ N(0, 1/(n C))``
(unconstrained) and ``b = 0``, i.e. H_pre = 1/2, H_post = 1 and H_res = uniform 1/n at the start.

With ``constraint="none"`` (unconstrained hyper-connections) the static part of H_res is the
identity, ``b_res = I``, under either initialisation, as in the hyper-connections paper.

Streams persist from the first wrapped layer to the last: create them once with
:func:`expand_streams` and collapse them once with :func:`collapse_streams` (trap (b), FACTS.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import recompute
from ._host import rows, shaped
from .coefficients import epilogue, projection
from .sinkhorn import BACKENDS
from .sinkhorn.reference import ORDER_DIMS
from .streams import merge, pre_mix

INITS = ("identity", "paper")
CONSTRAINTS = ("sinkhorn", "none")
COEFF_DTYPES = (torch.float32, torch.float64)


@dataclass
class MHCConfig:
    """Configuration of one mHC site.

    Attributes:
        n_streams: expansion rate n (number of residual streams), >= 1; the paper uses 4.
        sinkhorn_iters: Sinkhorn-Knopp iterations for H_res, >= 1; the paper uses 20.
        order: ``"col_row"`` (paper: columns then rows, rows exact) or ``"row_col"``.
        alpha_init: initial value of the three gates alpha_pre, alpha_post, alpha_res.
        init: ``"identity"`` (exactly x + F(x) for identical streams) or ``"paper"``.
        constraint: ``"sinkhorn"`` (mHC) or ``"none"`` (unconstrained hyper-connections).
        eps: Sinkhorn normaliser epsilon.
        rms_eps: added to the mean square before the square root of the RMS.
        coeff_dtype: dtype of the coefficient path (float32 or float64), whatever the streams' dtype.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for every kernel of the layer. ``auto``:
            on CUDA the fused Triton Sinkhorn, stream and coefficient-epilogue kernels, and the
            fused projection where it was measured faster (n*C >= 4096, n <= 4:
            :func:`mhc_kernels.coefficients.triton_by_default`; else cuBLAS); ``triton`` every
            fused kernel; elsewhere PyTorch.
        identity_gap: diagonal logit gap of H_res under ``init="identity"``; ``None`` picks
            ``log(9 (n - 1))`` (diagonal 0.9).
        recompute: keep one stream input per ``recompute_block`` connections for backward and
            rebuild the others there by re-running the merges (paper §4.3.2): less activation
            memory for one more merge per rebuilt stream.
        recompute_block: with ``recompute``, the number of consecutive connections that share one
            kept stream input (the paper's L_r): the others are rebuilt in backward from it
            (:mod:`mhc_kernels.recompute`). 1 keeps every connection's stream input (only the
            first connection's, when made by :func:`expand_streams`, shrinks to its source).
        fused_backward: compute the gradient of the connection's stream input in one pass
            (:func:`mhc_kernels.streams.stream_grad`: the pre-mix's, the merge's and the
            projection's terms together) instead of three stream tensors that autograd adds: about
            12 instead of 22 stream tensors of memory traffic per connection, forward and
            backward (benchmarks/README.md). Same gradients up to summation order; works with
            either backend and with ``recompute``; eager only (under torch.compile the layer runs
            as without it), and gradients of gradients are refused. Off by default: on an H200
            it cut the bf16 block's GPU time by 6-9% (replayed as CUDA graphs), but the eager
            layer with it was no faster (one connection 0.7-1.1x; the step is bound by the
            host's dispatch, benchmarks/README.md).
    """

    n_streams: int = 4
    sinkhorn_iters: int = 20
    order: str = "col_row"
    alpha_init: float = 0.01
    init: str = "identity"
    constraint: str = "sinkhorn"
    eps: float = 1e-12
    rms_eps: float = 1e-6
    coeff_dtype: torch.dtype = torch.float32
    backend: str = "auto"
    identity_gap: float | None = None
    recompute: bool = False
    recompute_block: int = 1
    fused_backward: bool = False

    def __post_init__(self):
        def check(name, ok, allowed):
            if not ok:
                value = getattr(self, name)
                raise ValueError(f"MHCConfig.{name} must be {allowed}, got {value!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        check("n_streams", is_int(self.n_streams) and self.n_streams >= 1, "an integer >= 1")
        check(
            "sinkhorn_iters",
            is_int(self.sinkhorn_iters) and self.sinkhorn_iters >= 1,
            "an integer >= 1",
        )
        check("order", self.order in ORDER_DIMS, f"one of {tuple(ORDER_DIMS)}")
        check("alpha_init", math.isfinite(self.alpha_init), "a finite float")
        check("init", self.init in INITS, f"one of {INITS}")
        check("constraint", self.constraint in CONSTRAINTS, f"one of {CONSTRAINTS}")
        check("eps", self.eps >= 0, "a float >= 0")
        check("rms_eps", self.rms_eps >= 0, "a float >= 0")
        check("coeff_dtype", self.coeff_dtype in COEFF_DTYPES, "torch.float32 or torch.float64")
        check("backend", self.backend in BACKENDS, f"one of {BACKENDS}")
        check("recompute", isinstance(self.recompute, bool), "True or False")
        check("fused_backward", isinstance(self.fused_backward, bool), "True or False")
        check(
            "recompute_block",
            is_int(self.recompute_block) and self.recompute_block >= 1,
            "an integer >= 1",
        )
        check(
            "identity_gap",
            self.identity_gap is None or math.isfinite(self.identity_gap),
            "None or a finite float",
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def expand_streams(x: torch.Tensor, n: int) -> torch.Tensor:
    """Create the n-stream state once, before the first wrapped layer: ``(..., C) -> (..., n, C)``.

    Example:
        >>> expand_streams(torch.randn(2, 8), 4).shape
        torch.Size([2, 4, 8])
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return recompute.expand(x, n)  # marked with x for a recomputing first connection


def collapse_streams(x: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Collapse the streams once, after the last wrapped layer: ``(..., n, C) -> (..., C)``.

    ``reduce`` is ``"mean"`` (default: identical streams collapse to themselves) or ``"sum"``.
    """
    if reduce == "mean":
        return x.mean(dim=-2)
    if reduce == "sum":
        return x.sum(dim=-2)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


class HyperConnection(nn.Module):
    """The mHC connection of one residual site, without its branch: coefficients and mixing.

    Use it where the branch must stay where it is in a pretrained module tree (so its
    ``state_dict`` keys and LoRA target names do not move): ``connect(x, branch)`` applies the
    connection around any callable ``branch``. :class:`MHCLayer` is this plus an owned branch.

    Args:
        dim: C, the width of one stream.
        config: an :class:`MHCConfig` (defaults when omitted); keyword arguments override fields.
    """

    def __init__(self, dim: int, config: MHCConfig | None = None, **overrides):
        super().__init__()
        unknown = set(overrides) - set(MHCConfig.field_names())
        if unknown:
            raise TypeError(f"unknown MHCLayer options {sorted(unknown)}")
        config = MHCConfig(**{**(config or MHCConfig()).__dict__, **overrides})
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self.dim = dim
        self.config = config
        n = config.n_streams
        width = n * n + 2 * n
        self.phi = nn.Parameter(torch.empty(n * dim, width, dtype=config.coeff_dtype))
        self.bias = nn.Parameter(torch.empty(width, dtype=config.coeff_dtype))
        self.alpha = nn.Parameter(torch.empty(3, dtype=config.coeff_dtype))  # pre, post, res
        self.record_h_res = False
        self.last_h_res: torch.Tensor | None = None
        self.reset_coefficients()

    @property
    def n_streams(self) -> int:
        return self.config.n_streams

    @torch.no_grad()
    def reset_coefficients(self) -> None:
        """(Re)initialise phi, bias and alpha as ``config.init`` says (module docstring)."""
        n, c = self.config.n_streams, self.dim
        std = 1.0 / math.sqrt(n * c)
        nn.init.normal_(self.phi, std=std)
        self.alpha.fill_(self.config.alpha_init)
        self.bias.zero_()
        if self.config.constraint == "none":  # unconstrained HC starts from H_res = I
            self.bias[2 * n :].view(n, n).diagonal().fill_(1.0)
        if self.config.init == "paper":
            return
        if n > 1:  # blocks of phi sum to zero over the streams: no dynamic term for equal streams
            blocks = self.phi.view(n, c, -1)
            blocks -= blocks.mean(dim=0, keepdim=True)
            self.bias[:n] = -math.log(n - 1)  # sigmoid -> 1/n
            if self.config.constraint == "sinkhorn":
                gap = self.config.identity_gap
                gap = math.log(9 * (n - 1)) if gap is None else gap
                self.bias[2 * n :].view(n, n).diagonal().fill_(gap)
        else:  # n = 1: H_pre cannot reach 1 through a sigmoid; a gated residual, nearly open
            self.bias[0] = 4.0

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x: (..., n, C)`` -> ``H_pre (..., n)``, ``H_post (..., n)``, ``H_res (..., n, n)``."""
        return self.gates(*self.project(x, self.phi), self.alpha, self.bias)

    def project(self, x, phi):
        """``x: (..., n, C)`` -> ``(v @ phi: (..., W), sum(v^2): (...))`` for ``v = vec(x)``: one
        read of the streams."""
        v = x.reshape(*x.shape[:-2], self.config.n_streams * self.dim)
        return projection(v, phi, self.config.backend)

    def gates(self, proj, sumsq, alpha, bias):
        """The coefficients from :meth:`project`'s output: scale, bias, gates and Sinkhorn."""
        c, n = self.config, self.config.n_streams
        sinkhorn = (c.sinkhorn_iters, c.order, c.eps) if c.constraint == "sinkhorn" else None
        return epilogue(proj, sumsq, alpha, bias, n, n * self.dim, c.rms_eps, c.backend, sinkhorn)

    def connect(self, x: torch.Tensor, branch, *args, **kwargs) -> torch.Tensor:
        """``x: (..., n, C)`` -> ``(..., n, C)``: ``H_res x + H_post^T branch(H_pre x, *args)``."""
        n = self.config.n_streams
        if x.dim() < 2 or x.shape[-2:] != (n, self.dim):
            raise ValueError(
                f"MHCLayer expects streams of shape (..., {n}, {self.dim}), got {tuple(x.shape)}; "
                "create them once with expand_streams(x, n) before the first wrapped layer"
            )
        out = self._connect(x, branch, *args, **kwargs)
        recompute.forget_source(x)  # streams from expand_streams: their source is kept or not
        return out

    def _connect(self, x: torch.Tensor, branch, *args, **kwargs) -> torch.Tensor:
        c, backend = self.config, self.config.backend
        training = torch.is_grad_enabled()
        if training and (c.recompute or c.fused_backward) and not torch.compiler.is_compiling():
            out, h_res = recompute.connect(self, x, branch, *args, **kwargs)
            self._record(h_res)
            return out
        if training and c.recompute:
            # torch.compile cannot trace the rebuild of streams from objects attached to tensors
            # and autograd nodes: checkpoint each part (each connection keeps its stream input,
            # as with recompute_block=1; the fused backward is eager only)
            h_pre, h_post, h_res = checkpoint(self.coefficients, x, use_reentrant=False)
            branch_in = checkpoint(pre_mix, x, h_pre, backend, use_reentrant=False)
            self._record(h_res)
            y = self.run_branch(branch, branch_in, *args, **kwargs)
            return checkpoint(merge, x, y, h_post, h_res, backend, use_reentrant=False)
        # the tokens as rows, once: the kernels' layout, so that no front door adds views (and
        # autograd nodes) of its own
        x2 = rows(x, *x.shape[-2:])
        h_pre, h_post, h_res = self.coefficients(x2)
        self._record(h_res)
        y = self.run_branch_on_rows(branch, pre_mix(x2, h_pre, backend), x, *args, **kwargs)
        return shaped(merge(x2, y, h_post, h_res, backend), x.shape)

    def _record(self, h_res: torch.Tensor) -> None:
        if self.record_h_res:
            n = self.config.n_streams
            self.last_h_res = h_res.detach().reshape(-1, n, n).mean(dim=0)

    def run_branch_on_rows(self, branch, branch_in: torch.Tensor, x: torch.Tensor, *args, **kwargs):
        """:meth:`run_branch` for a connection that works on rows of tokens: the branch gets
        ``branch_in (T, C)`` in the leading shape of the streams ``x`` it came from, and its output
        comes back as rows ``(T, C)``."""
        branch_in = shaped(branch_in, (*x.shape[:-2], self.dim))
        return rows(self.run_branch(branch, branch_in, *args, **kwargs), self.dim)

    @staticmethod
    def run_branch(branch, branch_in: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``branch(branch_in, *args, **kwargs)``, which must return a tensor."""
        y = branch(branch_in, *args, **kwargs)
        if not isinstance(y, torch.Tensor):
            raise TypeError(
                f"the wrapped branch must return a tensor of shape (..., C), got {type(y).__name__}; "
                "wrap a module that returns a tuple so that it returns its first element"
            )
        if y.shape != branch_in.shape:
            raise ValueError(
                f"the wrapped branch must return its input's shape {tuple(branch_in.shape)}, got "
                f"{tuple(y.shape)}: mHC adds its output to the streams"
            )
        return y

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, n_streams={c.n_streams}, constraint={c.constraint!r}, "
            f"sinkhorn_iters={c.sinkhorn_iters}, init={c.init!r}"
        )


class MHCLayer(HyperConnection):
    """Manifold-constrained hyper-connection around a residual branch.

    Args:
        branch: ``F: (..., C) -> (..., C)``, the sub-layer *including* its pre-norm and *excluding*
            its skip connection (e.g. ``RMSNorm -> attention``). Extra ``forward`` arguments are
            passed to it.
        dim: C, the width of one stream.
        n_streams, sinkhorn_iters, init: as in :class:`MHCConfig`.
        config: a full :class:`MHCConfig`; other keyword arguments override its fields.

    Shapes: ``forward(x: (..., n, C), *args, **kwargs) -> (..., n, C)`` in the dtype of ``x``.

    Set ``record_h_res = True`` to keep the token-averaged H_res of the last forward in
    ``last_h_res`` (``(n, n)``, detached) for :func:`mhc_kernels.metrics.amax_gain`.

    Example:
        >>> branch = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
        >>> layer = MHCLayer(branch, dim=16, n_streams=4)
        >>> x = expand_streams(torch.randn(2, 10, 16), 4)
        >>> layer(x).shape
        torch.Size([2, 10, 4, 16])
    """

    def __init__(
        self,
        branch: nn.Module,
        dim: int,
        n_streams: int = 4,
        *,
        sinkhorn_iters: int = 20,
        init: str = "identity",
        config: MHCConfig | None = None,
        **overrides,
    ):
        if config is None:
            overrides = {"n_streams": n_streams, "sinkhorn_iters": sinkhorn_iters, "init": init,
                         **overrides}  # fmt: skip
        super().__init__(dim, config, **overrides)
        self.branch = branch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.connect(x, self.branch, *args, **kwargs)
