import pytest
import torch

from st_finetune.config import load_config
from st_finetune.demo import make_wound_study
from st_finetune.model import STConfig, STModel, write_model_folder
from st_finetune.train import run

PERTS = ["drugA", "drugB", "drugC", "drugD", "DMSO"]


def tiny_config(backbone="llama", **overrides) -> STConfig:
    kwargs = {
        "llama": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                  "head_dim": 8, "intermediate_size": 64, "rms_norm_eps": 1e-6,
                  "max_position_embeddings": 64},
        "gpt2": {"n_layer": 2, "n_head": 4, "n_positions": 64, "resid_pdrop": 0.0,
                 "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    }[backbone]  # fmt: skip
    values = dict(input_dim=12, output_dim=12, pert_dim=len(PERTS), hidden_dim=32, cell_set_len=8,
                  n_encoder_layers=2, n_decoder_layers=2, embed_key="X_hvg",
                  transformer_backbone_key=backbone, transformer_backbone_kwargs=kwargs)  # fmt: skip
    values.update(overrides)
    return STConfig(**values)


def tiny_model(backbone="llama", seed=0, **overrides) -> STModel:
    torch.manual_seed(seed)
    model = STModel(tiny_config(backbone, **overrides))
    with torch.no_grad():  # random, non-trivial weights everywhere (norms included)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch_for(config: STConfig, sets=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = sets * config.cell_set_len
    pert = torch.nn.functional.one_hot(torch.randint(0, config.pert_dim, (sets,), generator=gen),
                                       config.pert_dim).float()  # fmt: skip
    return {
        "pert_emb": pert.repeat_interleave(config.cell_set_len, dim=0),
        "ctrl_cell_emb": torch.rand(rows, config.input_dim, generator=gen),
    }


@pytest.fixture(params=["llama", "gpt2"])
def backbone(request):
    return request.param


@pytest.fixture
def model_folder(tmp_path, backbone):
    model = tiny_model(backbone)
    folder = write_model_folder(model, tmp_path / f"st-{backbone}", PERTS,
                                gene_names=[f"g{i}" for i in range(12)])  # fmt: skip
    return model, folder


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    study = make_wound_study(base / "study.h5ad")
    model = tiny_model(input_dim=64, output_dim=64, embed_key="X_state")
    folder = write_model_folder(model, base / "st", ["drugA", "drugB", "drugC", "drugD", "DMSO"])
    return study, folder


def overrides(inputs, out, **extra):
    study, folder = inputs
    args = {
        "name": "tiny", "output_dir": str(out), "data.paths": str(study),
        "model.checkpoint": str(folder), "data.cell_set_len": 16, "training.batch_size": 8,
        "training.max_epochs": 2, "training.lr": 1e-3, "training.warmup_steps": 5,
        "mhc.enable": True, "mhc.n_streams": 2, "mhc.sinkhorn_iters": 5, "lora.r": 4,
        "trainer.accelerator": "cpu", "trainer.progress_bar": False,
    }  # fmt: skip
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def tiny_run(inputs, tmp_path_factory):
    """A finished one-epoch LoRA + mHC run on the tiny inputs, with a gene decoder (the study's
    genes in X), for the tests that read runs."""
    out = tmp_path_factory.mktemp("runs")
    run(load_config(None, overrides(inputs, out, **{"training.max_epochs": 1, "data.gene_key": "X",
                                                    "decoder.hidden": 32,
                                                    "decoder.max_epochs": 5})))  # fmt: skip
    return out / "tiny"
