"""Fine-tuned artifacts reload onto their base; merged exports load as State checkpoints."""

import json

import pytest
import torch

from st_finetune.model import export_merged, load_finetuned, load_pretrained, save_finetuned

from .conftest import batch_for
from .test_adapt import VARIANTS, prepared


def perturb_trainables(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("variant", ["lora", "lora_mhc", "lora_mhc_bf16"])
def test_artifact_roundtrip(model_folder, tmp_path, variant):
    _, folder = model_folder
    model, rebuilt, _ = prepared(folder, variant, input_dim=10, perts=["burn", "sham"])
    perturb_trainables(model)
    model.eval()
    model.config.cell_set_len = 16  # fine-tuned on sets of 16 cells, the base on sets of 8
    _, info = load_pretrained(folder)
    lora, mhc = VARIANTS[variant]
    out = save_finetuned(model, tmp_path / "art", base_checkpoint=info.checkpoint,
                         base_sha256=info.sha256, pert_names=["burn", "sham"], rebuilt=rebuilt,
                         lora=lora, mhc=mhc)  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < (folder / "final.ckpt").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_sha256"] == info.sha256
    reloaded, _ = load_finetuned(out)
    assert reloaded.config.cell_set_len == 16
    batch = {"pert_emb": torch.eye(2)[[0, 1] * 8], "ctrl_cell_emb": torch.randn(16, 10)}
    torch.testing.assert_close(reloaded(batch), model(batch), rtol=1e-6, atol=1e-6)


def test_artifact_refuses_a_different_base(model_folder, tmp_path):
    _, folder = model_folder
    model, rebuilt, _ = prepared(folder, "lora")
    _, info = load_pretrained(folder)
    out = save_finetuned(model, tmp_path / "art", base_checkpoint=info.checkpoint,
                         base_sha256="0" * 64, pert_names=info.pert_names, rebuilt=rebuilt,
                         lora=VARIANTS["lora"][0], mhc=VARIANTS["lora"][1])  # fmt: skip
    with pytest.raises(ValueError, match="sha256"):
        load_finetuned(out)


def test_merged_export_loads_as_a_state_checkpoint(model_folder, tmp_path):
    writer, folder = model_folder
    model, _, _ = prepared(folder, "lora_mhc")
    perturb_trainables(model)
    model.eval()
    path = export_merged(model, tmp_path / "merged.ckpt", mhc=VARIANTS["lora_mhc"][1])
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any("lora_" in k or "base_layer" in k for k in state)
    assert set(writer.state_dict()) <= set(state)
    assert any(".attn_hc.phi" in k for k in state)
    merged, _ = load_pretrained(path)
    batch = batch_for(writer.config)
    torch.testing.assert_close(merged(batch), model(batch), rtol=1e-5, atol=1e-5)
