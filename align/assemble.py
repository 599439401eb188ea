"""``align assemble RECIPE``: vision encoder + projector + causal LM -> a folder transformers and vLLM load.

This module owns the assembly options and the export class each one needs (no class of our own):

* ``projector.type: mlp2x_<act>`` (LLaVA-1.5's ``mlp2x_gelu``; ``relu``, ``silu``, ``quick_gelu``,
  ``gelu_pytorch_tanh``) -> ``LlavaForConditionalGeneration``, with ``vision.feature_layer`` one hidden state or a
  list concatenated along features (transformers and every stage; vLLM's Llava takes one layer only), and
  ``vision.select_strategy`` dropping or keeping CLIP's CLS token;
* ``vision.anyres_grids`` (LLaVA-NeXT tiling over tower-sized tiles) -> ``LlavaNextForConditionalGeneration``:
  image tokens grow with the image (feature-layer lists work in vLLM here);
* ``projector.type: pixel_shuffle`` with ``scale_factor`` s (Idefics3 / SmolVLM connector: s x s neighbouring
  patches become one token, then one Linear) -> ``Idefics3ForConditionalGeneration``: s^2 times fewer image
  tokens (SigLIP-so400m/384: 729 -> 81 at s = 3). SigLIP towers and Llama-family LLMs only (vLLM builds its
  text model as Llama).

The stages (projector/sft/grpo/eval/export) train and run Llava folders only and refuse the other two
before loading (:data:`align.checkpoint.INFERENCE_ONLY`); ``align chat`` runs all three through transformers.

Options the export classes cannot hold are refused by the recipe check with the reason (``linear``,
``mlp3x_gelu`` and deeper). Every folder's ``<image>`` expansion is checked against the tower's feature count.

Run: ``align assemble recipes/tiny/assemble_siglip_qwen2.yaml [key=value ...]``; tests:
``pytest -q tests/test_assemble.py tests/test_assembly_options.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align.config import MAX_SEED, RecipeError, load_any, ranged, save_resolved
from align.errors import AlignError
from align.model import format_parameter_table, parameter_table


@dataclass
class VisionSpec:
    source: Literal["hf", "open_clip"]
    name_or_path: str  # HF id or folder; open_clip model name (e.g. ViT-L-14-336) or "local-dir:FOLDER"
    pretrained: str | None = None  # open_clip only: pretrained tag (e.g. openai) or a weights file
    feature_layer: int | list[int] = ranged(
        -2,
        ge=-1024,
        le=1024,  # hidden state fed to the projector (-2: penultimate); a list: concatenated
    )
    select_strategy: Literal["default", "full"] | None = (
        None  # None: CLIP drops CLS ("default"), SigLIP "full"; "full" keeps CLIP's CLS as one more token
    )
    anyres_grids: list[str] | None = (
        None  # anyres (LLaVA-NeXT class): ROWSxCOLS tile grids, e.g. [1x2, 2x1, 2x2]
    )

    def check(self) -> None:
        if self.source == "hf" and self.pretrained is not None:
            raise RecipeError.at(
                "pretrained", "only open_clip sources take 'pretrained'; HF towers use name_or_path"
            )
        if isinstance(self.feature_layer, list) and not self.feature_layer:
            raise RecipeError.at("feature_layer", "an empty list selects no hidden state; name one or more")
        if self.anyres_grids is not None:
            self.grids()

    def grids(self) -> list[list[int]] | None:
        """``anyres_grids`` as [rows, cols] pairs; RecipeError at ``anyres_grids`` for a malformed or repeated one."""
        if self.anyres_grids is None:
            return None
        if not self.anyres_grids:
            raise RecipeError.at("anyres_grids", "an empty list allows no grid; omit the key for no tiling")
        grids = []
        for i, text in enumerate(self.anyres_grids):
            match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
            if match is None or not all(1 <= int(n) <= MAX_TILES for n in match.groups()):
                raise RecipeError.at(
                    f"anyres_grids[{i}]",
                    f"expected ROWSxCOLS with 1..{MAX_TILES} tiles each (e.g. 2x2), got {text!r}",
                )
            grids.append([int(n) for n in match.groups()])
        if len({tuple(g) for g in grids}) != len(grids):
            raise RecipeError.at("anyres_grids", f"{self.anyres_grids} names a grid twice")
        return grids


@dataclass
class LLMSpec:
    name_or_path: str  # any HF causal LM id or folder (DeepSeek-R1-Distill-Qwen/-Llama, ...)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


MAX_TILES = 12  # per side of an anyres grid (LLaVA-OneVision's largest is 6 x 6)
# Activations both transformers' ACT2FN and vLLM's get_act_fn know by the same name (the folder's
# projector_hidden_act is read by both); transformers' identity "linear" is not among vLLM's.
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
PIXEL_SHUFFLE = "pixel_shuffle"


def projector_activation(projector_type: str) -> str:
    """The activation of an ``mlp2x_<act>`` projector; RecipeError at ``type`` naming why others do not fit."""
    match = re.fullmatch(r"mlp(\d+)x_(\w+)", projector_type)
    if projector_type == "linear":
        raise RecipeError.at(
            "type",
            "'linear' does not fit LlavaMultiModalProjector, which is always Linear -> act -> Linear: its identity "
            "act ('linear') exists in transformers but not in vLLM, so the folder would not serve; use mlp2x_gelu, "
            "or pixel_shuffle with scale_factor 1 (one Linear, Idefics3 class)",
        )
    if match is None:
        raise RecipeError.at(
            "type", f"{projector_type!r} is not a projector; expected mlp2x_<act> or {PIXEL_SHUFFLE}"
        )
    depth, act = int(match.group(1)), match.group(2)
    if depth != 2:
        raise RecipeError.at(
            "type",
            f"{projector_type!r}: LlavaMultiModalProjector has exactly 2 Linear layers and no HF class loaded by "
            "transformers and vLLM holds a deeper MLP projector; use mlp2x_<act>",
        )
    if act not in PROJECTOR_ACTIVATIONS:
        raise RecipeError.at(
            "type",
            f"activation {act!r} is not one transformers and vLLM both name; expected one of "
            f"{', '.join('mlp2x_' + a for a in PROJECTOR_ACTIVATIONS)}",
        )
    return act


@dataclass
class ProjectorSpec:
    type: str = (
        "mlp2x_gelu"  # mlp2x_<act> (LLaVA-1.5: mlp2x_gelu) -> Llava class; pixel_shuffle -> Idefics3 class
    )
    scale_factor: int | None = ranged(
        None,
        ge=1,
        le=16,  # pixel_shuffle only: s x s patches -> one token (s^2 fewer); 1: every patch, one Linear
    )

    def check(self) -> None:
        if self.type == PIXEL_SHUFFLE:
            if self.scale_factor is None:
                raise RecipeError.at(
                    "scale_factor", "pixel_shuffle needs a scale_factor (2: 4x fewer image tokens)"
                )
            return
        projector_activation(self.type)
        if self.scale_factor is not None:
            raise RecipeError.at("scale_factor", f"only pixel_shuffle takes a scale_factor, not {self.type}")


@dataclass
class AssembleRecipe:
    kind: Literal["assemble"]
    vision: VisionSpec
    llm: LLMSpec
    output_dir: str
    projector: ProjectorSpec = field(default_factory=ProjectorSpec)
    image_token: str = "<image>"
    seed: int = ranged(0, ge=0, le=MAX_SEED)  # the projector's initial weights
    dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def export_class(self) -> str:
        """The transformers / vLLM class the assembled folder is."""
        if self.projector.type == PIXEL_SHUFFLE:
            return "Idefics3ForConditionalGeneration"
        if self.vision.anyres_grids is not None:
            return "LlavaNextForConditionalGeneration"
        return "LlavaForConditionalGeneration"

    def check(self) -> None:
        if self.projector.type != PIXEL_SHUFFLE:
            return
        if self.vision.anyres_grids is not None:
            raise RecipeError.at(
                "vision.anyres_grids",
                "anyres tiling is LLaVA-NeXT's (mlp2x_<act> projectors), not pixel_shuffle's",
            )
        if isinstance(self.vision.feature_layer, list):
            raise RecipeError.at(
                "vision.feature_layer",
                "pixel_shuffle (Idefics3) reads one hidden state, the tower's last through its post-LayerNorm; "
                "name one layer (the tower is cut after it)",
            )
        if self.vision.select_strategy == "default":
            raise RecipeError.at(
                "vision.select_strategy",
                "pixel_shuffle (Idefics3) keeps every patch token: use 'full' or omit it",
            )


def add_tokens(tokenizer, llm, image_token: str) -> dict[str, int]:
    """Add ``<image>`` (special) and a pad token if missing; new embedding rows start at the mean row.

    The mean keeps new rows inside the distribution of the trained ones (random rows can dominate the
    softmax of a trained LM); ``<image>`` embeddings are replaced by image features anyway.
    """
    added = {}
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False
        )
        added["image"] = tokenizer.convert_tokens_to_ids(image_token)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<｜▁pad▁｜>"})
        added["pad"] = tokenizer.pad_token_id
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in (llm.get_input_embeddings(), llm.get_output_embeddings()):
                if emb is not None:
                    emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    return added


def _finish(model, buffers: dict, tie_word_embeddings: bool) -> None:
    """After ``load_state_dict(assign=True)`` into a meta-device model: its non-persistent buffers (rotary
    ``inv_freq``, position ids; in no state dict) from the parts' own ``buffers`` by name, tied embeddings, eval."""
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, buffers[name].clone(), persistent=False)
    if tie_word_embeddings:
        model.tie_weights()
    model.eval()


def build_llava(
    vision_model,
    image_processor,
    llm,
    tokenizer,
    *,
    has_cls: bool,
    feature_layer: int | list[int],
    select_strategy: str,
    image_token: str,
    seed: int,
    projector_act: str = "gelu",
):
    """Compose (model, processor) from loaded parts; the projector is Linear -> ``projector_act`` -> Linear, seeded.

    A ``feature_layer`` list concatenates those hidden states along features (the first Linear grows to match).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    add_tokens(tokenizer, llm, image_token)
    vision_config = vision_model.config
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    n_tokens = patches + (1 if has_cls and select_strategy == "full" else 0)
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select_strategy,
        projector_hidden_act=projector_act,
        multimodal_projector_bias=True,
        image_seq_length=n_tokens,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.text_config.vocab_size = llm.get_input_embeddings().weight.shape[0]
    torch.manual_seed(seed)
    projector = LlavaMultiModalProjector(config)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in _tower_state(vision_model).items()}
    # the projector is made in float32 for the same seed-determined values at any dtype, then stored like the LLM
    projector_state = projector.state_dict().items()
    state.update({f"model.multi_modal_projector.{k}": v.to(llm.dtype) for k, v in projector_state})
    for k, v in llm.state_dict().items():  # causal LM: model.* (decoder) and lm_head.*
        state[k if k.startswith("lm_head.") else "model.language_model." + k.removeprefix("model.")] = v
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq, position ids) are not in state dicts: take the parts' own.
    buffers = {
        f"model.vision_tower.{k.removeprefix('vision_model.')}": v for k, v in vision_model.named_buffers()
    }
    buffers.update({"model.language_model." + k.removeprefix("model."): v for k, v in llm.named_buffers()})
    _finish(model, buffers, config.tie_word_embeddings)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=image_token,
        num_additional_image_tokens=1 if has_cls else 0,
    )
    return model, processor


def anyres_max_tokens(base: int, side: int, grids: list[list[int]]) -> int:
    """The most tokens one image becomes under anyres: ``base`` (the whole image) + the largest tile grid.

    A grid of r x c tiles gives (r * side) x (c * side) features plus one row separator per feature row; an image
    whose aspect differs from its grid's loses the padded rows or columns ("unpad"), so it gives fewer.
    """
    return base + max(rows * side * (cols * side + 1) for rows, cols in grids)


def build_llava_next(llava, processor, *, grids: list[list[int]], seed: int):
    """The Llava ``(model, processor)`` as ``LlavaNextForConditionalGeneration`` with anyres tiling over ``grids``.

    Same tower, projector and LLM weights (LLaVA-NeXT names them as Llava does) plus the learned row separator
    ``image_newline``, seeded as LLaVA-NeXT initialises it (normal, std 1/sqrt(hidden)).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    lc = llava.config
    size = lc.vision_config.image_size
    config = LlavaNextConfig(
        vision_config=lc.vision_config.to_dict(),
        text_config=lc.text_config.to_dict(),
        image_token_index=lc.image_token_id,
        projector_hidden_act=lc.projector_hidden_act,
        vision_feature_select_strategy=lc.vision_feature_select_strategy,
        vision_feature_layer=lc.vision_feature_layer,
        multimodal_projector_bias=lc.multimodal_projector_bias,
        tie_word_embeddings=lc.tie_word_embeddings,
        image_grid_pinpoints=[[rows * size, cols * size] for rows, cols in grids],
        image_seq_length=lc.image_seq_length,
    )
    hidden = lc.text_config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    newline = torch.randn(hidden, generator=generator, dtype=llava.dtype) / hidden**0.5
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    model.load_state_dict({**llava.state_dict(), "model.image_newline": newline}, strict=True, assign=True)
    buffers = dict(llava.named_buffers())
    _finish(model, buffers, config.tie_word_embeddings)
    ip = processor.image_processor
    tiles = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=config.image_grid_pinpoints,
            resample=ip.resample,
            rescale_factor=ip.rescale_factor,
            image_mean=ip.image_mean,
            image_std=ip.image_std,
        ),
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )
    return model, tiles


# Idefics3Processor writes each image as <fake_token_around_image><global-img><image>*n<fake_token_around_image>
# and adds <end_of_utterance>; all become single special tokens before the embeddings are sized.
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
IDEFICS3_LLMS = ("llama",)  # vLLM's Idefics3 builds its text model as LlamaModel


def kept_layers(feature_layer: int, num_layers: int) -> int:
    """Encoder layers a tower keeps when ``hidden_states[feature_layer]`` must become its last output."""
    return feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer


def build_idefics3(
    vision_model,
    image_processor,
    llm,
    tokenizer,
    *,
    feature_layer: int,
    scale_factor: int,
    seed: int,
):
    """Compose (model, processor) as ``Idefics3ForConditionalGeneration``: pixel-shuffle connector, seeded.

    The SigLIP tower is cut after ``feature_layer`` and read through its post-LayerNorm, as SmolVLM reads its
    tower; its pooling head is dropped. Images are squared to the tower's input size (no tiling), so every image
    gives ``(side / scale_factor)^2`` tokens.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessor

    tokenizer.add_special_tokens(
        {"additional_special_tokens": list(IDEFICS3_TOKENS)}, replace_extra_special_tokens=False
    )
    add_tokens(tokenizer, llm, "<image>")
    vc = vision_model.config
    layers = kept_layers(feature_layer, vc.num_hidden_layers)
    side = vc.image_size // vc.patch_size
    config = Idefics3Config(
        vision_config={
            "hidden_size": vc.hidden_size,
            "intermediate_size": vc.intermediate_size,
            "num_hidden_layers": layers,
            "num_attention_heads": vc.num_attention_heads,
            "num_channels": vc.num_channels,
            "image_size": vc.image_size,
            "patch_size": vc.patch_size,
            "hidden_act": vc.hidden_act,
            "layer_norm_eps": vc.layer_norm_eps,
            "attention_dropout": vc.attention_dropout,
        },
        text_config=llm.config.to_dict(),
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.text_config.vocab_size = llm.get_input_embeddings().weight.shape[0]
    torch.manual_seed(seed)
    connector = torch.nn.Linear(vc.hidden_size * scale_factor**2, llm.config.hidden_size, bias=False)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    state = {}
    for k, v in _tower_state(vision_model).items():
        parts = k.split(".")
        if k.startswith("head.") or (k.startswith("encoder.layers.") and int(parts[2]) >= layers):
            continue  # the pooling head and the layers after feature_layer feed no image token
        state[f"model.vision_model.{k}"] = v
    state["model.connector.modality_projection.proj.weight"] = connector.weight.detach().to(llm.dtype)
    for k, v in llm.state_dict().items():  # a tied lm_head is listed too, and tied again below
        state[k if k.startswith("lm_head.") else "model.text_model." + k.removeprefix("model.")] = v
    model.load_state_dict(state, strict=True, assign=True)
    buffers = {"model.text_model." + k.removeprefix("model."): v for k, v in llm.named_buffers()}
    _finish(model, buffers, config.tie_word_embeddings)
    size = {"longest_edge": vc.image_size}
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            do_resize=True,
            size=size,
            max_image_size=size,
            do_image_splitting=False,
            resample=image_processor.resample,
            rescale_factor=image_processor.rescale_factor,
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
        ),
        tokenizer=tokenizer,
        image_seq_len=(side // scale_factor) ** 2,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def check_pixel_shuffle(
    info, llm_model_type: str, image_token: str, scale_factor: int, feature_layer: int
) -> None:
    """RecipeError for a pixel_shuffle assembly the Idefics3 class (or vLLM's) cannot hold."""
    if info.kind != "siglip":
        raise RecipeError.at(
            "vision",
            f"pixel_shuffle (Idefics3) needs a SigLIP tower (its vision model is SigLIP's), not {info.kind}",
        )
    if llm_model_type not in IDEFICS3_LLMS:
        raise RecipeError.at(
            "llm.name_or_path",
            f"pixel_shuffle (Idefics3): vLLM builds the Idefics3 text model as Llama, so a {llm_model_type!r} LLM "
            "would not serve; use a Llama-family LLM (e.g. DeepSeek-R1-Distill-Llama) or an mlp2x_<act> projector",
        )
    if image_token != "<image>":
        raise RecipeError.at(
            "image_token", f"Idefics3Processor's image token is '<image>', not {image_token!r}"
        )
    side = info.image_size // info.patch_size
    if side % scale_factor:
        fits = [s for s in range(2, side + 1) if side % s == 0]
        raise RecipeError.at(
            "projector.scale_factor",
            f"{scale_factor} does not divide the tower's {side} x {side} patch grid; "
            f"use one of {fits or [1]} ({', '.join(f'{(side // s) ** 2} tokens' for s in fits) or 'no compression'})",
        )
    if kept_layers(feature_layer, info.num_layers) < 1:
        raise RecipeError.at("vision.feature_layer", f"{feature_layer} keeps no encoder layer of the tower")


def _tower_state(vision_model) -> dict:
    """Tower weights named as the Llava vision tower names them (no ``vision_model.`` level in transformers 5)."""
    return {k.removeprefix("vision_model."): v for k, v in vision_model.state_dict().items()}


def check_image_tokens(model, processor) -> int:
    """Processor expansion must equal the tower's feature count; raise with both numbers otherwise."""
    from PIL import Image

    from align.checkpoint import image_seq_len

    config = model.config
    size = config.vision_config.image_size
    # anyres: the count depends on the image's size and aspect, so wide, tall, small and large images are checked
    shapes = [(size, size)]
    if config.model_type == "llava_next":
        shapes += [
            (3 * size // 2, size // 3),
            (size // 2, 2 * size),
            (size // 4, size // 5),
            (2 * size, 2 * size),
        ]
    for shape in shapes:
        image = Image.new("RGB", shape)
        expected = image_seq_len(processor, image)
        # the processor's own pixels: Idefics3 drops all-zero images as batch padding
        pixels = processor.image_processor(images=[image], return_tensors="pt")
        names = ("pixel_values", "pixel_attention_mask", "image_sizes")
        with torch.no_grad():
            features = model.model.get_image_features(**{k: pixels[k] for k in names if k in pixels})
        found = features.pooler_output[0].shape[0]
        if found != expected:
            how = (
                f"pixel shuffle scale {config.scale_factor}"
                if config.model_type == "idefics3"
                else f"feature layer {config.vision_feature_layer}, strategy {config.vision_feature_select_strategy}"
            )
            raise AlignError(
                f"image features and image tokens do not match: the processor expands <image> to {expected} "
                f"tokens but the vision tower gives {found} features ({how}; image {shape[0]} x {shape[1]})"
            )
    return image_seq_len(processor, Image.new("RGB", (size, size)))


def llm_config_of(name_or_path: str):
    """The config of a causal LM (a folder is checked first: config.json, model_type, safetensors weights).

    A vision tower, a Llava or any other non-causal-LM folder is refused with what was found, before loading.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from align.checkpoint import check_weight_files, read_model_config

    folder = Path(name_or_path).is_dir()
    if folder:  # no config.json or no model_type: one line naming the folder, before transformers reads it
        read_model_config(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AlignError(f"llm.name_or_path {name_or_path}: cannot read its config: {first}") from None
    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = "a vision tower" if "clip" in model_type or "siglip" in model_type else "not a causal LM"
        raise AlignError(
            f"llm.name_or_path {name_or_path}: model_type is {model_type!r} ({what}); "
            "the LLM must be a causal language model (e.g. qwen2, llama)"
        )
    if folder:
        check_weight_files(name_or_path)
    if getattr(config, "vision_config", None) is not None:  # e.g. gemma3: its causal-LM class is multimodal
        raise AlignError(
            f"llm.name_or_path {name_or_path}: {config.model_type!r} is a vision-language model; "
            "name a text-only causal LM"
        )
    return config


def compose(recipe: AssembleRecipe, recipe_file: str | None = None):
    """``(model, processor, generation_config)`` in memory from the parts named by ``recipe``, checked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from align.checkpoint import supported_attention
    from align.vision import check_feature_selection, describe_vision, load_vision_tower

    spec = recipe.vision
    llm_config = llm_config_of(recipe.llm.name_or_path)  # configs only: fail before loading
    info = describe_vision(spec.source, spec.name_or_path, spec.pretrained)
    layers = spec.feature_layer if isinstance(spec.feature_layer, list) else [spec.feature_layer]
    shuffle = recipe.projector.type == PIXEL_SHUFFLE
    try:
        for layer in layers:
            strategy = check_feature_selection(info, layer, spec.select_strategy)
        if spec.anyres_grids is not None and info.has_cls and strategy == "full":
            raise RecipeError.at(
                "select_strategy",
                "anyres (LLaVA-NeXT) lays each tile's features out on the patch grid, so CLIP's CLS token must be "
                "dropped: use 'default'",
            )
    except RecipeError as err:
        err = err.under("vision")
        err.file = recipe_file
        raise err from None
    if shuffle:
        try:
            check_pixel_shuffle(
                info, llm_config.model_type, recipe.image_token, recipe.projector.scale_factor, layers[0]
            )
        except RecipeError as err:
            err.file = recipe_file
            raise err from None
    dtype = getattr(torch, recipe.dtype)
    vision_model, image_processor, _ = load_vision_tower(
        spec.source, spec.name_or_path, spec.pretrained, dtype
    )
    llm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(llm_config)]
    llm = AutoModelForCausalLM.from_pretrained(
        recipe.llm.name_or_path,
        dtype=dtype,
        attn_implementation=supported_attention(llm_class, recipe.llm.attn_implementation),
    )
    cap = getattr(llm.config, "final_logit_softcapping", None)
    if cap:  # Llava's own lm_head call has no capping; tanh is monotonic, so greedy tokens are the same
        print(
            f"{llm_config.model_type}: final_logit_softcapping {cap} is not applied by "
            "LlavaForConditionalGeneration (logits are the LLM's before capping; argmax unchanged)"
        )
    tokenizer = AutoTokenizer.from_pretrained(recipe.llm.name_or_path)
    if shuffle:
        model, processor = build_idefics3(
            vision_model,
            image_processor,
            llm,
            tokenizer,
            feature_layer=layers[0],
            scale_factor=recipe.projector.scale_factor,
            seed=recipe.seed,
        )
    else:
        model, processor = build_llava(
            vision_model,
            image_processor,
            llm,
            tokenizer,
            has_cls=info.has_cls,
            feature_layer=spec.feature_layer,
            select_strategy=strategy,
            image_token=recipe.image_token,
            seed=recipe.seed,
            projector_act=projector_activation(recipe.projector.type),
        )
        if spec.anyres_grids is not None:
            model, processor = build_llava_next(model, processor, grids=spec.grids(), seed=recipe.seed)
        elif isinstance(spec.feature_layer, list):
            # measured with vLLM 0.32 (tests/test_assembly_options.py): its Llava projector takes one layer's width
            print(
                f"note: feature layers {spec.feature_layer}: transformers and align's stages load this Llava folder, "
                "vLLM's LlavaForConditionalGeneration does not (its projector takes one layer); its LLaVA-NeXT "
                "class concatenates layers (vision.anyres_grids)"
            )
    check_image_tokens(model, processor)
    generation_config = llm.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor, generation_config


def assemble(recipe: AssembleRecipe, recipe_file: str | None = None) -> Path:
    """Compose and save the folder (+ the resolved recipe); returns its path.

    Llava folders are written in the canonical llava-hf layout; Idefics3 folders by transformers itself, whose
    names (``model.vision_model.*``, ``model.connector.*``, ``model.text_model.*``, ``lm_head.*``) are the
    published SmolVLM layout that vLLM loads.
    """
    from PIL import Image

    from align.checkpoint import atomic_folder, image_seq_len, save_llava, save_processor
    from align.runfolder import check_output_dir

    check_output_dir(recipe.output_dir)  # before minutes of loading, not after
    model, processor, generation_config = compose(recipe, recipe_file)
    if model.config.model_type == "idefics3":
        model.config.architectures = ["Idefics3ForConditionalGeneration"]
        with atomic_folder(recipe.output_dir) as tmp:
            model.save_pretrained(tmp)
            save_processor(processor, tmp)
            generation_config.save_pretrained(tmp)
        out = Path(recipe.output_dir)
    else:
        out = save_llava(
            recipe.output_dir,
            config=model.config,
            state_dict=model.state_dict(),
            processor=processor,
            generation_config=generation_config,
            architecture=recipe.export_class,
        )
    save_resolved(recipe, out)
    tokens = image_seq_len(processor, Image.new("RGB", (model.config.vision_config.image_size,) * 2))
    if recipe.vision.anyres_grids is not None:
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        tokens = (
            f"{tokens} to {anyres_max_tokens(model.config.image_seq_length, side, recipe.vision.grids())}"
        )
    title = f"assembled {out} ({recipe.export_class}, {tokens} image tokens)"
    print(format_parameter_table(parameter_table(model), title))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="assemble recipe (kind: assemble)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")


def run(args) -> int:
    recipe = load_any(args.recipe, args.overrides, expect="assemble")
    assemble(recipe, args.recipe)
    return 0
