import pytest
import torch


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled float tensors, so a kernel that forgets to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            with torch.no_grad():  # torch.utils.checkpoint asks for empty(..., requires_grad=True)
                out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same random inputs on every run."""
    torch.manual_seed(0)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
