"""Fine-tuned artifacts: small adapter folders, and merged State-format checkpoints.

Adapter folder (what training writes; megabytes, not the whole model)::

    manifest.json        base checkpoint (path, sha256), settings, perturbations, rebuilt heads,
                         cells per set
    adapter/             peft's adapter_config.json + adapter_model.safetensors (LoRA only)
    extra_state.pt       mHC coefficients and rebuilt heads (state_dict tensors only)

:func:`load_finetuned` rebuilds the model on the base checkpoint (refusing a base whose hash differs)
and gives the same outputs as the model that was saved.

Merged checkpoint (:func:`export_merged`): a State-format ``.ckpt`` with LoRA merged into the
backbone weights, so State's keys are unchanged; mHC parameters sit under their own keys,
``transformer_backbone.layers.{i}.{attn_hc,mlp_hc}.{phi,bias,alpha}`` (GPT2: ``.h.{i}.``), and
``hyper_parameters["mhc"]`` records the settings that :func:`load_pretrained` needs to rebuild them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel

from .adapt import LoraSettings, MHCSettings, adapt_heads, add_mhc, is_mhc_param, quiet_peft
from .backbones import unwrap
from .checkpoint import file_sha256, load_pretrained, safe_torch_load, save_state_checkpoint
from .st import STModel

MANIFEST = "manifest.json"


def save_finetuned(model: STModel, folder: str | Path, *, base_checkpoint: Path, base_sha256: str,
                   pert_names: list[str], rebuilt: list[str], lora: LoraSettings,
                   mhc: MHCSettings) -> Path:  # fmt: skip
    """Write the adapter folder for ``model`` (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = model.transformer_backbone
    if isinstance(backbone, PeftModel):
        backbone.save_pretrained(folder / "adapter")
    extra = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if is_mhc_param(k) or k.split(".")[0] in rebuilt}  # fmt: skip
    torch.save(extra, folder / "extra_state.pt")
    manifest = {
        "base_checkpoint": str(Path(base_checkpoint).resolve()),
        "base_sha256": base_sha256,
        "pert_names": list(pert_names),
        "input_dim": model.config.input_dim,
        "cell_set_len": model.config.cell_set_len,
        "rebuilt_heads": rebuilt,
        "lora": asdict(lora) if isinstance(backbone, PeftModel) else None,
        "mhc": asdict(mhc) if mhc.enable else None,
        "mhc_keys": sorted(k for k in extra if is_mhc_param(k)),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def load_finetuned(folder: str | Path, base: str | Path | None = None) -> tuple[STModel, dict]:
    """Rebuild a fine-tuned model from its adapter folder and its base checkpoint (eval mode)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a fine-tuned artifact: no {MANIFEST}")
    manifest = json.loads(manifest_path.read_text())
    model, info = load_pretrained(base or manifest["base_checkpoint"])
    if info.sha256 != manifest["base_sha256"]:
        raise ValueError(
            f"base checkpoint {info.checkpoint} has sha256 {info.sha256[:12]}..., but the adapters "
            f"were trained on {manifest['base_sha256'][:12]}...: pass the right base checkpoint"
        )
    adapt_heads(model, manifest["input_dim"], manifest["pert_names"], info.pert_names,
                announce=False)  # fmt: skip
    # the sets it was fine-tuned on (the base's otherwise: artifacts written before this was kept)
    model.config.cell_set_len = manifest.get("cell_set_len", model.config.cell_set_len)
    if manifest["mhc"]:
        add_mhc(model, MHCSettings(**manifest["mhc"]), announce=False)
    if manifest["lora"]:
        with quiet_peft():
            model.transformer_backbone = PeftModel.from_pretrained(
                model.transformer_backbone, folder / "adapter"
            )
    extra = safe_torch_load(folder / "extra_state.pt")
    missing = [k for k in extra if k not in model.state_dict()]
    if missing:
        raise ValueError(f"extra_state.pt has keys the rebuilt model lacks: {missing[:5]}")
    model.load_state_dict(extra, strict=False)
    return model.eval(), manifest


def merged_state(model: STModel) -> dict:
    """State-format state_dict of ``model`` with LoRA merged (the model itself is not changed)."""
    merged = copy.deepcopy(model)
    if isinstance(merged.transformer_backbone, PeftModel):
        merged.transformer_backbone = merged.transformer_backbone.merge_and_unload()
    return merged.state_dict()


def export_merged(model: STModel, path: str | Path, mhc: MHCSettings | None = None,
                  pert_names: list[str] | None = None) -> Path:  # fmt: skip
    """Write a State-format checkpoint with LoRA merged and mHC under its own keys."""
    extra = {"pert_names": list(pert_names or [])}
    base = unwrap(model.transformer_backbone)
    if getattr(base, "mhc_streams", None):
        if mhc is None:
            raise ValueError("the model has mHC sites: pass the MHCSettings used to add them")
        extra["mhc"] = asdict(mhc)
    return save_state_checkpoint(model, path, extra, state_dict=merged_state(model))


__all__ = ["export_merged", "file_sha256", "load_finetuned", "merged_state", "save_finetuned"]
