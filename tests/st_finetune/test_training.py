"""The Lightning pieces: the set losses and the precision they are computed in."""

import pytest
import torch
from torch import nn

from st_finetune.config import TrainingConfig
from st_finetune.metrics import energy_distance
from st_finetune.training import STLightning, set_loss


def test_energy_loss_is_the_energy_distance_per_set():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 40, 16, generator=gen, dtype=torch.float64).unbind()
    y = y + torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)[:, None, None]  # three distances
    loss = set_loss("energy")(x, y)
    assert loss.shape == (3,)
    # geomloss floors each distance at 1e-4 (the square root of its 1e-8 clamp): the 40 zero
    # distances of a set to itself move each of E|x-x'| and E|y-y'| up by 1e-4 / 40
    exact = [energy_distance(a, b) for a, b in zip(x, y, strict=True)]
    floored = torch.tensor(exact, dtype=torch.float64) - 1e-4 / 40
    torch.testing.assert_close(loss, floored, rtol=0, atol=1e-12)
    assert loss[0] < loss[1] < loss[2]


class Fixed(nn.Module):
    """A model whose prediction autocast cannot touch: the control cells scaled (float32)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.1))

    def forward(self, batch):
        return batch["ctrl_cell_emb"] * self.scale


@pytest.mark.parametrize("loss", ["energy", "sinkhorn", "mse"])
def test_set_losses_are_float32_under_bf16_mixed_precision(loss):
    # what Lightning's bf16-mixed does: the training step under autocast. The energy distance of
    # 256-cell sets in 512 dimensions is ~0.13 while the mean distances are ~32: bf16 products in
    # the pairwise distances moved it by 2% (5% in 2048 dimensions) before the loss left autocast.
    gen = torch.Generator().manual_seed(0)
    cells, dim = 256, 512
    batch = {"ctrl_cell_emb": torch.randn(2 * cells, dim, generator=gen),
             "pert_cell_emb": torch.randn(2 * cells, dim, generator=gen)}  # fmt: skip
    module = STLightning(Fixed(), TrainingConfig(loss=loss), set_len=cells)
    exact = module.set_losses(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = module.set_losses(batch)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-5, atol=0)


def test_checkpoints_without_the_frozen_weights_must_hold_what_trains():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].requires_grad_(False)  # frozen: the base checkpoint's
    module = STLightning(model, TrainingConfig(loss="mse"), set_len=4, frozen_from_base=True)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["state_dict"]) == ["model.1.bias", "model.1.weight"]
    assert not module.strict_loading
    module.on_load_checkpoint(checkpoint)
    del checkpoint["state_dict"]["model.1.bias"]
    with pytest.raises(ValueError, match=r"lacks 1 trained weights of this model, e.g. \['model.1"):
        module.on_load_checkpoint(checkpoint)
    whole = STLightning(model, TrainingConfig(loss="mse"), set_len=4)  # no base: every weight
    checkpoint = {"state_dict": whole.state_dict()}
    whole.on_save_checkpoint(checkpoint)
    assert len(checkpoint["state_dict"]) == 4 and whole.strict_loading
