"""``align inspect PATH``: what a model folder holds, without loading its weights.

Prints the export class, components and parameter counts (from the config, on the meta device), the projector
option, the image token count the processor produces, the dtype, whether the weight names follow the layout
transformers and vLLM load (canonical llava-hf; SmolVLM's for Idefics3), and what the chat template does (does
the generation prompt prefill ``<think>``? does it strip reasoning from history?).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.checkpoint import CANONICAL_PREFIXES, image_seq_len, weight_names
from align.errors import AlignError
from align.model import format_parameter_table, parameter_table


def template_behaviour(tokenizer) -> dict[str, bool | str]:
    """Render the chat template on probe messages and report its reasoning-related behaviour."""
    if not tokenizer.chat_template:
        return {"has_template": False}
    user = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    history = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": "<think>\nREASONING\n</think>\nANSWER"}], tokenize=False
    )
    return {
        "has_template": True,
        "prefills_think": prompt.rstrip().endswith("<think>"),
        "strips_reasoning_from_history": "REASONING" not in history and "ANSWER" in history,
        "generation_prompt_tail": prompt[-40:],
    }


# what `align assemble` exports, by model_type: the class and the prefixes its weight names start with
CLASSES = {
    "llava": ("LlavaForConditionalGeneration", CANONICAL_PREFIXES),
    "llava_next": ("LlavaNextForConditionalGeneration", CANONICAL_PREFIXES),
    "idefics3": (
        "Idefics3ForConditionalGeneration",
        ("model.vision_model.", "model.connector.", "model.text_model.", "lm_head."),
    ),
}


def projector_of(config) -> str:
    """The assembly option a config holds, named as an assemble recipe's ``projector.type`` names it."""
    if config.model_type == "idefics3":
        return f"pixel_shuffle x{config.scale_factor}"
    if config.model_type == "llava_next":
        size = config.vision_config.image_size
        grids = ", ".join(f"{h // size}x{w // size}" for h, w in config.image_grid_pinpoints)
        return f"mlp2x_{config.projector_hidden_act}, anyres {grids}"
    return f"mlp2x_{config.projector_hidden_act}"


def describe(folder: str | Path) -> dict:
    """A JSON-able description of a Llava (or assembled LLaVA-NeXT / Idefics3) folder."""
    import transformers
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise AlignError(f"{folder}: not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in CLASSES:
        raise AlignError(f"{folder}: model_type is {config.model_type!r}, expected one of {sorted(CLASSES)}")
    class_name, prefixes = CLASSES[config.model_type]
    with torch.device("meta"):
        model = getattr(transformers, class_name)(config)
    processor = AutoProcessor.from_pretrained(folder)
    names = weight_names(folder)
    off_layout = [n for n in names if not n.startswith(prefixes)]
    rows = parameter_table(model)
    llava = config.model_type != "idefics3"
    size = config.vision_config.image_size
    return {
        "path": str(folder),
        "class": class_name,
        "vision": config.vision_config.model_type,
        "llm": config.text_config.model_type,
        "parameters": {c: total for c, total, _ in rows},
        # of a tower-sized image: anyres (LLaVA-NeXT) gives more to larger images
        "image_tokens": image_seq_len(processor, Image.new("RGB", (size, size))),
        "projector": projector_of(config),
        # Idefics3 reads the (cut) tower's last layer through its post-LayerNorm, every patch token
        "feature_layer": config.vision_feature_layer if llava else -1,
        "select_strategy": config.vision_feature_select_strategy if llava else "full",
        "dtype": str(getattr(config, "dtype", None) or config.text_config.dtype),
        "canonical_layout": not off_layout,
        "off_layout_examples": off_layout[:3],
        "vocab": len(processor.tokenizer),
        "chat_template": template_behaviour(processor.tokenizer),
        "_rows": rows,
    }


def add_arguments(parser) -> None:
    parser.add_argument("path", help="model folder")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    info = describe(args.path)
    rows = info.pop("_rows")
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model folder: {info['path']} ({info['class']})")
    print(
        f"  vision tower:   {info['vision']} (feature layer {info['feature_layer']}, {info['select_strategy']})"
    )
    print(f"  projector:      {info['projector']}")
    print(f"  language model: {info['llm']} (vocab {info['vocab']:,})")
    more = " (a tower-sized image; larger ones add tiles)" if info["class"].startswith("LlavaNext") else ""
    print(f"  image tokens:   {info['image_tokens']} per <image>{more}")
    print(f"  dtype:          {info['dtype']}")
    canonical = (
        "canonical llava-hf" if info["class"].startswith("Llava") else f"{info['class']} (SmolVLM layout)"
    )
    layout = canonical if info["canonical_layout"] else f"NOT canonical, e.g. {info['off_layout_examples']}"
    print(f"  weight names:   {layout}")
    tpl = info["chat_template"]
    if tpl["has_template"]:
        print(
            f"  chat template:  prefills <think>: {tpl['prefills_think']}; "
            f"strips reasoning from history: {tpl['strips_reasoning_from_history']}"
        )
    else:
        print("  chat template:  none")
    print(format_parameter_table(rows))
    return 0
