"""``align assemble RECIPE``: vision encoder + mlp2x_gelu projector + causal LM -> a standard Llava folder.

Run: ``align assemble recipes/tiny/assemble_siglip_qwen2.yaml [key=value ...]``.
"""

from __future__ import annotations

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
    feature_layer: int = ranged(-2, ge=-1024, le=1024)  # hidden state fed to the projector (-2: penultimate)
    select_strategy: Literal["default", "full"] | None = (
        None  # None: CLIP drops CLS ("default"), SigLIP "full"
    )

    def check(self) -> None:
        if self.source == "hf" and self.pretrained is not None:
            raise RecipeError.at(
                "pretrained", "only open_clip sources take 'pretrained'; HF towers use name_or_path"
            )


@dataclass
class LLMSpec:
    name_or_path: str  # any HF causal LM id or folder (DeepSeek-R1-Distill-Qwen/-Llama, ...)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass
class ProjectorSpec:
    type: Literal["mlp2x_gelu"] = "mlp2x_gelu"  # LLaVA-1.5: Linear -> GELU -> Linear


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


def build_llava(
    vision_model,
    image_processor,
    llm,
    tokenizer,
    *,
    has_cls: bool,
    feature_layer: int,
    select_strategy: str,
    image_token: str,
    seed: int,
):
    """Compose (model, processor) from loaded parts; the projector is LLaVA's mlp2x_gelu, seeded."""
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
        projector_hidden_act="gelu",
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
    state.update({f"model.multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    for k, v in llm.state_dict().items():  # causal LM: model.* (decoder) and lm_head.*
        state[k if k.startswith("lm_head.") else "model.language_model." + k.removeprefix("model.")] = v
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq, position ids) are not in state dicts: take the parts' own.
    buffers = {
        f"model.vision_tower.{k.removeprefix('vision_model.')}": v for k, v in vision_model.named_buffers()
    }
    buffers.update({"model.language_model." + k.removeprefix("model."): v for k, v in llm.named_buffers()})
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, buffers[name].clone(), persistent=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
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


def _tower_state(vision_model) -> dict:
    """Tower weights named as the Llava vision tower names them (no ``vision_model.`` level in transformers 5)."""
    return {k.removeprefix("vision_model."): v for k, v in vision_model.state_dict().items()}


def check_image_tokens(model, processor) -> int:
    """Processor expansion must equal the tower's feature count; raise with both numbers otherwise."""
    from align.checkpoint import image_seq_len

    expected = image_seq_len(processor)
    size = model.config.vision_config.image_size
    pixels = torch.zeros(1, 3, size, size, dtype=model.dtype)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    if features.shape[0] != expected:
        raise AlignError(
            f"image features and image tokens do not match: the processor expands <image> to {expected} tokens "
            f"but the vision tower gives {features.shape[0]} features (feature layer "
            f"{model.config.vision_feature_layer}, strategy {model.config.vision_feature_select_strategy})"
        )
    return expected


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
    try:
        strategy = check_feature_selection(info, spec.feature_layer, spec.select_strategy)
    except RecipeError as err:
        err = err.under("vision")
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
    )
    check_image_tokens(model, processor)
    generation_config = llm.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor, generation_config


def assemble(recipe: AssembleRecipe, recipe_file: str | None = None) -> Path:
    """Compose and save a Llava folder (canonical llava-hf layout + the resolved recipe); returns its path."""
    from align.checkpoint import save_llava
    from align.runfolder import check_output_dir

    check_output_dir(recipe.output_dir)  # before minutes of loading, not after
    model, processor, generation_config = compose(recipe, recipe_file)
    out = save_llava(
        recipe.output_dir,
        config=model.config,
        state_dict=model.state_dict(),
        processor=processor,
        generation_config=generation_config,
    )
    save_resolved(recipe, out)
    title = f"assembled {out} ({model.config.image_seq_length} image tokens)"
    print(format_parameter_table(parameter_table(model), title))
    return out


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="assemble recipe (kind: assemble)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")


def run(args) -> int:
    recipe = load_any(args.recipe, args.overrides, expect="assemble")
    assemble(recipe, args.recipe)
    return 0
