"""LoRA and mHC on a loaded ST model: step-0 equality, gradients, trainability, new heads."""

import logging

import pytest
import torch

from st_finetune.model import (
    LoraSettings,
    MHCSettings,
    STModel,
    load_pretrained,
    prepare_for_finetuning,
)
from st_finetune.model.adapt import is_lora_param, is_mhc_param

from .conftest import PERTS, batch_for

VARIANTS = {
    "lora": (LoraSettings(enable=True, r=4, alpha=8, dropout=0.0), MHCSettings(enable=False)),
    "lora_mhc": (
        LoraSettings(enable=True, r=4, alpha=8, dropout=0.0),
        MHCSettings(enable=True, n_streams=4, sinkhorn_iters=20),
    ),  # fmt: skip
    "mhc": (LoraSettings(enable=False), MHCSettings(enable=True, n_streams=2)),
    "lora_mhc_bf16": (
        LoraSettings(enable=True, r=4, alpha=8, dropout=0.0),
        MHCSettings(enable=True, stream_dtype="bfloat16"),
    ),  # fmt: skip
}
BF16_EPS = torch.finfo(torch.bfloat16).eps


def prepared(folder, variant, input_dim=12, perts=PERTS):
    model, info = load_pretrained(folder)
    lora, mhc = VARIANTS[variant]
    rebuilt, report = prepare_for_finetuning(model, input_dim=input_dim, pert_names=perts,
                                             pretrained_perts=info.pert_names, lora=lora, mhc=mhc)  # fmt: skip
    return model, rebuilt, report


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_zero_reproduces_the_pretrained_model(model_folder, variant):
    writer, folder = model_folder
    model, rebuilt, _ = prepared(folder, variant)
    assert rebuilt == []
    batch = batch_for(writer.config)
    expected = writer(batch)
    if VARIANTS[variant][1].stream_dtype == "bfloat16":  # a few roundings of the streams to bf16
        bound = 4 * BF16_EPS * expected.abs().max()
        assert (model.eval()(batch) - expected).abs().max() <= bound
    else:
        torch.testing.assert_close(model.eval()(batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_only_adapters_mhc_and_rebuilt_heads_train(model_folder, variant):
    _, folder = model_folder
    model, _, report = prepared(folder, variant)
    for name, p in model.named_parameters():
        assert p.requires_grad == (is_lora_param(name) or is_mhc_param(name)), name
    assert 0 < report["percent"] < 100
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_first_backward_reaches_every_trainable_parameter(model_folder):
    _, folder = model_folder
    model, _, _ = prepared(folder, "lora_mhc")
    model.train()
    batch = batch_for(model.config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def backward():
        opt.zero_grad()
        (
            model(batch) * torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
        ).sum().backward()

    backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values())  # every one is on the graph
    # exactly zero at step 0, by construction: LoRA A (its partner B starts at 0), and H_res and
    # the gates of mHC (identical streams; mhc_kernels/layer.py explains why)
    nonzero = [n for n, p in trainable.items() if p.grad.abs().max() > 0]
    assert any("lora_B" in n for n in nonzero) and any(n.endswith("hc.bias") for n in nonzero)
    opt.step()
    backward()
    dead = [n for n, p in trainable.items() if p.grad.abs().max() == 0]
    assert dead == [], f"no gradient after one update: {dead}"


def test_lora_is_applied_after_the_weights_are_loaded(model_folder):
    writer, folder = model_folder
    model, _, _ = prepared(folder, "lora")
    name = "q_proj" if writer.config.transformer_backbone_key == "llama" else "c_attn"
    loaded = {k: v for k, v in model.state_dict().items() if name in k and "base_layer" in k}
    original = {k: v for k, v in writer.state_dict().items() if name in k}
    assert len(loaded) == len(original) > 0
    for (_, a), (_, b) in zip(sorted(loaded.items()), sorted(original.items()), strict=True):
        torch.testing.assert_close(a, b)


def test_new_feature_space_and_perturbations_rebuild_heads(model_folder, caplog):
    _, folder = model_folder
    with caplog.at_level(logging.INFO, logger="st_finetune"):
        model, rebuilt, _ = prepared(folder, "lora_mhc", input_dim=20, perts=["burn", "sham"])
    assert sorted(rebuilt) == ["basal_encoder", "pert_encoder", "project_out"]
    assert "rebuilding basal_encoder and project_out" in caplog.text
    assert "new pert_encoder" in caplog.text
    for name, p in model.named_parameters():
        if name.split(".")[0] in rebuilt:
            assert p.requires_grad, name
    batch = {"pert_emb": torch.eye(2)[[0, 1] * 8], "ctrl_cell_emb": torch.randn(16, 20)}
    assert model(batch).shape == (16, 20)


def test_rebuilding_heads_leaves_the_checkpoints_config_alone(model_folder):
    # the model's config is its own: the checkpoint's (and another model built from the same
    # STConfig) keep the pretrained dimensions, and a second model is built as the first was
    _, folder = model_folder
    model, info = load_pretrained(folder)
    twin = STModel(info.config)
    lora, mhc = VARIANTS["lora"]
    prepare_for_finetuning(model, input_dim=20, pert_names=["burn", "sham"],
                           pretrained_perts=info.pert_names, lora=lora, mhc=mhc)  # fmt: skip
    assert (model.config.input_dim, model.config.pert_dim) == (20, 2)
    assert (info.config.input_dim, info.config.pert_dim) == (12, len(PERTS))
    assert (twin.config.input_dim, twin.config.pert_dim) == (12, len(PERTS))
    assert STModel(info.config).basal_encoder[0].in_features == 12


def test_lora_targets_must_be_layers_of_the_backbone(model_folder, backbone):
    _, folder = model_folder
    model, info = load_pretrained(folder)
    known = "self_attn.q_proj" if backbone == "llama" else "attn.c_attn"  # a dotted suffix is fine
    with pytest.raises(ValueError, match=r"\['qproj'\] are not layers of the .* linear layers: \["):
        prepare_for_finetuning(model, input_dim=12, pert_names=PERTS, pretrained_perts=PERTS,
                               lora=LoraSettings(target_modules=["qproj", known]),
                               mhc=MHCSettings())  # fmt: skip
    prepare_for_finetuning(model, input_dim=12, pert_names=PERTS, pretrained_perts=PERTS,
                           lora=LoraSettings(target_modules=[known]), mhc=MHCSettings())  # fmt: skip


def test_mhc_layers_subset_and_out_of_range(model_folder):
    _, folder = model_folder
    model, info = load_pretrained(folder)
    with pytest.raises(ValueError, match="out of range"):
        prepare_for_finetuning(model, input_dim=12, pert_names=PERTS, pretrained_perts=info.pert_names,
                               lora=LoraSettings(enable=False),
                               mhc=MHCSettings(enable=True, layers=[5]))  # fmt: skip


def test_mhc_recomputation_gives_the_same_gradients(model_folder):
    """``mhc.recompute = k``: one kept stream per k connections, same loss and gradients; the
    same for the fused backward (``mhc.extra: {fused_backward: true}``)."""
    _, folder = model_folder
    lora = LoraSettings(enable=True, r=4, alpha=8, dropout=0.0)
    grads = []
    for settings in ({}, {"recompute": 3}, {"extra": {"fused_backward": True}}):
        torch.manual_seed(0)  # the same LoRA initialisation
        model, info = load_pretrained(folder)
        prepare_for_finetuning(model, input_dim=12, pert_names=PERTS,
                               pretrained_perts=info.pert_names, lora=lora,
                               mhc=MHCSettings(enable=True, **settings))  # fmt: skip
        with torch.no_grad():  # streams that differ, so every part of mHC is live
            for name, p in model.named_parameters():
                if "hc." in name or "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
        model.train()
        upstream = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
        (model(batch_for(model.config)) * upstream).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], msg=name)
    with pytest.raises(ValueError, match="mhc.recompute"):
        MHCSettings(enable=True, recompute=-1).mhc_config()


@pytest.mark.parametrize("layers", [None, [0]], ids=["all", "first"])
def test_bf16_streams_follow_float32_streams(model_folder, layers):
    """``mhc.stream_dtype: bfloat16``: the branches still compute in float32 (this CPU model has no
    autocast); with streams that differ (every part of mHC live), the layers without mHC included,
    the outputs stay within a few bf16 roundings of float32 streams', and the gradients of the
    trainable parameters within what the streams' roundings to bf16 can cost: one per sub-layer
    plus the first, each no more than rounding the backbone's input to bf16 once costs (how much
    that is depends on the weights: 0.1-0.2% of the gradients' norm for three of these tiny
    models, 10% for the GPT2 one with mHC in its first layer only, where bf16 streams cost no more)."""
    from st_finetune.model.backbones import decoder_layers, unwrap

    _, folder = model_folder
    lora = LoraSettings(enable=True, r=4, alpha=8, dropout=0.0)

    def round_input(module, args, kwargs):
        return args, {"inputs_embeds": kwargs["inputs_embeds"].bfloat16().float()}

    def run(stream_dtype, rounded_input=False):
        torch.manual_seed(0)
        model, info = load_pretrained(folder)
        prepare_for_finetuning(model, input_dim=12, pert_names=PERTS,
                               pretrained_perts=info.pert_names, lora=lora,
                               mhc=MHCSettings(enable=True, layers=layers,
                                               stream_dtype=stream_dtype))  # fmt: skip
        backbone = unwrap(model.transformer_backbone)
        if rounded_input:
            backbone.register_forward_pre_hook(round_input, with_kwargs=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "hc." in name or "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p))
        out = model.train()(batch_for(model.config))
        upstream = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
        (out * upstream).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        return out.detach(), grads, 2 * len(decoder_layers(backbone)) + 1

    (out, grads, roundings), (out_bf16, grads_bf16, _) = run("float32"), run("bfloat16")
    _, grads_rounded, _ = run("float32", rounded_input=True)
    assert out_bf16.dtype == torch.float32
    assert (out_bf16 - out).abs().max() <= 4 * BF16_EPS * out.abs().max()
    assert torch.isfinite(grads_bf16).all()
    assert (grads_bf16 - grads).norm() <= roundings * (grads_rounded - grads).norm()
    with pytest.raises(ValueError, match="mhc.stream_dtype must be one of"):
        MHCSettings(enable=True, stream_dtype="float16")


def test_streams_take_the_hidden_states_dtype_unless_told(model_folder, monkeypatch):
    """Under bf16 autocast (the trainer's GPU default) the encoders hand the backbone bf16 hidden
    states: ``auto`` streams are bf16, as a plain residual is; ``float32`` keeps them float32
    (the branches then get bf16 inputs, as without mHC). Forward and backward run either way."""
    from mhc_kernels import HyperConnection

    _, folder = model_folder
    seen = []
    connect = HyperConnection.connect
    monkeypatch.setattr(HyperConnection, "connect",
                        lambda self, x, *a, **k: seen.append(x.dtype) or connect(self, x, *a, **k))  # fmt: skip
    for stream_dtype, expected in (("auto", torch.bfloat16), ("float32", torch.float32)):
        model, info = load_pretrained(folder)
        prepare_for_finetuning(model, input_dim=12, pert_names=PERTS,
                               pretrained_perts=info.pert_names, lora=LoraSettings(enable=False),
                               mhc=MHCSettings(enable=True, stream_dtype=stream_dtype))  # fmt: skip
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.train()(batch_for(model.config))
        out.float().square().sum().backward()
        assert seen and set(seen) == {expected}
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
