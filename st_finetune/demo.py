"""The shipped demo: a synthetic sham/burn wound-healing study and a small pretrained ST model.

Both are generated on first use (seconds on a laptop CPU) and cached under ``data/demo/``.

The study (``wound_healing.h5ad``) has the real schema: ``obs["condition"]`` in {sham, burn},
``obs["cell_type"]`` (macrophage, fibroblast, endothelial, keratinocyte, neutrophil, T cell),
``obs["timepoint"]`` in {10, 14, 19} (days), ``obs["mouse"]`` (batch) and a 64-dimensional embedding
in ``obsm["X_state"]`` (SE-600M embeddings are 2048-dimensional; 64 keeps the demo fast). Cells are
drawn in one shared "embedding universe" (seeded):

    cell = centroid[type] + heal(type) * progress + programme noise (rank 8) + isotropic noise

What is planted, exactly (``burn`` vs ``sham`` of the same type and day):

* inflammation: ``+ A[type] * exp(-(day - 10) / 8) * u`` along one shared inflammation direction
  ``u``: A = 3.0 macrophage, 3.5 neutrophil, 1.2 T cell, 1.0 fibroblast, 0.8 endothelial,
  0.6 keratinocyte (strong early, slow to resolve);
* proliferation: ``+ B[type] * exp(-((day - 14) / 4)^2) * v[type]`` along a type-specific direction:
  B = 1.5 fibroblast, 1.0 endothelial, 0.3 for the others (peaks at day 14);
* delayed resolution: healing progress is ``(day - 10) / 9`` for sham and ``max(day - 14, 0) / 9``
  for burn (burn lags four days along each type's healing direction);
* heterogeneous response: each burn cell's inflammation shift is scaled by ``(1 + 0.8 z)``,
  where ``z`` is the cell's standardised score on its type's first expression programme
  (activated cells respond more), so burn changes the *shape* of each population, not only its
  mean;
* spread: burn macrophages and neutrophils have 1.5x the within-type noise.

Gene expression (``X``, 200 genes, log1p of counts per 10,000) is drawn from each cell's
embedding: Poisson counts with rates ``softmax(base + loading . x)`` times a library size, where
inflammatory genes (Il1b, Tnf, Cxcl2, S100a8, S100a9, ...) load on the inflammation direction,
Col1a1, Col3a1, Fn1, Postn (fibroblast) and Pecam1, Kdr, Vegfa, Mki67 (endothelial) on their
type's proliferation direction, three markers per cell type on its centroid, and 169 ``Gm*``
genes at random. So burn raises the inflammatory genes most in macrophages and neutrophils at day
10. The embeddings are drawn first and do not depend on the genes.

Two irregularities exercise the data checks: burn T cells at day 19 are only 12 cells (resampled
with replacement), and there are no sham neutrophils at day 19 (their burn cells fall back on the
neutrophil controls of other days, with a warning). ``adata.uns["planted"]`` holds the amplitudes.

The pretrained checkpoint (``st_pretrained/``, State's folder layout) is a small bidirectional Llama
ST model pretrained (600 steps, energy loss, with control-to-control sets) for a different task in
the same embedding space: a cytokine stimulation screen (IFNG, TNF, IL1B, IL4, IL6, IL10, TGFB1 vs
PBS) on the same cell types, without timepoints. The demo therefore fine-tunes through the same
loader as ST-Tahoe, keeps the backbone (LoRA, mHC) and the input/output heads, and gets a new
``pert_encoder`` for the sham/burn vocabulary. (Rebuilding the heads for a new feature space, as
ST-Tahoe's 2000 HVGs vs SE-600M embeddings needs, is exercised by the tests; on the demo it needs
far more steps than a CPU demo affords.)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("st_finetune")

CELL_TYPES = ("macrophage", "fibroblast", "endothelial", "keratinocyte", "neutrophil", "T cell")
DAYS = (10, 14, 19)
DIM = 64
INFLAMMATION = {"macrophage": 3.0, "neutrophil": 3.5, "T cell": 1.2, "fibroblast": 1.0,
                "endothelial": 0.8, "keratinocyte": 0.6}  # fmt: skip
PROLIFERATION = {"fibroblast": 1.5, "endothelial": 1.0}
COUNTS = {"macrophage": 220, "fibroblast": 260, "endothelial": 160, "keratinocyte": 200,
          "neutrophil": 90, "T cell": 70}  # fmt: skip
CYTOKINES = ("IFNG", "TNF", "IL1B", "IL4", "IL6", "IL10", "TGFB1")
UNIVERSE_SEED = 1234
INFLAMMATORY_GENES = ("Il1b", "Tnf", "Cxcl2", "S100a8", "S100a9", "Ccl2", "Il6", "Nos2", "Saa3",
                      "Lcn2")  # fmt: skip
PROLIFERATION_GENES = {"fibroblast": ("Col1a1", "Col3a1", "Fn1", "Postn"),
                       "endothelial": ("Pecam1", "Kdr", "Vegfa", "Mki67")}  # fmt: skip
MARKER_GENES = {"macrophage": ("Adgre1", "Lyz2", "Cd68"), "fibroblast": ("Pdgfra", "Dcn", "Col1a2"),
                "endothelial": ("Cdh5", "Emcn", "Cd34"), "keratinocyte": ("Krt14", "Krt5", "Krt10"),
                "neutrophil": ("Ly6g", "Csf3r", "Retnlg"), "T cell": ("Cd3e", "Cd3g", "Trbc2")}  # fmt: skip
N_GENES = 200


def _unit(rng, dim):
    v = rng.normal(size=dim)
    return v / np.linalg.norm(v)


class Universe:
    """The shared embedding space both synthetic studies live in."""

    def __init__(self, dim: int = DIM, seed: int = UNIVERSE_SEED):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centroid = {t: 3.0 * rng.normal(size=dim) / math.sqrt(dim) * 4 for t in CELL_TYPES}
        self.heal = {t: 2.0 * _unit(rng, dim) for t in CELL_TYPES}
        self.programmes = {t: rng.normal(size=(8, dim)) * 0.25 for t in CELL_TYPES}
        self.inflammation = _unit(rng, dim)
        self.proliferation = {t: _unit(rng, dim) for t in CELL_TYPES}
        self.cytokine = {c: _unit(rng, dim) for c in CYTOKINES}
        self._genes()

    def _genes(self):
        """Gene loadings (drawn after, and apart from, everything above): the log expression rate
        of gene g in a cell at embedding x is ``base[g] + loading[g] . x``."""
        rng = np.random.default_rng(UNIVERSE_SEED + 1)
        names, rows = [], []
        for name in INFLAMMATORY_GENES:
            names.append(name)
            rows.append(0.35 * self.inflammation)
        for cell_type, genes in PROLIFERATION_GENES.items():
            for name in genes:
                names.append(name)
                rows.append(0.6 * self.proliferation[cell_type])
        for cell_type, genes in MARKER_GENES.items():
            direction = self.centroid[cell_type] / np.linalg.norm(self.centroid[cell_type])
            for name in genes:
                names.append(name)
                rows.append(0.12 * direction)
        while len(names) < N_GENES:
            names.append(f"Gm{10001 + len(names)}")
            rows.append(0.05 * rng.normal(size=self.dim))
        loading = np.array(rows) + 0.01 * rng.normal(size=(len(rows), self.dim))
        self.gene_names = names
        self.gene_base = rng.normal(size=len(names))
        self.gene_loading = loading

    def expression(self, rng, cells: np.ndarray):
        """Log-normalised expression (CSR, log1p of counts per 10,000) of ``cells`` (embeddings):
        Poisson counts with rates ``softmax(base + loading . x)`` times a library size."""
        from scipy import sparse

        logits = self.gene_base + cells @ self.gene_loading.T
        rates = np.exp(logits - logits.max(1, keepdims=True))
        rates /= rates.sum(1, keepdims=True)
        library = 2000 * rng.lognormal(0.0, 0.3, size=(len(cells), 1))
        counts = rng.poisson(rates * library)
        normalised = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
        return sparse.csr_matrix(normalised.astype(np.float32))

    def cells(self, rng, cell_type: str, count: int, shift: np.ndarray, spread: float = 1.0,
              response: np.ndarray | None = None):  # fmt: skip
        """``count`` cells; ``response`` (D,) is added scaled by ``1 + 0.8 z`` per cell, with z
        the cell's score on the type's first programme (heterogeneous response)."""
        scores = rng.normal(size=(count, 8))
        latent = scores @ self.programmes[cell_type]
        noise = 0.3 * rng.normal(size=(count, self.dim))
        cells = self.centroid[cell_type] + shift + spread * (latent + noise)
        if response is not None:
            cells = cells + (1 + 0.8 * scores[:, :1]) * response
        return cells


def burn_effects(u: Universe, cell_type: str, day: int) -> tuple[np.ndarray, np.ndarray]:
    """The planted burn effects: (inflammation response, proliferation shift), without the lag."""
    a = INFLAMMATION[cell_type] * math.exp(-(day - 10) / 8)
    b = PROLIFERATION.get(cell_type, 0.3) * math.exp(-(((day - 14) / 4) ** 2))
    return a * u.inflammation, b * u.proliferation[cell_type]


def make_wound_study(path: str | Path, seed: int = 0) -> Path:
    """Write the synthetic sham/burn study to ``path`` (an ``.h5ad``)."""
    import anndata

    u = Universe()
    rng = np.random.default_rng(seed)
    blocks, obs = [], []
    for day in DAYS:
        for cond in ("sham", "burn"):
            for ct in CELL_TYPES:
                count = COUNTS[ct] // 2 + int(rng.integers(0, COUNTS[ct] // 2))
                if (ct, day, cond) == ("T cell", 19, "burn"):
                    count = 12
                if (ct, day, cond) == ("neutrophil", 19, "sham"):
                    continue
                lag = 4 if cond == "burn" else 0
                shift = u.heal[ct] * max(day - 10 - lag, 0) / 9
                spread, response = 1.0, None
                if cond == "burn":
                    response, proliferation = burn_effects(u, ct, day)
                    shift = shift + proliferation
                    spread = 1.5 if ct in ("macrophage", "neutrophil") else 1.0
                blocks.append(u.cells(rng, ct, count, shift, spread, response))
                obs += [(cond, ct, day, f"mouse{int(rng.integers(1, 5))}")] * count
    frame = pd.DataFrame(obs, columns=["condition", "cell_type", "timepoint", "mouse"])
    for col in ("condition", "cell_type", "mouse"):
        frame[col] = frame[col].astype("category")
    frame.index = [f"cell{i:05d}" for i in range(len(frame))]
    cells = np.concatenate(blocks)
    adata = anndata.AnnData(X=u.expression(np.random.default_rng([seed, 2]), cells), obs=frame,
                            var=pd.DataFrame(index=u.gene_names))  # fmt: skip
    adata.obsm["X_state"] = cells.astype(np.float32)
    adata.uns["planted"] = {
        "inflammation_amplitude": dict(INFLAMMATION),
        "proliferation_amplitude": {t: PROLIFERATION.get(t, 0.3) for t in CELL_TYPES},
        "inflammation_decay_days": 8.0,
        "proliferation_peak_day": 14.0,
        "burn_healing_lag_days": 4.0,
        "burn_spread": {"macrophage": 1.5, "neutrophil": 1.5},
        "response_heterogeneity": 0.8,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    log.info("wrote the synthetic wound-healing study (%d cells) to %s", adata.n_obs, path)
    return path


def make_cytokine_screen(seed: int = 1):
    """The pretraining task: (features, perturbation, cell type) arrays of a cytokine screen."""
    u = Universe()
    rng = np.random.default_rng(seed)
    feats, perts, types = [], [], []
    for ct in CELL_TYPES:
        for pert in ("PBS", *CYTOKINES):
            shift = np.zeros(u.dim)
            if pert != "PBS":
                gain = 1.0 + rng.random() * 2
                shift = gain * u.cytokine[pert]
                if pert in ("TNF", "IL1B", "IFNG"):  # inflammatory cytokines share the programme
                    shift = shift + INFLAMMATION[ct] * 0.5 * u.inflammation
            feats.append(u.cells(rng, ct, 160, shift))
            perts += [pert] * 160
            types += [ct] * 160
    return np.concatenate(feats).astype(np.float32), np.array(perts), np.array(types)


PRETRAIN_BACKBONE = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "head_dim": 32, "intermediate_size": 256, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 512, "attention_dropout": 0.0}  # fmt: skip


def make_pretrained(folder: str | Path, seed: int = 0, steps: int = 600) -> Path:
    """Pretrain the demo's small ST model on the cytokine screen; write a State model folder."""
    import torch

    from .config import DataConfig, TrainingConfig
    from .data import CellSetData, CellTable
    from .model import STConfig, STModel, write_model_folder
    from .training import STLightning

    torch.manual_seed(seed)
    feats, perts, types = make_cytokine_screen()
    names = sorted({str(p) for p in perts})
    table = CellTable(features=feats, pert=perts, cell_type=types,
                      timepoint=np.full(len(perts), "all"),
                      obs_names=np.array([f"c{i}" for i in range(len(perts))]),
                      source=np.full(len(perts), "cytokine_screen"), control="PBS",
                      pert_names=names)  # fmt: skip
    cfg = DataConfig(paths=["<generated>"], control_pert="PBS", timepoint_key=None,
                     cell_set_len=64, val_fraction=0.0, test_fraction=0.0,
                     control_sets=True)  # fmt: skip
    data = CellSetData(cfg, seed, table)
    config = STConfig(input_dim=DIM, output_dim=DIM, pert_dim=len(names),
                      hidden_dim=128,
                      cell_set_len=64, n_encoder_layers=2, n_decoder_layers=2,
                      embed_key="X_state", dropout=0.0,
                      transformer_backbone_key="llama",
                      transformer_backbone_kwargs=dict(PRETRAIN_BACKBONE))  # fmt: skip
    model = STModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    module = STLightning(model, TrainingConfig(loss="energy"), set_len=64)
    step, epoch = 0, 0
    model.train()
    while step < steps:
        for batch in data.loader("train", batch_size=8, epoch=epoch):
            loss = module.set_losses(batch).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    log.info(
        "pretrained the demo ST model for %d steps (final energy loss %.3f)", step, loss.item()
    )
    return write_model_folder(model.eval(), folder, names)


def _demo_without_genes(path: str | Path) -> bool:
    """Whether ``path`` is a demo study written by an earlier version, without genes: one this
    module wrote (its planted effects in ``uns``) and no ``X``. Any other file is the user's."""
    import h5py

    if not Path(path).is_file():  # a folder of files: the user's
        return False
    try:
        with h5py.File(path, "r") as f:
            return "X" not in f and "planted" in f.get("uns", {})
    except OSError:  # not an HDF5 file: the user's (the data checks say what is wrong with it)
        return False


STUDY_NAME, CHECKPOINT_NAME = "wound_healing.h5ad", "st_pretrained"  # configs/demo.yaml's


def ensure_demo_files(data_path: str | Path | None, checkpoint: str | Path | None) -> None:
    """Create whichever of the demo study and the demo checkpoint is missing (and write again a
    demo study from an earlier version, which lacks the genes: same embeddings). A file of the
    user's at ``data_path`` is never touched, and the demo files are made only under their own
    names (``STUDY_NAME``, ``CHECKPOINT_NAME``): a missing path of any other name is the user's
    (mistyped, or not yet copied), and training a synthetic stand-in there would pass for theirs."""
    if data_path and not Path(data_path).exists():
        _refuse_unless_named(data_path, STUDY_NAME, "data.paths", "demo_data=false")
        make_wound_study(data_path)
    elif data_path and _demo_without_genes(data_path):
        log.info("the demo study at %s predates its genes: writing it again", data_path)
        make_wound_study(data_path)
    if checkpoint and not Path(checkpoint).exists():
        _refuse_unless_named(checkpoint, CHECKPOINT_NAME, "model.checkpoint",
                             "model.demo_pretrained=false")  # fmt: skip
        make_pretrained(checkpoint)


def _refuse_unless_named(path: str | Path, name: str, key: str, off: str) -> None:
    if Path(path).name != name:
        raise FileNotFoundError(
            f"{key}: {path} does not exist. The demo makes its synthetic files only under their "
            f"own names ({name}, as configs/demo.yaml has it), never at a path of yours: check "
            f"the path, or run on your own files with {off} (configs/st_lora_mhc.yaml)"
        )
