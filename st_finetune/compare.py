"""Train (or reuse) several variants and compare them: ``python -m st_finetune.compare FILE``.

The comparison file names a base run config, overrides for every variant, and the variants::

    title: ST-LoRA vs ST-LoRA-mHC on the demo
    base: configs/demo.yaml
    output_dir: runs/compare_demo
    overrides: [training.max_epochs=12]
    seeds: [0, 1, 2]            # optional: replicate every variant
    variants:
      st_lora: [mhc.enable=false]
      st_lora_mhc: [mhc.enable=true]

Runs go to ``output_dir/runs/<variant>``, or with ``seeds`` (or ``--seeds 0 1 2`` on the command
line) to ``output_dir/runs/seed<k>/<variant>`` with ``training.seed=k``; a finished run with the
same resolved config is reused. The seed decides the split, the sampled sets and the
initialisation, so the variants of one seed share their held-out cells and are compared pair by
pair. The comparison (``results.csv`` with a ``seed`` column, ``report.md``, plots) goes to
``output_dir``. The pretrained model and the two baselines are scored once per seed, on the first
variant's held-out split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from .config import load_config, read_yaml, to_dict
from .evaluate import score_run, shift_trajectories
from .report import write_report
from .train import run, run_cli

KEYS = {"title", "base", "output_dir", "overrides", "seeds", "variants"}


def read_comparison(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"comparison file {path} does not exist")
    spec = read_yaml(path)
    unknown = set(spec) - KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in {path}; expected {sorted(KEYS)}")
    if not spec.get("variants"):
        raise ValueError(f"{path} lists no variants")
    spec["seeds"] = check_seeds(spec.get("seeds"), f"'seeds' in {path}")
    return spec


def check_seeds(seeds, where: str) -> list[int] | None:
    """``None`` (one run per variant, the base config's seed) or distinct integers."""
    if seeds is None:
        return None
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    ok = isinstance(seeds, list) and seeds
    if not ok or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"{where} must be a list of integers, e.g. [0, 1, 2]; got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where} repeats a seed: {seeds}")
    return seeds


def variant_config(spec: dict, name: str, extra: list[str], seed: int | None = None):
    """A variant's run config; with ``seed``, its replicate under ``runs/seed<seed>/``."""
    out = Path(spec.get("output_dir", "runs/compare")) / "runs"
    if seed is not None:
        out, extra = out / f"seed{seed}", [*extra, f"training.seed={seed}"]
    overrides = [*spec.get("overrides", []), *(spec["variants"][name] or []), *extra,
                 f"name={name}", f"output_dir={out}"]  # fmt: skip
    return load_config(spec.get("base"), overrides)


def train_or_reuse(cfg) -> Path:
    """Reuse a finished run whose resolved config matches; train otherwise."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if (run_dir / "summary.json").is_file() and saved.is_file():
        if yaml.safe_load(saved.read_text()) == yaml.safe_load(yaml.safe_dump(to_dict(cfg))):
            print(f"[st_finetune] reusing the finished run {run_dir}", file=sys.stderr)
            return run_dir
    run(cfg)
    return run_dir


def compare(path: str | Path, extra: list[str] = (), seeds: list[int] | None = None) -> Path:
    """Run the comparison described by ``path`` (``seeds`` replaces the file's); returns the
    report's path."""
    spec = read_comparison(path)
    seeds = check_seeds(seeds, "--seeds") or spec["seeds"]
    out = Path(spec.get("output_dir", "runs/compare"))
    configs = [variant_config(spec, name, list(extra), seed)
               for seed in seeds or [None] for name in spec["variants"]]  # fmt: skip
    run_seeds = list(dict.fromkeys(cfg.training.seed for cfg in configs))
    if seeds is None and len(run_seeds) > 1:  # a variant's overrides set training.seed
        chosen = {cfg.name: cfg.training.seed for cfg in configs}
        raise ValueError(
            f"the variants train with different seeds ({chosen}), so they would be scored on "
            "different held-out cells; set training.seed in the comparison's 'overrides', or "
            "list 'seeds' to replicate every variant"
        )
    run_dirs = {name: {} for name in spec["variants"]}  # variant -> seed -> run folder
    for cfg in configs:
        run_dirs[cfg.name][cfg.training.seed] = train_or_reuse(cfg)
    frames, shifts, plot = [], [], None
    for seed in run_seeds:
        for i, name in enumerate(run_dirs):
            rows, predictions, data = score_run(run_dirs[name][seed], baselines=i == 0)
            frame = pd.DataFrame(rows)
            if i:  # the pretrained model is scored once per seed
                predictions.pop("pretrained", None)
                frame = frame[frame["variant"] != "pretrained"]
            if seed == run_seeds[0]:  # its cells (one split per seed) and predictions, plotted
                plot = plot or (data, {})
                plot[1].update(predictions)
            frames.append(frame.assign(seed=seed))
            shift = shift_trajectories(data, predictions)
            shifts.append((shift if i == 0 else shift[shift["variant"] != "observed"])
                          .assign(seed=seed))  # fmt: skip
    results = pd.concat(frames, ignore_index=True)
    report = write_report(out, results, run_dirs, pd.concat(shifts, ignore_index=True),
                          spec.get("title", "Comparison"), plot)  # fmt: skip
    print(f"[st_finetune] wrote {report} and {out / 'results.csv'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m st_finetune.compare",
        description="Train or reuse variants and compare them.",
    )
    parser.add_argument("comparison", help="comparison YAML (see the module docstring)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every variant")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help="train every variant once per seed (replaces the file's 'seeds')")  # fmt: skip
    args = parser.parse_args(argv)

    def job():
        report = compare(args.comparison, args.overrides, args.seeds)
        print(Path(report).read_text().split("## What the numbers")[0])

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
