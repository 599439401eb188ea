"""``align plan RECIPE [--gpus N] [--json]``: parameters and per-GPU training memory, on the meta device.

This module owns three things:

* resolving the configs an ``assemble`` recipe names, offline: a local folder's ``config.json``; for a hub id,
  the copy shipped in ``recipes/models/<org>--<name>/config.json``, else the Hugging Face cache; open_clip
  towers through :func:`align.vision.hf_vision_config`;
* :func:`plan_model`: the assembled model built on the meta device in the class its projector option exports
  to (``LlavaForConditionalGeneration`` for ``mlp2x_<act>`` with one or several feature layers,
  ``Idefics3ForConditionalGeneration`` for ``pixel_shuffle``; no weights are allocated, so a 70B plan runs on
  a laptop), counted per component, plus image tokens per image and the size of LoRA adapters;
* the report: that plan beside :func:`align.memory.memory_per_gpu` for each strategy.

Run: ``align plan recipes/real/assemble_siglip_so400m_r1_qwen7b.yaml --gpus 8`` (``--json`` for machines).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from align.config import RecipeError, load_any
from align.errors import AlignError
from align.memory import ACCOUNTING, STRATEGIES, memory_per_gpu

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedConfig

MODELS_DIR = Path(__file__).resolve().parent.parent / "recipes" / "models"
LORA_RANK = 128
STAGES = ("projector", "sft", "sft-lora", "grpo")
STRATEGY_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}


@dataclass(frozen=True)
class Plan:
    """Parameter counts of one assembled model (each tied tensor counted once)."""

    vision: int  # the whole tower as instantiated, including any pooling head
    vision_head: int  # part of `vision` LLaVA never uses: SigLIP's attention-pooling head (0 for CLIP)
    projector: int
    llm: int  # decoder + embed_tokens + lm_head
    llm_embed: int
    llm_head: int  # 0 when tied to embed_tokens
    vocab: int  # after adding the image token(s)
    image_tokens: int  # per image, after the select strategy (and the pixel shuffle)
    lora: int  # LoRA adapters of rank LORA_RANK on every LLM linear layer except lm_head
    export_class: str = "LlavaForConditionalGeneration"
    anyres_base: int | None = (
        None  # anyres: tokens of the whole image; image_tokens is then the most per image
    )

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm

    def split(self, stage: str) -> tuple[int, int]:
        """(trainable, frozen) parameters under a stage's default freezing."""
        if stage == "projector":
            trainable = self.projector
        elif stage in ("sft", "grpo"):
            trainable = self.projector + self.llm
        elif stage == "sft-lora":  # adapters are new parameters on top of a frozen base
            return self.projector + self.lora, self.total - self.projector
        else:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        return trainable, self.total - trainable


def image_tokens(vision_config: PreTrainedConfig, select_strategy: str) -> int:
    """Tokens one image becomes: patches, plus CLIP's CLS unless the ``default`` strategy drops it."""
    image, patch = vision_config.image_size, vision_config.patch_size
    image = image if isinstance(image, int) else image[0]
    patch = patch if isinstance(patch, int) else patch[0]
    cls = 1 if vision_config.model_type == "clip_vision_model" else 0
    if select_strategy == "default" and not cls:
        raise AlignError(
            f"select_strategy 'default' drops the first token as CLS, but {vision_config.model_type} has no CLS "
            f"token: it would drop a real patch of {(image // patch) ** 2}; use 'full'"
        )
    return (image // patch) ** 2 + cls - (1 if select_strategy == "default" else 0)


def default_select_strategy(vision_config: PreTrainedConfig) -> str:
    """LLaVA-1.5 drops CLIP's CLS token; SigLIP has none, so it keeps every token."""
    return "default" if vision_config.model_type == "clip_vision_model" else "full"


def lora_parameters(module: nn.Module, rank: int) -> int:
    """LoRA parameter count from shapes: A (rank x in) + B (out x rank) per ``nn.Linear`` in ``module``."""
    from torch import nn

    return sum(rank * (m.in_features + m.out_features) for m in module.modules() if isinstance(m, nn.Linear))


def plan_model(
    vision_config: PreTrainedConfig,
    text_config: PreTrainedConfig,
    feature_layer: int | list[int],
    select_strategy: str | None,
    vocab: int | None = None,
    lora_rank: int = LORA_RANK,
    projector: str = "mlp2x_gelu",
    scale_factor: int | None = None,
    anyres_grids: list[list[int]] | None = None,
) -> Plan:
    """Count the model assembled from two HF configs with projector option ``projector``, on the meta device.

    ``vocab`` is the number of embedding rows after adding ``<image>`` (None: the LLM's rows + 1);
    ``select_strategy`` None picks the LLaVA default for the tower; ``scale_factor``: ``pixel_shuffle`` only;
    ``anyres_grids``: LLaVA-NeXT tiling (image tokens are then the most one image can take).
    """
    from align.assemble import PIXEL_SHUFFLE, projector_activation

    layers = vision_config.num_hidden_layers
    for layer in feature_layer if isinstance(feature_layer, list) else [feature_layer]:
        if not -(layers + 1) <= layer <= layers:
            raise AlignError(
                f"vision feature_layer {layer} is out of range: the tower has {layers} layers, "
                f"so hidden states {-(layers + 1)}..{layers}"
            )
    text_config = copy.deepcopy(text_config)
    # Same shapes as resize_token_embeddings(vocab) after loading, without building twice.
    text_config.vocab_size = text_config.vocab_size + 1 if vocab is None else vocab
    if projector == PIXEL_SHUFFLE:
        return _plan_idefics3(vision_config, text_config, feature_layer, scale_factor, lora_rank)
    try:
        act = projector_activation(projector)
    except RecipeError as err:
        raise AlignError(f"projector.{err}") from None
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    strategy = select_strategy or default_select_strategy(vision_config)
    tokens = image_tokens(vision_config, strategy)
    config = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_seq_length=tokens,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
    )
    if anyres_grids is None:
        # any image token id: only shapes matter here
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(
                LlavaConfig(image_token_id=text_config.vocab_size - 1, **config)
            )
        export, most = "LlavaForConditionalGeneration", tokens
    else:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        from align.assemble import anyres_max_tokens

        size = vision_config.image_size
        pinpoints = [[rows * size, cols * size] for rows, cols in anyres_grids]
        config = LlavaNextConfig(
            image_token_index=text_config.vocab_size - 1, image_grid_pinpoints=pinpoints, **config
        )
        with torch.device("meta"):
            model = LlavaNextForConditionalGeneration(config)
        export = "LlavaNextForConditionalGeneration"
        most = anyres_max_tokens(tokens, size // vision_config.patch_size, anyres_grids)
    tower = model.model.vision_tower
    head = getattr(tower, "head", None) or getattr(getattr(tower, "vision_model", None), "head", None)
    plan = _count(model, model.model.language_model, head, most, export, lora_rank)
    return plan if anyres_grids is None else dataclasses.replace(plan, anyres_base=tokens)


def _plan_idefics3(
    vision_config: PreTrainedConfig,
    text_config: PreTrainedConfig,
    feature_layer: int | list[int],
    scale_factor: int | None,
    lora_rank: int,
) -> Plan:
    """The pixel-shuffle option: the tower cut after ``feature_layer``, a Linear on s^2 concatenated patches."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from align.assemble import IDEFICS3_LLMS, kept_layers

    if vision_config.model_type != "siglip_vision_model":
        raise AlignError(f"pixel_shuffle (Idefics3) needs a SigLIP tower, not {vision_config.model_type}")
    if text_config.model_type not in IDEFICS3_LLMS:
        raise AlignError(
            f"pixel_shuffle (Idefics3): vLLM builds the Idefics3 text model as Llama, not {text_config.model_type!r}"
        )
    if isinstance(feature_layer, list) or scale_factor is None:
        raise AlignError("pixel_shuffle (Idefics3) needs one feature_layer and a scale_factor")
    side = vision_config.image_size // vision_config.patch_size
    if side % scale_factor:
        raise AlignError(
            f"scale_factor {scale_factor} does not divide the tower's {side} x {side} patch grid"
        )
    vision = vision_config.to_dict()
    vision.update(num_hidden_layers=kept_layers(feature_layer, vision_config.num_hidden_layers))
    vision = {
        k: vision[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
        )
    }
    config = Idefics3Config(
        vision_config=vision,
        text_config=text_config.to_dict(),
        scale_factor=scale_factor,
        image_token_id=text_config.vocab_size - 1,
    )
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    tokens = (side // scale_factor) ** 2
    return _count(model, model.model.text_model, None, tokens, "Idefics3ForConditionalGeneration", lora_rank)


def _count(
    model: nn.Module, language_model: nn.Module, head, tokens: int, export_class: str, rank: int
) -> Plan:
    from align.model import parameter_table

    counts = {component: total for component, total, _ in parameter_table(model)}
    embed = language_model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return Plan(
        vision=counts["vision"],
        vision_head=sum(p.numel() for p in head.parameters()) if head is not None else 0,
        projector=counts["projector"],
        llm=counts["llm"],
        llm_embed=embed.numel(),
        llm_head=0 if tied else model.lm_head.weight.numel(),
        vocab=embed.shape[0],
        image_tokens=tokens,
        lora=lora_parameters(language_model, rank),
        export_class=export_class,
    )


def shipped_config_dir(hub_id: str, models_dir: Path = MODELS_DIR) -> Path:
    return models_dir / hub_id.replace("/", "--")


def resolve_config(name_or_path: str, models_dir: Path = MODELS_DIR) -> PreTrainedConfig:
    """An HF config for a folder or hub id, without network: folder, shipped copy, then the HF cache."""
    from transformers import AutoConfig

    folder = Path(name_or_path)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise AlignError(f"{folder}: model folder has no config.json")
        return AutoConfig.from_pretrained(folder)
    shipped = shipped_config_dir(name_or_path, models_dir)
    if (shipped / "config.json").is_file():
        return AutoConfig.from_pretrained(shipped)
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise AlignError(
            f"no config for '{name_or_path}': not a local folder, not shipped as {shipped}/config.json and not "
            f"in the Hugging Face cache ({type(err).__name__}); put its config.json there or pass a folder"
        ) from None


def vocab_with_image_token(
    llm_name_or_path: str, rows: int, image_token: str, extra_tokens: tuple[str, ...] = ()
) -> tuple[int, str]:
    """Embedding rows after ``align assemble`` adds ``image_token`` (and a pad token if missing), and how known.

    Assemble grows the embeddings only when the tokenizer outgrows them, so LLMs shipped with spare rows
    (R1-Distill-Qwen: 152064 rows, about 151665 tokens) keep their size. Without a tokenizer (shipped configs)
    the vocabulary is assumed full: rows + 1. ``extra_tokens``: the export class's own tokens (Idefics3's).
    """
    folder = Path(llm_name_or_path)
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        n = 1 + len(extra_tokens)
        return rows + n, f"+{n} image token(s); no tokenizer offline, so no spare rows assumed"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    new = sum(t not in vocab for t in {image_token, *extra_tokens})
    needed = len(tokenizer) + new + (tokenizer.pad_token is None)
    return max(rows, needed), f"tokenizer has {len(tokenizer)} tokens, {needed} with image/pad tokens"


def resolve_vision_config(
    source: str, name_or_path: str, pretrained: str | None, models_dir: Path = MODELS_DIR
) -> PreTrainedConfig:
    """The HF vision config of a tower; CLIP/SigLIP dual-encoder configs give their vision half."""
    if source == "open_clip":
        from align.vision import hf_vision_config

        return hf_vision_config(name_or_path, pretrained)
    config = resolve_config(name_or_path, models_dir)
    return getattr(config, "vision_config", None) or config


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def report(plan: Plan, gpus: int, projector: str = "mlp2x_gelu") -> dict:
    """Everything ``align plan`` prints, as plain data (``projector``: the option, as the report names it)."""
    stages = {}
    for stage in STAGES:
        trainable, frozen = plan.split(stage)
        memory = {s: memory_per_gpu(trainable, frozen, gpus, s) for s in STRATEGIES}
        stages[stage] = {"trainable": trainable, "frozen": frozen, "memory_bytes": memory}
    # GRPO with beta > 0 also holds a frozen reference policy: bf16 weights again, sharded only by ZeRO-3.
    reference = {s: memory_per_gpu(0, plan.total, gpus, s)["weights"] for s in STRATEGIES}
    return {
        "params": {**asdict(plan), "total": plan.total},
        "projector": projector,
        "export_class": plan.export_class,
        "gpus": gpus,
        "stages": stages,
        "grpo_reference_bytes": reference,
        "accounting": ACCOUNTING,
    }


def format_report(data: dict, header: list[str]) -> str:
    p = data["params"]
    rows = [
        ("vision tower", p["vision"]),
        ("  of which pooling head (unused by LLaVA)", p["vision_head"]),
        (f"projector ({data['projector']})", p["projector"]),
        ("llm", p["llm"]),
        (f"  of which embed_tokens ({p['vocab']} rows)", p["llm_embed"]),
        ("  of which lm_head" + (" (tied)" if p["llm_head"] == 0 else ""), p["llm_head"]),
        ("total", p["total"]),
        (f"LoRA r={LORA_RANK} on all LLM linear layers (extra)", p["lora"]),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [*header, "", f"{'parameters':<{width}}  {'count':>16}  {'':>10}"]
    lines += [f"{name:<{width}}  {n:>16,}  {_params(n):>10}" for name, n in rows]
    tokens = f"{p['image_tokens']}"
    if p["anyres_base"] is not None:
        tokens = (
            f"up to {tokens} (anyres: {p['anyres_base']} for the whole image + its tiles and row separators)"
        )
    lines += ["", f"image tokens per image: {tokens}", f"export class: {data['export_class']}", ""]
    gpus = data["gpus"]
    lines.append(f"memory per GPU on {gpus} GPU(s), GiB:")
    head = f"{'stage':<10} {'trainable':>10} {'strategy':<8} {'weights':>8} {'grads':>8} {'optim':>8} {'total':>8}"
    lines.append(head)
    for stage, s in data["stages"].items():
        for i, strategy in enumerate(STRATEGIES):
            m = s["memory_bytes"][strategy]
            first = f"{stage:<10} {_params(s['trainable']):>10}" if i == 0 else " " * 21
            lines.append(
                f"{first} {STRATEGY_NAMES[strategy]:<8} {_gib(m['weights']):>8} {_gib(m['gradients']):>8} "
                f"{_gib(m['optimizer']):>8} {_gib(m['total']):>8}"
            )
    ref = ", ".join(f"{STRATEGY_NAMES[k]} {_gib(v)}" for k, v in data["grpo_reference_bytes"].items())
    lines += ["", f"grpo with beta > 0 also keeps a frozen reference model, GiB per GPU: {ref}"]
    if data["export_class"] != "LlavaForConditionalGeneration":
        lines += [
            f"note: align's stages train Llava folders only; this {data['export_class']} folder is for inference"
        ]
    lines += [f"accounting: {data['accounting']}"]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="an assemble recipe (kind: assemble)")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs to shard over (default 8)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise AlignError(f"--gpus must be at least 1, got {args.gpus}")
    from align.assemble import IDEFICS3_TOKENS, PIXEL_SHUFFLE

    recipe = load_any(args.recipe, args.overrides, expect="assemble")
    v, llm, projector = recipe.vision, recipe.llm, recipe.projector
    shuffle = projector.type == PIXEL_SHUFFLE
    vision_config = resolve_vision_config(v.source, v.name_or_path, v.pretrained)
    text_config = resolve_config(llm.name_or_path)
    vocab, vocab_note = vocab_with_image_token(
        llm.name_or_path, text_config.vocab_size, recipe.image_token, IDEFICS3_TOKENS if shuffle else ()
    )
    plan = plan_model(
        vision_config,
        text_config,
        v.feature_layer,
        v.select_strategy,
        vocab=vocab,
        projector=projector.type,
        scale_factor=projector.scale_factor,
        anyres_grids=v.grids(),
    )
    strategy = "full" if shuffle else v.select_strategy or default_select_strategy(vision_config)
    data = report(
        plan, args.gpus, f"{projector.type} x{projector.scale_factor}" if shuffle else projector.type
    )
    data["vision"] = {
        "name_or_path": v.name_or_path,
        "model_type": vision_config.model_type,
        "feature_layer": v.feature_layer,
        "select_strategy": strategy,
    }
    data["llm"] = {
        "name_or_path": llm.name_or_path,
        "model_type": text_config.model_type,
        "vocab_note": vocab_note,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    header = [
        f"plan: {args.recipe} (meta device: no weights loaded)",
        f"vision: {v.name_or_path} ({vision_config.model_type}), feature layer {v.feature_layer}, select {strategy}",
        f"llm:    {llm.name_or_path} ({text_config.model_type}), vocab {text_config.vocab_size} -> {plan.vocab} "
        f"({vocab_note})",
    ]
    print(format_report(data, header))
    return 0
