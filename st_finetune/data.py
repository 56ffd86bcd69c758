"""AnnData input: validation, groups, reproducible splits and cell-set sampling.

A *group* is one (cell type, timepoint, perturbation). A training example is a *cell set*: up to
``cell_set_len`` perturbed cells of one group (the target) paired with as many control cells of the
same cell type and timepoint (the input), plus the perturbation's one-hot code (perturbations in
sorted order, as State does). When a timepoint has no control cells of that type, the controls of
the cell type at any timepoint stand in, with a warning naming the group. Groups smaller than a
set are resampled with replacement. Every choice comes from the run's seed (and the epoch), so a run
and its resumption see the same sets in the same order.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig

log = logging.getLogger("st_finetune")

SPLITS = ("train", "val", "test")
NO_TIMEPOINT = "all"


class DataError(ValueError):
    """Bad input data, found before any training starts."""


class MissingGenes(DataError):
    """A file lacks the gene expression that ``data.gene_key`` names."""


@dataclass
class CellTable:
    """All cells, validated: features plus the labels that define groups."""

    features: np.ndarray  # (N, D) float32
    pert: np.ndarray  # (N,) str
    cell_type: np.ndarray  # (N,) str
    timepoint: np.ndarray  # (N,) str (NO_TIMEPOINT without a timepoint column)
    obs_names: np.ndarray  # (N,) str, unique
    source: np.ndarray  # (N,) file name
    control: str
    pert_names: list[str]  # sorted, control included
    genes: sparse.csr_matrix | None = None  # (N, G) float32, with data.gene_key
    gene_names: list[str] | None = None

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def pert_index(self, name: str) -> int:
        return self.pert_names.index(name)


# ----------------------------------------------------------------------------------- loading


def find_h5ad(paths: list[str]) -> list[Path]:
    if not paths:
        raise DataError("data.paths is empty: give one or more .h5ad files or folders")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.h5ad"))
            if not found:
                raise DataError(f"folder {p} holds no .h5ad file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"data file {p} does not exist")
    return files


def obs_labels(obs: pd.DataFrame, key: str, file: Path, role: str) -> np.ndarray:
    """``obs[key]`` as string labels, or a DataError naming ``file``, the column, its config key
    (``data.<role>``) and the fix: missing column, missing values, continuous numbers."""
    if key not in obs.columns:
        raise DataError(
            f"{file.name}: obs has no column '{key}' (data.{role}); available: {list(obs.columns)}"
        )
    col = obs[key]
    missing = int(col.isna().sum())
    if missing == len(col):
        raise DataError(f"{file.name}: obs column '{key}' (data.{role}) is empty")
    if missing:
        raise DataError(
            f"{file.name}: obs column '{key}' (data.{role}) has {missing} missing values; "
            "fill or drop those cells"
        )
    if pd.api.types.is_float_dtype(col):
        if not np.all(np.mod(col.to_numpy(), 1) == 0):
            raise DataError(
                f"{file.name}: obs column '{key}' (data.{role}) holds continuous numbers "
                f"(e.g. {col.iloc[0]!r}), not categorical labels; convert it with "
                f"adata.obs['{key}'] = adata.obs['{key}'].astype('category')"
            )
        col = col.astype(int)
    if not (
        isinstance(col.dtype, pd.CategoricalDtype)
        or pd.api.types.is_object_dtype(col)
        or pd.api.types.is_string_dtype(col)
        or pd.api.types.is_integer_dtype(col)
        or pd.api.types.is_bool_dtype(col)
    ):
        raise DataError(
            f"{file.name}: obs column '{key}' (data.{role}) has dtype {col.dtype}; expected "
            "categorical labels (category, string or integer)"
        )
    return col.astype(str).to_numpy()


def read_features(adata, key: str, file: Path) -> np.ndarray:
    """``(cells, features)`` float32 from ``adata.obsm[key]`` or ``adata.X`` (dense or sparse),
    or a DataError naming ``file`` and what is wrong (missing key, shape, NaN or Inf)."""
    if key == "X":
        matrix = adata.X
        if matrix is None:
            raise DataError(f"{file.name}: data.embed_key=X but the file has no X matrix")
    else:
        if key not in adata.obsm:
            raise DataError(
                f"{file.name}: obsm has no '{key}' (data.embed_key); available: "
                f"{list(adata.obsm.keys())} (or X for the expression matrix)"
            )
        matrix = adata.obsm[key]
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise DataError(f"{file.name}: features '{key}' must be 2-D (cells x features)")
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        rows = [str(n) for n in adata.obs_names[bad][:5]]
        raise DataError(
            f"{file.name}: {int(bad.sum())} cells have NaN or Inf features in '{key}' "
            f"(first: {rows}); remove or impute them"
        )
    return matrix


def read_genes(adata, key: str, file: Path) -> tuple[sparse.csr_matrix, list[str]]:
    """Gene expression ``(cells, genes)`` as float32 CSR from ``adata.X`` or ``adata.layers[key]``
    (on disk or in memory, dense or sparse) with the gene names, or a DataError naming the fix."""
    if key == "X":
        try:
            matrix = adata.X if adata.n_vars else None
        except KeyError:  # a file read on disk without X raises instead of giving None
            matrix = None
        if matrix is None:
            raise MissingGenes(f"{file.name}: data.gene_key=X but the file has no genes in X; "
                               "name the layer that holds them, or leave data.gene_key unset "
                               "(no gene decoder)")  # fmt: skip
    elif key in adata.layers:
        matrix = adata.layers[key]
    else:
        raise MissingGenes(f"{file.name}: no layer '{key}' (data.gene_key); layers: "
                           f"{list(adata.layers.keys())} (or X; unset: no gene decoder)")  # fmt: skip
    if hasattr(matrix, "to_memory"):  # a sparse matrix left on disk
        matrix = matrix.to_memory()
    elif not sparse.issparse(matrix):
        matrix = np.asarray(matrix[()] if hasattr(matrix, "id") else matrix)  # h5py or numpy
    matrix = sparse.csr_matrix(matrix, dtype=np.float32)
    if not np.isfinite(matrix.data).all():
        raise DataError(f"{file.name}: gene expression '{key}' has NaN or Inf values")
    return matrix, [str(g) for g in adata.var_names]


def context_labels(obs: pd.DataFrame, cfg: DataConfig, file: Path) -> tuple[np.ndarray, ...]:
    """Each cell's cell type and timepoint (``NO_TIMEPOINT`` without ``data.timepoint_key``)."""
    cell_type = obs_labels(obs, cfg.cell_type_key, file, "cell_type_key")
    if not cfg.timepoint_key:
        return cell_type, np.full(len(obs), NO_TIMEPOINT)
    return cell_type, obs_labels(obs, cfg.timepoint_key, file, "timepoint_key")


@contextlib.contextmanager
def opened_h5ad(file: Path, embed_key: str) -> Iterator:
    """``file`` as AnnData for the block; with features from obsm, its X (often the gene counts
    beside the embedding, the largest part of the file) stays on disk."""
    import anndata

    backed = "r" if embed_key != "X" else None
    adata = anndata.read_h5ad(file, backed=backed)
    try:
        if adata.n_obs == 0:
            raise DataError(f"{file.name} holds no cells")
        yield adata
    finally:
        if backed:
            adata.file.close()


def _read_part(adata, cfg: DataConfig, file: Path) -> dict:
    obs = adata.obs
    cell_type, timepoint = context_labels(obs, cfg, file)
    part = {
        "pert": obs_labels(obs, cfg.pert_col, file, "pert_col"),
        "cell_type": cell_type,
        "timepoint": timepoint,
        "features": read_features(adata, cfg.embed_key, file),
        "obs_names": np.asarray(adata.obs_names, dtype=str),
        "source": np.full(adata.n_obs, file.name),
    }
    if cfg.batch_key:
        obs_labels(obs, cfg.batch_key, file, "batch_key")
    if cfg.gene_key:
        part["genes"] = read_genes(adata, cfg.gene_key, file)
    return part


def _stack_genes(parts: list[dict], files: list[Path]) -> dict:
    """The files' gene matrices stacked, on the first file's genes (all must have them)."""
    names = parts[0]["genes"][1]
    blocks = []
    for part, file in zip(parts, files, strict=True):
        matrix, own = part.pop("genes")
        if own != names:
            index = pd.Index(own)
            missing = [g for g in names if g not in index]
            if missing:
                raise DataError(f"{file.name} lacks {len(missing)} of {files[0].name}'s genes "
                                f"(first: {missing[:5]}); every file needs the same genes")  # fmt: skip
            matrix = matrix[:, index.get_indexer(names)]
        blocks.append(matrix)
    return {"genes": sparse.vstack(blocks, format="csr"), "gene_names": names}


def load_cells(cfg: DataConfig) -> CellTable:
    """Read and validate every file; one clear error for the first problem found."""
    parts, files = [], find_h5ad(cfg.paths)
    for file in files:
        with opened_h5ad(file, cfg.embed_key) as adata:
            parts.append(_read_part(adata, cfg, file))
    genes = _stack_genes(parts, files) if cfg.gene_key else {}
    dims = {p["features"].shape[1] for p in parts}
    if len(dims) > 1:
        raise DataError(f"files disagree on the feature dimension of '{cfg.embed_key}': {dims}")
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(parts) > 1:
        table["obs_names"] = np.char.add(np.char.add(table["source"], ":"), table["obs_names"])
    labels = sorted(set(table["pert"]))
    if cfg.control_pert not in labels:
        raise DataError(
            f"control label '{cfg.control_pert}' (data.control_pert) is not in obs column "
            f"'{cfg.pert_col}'; labels found: {labels}"
        )
    if len(labels) < 2:
        raise DataError(f"obs column '{cfg.pert_col}' holds only the control label {labels}")
    return CellTable(control=cfg.control_pert, pert_names=labels, **table, **genes)


# ------------------------------------------------------------------------------------ splits


def make_splits(table: CellTable, cfg: DataConfig, seed: int) -> np.ndarray:
    """One of train/val/test per cell, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    split = np.full(len(table.pert), "train", dtype=object)
    keys = pd.DataFrame({"ct": table.cell_type, "tp": table.timepoint, "p": table.pert})
    if cfg.split == "groups":
        column = {cfg.cell_type_key: table.cell_type, cfg.timepoint_key: table.timepoint}.get(
            cfg.holdout_key
        )
        if column is None:
            raise DataError(
                f"data.holdout_key must be the cell type or timepoint column "
                f"({cfg.cell_type_key!r} or {cfg.timepoint_key!r}), got {cfg.holdout_key!r}"
            )
        values = {str(v) for v in cfg.holdout_values}
        unknown = values - set(column)
        if unknown:
            raise DataError(
                f"data.holdout_values {sorted(unknown)} not found in '{cfg.holdout_key}'; "
                f"values: {sorted(set(column))}"
            )
        split[np.isin(column, list(values))] = "test"
    for _, idx in keys.groupby(["ct", "tp", "p"], sort=True).indices.items():
        idx = idx[split[idx] == "train"]
        idx = rng.permutation(idx)
        n_test = 0 if cfg.split == "groups" else int(round(cfg.test_fraction * len(idx)))
        n_val = int(round(cfg.val_fraction * len(idx)))
        if len(idx) - n_test - n_val < 1:  # keep at least one training cell per group
            n_val = max(0, len(idx) - n_test - 1)
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_val]] = "val"
    return split.astype(str)


def write_splits(table: CellTable, split: np.ndarray, path: Path) -> None:
    pd.DataFrame(
        {"obs_name": table.obs_names, "file": table.source, "split": split,
         "cell_type": table.cell_type, "timepoint": table.timepoint, "perturbation": table.pert}
    ).to_csv(path, index=False)  # fmt: skip


# --------------------------------------------------------------------------------- cell sets


@dataclass
class Group:
    """One perturbed group within one split, with its matched controls."""

    cell_type: str
    timepoint: str
    pert: str
    cells: np.ndarray
    controls: np.ndarray
    controls_fallback: bool = False

    @property
    def name(self) -> str:
        return f"{self.cell_type} | {self.timepoint} | {self.pert}"


def build_groups(table: CellTable, split: np.ndarray, which: str, cfg: DataConfig,
                 report: list[str] | None = None) -> list[Group]:  # fmt: skip
    """Perturbed groups of split ``which`` with matched controls (see the module docstring)."""
    in_split = split == which
    is_ctrl = table.pert == table.control
    frame = pd.DataFrame({"ct": table.cell_type, "tp": table.timepoint, "p": table.pert})
    groups = []
    for (ct, tp, pert), idx in (
        frame[in_split].groupby(["ct", "tp", "p"], sort=True).indices.items()
    ):
        cells = np.flatnonzero(in_split)[idx]
        if pert == table.control and not cfg.control_sets:
            continue
        if len(cells) < cfg.min_cells:
            msg = f"{which}: group '{ct} | {tp} | {pert}' has {len(cells)} cells (< data.min_cells={cfg.min_cells}): skipped"
            log.warning(msg)
            if report is not None:
                report.append(msg)
            continue
        controls = np.flatnonzero(
            in_split & is_ctrl & (table.cell_type == ct) & (table.timepoint == tp)
        )
        if pert == table.control:
            controls = cells
        fallback = False
        if len(controls) == 0:
            controls = np.flatnonzero(in_split & is_ctrl & (table.cell_type == ct))
            fallback = True
            if len(controls) == 0:
                controls = np.flatnonzero(is_ctrl & (table.cell_type == ct) & (split == "train"))
            if len(controls) == 0:
                msg = f"{which}: group '{ct} | {tp} | {pert}' has no control cells of its cell type: skipped"
                log.warning(msg)
                if report is not None:
                    report.append(msg)
                continue
            log.warning(
                "%s: no '%s' cells of %s at timepoint %s; using the cell type's controls from "
                "other timepoints for group '%s | %s | %s'",
                which, table.control, ct, tp, ct, tp, pert,
            )  # fmt: skip
        groups.append(Group(ct, tp, pert, cells, controls, fallback))
    return groups


def _draw(rng: np.random.Generator, pool: np.ndarray, size: int) -> np.ndarray:
    return rng.choice(pool, size=size, replace=len(pool) < size)


def sample_sets(groups: list[Group], set_len: int, rng: np.random.Generator) -> list[tuple]:
    """``(group index, control cells, target cells)`` for ceil(|group| / set_len) sets per group."""
    sets = []
    for gi, group in enumerate(groups):
        for _ in range(max(1, math.ceil(len(group.cells) / set_len))):
            sets.append((gi, _draw(rng, group.controls, set_len), _draw(rng, group.cells, set_len)))
    order = rng.permutation(len(sets))
    return [sets[i] for i in order]


class CellSetDataset(Dataset):
    """Cell sets as State's batch dictionaries (one set per item)."""

    def __init__(self, table: CellTable, groups: list[Group], sets: list[tuple]):
        self.table = table
        self.groups = groups
        self.sets = sets
        self.n_perts = len(table.pert_names)

    def __len__(self) -> int:
        return len(self.sets)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i], one=True)

    def __getitems__(self, indices: list[int], one: bool = False) -> dict:
        """Sets ``indices`` in State's flat layout, ``(B * S, ...)`` rows and ``group`` per set
        (a single set's ``group`` a scalar with ``one``). The DataLoader asks for a whole batch
        at once: one row gather per tensor straight into the batch (``np.take``: rows copied
        whole), where one torch gather per set and a concatenation took 3-8x as long."""
        sets = [self.sets[i] for i in indices]
        perts = [self.table.pert_index(self.groups[gi].pert) for gi, _, _ in sets]
        column = torch.from_numpy(np.repeat(perts, [len(ctrl) for _, ctrl, _ in sets]))
        onehot = torch.zeros(len(column), self.n_perts)
        onehot[torch.arange(len(column)), column] = 1.0
        groups = torch.tensor([gi for gi, _, _ in sets])
        return {
            "pert_emb": onehot,
            "ctrl_cell_emb": self._gather([ctrl for _, ctrl, _ in sets]),
            "pert_cell_emb": self._gather([target for _, _, target in sets]),
            "group": groups[0] if one else groups,
        }

    def _gather(self, cells: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.take(self.table.features, np.concatenate(cells), axis=0))


def collate_sets(batch: dict) -> dict:
    """The batch :meth:`CellSetDataset.__getitems__` built, as it is (the DataLoader's default
    collation would stack its tensors once more)."""
    return batch


class CellSetData:
    """Everything the training loop needs from the data, built once per run."""

    def __init__(self, cfg: DataConfig, seed: int, table: CellTable | None = None,
                 split: np.ndarray | None = None):  # fmt: skip
        self.cfg = cfg
        self.seed = seed
        self.table = table if table is not None else load_cells(cfg)
        self.split = make_splits(self.table, cfg, seed) if split is None else split
        self.report: list[str] = []
        self.groups = {s: build_groups(self.table, self.split, s, cfg, self.report) for s in SPLITS}
        needed = "train" if split is None else "test"
        if not self.groups[needed]:
            raise DataError(
                f"no {needed} group has enough cells to form a set: "
                + ("; ".join(self.report[:5]) or "check data.pert_col and data.control_pert")
            )

    @classmethod
    def unseen(cls, cfg: DataConfig, pert_names: list[str]) -> CellSetData:
        """Cells to score a trained model on and never train on (another cohort): every cell in
        the test split, perturbations coded in the model's order ``pert_names``."""
        table = load_cells(cfg)
        unknown = sorted(set(table.pert_names) - set(pert_names))
        if unknown:
            raise DataError(f"perturbations {unknown} in {[str(p) for p in cfg.paths]} are not "
                            f"the model's; it knows {pert_names}")  # fmt: skip
        table.pert_names = list(pert_names)
        return cls(cfg, 0, table, split=np.full(len(table.pert), "test"))

    def sets(self, which: str, epoch: int = 0) -> CellSetDataset:
        """The sets of split ``which``; training sets change with ``epoch``, evaluation sets do not."""
        split_id = SPLITS.index(which)
        rng = np.random.default_rng([self.seed, split_id, epoch if which == "train" else 0])
        groups = self.groups[which]
        return CellSetDataset(self.table, groups, sample_sets(groups, self.cfg.cell_set_len, rng))

    def loader(
        self, which: str, batch_size: int, epoch: int = 0, num_workers: int = 0
    ) -> DataLoader:
        return DataLoader(self.sets(which, epoch), batch_size=batch_size, shuffle=False,
                          collate_fn=collate_sets, num_workers=num_workers)  # fmt: skip

    def summary(self) -> dict:
        counts = {s: int((self.split == s).sum()) for s in SPLITS}
        return {"cells": len(self.split), "dim": self.table.dim, "perturbations": self.table.pert_names,
                "split_cells": counts, "groups": {s: len(g) for s, g in self.groups.items()},
                "skipped": list(self.report)}  # fmt: skip
