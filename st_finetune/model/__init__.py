"""The ST model, its checkpoints, and the LoRA + mHC adaptation."""

from .adapt import LoraSettings, MHCSettings, prepare_for_finetuning
from .artifact import export_merged, load_finetuned, save_finetuned
from .checkpoint import PretrainedInfo, load_pretrained, save_state_checkpoint, write_model_folder
from .st import STConfig, STModel

__all__ = [
    "LoraSettings",
    "MHCSettings",
    "PretrainedInfo",
    "STConfig",
    "STModel",
    "export_merged",
    "load_finetuned",
    "load_pretrained",
    "prepare_for_finetuning",
    "save_finetuned",
    "save_state_checkpoint",
    "write_model_folder",
]
