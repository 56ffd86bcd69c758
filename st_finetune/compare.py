"""Train (or reuse) several variants and compare them: ``python -m st_finetune.compare FILE``.

The comparison file names a base run config, overrides for every variant, and the variants::

    title: ST-LoRA vs ST-LoRA-mHC on the demo
    base: configs/demo.yaml
    output_dir: runs/compare_demo
    overrides: [training.max_epochs=12]
    variants:
      st_lora: [mhc.enable=false]
      st_lora_mhc: [mhc.enable=true]

Runs go to ``output_dir/runs/<variant>``; a finished run with the same resolved config is reused.
The comparison (``results.csv``, ``report.md``, plots) goes to ``output_dir``. The pretrained
model and the two baselines are scored once, on the first variant's held-out split (every variant
shares the data, seed and hence the split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from .config import load_config, read_yaml, to_dict
from .data import DataError
from .evaluate import score_run, shift_trajectories
from .report import write_report
from .train import run, setup_logging

KEYS = {"title", "base", "output_dir", "overrides", "variants"}


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
    return spec


def variant_config(spec: dict, name: str, extra: list[str]):
    out = Path(spec.get("output_dir", "runs/compare"))
    overrides = [*spec.get("overrides", []), *(spec["variants"][name] or []), *extra,
                 f"name={name}", f"output_dir={out / 'runs'}"]  # fmt: skip
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


def compare(path: str | Path, extra: list[str] = ()) -> Path:
    """Run the comparison described by ``path``; returns the report's path."""
    spec = read_comparison(path)
    out = Path(spec.get("output_dir", "runs/compare"))
    run_dirs = {name: train_or_reuse(variant_config(spec, name, list(extra)))
                for name in spec["variants"]}  # fmt: skip
    frames, shifts = [], []
    for i, run_dir in enumerate(run_dirs.values()):
        rows, predictions, data = score_run(run_dir, baselines=i == 0)
        frame = pd.DataFrame(rows)
        if i:  # the pretrained model is scored once
            predictions.pop("pretrained", None)
            frame = frame[frame["variant"] != "pretrained"]
        frames.append(frame)
        shift = shift_trajectories(data, predictions)
        shifts.append(shift if i == 0 else shift[shift["variant"] != "observed"])
    results = pd.concat(frames, ignore_index=True)
    report = write_report(out, results, run_dirs, pd.concat(shifts, ignore_index=True),
                          spec.get("title", "Comparison"))  # fmt: skip
    print(f"[st_finetune] wrote {report} and {out / 'results.csv'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train or reuse variants and compare them.")
    parser.add_argument("comparison", help="comparison YAML (see the module docstring)")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every variant")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        report = compare(args.comparison, args.overrides)
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"[st_finetune] {err}", file=sys.stderr)
        return 1
    print(Path(report).read_text().split("## What the numbers")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
