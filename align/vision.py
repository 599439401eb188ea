"""Vision towers: describe, load and convert the image encoder a Llava model is built around.

This module owns loading CLIP / SigLIP vision towers from two sources and handing them over as standard
Hugging Face modules, so the rest of align (assemble, checkpoints, training) only ever sees
``CLIPVisionModel`` / ``SiglipVisionModel`` and a matching image processor:

* ``source="hf"``: a hub id or folder holding a ``CLIPVisionModel`` / ``SiglipVisionModel`` or a full
  ``CLIPModel`` / ``SiglipModel`` (its vision half is taken);
* ``source="open_clip"``: a model name known to open_clip plus ``pretrained`` (a tag such as ``openai`` or a
  weights file), or ``local-dir:FOLDER`` (``open_clip_config.json`` + weights). The open_clip tower is
  converted weight by weight: open_clip's own ViT becomes a ``CLIPVisionModel``; a timm SigLIP ViT (no class
  token, MAP head: what open_clip's SigLIP models are, and the zoo's ``openclip-siglip``) becomes a
  ``SiglipVisionModel``. The image processor is built from open_clip's preprocess config so that it produces
  the same pixels as open_clip's eval transform.

:func:`describe_vision` and :func:`hf_vision_config` only read configs (open_clip towers are instantiated
on the meta device), so recipes can be validated and planned before any weights are touched.

Processors use the PIL backend: its resize is PIL's, which is what open_clip and the original towers use;
transformers' torchvision backend resizes differently (on tests/test_vision.py's pictures at 64 px: 1-2
levels of 255 per pixel, 17 where a squash upsamples one side across a hard edge). HF towers get their own
processor class's PIL variant (``CLIPImageProcessorPil``, ...). open_clip towers get transformers' generic
``PilBackend``, configured by value, because a saved folder must reload the PIL backend on its own:
transformers saves ``FooImageProcessorPil`` as ``FooImageProcessor``, and ``AutoImageProcessor`` /
``AutoProcessor`` then pick the torchvision backend (even when the saved name keeps the ``Pil`` suffix, since
it is looked up in the same model-family table), whereas a saved ``PilBackend`` is in no family table and
reloads as itself, whatever backend is asked for. So a Llava folder assembled from an open_clip tower gives
open_clip's pixels after a plain ``AutoProcessor.from_pretrained(folder)``.

Used by ``align assemble`` (load + validate) and ``align plan`` (configs only); it has no command of its own.
Try it: ``python -c "from align.vision import describe_vision as d; print(d('open_clip', 'ViT-L-14-336', 'openai'))"``.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PilBackend,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import PILImageResampling

from align.checkpoint import check_weight_files, read_model_config
from align.config import RecipeError
from align.errors import AlignError

Source = Literal["hf", "open_clip"]
VisionConfig = CLIPVisionConfig | SiglipVisionConfig
VisionModel = CLIPVisionModel | SiglipVisionModel

LOCAL_DIR = "local-dir:"
_HF_KINDS = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}


@dataclass(frozen=True)
class VisionInfo:
    """What the rest of align needs to know about a tower, without its weights."""

    kind: Literal["clip", "siglip"]
    has_cls: bool  # CLIP prepends a class token to the patch tokens; SigLIP does not
    hidden_size: int
    image_size: int
    patch_size: int
    num_patches: int
    num_layers: int  # hidden_states has num_layers + 1 entries (the embeddings come first)
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def image_tokens(self, select_strategy: Literal["default", "full"]) -> int:
        """Tokens per image fed to the projector: 'default' drops the CLS token, 'full' keeps every token."""
        return self.num_patches + (1 if self.has_cls and select_strategy == "full" else 0)


def check_feature_selection(
    info: VisionInfo, feature_layer: int, select_strategy: Literal["default", "full"] | None
) -> Literal["default", "full"]:
    """The select strategy to use (None: CLIP 'default', SigLIP 'full'); RecipeError for impossible choices."""
    n = info.num_layers
    if not -(n + 1) <= feature_layer <= n:
        raise RecipeError.at(
            "feature_layer",
            f"{feature_layer} is out of range: the {info.kind} tower has {n} layers, so hidden states are "
            f"indexed {-(n + 1)}..{n} (0 = embeddings, -1 = last layer, -2 = penultimate)",
        )
    strategy = select_strategy or ("default" if info.has_cls else "full")
    if strategy == "default" and not info.has_cls:
        raise RecipeError.at(
            "select_strategy",
            f"'default' drops the first token as CLS, but this {info.kind} tower has no CLS token; "
            f"use 'full' (all {info.num_patches} patch tokens)",
        )
    return strategy


def describe_vision(source: Source, name_or_path: str, pretrained: str | None = None) -> VisionInfo:
    """Describe a tower from its configs only (no weights are read or downloaded)."""
    if source == "hf":
        _reject_pretrained(name_or_path, pretrained)
        return _info(_hf_config(name_or_path), _hf_processor(name_or_path))
    visual = _openclip_visual(name_or_path, pretrained, meta=True)
    config = _config_from_visual(visual, name_or_path)
    return _info(config, openclip_image_processor(visual.preprocess_cfg, name_or_path))


def hf_vision_config(name_or_path: str, pretrained: str | None = None) -> VisionConfig:
    """The ``CLIPVisionConfig`` / ``SiglipVisionConfig`` an open_clip tower converts to (meta device only)."""
    return _config_from_visual(_openclip_visual(name_or_path, pretrained, meta=True), name_or_path)


def load_vision_tower(
    source: Source, name_or_path: str, pretrained: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[VisionModel, BaseImageProcessor, VisionInfo]:
    """Load a tower as an HF vision model (eval mode) with its image processor and description."""
    if source == "hf":
        _reject_pretrained(name_or_path, pretrained)
        config = _hf_config(name_or_path)
        if Path(name_or_path).is_dir():
            check_weight_files(name_or_path)
        model_class = CLIPVisionModel if isinstance(config, CLIPVisionConfig) else SiglipVisionModel
        try:
            with _quiet():  # a full CLIP/SigLIP checkpoint lists every text weight as "unexpected"
                model, loading = model_class.from_pretrained(
                    name_or_path, dtype=dtype, output_loading_info=True
                )
        except OSError as err:
            raise AlignError(f"cannot load vision weights from '{name_or_path}': {err}") from err
        if loading["missing_keys"] or loading["mismatched_keys"]:
            missing = sorted(loading["missing_keys"]) + sorted(str(k) for k in loading["mismatched_keys"])
            raise AlignError(f"'{name_or_path}' lacks {len(missing)} vision weights, e.g. {missing[:3]}")
        processor = _hf_processor(name_or_path)
    else:
        visual = _openclip_visual(name_or_path, pretrained, meta=False)
        config = _config_from_visual(visual, name_or_path)
        model = convert_openclip_visual(visual, config, name_or_path).to(dtype)
        processor = openclip_image_processor(visual.preprocess_cfg, name_or_path)
    return model.eval(), processor, _info(config, processor)


# ---------------------------------------------------------------------------------------------- HF sources


def _reject_pretrained(name_or_path: str, pretrained: str | None) -> None:
    if pretrained is not None:
        raise AlignError(f"'{name_or_path}': only open_clip towers take pretrained ({pretrained!r})")


def _hf_config(name_or_path: str) -> VisionConfig:
    if Path(name_or_path).is_dir():
        read_model_config(name_or_path)  # no config.json / no model_type: one line naming the folder
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AlignError(f"cannot read the config of vision tower '{name_or_path}': {first}") from None
    if config.model_type not in _HF_KINDS:
        raise AlignError(
            f"'{name_or_path}' is a {config.model_type} model; the vision tower must be CLIP or SigLIP "
            f"(model_type one of {', '.join(_HF_KINDS)})"
        )
    return getattr(config, "vision_config", None) or config


def _hf_processor(name_or_path: str) -> BaseImageProcessor:
    try:
        return AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    except (OSError, ValueError) as err:
        raise AlignError(f"'{name_or_path}' has no usable preprocessor_config.json: {err}") from err


def _kind(config: VisionConfig) -> Literal["clip", "siglip"]:
    return "clip" if isinstance(config, CLIPVisionConfig) else "siglip"


def _info(config: VisionConfig, processor: BaseImageProcessor) -> VisionInfo:
    kind = _kind(config)
    grid = config.image_size // config.patch_size
    return VisionInfo(
        kind=kind,
        has_cls=kind == "clip",
        hidden_size=config.hidden_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_patches=grid * grid,
        num_layers=config.num_hidden_layers,
        image_mean=tuple(float(m) for m in processor.image_mean),
        image_std=tuple(float(s) for s in processor.image_std),
    )


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence library warnings that are expected here and checked explicitly instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


# ----------------------------------------------------------------------------------------- open_clip sources


def _openclip_visual(name_or_path: str, pretrained: str | None, meta: bool) -> nn.Module:
    """open_clip's image tower (``model.visual``, with ``preprocess_cfg`` set), real or on the meta device."""
    import open_clip

    tag_cfg: dict = {}
    if name_or_path.startswith(LOCAL_DIR):
        folder = Path(name_or_path[len(LOCAL_DIR) :])
        if pretrained is not None:
            raise AlignError(
                f"'{name_or_path}': a local-dir: tower takes its weights from the folder, not pretrained"
            )
        if not (folder / "open_clip_config.json").is_file():
            found = ""
            if (folder / "config.json").is_file():  # a Hugging Face folder: say what it is
                found = f" (it is a Hugging Face {read_model_config(folder)['model_type']!r} folder, not an open_clip one)"
            raise AlignError(f"'{name_or_path}': {folder}/open_clip_config.json not found{found}")
        if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
            raise AlignError(f"'{name_or_path}': no weights file in {folder}")
    elif name_or_path.startswith("hf-hub:"):
        raise AlignError(f"'{name_or_path}': download the repository and use local-dir:FOLDER")
    else:
        if open_clip.get_model_config(name_or_path) is None:
            close = difflib.get_close_matches(name_or_path, open_clip.list_models(), n=3)
            raise AlignError(f"open_clip has no model '{name_or_path}' (close: {', '.join(close) or 'none'})")
        tags = open_clip.list_pretrained_tags_by_model(name_or_path)
        if pretrained is None or (pretrained not in tags and not Path(pretrained).is_file()):
            raise AlignError(
                f"open_clip model '{name_or_path}' needs pretrained: one of its tags ({', '.join(tags) or 'none'}) "
                f"or an existing weights file; got {pretrained!r}"
            )
        tag_cfg = open_clip.get_pretrained_cfg(name_or_path, pretrained)
    # Tags trained with QuickGELU (OpenAI's) only warn when the config lacks it; force it so weights match.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        if meta:
            with _quiet(), torch.device("meta"):  # "initialized randomly" is the point of a meta build
                model = open_clip.create_model(
                    name_or_path,
                    load_weights=False,
                    device="meta",
                    force_quick_gelu=quick_gelu,
                    force_preprocess_cfg=tag_cfg,
                )
        else:
            model, _, _ = open_clip.create_model_and_transforms(
                name_or_path, pretrained=pretrained, force_quick_gelu=quick_gelu
            )
    except (RuntimeError, ValueError, OSError) as err:
        raise AlignError(
            f"open_clip cannot create '{name_or_path}' (pretrained={pretrained!r}): {err}"
        ) from err
    return model.visual


def _activation(module: nn.Module, name: str) -> str:
    """The HF ``hidden_act`` computing exactly what an open_clip / timm activation module computes."""
    kind = type(module).__name__
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[module.approximate]
    if kind in ("GELU", "GELUTanh", "QuickGELU"):  # open_clip's / timm's own classes
        return {"GELU": "gelu", "GELUTanh": "gelu_pytorch_tanh", "QuickGELU": "quick_gelu"}[kind]
    raise AlignError(f"'{name}': activation {kind} has no Hugging Face CLIP/SigLIP equivalent")


def _square(value: int | tuple[int, int], what: str, name: str) -> int:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h != w:
        raise AlignError(f"'{name}': {what} is {h}x{w}; HF CLIP/SigLIP towers need a square one")
    return int(h)


def _config_from_visual(visual: nn.Module, name: str) -> VisionConfig:
    """Read the HF config off the instantiated open_clip tower (works on the meta device)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if isinstance(visual.ln_pre, nn.Identity):
            raise AlignError(
                f"'{name}': this open_clip ViT has no pre-LayerNorm (no_ln_pre, as CLIPA towers) but still a "
                "class token; neither HF CLIPVisionModel (always pre-LN) nor SiglipVisionModel (no class token) "
                "computes the same hidden states"
            )
        block = visual.transformer.resblocks[0]
        config = CLIPVisionConfig(
            hidden_size=visual.transformer.width,
            intermediate_size=block.mlp.c_fc.out_features,
            num_hidden_layers=len(visual.transformer.resblocks),
            num_attention_heads=block.attn.num_heads,
            image_size=_square(visual.image_size, "image size", name),
            patch_size=_square(visual.patch_size, "patch size", name),
            hidden_act=_activation(block.mlp.gelu, name),
            layer_norm_eps=block.ln_1.eps,
            projection_dim=visual.output_dim,
        )
    elif isinstance(visual, TimmModel) and type(visual.trunk).__name__ == "VisionTransformer":
        trunk = visual.trunk
        block = trunk.blocks[0]
        config = SiglipVisionConfig(
            hidden_size=trunk.embed_dim,
            intermediate_size=block.mlp.fc1.out_features,
            num_hidden_layers=len(trunk.blocks),
            num_attention_heads=block.attn.num_heads,
            image_size=_square(trunk.patch_embed.img_size, "image size", name),
            patch_size=_square(trunk.patch_embed.patch_size, "patch size", name),
            hidden_act=_activation(block.mlp.act, name),
            layer_norm_eps=block.norm1.eps,
            vision_use_head=trunk.attn_pool is not None,
        )
    else:
        inner = f" ({type(visual.trunk).__name__})" if isinstance(visual, TimmModel) else ""
        raise AlignError(
            f"'{name}': open_clip tower {type(visual).__name__}{inner} is not supported; align converts "
            "open_clip's ViT (to CLIPVisionModel) and timm ViTs without class token (to SiglipVisionModel)"
        )
    _weight_map(visual, config, name)  # an unmappable parameter fails here, before any weights are read
    return config


def convert_openclip_visual(visual: nn.Module, config: VisionConfig, name: str) -> VisionModel:
    """The HF vision model holding exactly the open_clip tower's weights (projection heads dropped)."""
    model = (CLIPVisionModel if isinstance(config, CLIPVisionConfig) else SiglipVisionModel)(config)
    weights = {
        key: tensor.detach().float().clone() for key, tensor in _weight_map(visual, config, name).items()
    }
    model.load_state_dict(weights, strict=True)
    return model


def _weight_map(visual: nn.Module, config: VisionConfig, name: str) -> dict[str, torch.Tensor]:
    """HF key -> tensor; raises AlignError if a tower parameter is missing or would be left behind."""
    params = dict(visual.named_parameters())
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in params:
            raise AlignError(
                f"'{name}': open_clip tower has no parameter '{key}'; not a plain CLIP/SigLIP ViT"
            )
        used.add(key)
        return params[key]

    def bias(src: str, rows: int) -> torch.Tensor:
        # a linear without bias (timm qkv_bias=False) is the same linear with an exact zero bias
        return (
            take(f"{src}.bias")
            if f"{src}.bias" in params
            else torch.zeros(rows, device=params[f"{src}.weight"].device)
        )

    def copy(hf: str, src: str) -> None:
        out[f"{hf}.weight"] = take(f"{src}.weight")
        out[f"{hf}.bias"] = bias(src, out[f"{hf}.weight"].shape[0])

    def split_qkv(hf: str, weight: torch.Tensor, fused_bias: torch.Tensor) -> None:
        # fused projections stack the q rows, then k, then v (open_clip in_proj and timm qkv alike)
        for part, w, b in zip("qkv", weight.chunk(3), fused_bias.chunk(3), strict=True):
            out[f"{hf}.self_attn.{part}_proj.weight"], out[f"{hf}.self_attn.{part}_proj.bias"] = w, b

    if isinstance(config, CLIPVisionConfig):
        out["embeddings.class_embedding"] = take("class_embedding")
        out["embeddings.patch_embedding.weight"] = take("conv1.weight")
        out["embeddings.position_embedding.weight"] = take("positional_embedding")
        copy("pre_layrnorm", "ln_pre")
        copy("post_layernorm", "ln_post")  # both apply it to the pooled CLS token only
        parts = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
        for i in range(config.num_hidden_layers):
            src = f"transformer.resblocks.{i}"
            split_qkv(
                f"encoder.layers.{i}", take(f"{src}.attn.in_proj_weight"), take(f"{src}.attn.in_proj_bias")
            )
            for hf_part, src_part in parts.items():
                copy(f"encoder.layers.{i}.{hf_part}", f"{src}.{src_part}")
        dropped = {"proj"}  # the contrastive projection: LLaVA reads hidden states
    else:
        out["embeddings.position_embedding.weight"] = take("trunk.pos_embed")[0]
        copy("embeddings.patch_embedding", "trunk.patch_embed.proj")
        copy("post_layernorm", "trunk.norm")
        parts = {"self_attn.out_proj": "attn.proj", "layer_norm1": "norm1", "layer_norm2": "norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
        for i in range(config.num_hidden_layers):
            src = f"trunk.blocks.{i}"
            qkv = take(f"{src}.attn.qkv.weight")
            split_qkv(f"encoder.layers.{i}", qkv, bias(f"{src}.attn.qkv", qkv.shape[0]))
            for hf_part, src_part in parts.items():
                copy(f"encoder.layers.{i}.{hf_part}", f"{src}.{src_part}")
        if config.vision_use_head:
            _check_pool(visual.trunk, config, name)
            pool = "trunk.attn_pool"
            out["head.probe"] = take(f"{pool}.latent")
            out["head.attention.in_proj_weight"] = torch.cat(
                [take(f"{pool}.q.weight"), take(f"{pool}.kv.weight")]
            )
            out["head.attention.in_proj_bias"] = torch.cat([take(f"{pool}.q.bias"), take(f"{pool}.kv.bias")])
            for hf_part, src_part in {"attention.out_proj": "proj", "layernorm": "norm", "mlp.fc1": "mlp.fc1",
                                      "mlp.fc2": "mlp.fc2"}.items():  # fmt: skip
                copy(f"head.{hf_part}", f"{pool}.{src_part}")
        dropped = {k for k in params if k.startswith("head.")}  # open_clip's projection after the trunk
    left = sorted(set(params) - used - dropped)
    if left:
        raise AlignError(
            f"'{name}': {len(left)} tower parameters have no place in a Hugging Face "
            f"{type(config).__name__.removesuffix('Config')} (e.g. {left[:4]}): layer scale, qk-norm, register "
            "tokens, attention pooling and similar variants are not supported"
        )
    return out


def _check_pool(trunk: nn.Module, config: SiglipVisionConfig, name: str) -> None:
    """What the parameter check cannot see: SigLIP's head has one query and the encoder's heads and MLP."""
    pool = trunk.attn_pool
    if not (
        pool.latent_len == 1
        and pool.num_heads == config.num_attention_heads
        and _activation(pool.mlp.act, name) == config.hidden_act
    ):
        raise AlignError(
            f"'{name}': its attention-pooling head differs from SigLIP's (one query, same heads/MLP)"
        )


def openclip_image_processor(preprocess: dict, name: str = "open_clip tower") -> PilBackend:
    """The HF image processor giving the pixels of open_clip's eval transform for ``preprocess``.

    ``preprocess`` is open_clip's preprocess config (``model.visual.preprocess_cfg``: size, mean, std,
    interpolation, resize_mode). The processor is a ``PilBackend`` (see the module docstring: it survives
    ``save_pretrained`` + ``AutoImageProcessor.from_pretrained`` as itself). One known difference: when the
    resized long side exceeds the crop by 4k+3 pixels, torchvision's CenterCrop rounds the offset half-to-even
    and HF floors it, so the crop starts one pixel earlier along that side.
    """
    size = _square(preprocess["size"], "preprocess size", name)
    mode = preprocess["resize_mode"]
    if mode == "squash":
        geometry = {"size": {"height": size, "width": size}, "do_center_crop": False}
    elif mode == "shortest":
        geometry = {"size": {"shortest_edge": size}, "do_center_crop": True}
    else:
        raise AlignError(
            f"'{name}': open_clip resize_mode {mode!r} (resize longest side, then pad) has no Hugging Face image "
            "processor equivalent; supported: shortest, squash"
        )
    return PilBackend(
        **geometry,
        # the output size in both modes (unused by a squash); LlavaProcessor counts image tokens from it
        crop_size={"height": size, "width": size},
        # open_clip evaluates 'random' interpolation (a training option) as bicubic
        resample=PILImageResampling.BILINEAR
        if preprocess["interpolation"] == "bilinear"
        else PILImageResampling.BICUBIC,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(m) for m in preprocess["mean"]],
        image_std=[float(s) for s in preprocess["std"]],
        do_convert_rgb=True,
    )
