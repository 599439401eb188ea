"""LoRA (peft) on the language model's linear layers, and merged weights for plain Llava checkpoints.

Adapters go on the LLM only: the projector trains fully and the vision tower is never adapted. Saving
computes ``W + delta`` for each adapted layer without touching the live model, so training can go on after a
checkpoint, and the saved folder is an ordinary Llava checkpoint. The adapter is saved beside it together with
the fully trained non-LoRA weights (projector, tower if trained) in ``non_lora_trainables.safetensors``, as
LLaVA's LoRA runs do: the adapter alone on top of the input model would miss the trained projector.

Tests: ``pytest tests/test_stages.py -k lora``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from align.checkpoint import canonical_state_dict
from align.errors import AlignError

_PEFT_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"  # peft's name for "every linear layer but the output head"
NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on ``target_modules`` inside ``language_model`` only.

    ``[ALL_LINEAR]`` adapts every linear layer of the LLM, whatever the family calls them (Phi-3 fuses
    ``qkv_proj`` and ``gate_up_proj``). Every other name must match a linear layer: one that matches nothing
    would silently adapt less than the recipe says (peft only complains when none matches, with a traceback).
    """
    from peft import LoraConfig, get_peft_model

    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if ".language_model." in f".{name}" and isinstance(module, nn.Linear)
    }
    if target_modules == [ALL_LINEAR]:
        target_modules = sorted(linear)
    unmatched = [t for t in target_modules if t not in linear]
    if unmatched:
        raise AlignError(
            f"lora.target_modules: {', '.join(map(repr, unmatched))} match no linear layer of the LLM; "
            f"its linear layers are named {', '.join(sorted(linear))}"
        )
    names = "|".join(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*language_model\..*\.({names})$",
        bias="none",
    )
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain ``LlavaForConditionalGeneration`` names and weights from a peft-wrapped state dict.

    Pure function on tensors (it also serves ZeRO-3, whose consolidated state dict arrives on rank 0 only):
    every ``X.base_layer.weight`` becomes ``X.weight + scaling * lora_B @ lora_A``; adapter tensors are dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if "lora_" in key:
            continue
        if key.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a = state_dict[f"{stem}.lora_A.default.weight"].float()
            b = state_dict[f"{stem}.lora_B.default.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")] = value
    return out


def save_adapter(
    model: nn.Module, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """The adapter (peft format) and the non-LoRA trainable weights (canonical Llava names) into ``folder``.

    ``state_dict`` is the consolidated peft-model state dict (``Engine.full_state_dict()``); pass it under
    ZeRO-3, where the live parameters are partitions and saving them would write empty tensors.
    """
    folder = Path(folder)
    state = state_dict if state_dict is not None else model.state_dict()
    model.save_pretrained(str(folder), state_dict=dict(state), save_embedding_layers=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    if trainable:
        plain = {k.removeprefix(_PEFT_PREFIX): v for k, v in state.items() if k in trainable}
        save_file(canonical_state_dict(plain), str(folder / NON_LORA_TRAINABLES), metadata={"format": "pt"})
