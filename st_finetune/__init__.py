"""st_finetune: fine-tune State Transition (ST) models with LoRA and mHC on AnnData."""

from .model import (
    LoraSettings,
    MHCSettings,
    STConfig,
    STModel,
    export_merged,
    load_finetuned,
    load_pretrained,
    prepare_for_finetuning,
    save_finetuned,
)

__all__ = [
    "LoraSettings",
    "MHCSettings",
    "STConfig",
    "STModel",
    "export_merged",
    "load_finetuned",
    "load_pretrained",
    "prepare_for_finetuning",
    "save_finetuned",
]
