"""The State Transition (ST) perturbation model, with State's module names and state_dict keys.

Written from the architecture description in FACTS.md §5 (not from State's code):

    control = basal_encoder(ctrl_cell_emb)                     (B, S, hidden)
    h       = transformer_backbone(pert_encoder(pert_emb) + control)
    out     = project_out(h + control) if predict_residual else project_out(h)
    out     = relu(out)                                        gene-expression spaces only

Encoders and ``project_out`` are MLPs of Linear layers with GELU and Dropout between them, so a
4-layer MLP has Linear layers at ``state_dict`` indices 0, 3, 6, 9, as in State.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .backbones import backbone_key, build_backbone

GENE_SPACES = ("X_hvg", "gene")


def build_mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int, dropout: float):
    """``n_layers`` Linear layers with GELU and Dropout between them (State's layout)."""
    if n_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got n_layers={n_layers}")
    dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(n_layers):
        if i:
            layers += [nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers)


@dataclass
class STConfig:
    """The constructor arguments an ST checkpoint's ``hyper_parameters`` carry (the ones we use)."""

    input_dim: int
    output_dim: int
    pert_dim: int
    hidden_dim: int
    cell_set_len: int = 256
    n_encoder_layers: int = 4
    n_decoder_layers: int = 4
    predict_residual: bool = True
    embed_key: str | None = "X_hvg"
    output_space: str | None = None
    dropout: float = 0.1
    transformer_backbone_key: str = "llama"
    transformer_backbone_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("input_dim", "output_dim", "pert_dim", "hidden_dim", "cell_set_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"STConfig.{name} must be a positive integer, got {value!r}")
        self.transformer_backbone_key = backbone_key(self.transformer_backbone_key)

    @property
    def relu_output(self) -> bool:
        return self.embed_key in GENE_SPACES or self.output_space in GENE_SPACES

    def to_hparams(self) -> dict:
        return asdict(self)


class STModel(nn.Module):
    """State Transition model: maps control cell sets plus a perturbation to perturbed cell sets.

    ``forward(batch, padded=True)`` takes State's batch dictionary: ``pert_emb`` ``(B*S, P)``
    (one-hot) and ``ctrl_cell_emb`` ``(B*S, D)``. With ``padded=True`` rows are split into sets of
    ``cell_set_len`` cells; with ``padded=False`` all rows form one set of any length. Returns the
    predicted perturbed cells ``(B*S, output_dim)`` in the same row order.

    Example:
        >>> cfg = STConfig(input_dim=8, output_dim=8, pert_dim=3, hidden_dim=16, cell_set_len=4,
        ...                transformer_backbone_kwargs={"num_hidden_layers": 1,
        ...                "num_attention_heads": 2, "intermediate_size": 32})
        >>> model = STModel(cfg).eval()
        >>> batch = {"pert_emb": torch.eye(3)[[0] * 8], "ctrl_cell_emb": torch.randn(8, 8)}
        >>> model(batch).shape
        torch.Size([8, 8])
    """

    def __init__(self, config: STConfig):
        super().__init__()
        # its own copy: fine-tuning edits it (new heads, st_finetune.model.adapt.adapt_heads), and
        # the caller's (a checkpoint's PretrainedInfo, another model's) must stay as it was given
        self.config = copy.deepcopy(config)
        c = config
        self.pert_encoder = build_mlp(
            c.pert_dim, c.hidden_dim, c.hidden_dim, c.n_encoder_layers, c.dropout
        )
        self.basal_encoder = build_mlp(
            c.input_dim, c.hidden_dim, c.hidden_dim, c.n_encoder_layers, c.dropout
        )
        self.transformer_backbone = build_backbone(
            c.transformer_backbone_key, c.transformer_backbone_kwargs, c.hidden_dim
        )
        self.project_out = build_mlp(
            c.hidden_dim, c.hidden_dim, c.output_dim, c.n_decoder_layers, c.dropout
        )
        self.relu = nn.ReLU() if c.relu_output else nn.Identity()

    def forward(self, batch: dict, padded: bool = True) -> torch.Tensor:
        pert, ctrl = batch["pert_emb"], batch["ctrl_cell_emb"]
        if pert.shape[0] != ctrl.shape[0]:
            raise ValueError(
                f"pert_emb has {pert.shape[0]} rows but ctrl_cell_emb has {ctrl.shape[0]}"
            )
        if padded:
            size = self.config.cell_set_len
            if ctrl.shape[0] % size:
                raise ValueError(
                    f"padded=True needs a multiple of cell_set_len={size} rows, got {ctrl.shape[0]}; "
                    "pad the sets or call with padded=False for one set of any length"
                )
            shape = (-1, size)
        else:
            shape = (1, ctrl.shape[0])
        control = self.basal_encoder(ctrl.reshape(*shape, ctrl.shape[-1]))
        h = self.transformer_backbone(
            inputs_embeds=self.pert_encoder(pert.reshape(*shape, pert.shape[-1])) + control
        )
        out = self.project_out(h + control if self.config.predict_residual else h)
        return self.relu(out).reshape(ctrl.shape[0], -1)
