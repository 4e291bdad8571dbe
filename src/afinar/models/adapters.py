"""LoRA / DoRA adapters via peft, or full fine-tuning: attach, save, load, merge."""

from __future__ import annotations

from pathlib import Path


def attach(model, method: str, lora) -> object:
    """Makes the right parameters trainable. `lora` is the LoraSettings part of the config."""
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, use_dora=lora.dora, bias="none",
        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def trainable_state(model) -> dict:
    """Only the trained tensors (LoRA weights, or everything for full fine-tuning)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n in names}


def load_trainable_state(model, state: dict) -> None:
    missing = set(state) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint has tensors the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)


def load_adapter(model, folder: Path, merge: bool = True):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(folder))
    # Merged weights generate as fast as the base model; the unmerged form adds LoRA matmuls.
    return model.merge_and_unload() if merge else model
