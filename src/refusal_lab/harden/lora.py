"""The LoRA adapter the harden stage trains: its targets, its attachment (LoRA or 4-bit QLoRA) and its merge."""

from __future__ import annotations

from typing import Any

import torch

from refusal_lab.config import HardenSettings
from refusal_lab.core.model import Loaded
from refusal_lab.errors import UserError


def lora_targets(loaded: Loaded, spec: str) -> list[str]:
    """Leaf names of the linear maps inside the decoder layers ('all'), or the given ones, checked."""
    have = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in loaded.adapter.layers.named_modules()
            if isinstance(mod, torch.nn.Linear)
        }
    )
    if spec == "all":
        return have
    wanted = [x.strip() for x in spec.split(",") if x.strip()]
    missing = [x for x in wanted if x not in have]
    if missing:
        raise UserError(f"LoRA targets {missing} are not in the model", f"use some of: {', '.join(have)}, or 'all'")
    return wanted


def lora_config(loaded: Loaded, cfg: HardenSettings) -> Any:
    """The peft LoraConfig of these settings (targets checked against the model)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(loaded, cfg.lora_targets),
    )


def attach(loaded: Loaded, lora: Any, gradient_checkpointing: bool) -> torch.nn.Module:
    """The peft model: `loaded.model` prepared for training (QLoRA casts on 4-bit weights) with the adapter in it.

    peft injects the adapter into the base's own modules, so `loaded.model` runs through it too.
    """
    from peft import get_peft_model

    base = loaded.model
    if is_4bit(base):  # QLoRA: cast norms, prepare the inputs' grads (in place)
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, gradient_checkpointing)
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    return get_peft_model(base, lora)


def is_4bit(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (every LoRA weight), detached copies on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if "lora_" in k}


def merge_onto(model: torch.nn.Module, lora: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A trained adapter (`state`, from a 4-bit QLoRA run) merged into a full-precision copy of its base.

    4-bit weights cannot take the merge, so the adapter moves to the unquantised base. Every LoRA
    tensor must find its place: a key that does not match would leave the base unhardened without a word.
    """
    from peft import get_peft_model

    peft = get_peft_model(model, lora)
    want = {k for k in peft.state_dict() if "lora_" in k}
    if want != set(state):
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise RuntimeError(f"the adapter does not fit the full-precision base: missing {missing}, unexpected {extra}")
    peft.load_state_dict(state, strict=False)
    return peft.merge_and_unload()
