"""The model as a visible composition: vision tower, projector, language model.

Trainability is decided here and only here, by component name, and reported as a table at every stage
start. Works on a plain ``LlavaForConditionalGeneration`` and on one wrapped by peft (LoRA), whose
parameter names gain a ``base_model.model.`` prefix; an assembled Idefics3 model is counted the same way.
Knows nothing about distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from align.feature_cache import tower_features

COMPONENTS = ("vision", "projector", "llm")


def component_of(param_name: str) -> str:
    """Which component a parameter belongs to, from its (possibly peft-prefixed) name."""
    if "vision_tower." in param_name:
        return "vision"
    # LLaVA-NeXT's image_newline (row separator) is trained with the projector, as LLaVA-NeXT does
    if "multi_modal_projector." in param_name or "image_newline" in param_name:
        return "projector"
    if "language_model." in param_name or "lm_head." in param_name:
        return "llm"
    # Idefics3 (pixel-shuffle connector) names its parts vision_model / connector / text_model
    if "vision_model." in param_name:
        return "vision"
    if "connector." in param_name:
        return "projector"
    if "text_model." in param_name:
        return "llm"
    raise ValueError(f"parameter {param_name!r} belongs to no component of {COMPONENTS}")


def llava_of(model: nn.Module) -> nn.Module:
    """The Llava model inside a peft wrapper (its LoRA layers active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # per forward: no param scan


def image_features(
    model: nn.Module, pixel_values: torch.Tensor | None = None, tower_output: torch.Tensor | None = None
) -> torch.Tensor:
    """The one image-embedding path of every forward (SFT's, the sampler's prefill, the log-prob passes):
    the tower's selected hidden states, computed from ``pixel_values`` (on the tower's device and dtype) or
    the ``tower_output`` the feature cache kept, through the projector: ``[images, tokens, hidden]``. The same
    numbers as transformers' ``get_image_features`` (tests/test_stages.py checks it bitwise)."""
    if tower_output is None:
        cfg = model.config
        tower_output = tower_features(
            model.model.vision_tower,
            pixel_values,
            cfg.vision_feature_layer,
            cfg.vision_feature_select_strategy,
        )
    return model.model.multi_modal_projector(tower_output)


def component_parameters(model: nn.Module, component: str) -> Iterable[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if component_of(n) == component)


def apply_trainability(model: nn.Module, *, vision: bool, projector: bool, llm: bool, lora: bool) -> None:
    """The one decision of what a stage trains, by component (the recipe's ``trainable`` section).

    With LoRA (``lora``) the LLM's own weights stay frozen and only its adapters train.
    """
    set_trainable(model, {"vision": vision, "projector": projector, "llm": llm and not lora})


def set_trainable(model: nn.Module, trainable: dict[str, bool]) -> None:
    """Freeze or unfreeze whole components; ``trainable`` must name every component.

    LoRA adapters (names containing ``lora_``) stay trainable inside a frozen LLM: that is what LoRA means.
    """
    missing = set(COMPONENTS) - set(trainable)
    if missing:
        raise ValueError(f"set_trainable needs a flag for every component; missing {sorted(missing)}")
    for name, param in model.named_parameters():
        flag = trainable[component_of(name)] or "lora_" in name
        param.requires_grad_(flag)


def parameter_table(
    model: nn.Module, numel: Callable[[nn.Parameter], int] = nn.Parameter.numel
) -> list[tuple[str, int, int]]:
    """(component, parameters, trainable parameters) for each component, in COMPONENTS order.

    ``numel`` counts a parameter's elements (a stage passes the engine's, which sees through partitioning).
    """
    totals = {c: [0, 0] for c in COMPONENTS}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        n = numel(param)
        totals[component_of(name)][0] += n
        if param.requires_grad:
            totals[component_of(name)][1] += n
    return [(c, *totals[c]) for c in COMPONENTS]


def format_parameter_table(rows: list[tuple[str, int, int]], title: str = "parameters") -> str:
    lines = [f"{title}:", f"  {'component':<10} {'total':>14} {'trainable':>14}"]
    for component, total, trainable in rows:
        lines.append(f"  {component:<10} {total:>14,} {trainable:>14,}")
    lines.append(f"  {'all':<10} {sum(r[1] for r in rows):>14,} {sum(r[2] for r in rows):>14,}")
    return "\n".join(lines)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter, to prove later what changed and what did not."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
