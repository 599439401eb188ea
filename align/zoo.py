"""The tiny offline model zoo: real-format, randomly initialised checkpoints for tests and the demo.

This module owns ``align zoo`` and :func:`build_zoo`, which writes one folder per part of :data:`PARTS`:

* ``clip-hf``: ``CLIPVisionModel`` + ``CLIPImageProcessor`` (CLS token, CLIP mean/std);
* ``siglip-hf``: ``SiglipVisionModel`` + ``SiglipImageProcessor`` (no CLS, mean/std 0.5);
* ``openclip-vit``: an open_clip CLIP ViT (with its tiny text tower) in open_clip's local layout,
  ``open_clip_config.json`` + ``open_clip_model.safetensors``;
* ``openclip-siglip``: an open_clip SigLIP model built the way open_clip's real ones are (ViT-B-16-SigLIP,
  ViT-SO400M-14-SigLIP-384): the image tower is a timm ViT named by ``vision_cfg.timm_model_name`` (timm's own
  ``vit_base_patch16_siglip_224`` architecture at toy size: no class token, MAP attention-pooling head, exact
  GELU, LayerNorm eps 1e-6, no projection after the pool), with a learned logit bias and a bidirectional text
  tower (``CustomTextCLIP``). Mean/std are 0.5 and resizing squashes, as SigLIP's. timm reads the tower's shape
  from ``timm-vision/config.json`` in the part folder, named as ``local-dir:ABSOLUTE_PATH``: open_clip hands the
  name to timm unchanged and timm resolves a relative one against the working directory, so only an absolute
  path keeps ``open_clip.create_model_and_transforms("local-dir:PART")`` working from anywhere. This part is
  therefore bound to where it was built: its fingerprint includes that location, so a copied or moved zoo
  rebuilds it in its new place;
* ``qwen2-r1`` / ``llama-r1``: ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` shaped like the R1 distills (GQA,
  untied embeddings, llama3 rope scaling for Llama) with the tokenizers of :mod:`align.zoo_tokenizer`.

:data:`FAMILIES` are further LLM parts, not in the default zoo (``build_families(out)``, used by
``tests/test_llm_families.py``), one per architecture feature the tests keep working: ``qwen3`` (q/k RMSNorm),
``qwen2-tied`` / ``llama-tied`` (tied embeddings), ``mistral`` and ``mistral-sw`` (sliding window), ``gemma2``
(scaled embeddings, attention and final-logit soft-capping, no sdpa, alternating sliding layers), ``gemma3``
(text only: q/k norms, local/global rope) and ``phi3`` (fused qkv and gate/up projections). They share the
Qwen flavour tokenizer and the R1-distill chat template (``llama-tied``: the Llama flavour, without a pad).

Every part is deterministic (fixed seeds): rebuilding into the same folder gives byte-identical files (folders
built elsewhere differ only in openclip-siglip's absolute timm path). A part folder is complete when its
``zoo-part.json`` marker holds the current fingerprint (part spec, library versions and, for openclip-siglip,
its location); complete parts are skipped unless ``force``. Parts are built in a temporary sibling folder and
renamed into place, so an interrupted build never leaves a half-written part that looks complete.

Run ``align zoo [--out checkpoints/zoo] [--force]``. Nothing else may depend on the zoo at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.errors import AlignError

PARTS = ("clip-hf", "siglip-hf", "openclip-vit", "openclip-siglip", "qwen2-r1", "llama-r1")
FAMILIES = ("qwen3", "qwen2-tied", "llama-tied", "mistral", "mistral-sw", "gemma2", "gemma3", "phi3")
MARKER = "zoo-part.json"
ZOO_VERSION = 1  # bump when a part's recipe changes in a way the spec dicts below do not show
SEED = 0
DEFAULT_OUT = Path("checkpoints/zoo")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

IMAGE_SIZE, PATCH_SIZE = 64, 8
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
VISION_HF = dict(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
LLM = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
# R1-Distill-Llama's rope: llama3 scaling (factor 8, low/high freq 1/4); original context scaled down with the model.
LLAMA_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=512,
)
QWEN_ROPE = dict(rope_type="default", rope_theta=10000.0)
# A window shorter than a prompt (64 image tokens + text), so that the sliding layers really slide.
WINDOW = 16
# family -> (config class name, tokenizer flavour, config arguments on top of LLM)
FAMILY_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3": ("Qwen3Config", "qwen2", dict(head_dim=32, rope_parameters=QWEN_ROPE)),
    "qwen2-tied": (
        "Qwen2Config",
        "qwen2",
        dict(tie_word_embeddings=True, rope_parameters=QWEN_ROPE, use_sliding_window=False),
    ),
    "llama-tied": ("LlamaConfig", "llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA_ROPE)),
    "mistral": ("MistralConfig", "qwen2", dict(sliding_window=None)),
    "mistral-sw": ("MistralConfig", "qwen2", dict(sliding_window=WINDOW)),
    "gemma2": (
        "Gemma2Config",
        "qwen2",
        dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, tie_word_embeddings=True),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "qwen2",
        dict(
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        ),
    ),
    "phi3": ("Phi3Config", "qwen2", dict()),
}
# The R1 distills ship sampling defaults in generation_config.json.
GENERATION = dict(do_sample=True, temperature=0.6, top_p=0.95)

# open_clip model configs (the "model_cfg" of open_clip_config.json). The text towers are tiny but keep the
# default CLIP tokenizer's vocabulary, so open_clip.get_tokenizer's SimpleTokenizer output fits them.
_OPENCLIP_VISION = dict(
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    width=VISION["hidden_size"],
    layers=VISION["num_hidden_layers"],
    head_width=VISION["hidden_size"] // VISION["num_attention_heads"],
    mlp_ratio=VISION["intermediate_size"] / VISION["hidden_size"],
)
_OPENCLIP_TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
OPENCLIP_CFG: dict[str, dict[str, Any]] = {
    "openclip-vit": {
        "embed_dim": 32,
        "vision_cfg": dict(_OPENCLIP_VISION),
        "text_cfg": dict(_OPENCLIP_TEXT),
    },
    "openclip-siglip": {
        # timm_proj "none" passes the MAP-pooled trunk feature through, so the joint space is the trunk width
        "embed_dim": VISION["hidden_size"],
        "init_logit_bias": -10,
        "custom_text": True,
        # + timm_model_name, which names the part's own timm folder (see _openclip_model_cfg)
        "vision_cfg": dict(
            image_size=IMAGE_SIZE, timm_model_pretrained=False, timm_pool="map", timm_proj="none"
        ),
        "text_cfg": dict(
            _OPENCLIP_TEXT,
            no_causal_mask=True,
            proj_bias=True,
            pool_type="last",
            norm_kwargs={"eps": 1e-6},
            act_kwargs={"approximate": "tanh"},
        ),
    },
}
# timm's config.json for the openclip-siglip tower (timm's local-dir: layout). The architecture's defaults are
# SigLIP's (class_token=False, global_pool="map"); model_args shrink it; pretrained_cfg tells timm users the
# preprocessing (open_clip uses its own preprocess_cfg below).
TIMM_DIR = "timm-vision"
TIMM_SIGLIP: dict[str, Any] = {
    "architecture": "vit_base_patch16_siglip_224",
    "model_args": dict(
        img_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        embed_dim=VISION["hidden_size"],
        depth=VISION["num_hidden_layers"],
        num_heads=VISION["num_attention_heads"],
        mlp_ratio=VISION["intermediate_size"] / VISION["hidden_size"],
    ),
    "pretrained_cfg": dict(
        input_size=[3, IMAGE_SIZE, IMAGE_SIZE],
        interpolation="bicubic",
        mean=list(SIGLIP_MEAN),
        std=list(SIGLIP_STD),
        crop_pct=1.0,
        crop_mode="squash",
    ),
}
OPENCLIP_PREPROCESS: dict[str, dict[str, Any]] = {
    "openclip-vit": dict(
        size=IMAGE_SIZE, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", resize_mode="shortest"
    ),
    "openclip-siglip": dict(
        size=IMAGE_SIZE, mean=SIGLIP_MEAN, std=SIGLIP_STD, interpolation="bicubic", resize_mode="squash"
    ),
}
# Names under which register_openclip() adds the configs to open_clip's registry. No "siglip" in the name:
# open_clip.get_tokenizer would then fetch the SigLIP tokenizer from the hub.
OPENCLIP_NAMES = {"openclip-vit": "zoo-ViT-T-8", "openclip-siglip": "zoo-ViT-T-8-SL"}
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
# Parts whose files name their own absolute location (openclip-siglip's timm tower): bound to where they are built.
LOCATED = ("openclip-siglip",)


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _build_clip_hf(path: Path, home: Path) -> int:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    _seeded(SEED)
    model = CLIPVisionModel(CLIPVisionConfig(**VISION_HF))
    model.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(path)
    return _parameters(model)


def _build_siglip_hf(path: Path, home: Path) -> int:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    _seeded(SEED)
    model = SiglipVisionModel(SiglipVisionConfig(**VISION_HF))
    model.save_pretrained(path)
    SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    ).save_pretrained(path)
    return _parameters(model)


def _openclip_model_cfg(part: str, home: Path) -> dict[str, Any]:
    """The open_clip ``model_cfg`` of an open_clip part living in ``home`` (its timm tower named absolutely)."""
    cfg = json.loads(json.dumps(OPENCLIP_CFG[part]))  # a deep copy: callers and constructors may consume it
    if part in LOCATED:
        cfg["vision_cfg"]["timm_model_name"] = f"local-dir:{Path(home).resolve() / TIMM_DIR}"
    return cfg


def _build_openclip(part: str) -> Callable[[Path, Path], int]:
    def build(path: Path, home: Path) -> int:
        from open_clip.model import CLIP, CustomTextCLIP
        from safetensors.torch import save_file

        if part in LOCATED:
            (path / TIMM_DIR).mkdir()
            _write_json(path / TIMM_DIR / "config.json", TIMM_SIGLIP)
        # Built from the folder being written (timm reads its config now); saved naming the folder's final home.
        cfg = _openclip_model_cfg(part, path)
        model_class = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
        _seeded(SEED)
        model = model_class(**cfg)
        state = {k: v.contiguous() for k, v in sorted(model.state_dict().items())}
        save_file(state, str(path / OPENCLIP_WEIGHTS))
        saved_cfg = _openclip_model_cfg(part, home)
        _write_json(
            path / "open_clip_config.json",
            {"model_cfg": saved_cfg, "preprocess_cfg": OPENCLIP_PREPROCESS[part]},
        )
        # The bare model config, for open_clip.add_model_config (see register_openclip).
        _write_json(path / f"{OPENCLIP_NAMES[part]}.json", saved_cfg)
        return _parameters(model)

    return build


def _build_llm(flavour: str) -> Callable[[Path, Path], int]:
    def build(path: Path, home: Path) -> int:
        from transformers import (
            GenerationConfig,
            LlamaConfig,
            LlamaForCausalLM,
            Qwen2Config,
            Qwen2ForCausalLM,
        )

        from align.zoo_tokenizer import build_r1_tokenizer

        tokenizer = build_r1_tokenizer(flavour, seed=SEED)
        ids = dict(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if flavour == "qwen2":
            config = Qwen2Config(
                **LLM, **ids, rope_parameters=QWEN_ROPE, use_sliding_window=False, max_window_layers=2
            )
            model_class = Qwen2ForCausalLM
        else:
            config = LlamaConfig(**LLM, **ids, rope_parameters=LLAMA_ROPE)
            model_class = LlamaForCausalLM
        _seeded(SEED)
        model = model_class(config)
        model.generation_config = GenerationConfig(**_generation_ids(ids), **GENERATION)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return _parameters(model)

    return build


def _build_family(family: str) -> Callable[[Path, Path], int]:
    def build(path: Path, home: Path) -> int:
        import transformers
        from transformers import AutoModelForCausalLM, GenerationConfig

        from align.zoo_tokenizer import build_r1_tokenizer

        config_name, flavour, extra = FAMILY_SPECS[family]
        tokenizer = build_r1_tokenizer(flavour, seed=SEED)
        ids = dict(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = getattr(transformers, config_name)(**(LLM | extra), **ids)
        _seeded(SEED)
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(**_generation_ids(ids), **GENERATION)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return _parameters(model)

    return build


def _generation_ids(ids: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ids.items() if k != "vocab_size" and v is not None}


# part -> builder(path, home): writes the part into ``path``, a staging folder renamed to ``home`` afterwards.
BUILDERS: dict[str, Callable[[Path, Path], int]] = {
    "clip-hf": _build_clip_hf,
    "siglip-hf": _build_siglip_hf,
    "openclip-vit": _build_openclip("openclip-vit"),
    "openclip-siglip": _build_openclip("openclip-siglip"),
    "qwen2-r1": _build_llm("qwen2"),
    "llama-r1": _build_llm("llama"),
    **{family: _build_family(family) for family in FAMILIES},
}
SPECS: dict[str, Any] = {
    "clip-hf": [VISION_HF, CLIP_MEAN, CLIP_STD],
    "siglip-hf": [VISION_HF, SIGLIP_MEAN, SIGLIP_STD],
    "openclip-vit": [OPENCLIP_CFG["openclip-vit"], OPENCLIP_PREPROCESS["openclip-vit"]],
    "openclip-siglip": [OPENCLIP_CFG["openclip-siglip"], TIMM_SIGLIP, OPENCLIP_PREPROCESS["openclip-siglip"]],
    "qwen2-r1": [LLM, QWEN_ROPE, GENERATION],
    "llama-r1": [LLM, LLAMA_ROPE, GENERATION],
    **{family: [LLM, FAMILY_SPECS[family], GENERATION] for family in FAMILIES},
}
# parts whose tokenizer is trained from code: its corpus and template are part of their fingerprint
TOKENIZED = ("qwen2-r1", "llama-r1", *FAMILIES)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def fingerprint(part: str, home: Path) -> str:
    """What the files of ``part`` built in folder ``home`` depend on: its spec, the seed, the versions of the
    libraries that write them and, for :data:`LOCATED` parts, the absolute location they name."""
    import open_clip
    import timm
    import tokenizers
    import torch
    import transformers

    versions = [
        transformers.__version__,
        open_clip.__version__,
        timm.__version__,
        tokenizers.__version__,
        torch.__version__,
    ]
    inputs: list[Any] = [ZOO_VERSION, part, SEED, SPECS[part], versions]
    if part in LOCATED:
        inputs.append(str(Path(home).resolve()))
    if part in TOKENIZED:
        from align.zoo_tokenizer import chat_template, training_corpus

        inputs += [hashlib.sha256("\n".join([*training_corpus(SEED), chat_template()]).encode()).hexdigest()]
    blob = json.dumps(inputs, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_marker(path: Path) -> dict[str, Any] | None:
    """The ``zoo-part.json`` of a part folder (``part``, ``fingerprint``, ``parameters``), or None."""
    try:
        return json.loads((path / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_part(part: str, out: Path, force: bool = False) -> Path:
    """Build one part under ``out`` unless it is already complete (and not ``force``)."""
    if part not in BUILDERS:
        raise ValueError(f"unknown zoo part {part!r}; parts are {', '.join(BUILDERS)}")
    path = out / part
    expected = fingerprint(part, path)
    marker = read_marker(path)
    if not force and marker is not None and marker.get("fingerprint") == expected:
        return path
    staging = out / f".{part}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parameters = BUILDERS[part](staging, path)
    _write_json(staging / MARKER, {"part": part, "fingerprint": expected, "parameters": parameters})
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def build_zoo(out: Path, force: bool = False) -> dict[str, Path]:
    """Write every part of :data:`PARTS` under ``out``; returns ``{part: folder}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {part: build_part(part, out, force) for part in PARTS}


def build_families(out: Path, force: bool = False) -> dict[str, Path]:
    """Write every LLM of :data:`FAMILIES` under ``out``; returns ``{family: folder}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {family: build_part(family, out, force) for family in FAMILIES}


def register_openclip(path: Path) -> tuple[str, str]:
    """Register an open_clip zoo part's config with open_clip; returns ``(model_name, pretrained)``.

    Afterwards ``open_clip.create_model_and_transforms(model_name, pretrained=pretrained)`` loads the part
    the way a named model plus a weights file loads. That route takes open_clip's default preprocessing
    (CLIP mean/std); pass ``image_mean``/``image_std`` from the part's ``open_clip_config.json`` for SigLIP.
    The registered config is the part's own, so a SigLIP part's timm tower is found wherever the caller runs.
    """
    import open_clip

    path = Path(path)
    marker = read_marker(path)
    part = marker["part"] if marker else None
    if part not in OPENCLIP_NAMES:
        raise AlignError(
            f"{path / MARKER}: expected a built open_clip zoo part ({', '.join(OPENCLIP_NAMES)}), got {part!r}"
        )
    name = OPENCLIP_NAMES[part]
    open_clip.add_model_config(path / f"{name}.json")
    return name, str(path / OPENCLIP_WEIGHTS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"zoo folder (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild parts that are already built")


def run(args: argparse.Namespace) -> int:
    paths = build_zoo(args.out, force=args.force)
    for part, path in paths.items():
        marker = read_marker(path) or {}
        print(f"{part:<16} {path}  {marker.get('parameters', 0):,} parameters")
    return 0
