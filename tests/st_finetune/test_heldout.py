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
