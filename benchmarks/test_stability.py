"""Stability suite (issue 7): plain residual vs HC vs mHC, trained from the same seed and data.

``pytest benchmarks/test_stability.py --benchmark-only`` (``MHC_STABILITY_SCALE=large`` on a GPU).
Writes ``benchmarks/results/stability-<scale>/`` (JSON of every series, PNG figures). The assertions
check what the paper claims and the maths guarantees for mHC; HC's behaviour is reported, not
asserted: whether its gains and gradient norms grow depends on the setting.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from conftest import DEVICE, environment
from stability import VARIANTS, MarkovSource, current_scale, summarise, train, write_results

RESULTS = Path(__file__).parent / "results"


@functools.cache
def run_for(variant: str, lr: float) -> dict:
    _, scale = current_scale()
    return train(scale, variant, lr, DEVICE, record_gains=True)


def runs_for(variant: str) -> list[dict]:
    return [run_for(variant, lr) for lr in current_scale()[1].lrs]


# one test per learning rate: each run is recorded as it finishes, so a capped step keeps it
@pytest.mark.parametrize("lr", current_scale()[1].lrs)
@pytest.mark.parametrize("variant", VARIANTS)
def test_stability_training(benchmark, record, variant, lr):
    run = benchmark.pedantic(lambda: run_for(variant, lr), rounds=1, iterations=1)
    record(variant=variant, scale=current_scale()[0], lr=lr, runs=[summarise(run)])


def test_stability_report(benchmark, record):
    name, scale = current_scale()
    runs = [r for v in VARIANTS for r in runs_for(v)]
    results = {"runs": runs, "entropy_rate": MarkovSource(scale.vocab, scale.seed).entropy_rate}
    path = benchmark.pedantic(
        lambda: write_results(results, RESULTS / f"stability-{name}", name, scale, environment()),
        rounds=1, iterations=1,
    )  # fmt: skip
    summary = [summarise(r) for r in runs]
    record(scale=name, results=str(path), summary=summary)
    for run in runs:
        if run["variant"] != "mhc" or "final_gains" not in run:
            continue
        gains = run["final_gains"]
        # rows of every H_res sum to 1 exactly, so the product's do too: forward gain 1
        assert max(abs(g - 1) for g in gains["composite_forward_gain"]) < 1e-3, run["lr"]
        assert max(gains["composite_backward_gain"]) <= 2.0, run["lr"]
    assert any(s["variant"] == "mhc" and not s["diverged"] for s in summary)
