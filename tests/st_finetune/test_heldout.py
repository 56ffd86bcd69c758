"""Where held-out predictions run: the GPU when there is one, the model back in place afterwards."""

import pytest
import torch

from st_finetune.heldout import evaluating, evaluation_device


def test_evaluation_runs_on_the_gpu_unless_the_run_asked_for_the_cpu_or_forks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation_device().type == "cuda" and evaluation_device("gpu").type == "cuda"
    assert evaluation_device("cpu").type == "cpu"
    assert evaluation_device(strategy="ddp").type == "cuda"
    assert evaluation_device(strategy="ddp_fork").type == "cpu"  # CUDA before a fork breaks it
    assert evaluation_device(strategy="ddp_notebook").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation_device().type == "cpu"


def test_evaluating_moves_the_model_there_and_back_even_on_errors(monkeypatch):
    model = torch.nn.Linear(2, 2).train()
    moves, to = [], model.to
    monkeypatch.setattr(model, "to", lambda device: moves.append(str(device)) or to("cpu"))
    with pytest.raises(RuntimeError, match="stop"), evaluating(model, "cuda"):
        assert not model.training
        raise RuntimeError("stop")
    assert moves == ["cuda", "cpu"]


def test_predictions_refuse_sets_of_another_length():
    # a model built for sets of 8 would read sets of 16 as two sets each, without an error
    from types import SimpleNamespace

    from st_finetune.heldout import predicted_sets

    from .conftest import tiny_model

    data = SimpleNamespace(cfg=SimpleNamespace(cell_set_len=16))
    with pytest.raises(ValueError, match="predicts sets of 8 cells but test's sets have 16"):
        next(predicted_sets(tiny_model(), data, "test", 4, "cpu"))
