"""LoRA adapters through peft: wrap a model for training, load an adapter checkpoint, merge for export."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.architectures import architecture
from finetune.errors import FinetuneError, install_hint

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise FinetuneError(f"LoRA needs peft; install it with: {install_hint('lora')}") from None
    return peft


def is_adapter_checkpoint(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def targets_for(model: PreTrainedModel, requested: list[str]) -> list[str]:
    if requested:
        return requested
    model_type = model.config.model_type
    targets = architecture(model_type).lora_targets
    if not targets:
        raise FinetuneError(
            f"no default LoRA targets for '{model_type}' models; name the layers with --lora-targets q_proj,v_proj,..."
        )
    return list(targets)


def wrap_with_lora(
    model: PreTrainedModel,
    r: int,
    alpha: int,
    dropout: float,
    targets: list[str],
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Freeze the base model and add trainable LoRA adapters to the target layers."""
    peft = _peft()
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets_for(model, targets),
        fan_in_fan_out=architecture(model.config.model_type).conv1d_projections,
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:
        raise FinetuneError(f"LoRA could not be attached ({str(exc).splitlines()[0]}); check --lora-targets") from None


def load_adapter_for_training(base_model: PreTrainedModel, checkpoint: Path) -> PeftModel:
    """Base model + the checkpoint's adapter, trainable (for resuming)."""
    peft = _peft()
    return peft.PeftModel.from_pretrained(base_model, str(checkpoint), is_trainable=True)


def load_merged(checkpoint: Path, dtype: torch.dtype | None, trust_remote_code: bool = False) -> PreTrainedModel:
    """The base model with the adapter folded into its weights: a plain transformers model.

    The base is loaded (and checked) like any model; then the adapter, whose bad file is named.
    """
    from finetune import modeling
    from finetune.files import read_json, reading

    peft = _peft()
    fix = modeling.file_fix(checkpoint)
    config_path = checkpoint / ADAPTER_CONFIG
    base_name = read_json(config_path, "LoRA adapter config", fix, required=("base_model_name_or_path",))[
        "base_model_name_or_path"
    ]
    if not isinstance(base_name, str) or not base_name:
        raise FinetuneError(f"LoRA adapter config {config_path} names no base model (base_model_name_or_path); {fix}")
    try:
        base = modeling.load_pretrained_model(base_name, trust_remote_code, dtype=dtype)
    except FinetuneError as exc:
        if modeling.local_model_dir(base_name) is not None:
            raise  # the base directory's own bad file, already named
        raise FinetuneError(
            f"the base model '{base_name}' of LoRA checkpoint {checkpoint} is neither a local directory nor "
            f"loadable from the Hugging Face Hub or its cache ({str(exc).split(';')[0]}); make it available, "
            f"or point base_model_name_or_path in {config_path} at a local copy"
        ) from None
    weights = checkpoint / "adapter_model.safetensors"
    with reading(weights, "LoRA adapter", fix):
        model = peft.PeftModel.from_pretrained(base, str(checkpoint))
    # A NaN in the adapter is the checkpoint's fault; one in the base weights, the base model's.
    modeling.require_finite(
        model, checkpoint, fix, weights_file=lambda name: str(weights) if "lora_" in name else base_name
    )
    return model.merge_and_unload()
