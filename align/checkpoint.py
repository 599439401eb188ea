"""Model folders: reading and writing Llava checkpoints in the canonical llava-hf key layout.

transformers 5 keeps ``model.vision_tower.*`` / ``model.language_model.*`` / ``lm_head.*`` in memory and its
own ``save_pretrained`` drops the ``vision_model.`` level of CLIP/SigLIP towers, a layout vLLM rejects. We
write the layout of the published llava-hf checkpoints instead, which transformers and vLLM both load:
``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``,
``vision_tower.vision_model.*``. Folders are written to a temporary sibling and renamed into place, so a
crash never leaves a folder that looks complete; their files follow the user's umask, as ``save_pretrained``'s
do. The chat template a folder carries also takes transformers' structured message content
(:func:`content_parts_template`), so ``processor.apply_chat_template`` and the ``image-text-to-text`` pipeline
work on it as documented.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from align.errors import AlignError

# in-memory (transformers 5) prefix -> canonical llava-hf prefix
_TO_CANONICAL = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    # LLaVA-NeXT (anyres): the row separator, named as the llava-v1.6 checkpoints name it
    ("model.image_newline", "image_newline"),
)
CANONICAL_PREFIXES = tuple(dst for _, dst in _TO_CANONICAL)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def canonical_key(key: str) -> str:
    """The llava-hf name of an in-memory ``LlavaForConditionalGeneration`` parameter name."""
    for src, dst in _TO_CANONICAL:
        if key.startswith(src):
            rest = key[len(src) :]
            # A tower that still has its own `vision_model.` level must not get a second one.
            if dst == "vision_tower.vision_model." and rest.startswith("vision_model."):
                rest = rest[len("vision_model.") :]
            return dst + rest
    raise AlignError(
        f"parameter {key!r} belongs to no Llava component (vision tower, projector, language model)"
    )


def canonical_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict:
    """Renamed, contiguous, unshared copies (safetensors refuses tensors that share storage, e.g. tied heads)."""
    out = {}
    for key, tensor in state_dict.items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[canonical_key(key)] = t.clone().contiguous()
    return out


def _shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    return shards


def write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """safetensors files (sharded with an index when larger than ``max_shard_bytes``)."""
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def weight_names(folder: str | Path) -> list[str]:
    """Tensor names stored in a model folder (read from headers; no weights loaded)."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        return sorted(json.loads((folder / INDEX_NAME).read_text())["weight_map"])
    if not (folder / WEIGHTS_NAME).exists():
        raise AlignError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return sorted(f.keys())


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask`` must set one to read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``open``/``mkdir`` would have.

    ``tempfile.mkdtemp`` makes 0700 folders and safetensors writes 0600 files: on a shared cluster the rest of
    a team could not read the model. ``save_pretrained`` leaves files to the umask; so do we.
    """
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``folder`` in one rename (modes: the umask's)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        follow_umask(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


_PARTS_END = "{#- align: end of content parts -#}"


def content_parts_template(template: str, image_token: str) -> str:
    """``template`` behind a preamble that turns structured content parts into the text it was trained on.

    transformers documents ``{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}``
    for image-text models; LLM templates (DeepSeek-R1-Distill's) concatenate ``content`` as a string. String
    content renders exactly as before, so training prompts do not change. Applying it twice replaces the
    earlier preamble.
    """
    original = template.split(_PARTS_END, 1)[-1]
    preamble = (resources.files("align") / "templates" / "content_parts.jinja").read_text(encoding="utf-8")
    token = json.dumps(image_token, ensure_ascii=False)
    return f"{{%- set align_image_token = {token} -%}}\n{preamble.rstrip()}{original}"


def save_processor(processor, folder: Path) -> None:
    """``processor.save_pretrained(folder)`` with :func:`content_parts_template` as the chat template of both the
    processor and its tokenizer; ``processor`` itself is left as it was."""
    template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
    if not template:
        processor.save_pretrained(folder)
        return
    before = processor.chat_template, processor.tokenizer.chat_template
    processor.chat_template = processor.tokenizer.chat_template = content_parts_template(
        template, processor.image_token
    )
    try:
        processor.save_pretrained(folder)
    finally:
        processor.chat_template, processor.tokenizer.chat_template = before


def save_llava(
    folder: str | Path,
    *,
    config,
    state_dict: dict[str, torch.Tensor],
    processor=None,
    generation_config=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    architecture: str = "LlavaForConditionalGeneration",
) -> Path:
    """Write a complete Llava folder (config, canonical weights, processor + tokenizer, generation config).

    ``architecture``: ``LlavaNextForConditionalGeneration`` for an anyres folder (the same layout + image_newline).
    """
    folder = Path(folder)
    # vLLM and TRL choose the model class from `architectures`; a config built in memory has none.
    config.architectures = [architecture]
    with atomic_folder(folder) as tmp:
        config.save_pretrained(tmp)
        write_weights(canonical_state_dict(state_dict, dtype), tmp, max_shard_bytes)
        if processor is not None:
            save_processor(processor, tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
    return folder


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# model types `align assemble` writes that the stages do not train (their layouts, processors and image-token
# spans differ from Llava's), with the option that makes them
INFERENCE_ONLY = {"idefics3": "projector.type pixel_shuffle", "llava_next": "vision.anyres_grids"}
_ATTENTION_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}
_noted: set[str] = set()  # attention fallbacks already printed by this process


def read_model_config(folder: str | Path) -> dict:
    """``config.json`` of a model folder as a dict, with a ``model_type``; reads no weights.

    Checking the config first turns a wrong folder into one line at once instead of minutes of loading.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise AlignError(f"{folder}: no config.json (not a model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AlignError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        found = sorted(config)[:8] if isinstance(config, dict) else type(config).__name__
        raise AlignError(f"{path}: no model_type (found {found}); not a Hugging Face model folder")
    return config


def check_weight_files(folder: str | Path) -> None:
    """A folder must hold safetensors weights: pickle files can run code when loaded, so they are refused."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AlignError(
            f"{folder}: holds only pickle weights ({', '.join(pickled)}); pickle weights are not loaded; "
            "convert to safetensors (load it where you trust it and save_pretrained(..., safe_serialization=True))"
        )
    raise AlignError(f"{folder}: no weights (no *.safetensors file)")


def resolve_model_folder(path: str | Path, expect: str | None = "llava") -> Path:
    """A model folder, or a stage's output folder (whose model/ is used), checked before any weights load.

    ``expect``: the ``model_type`` the folder must have (``None``: any); its weights must be safetensors.
    """
    path = Path(path)
    if (path / "config.json").exists():
        folder = path
    elif (path / "model" / "config.json").exists():
        folder = path / "model"
    else:
        raise AlignError(missing_model_reason(path))
    model_type = read_model_config(folder)["model_type"]
    if expect is not None and model_type != expect:
        hint = ""
        if expect == "llava" and _is_causal_lm(model_type):
            hint = "; this is a language model: build a Llava folder from it with `align assemble` first"
        elif expect == "llava" and model_type in INFERENCE_ONLY:
            hint = (
                f"; {model_type} folders ({INFERENCE_ONLY[model_type]}) load in transformers and vLLM as they are, "
                "but align's stages train and run Llava folders only (`align chat` runs them): "
                "assemble with an mlp2x_<act> projector to train"
            )
        raise AlignError(f"{folder}: model_type is {model_type!r}, expected {expect!r}{hint}")
    check_weight_files(folder)
    return folder


def missing_model_reason(path: Path) -> str:
    """Why ``path`` (which has no config.json, nor model/config.json) is not a model folder, and what to do."""
    if not path.exists():
        return f"{path}: does not exist (not a model folder, nor a stage output)"
    if not path.is_dir():
        return f"{path}: is a file, not a model folder"
    recipe = path / "recipe.resolved.yaml"
    if (path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir() or recipe.exists():
        import yaml

        try:  # the recipe names the stage to resume; a damaged one still gets the message
            kind = str(yaml.safe_load(recipe.read_text(encoding="utf-8")).get("kind", "STAGE"))
        except (OSError, AttributeError, yaml.YAMLError):
            kind = "STAGE"
        return (
            f"{path}: this run is unfinished (no model/ yet, its stage has not written its final model): "
            f"`align {kind} RECIPE --resume` continues it"
        )
    return f"{path}: no config.json (not a model folder, nor a stage output with model/config.json)"


def _is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def supported_attention(model_class, requested: str) -> str:
    """``requested`` when ``model_class`` implements it, else the first it does of sdpa, eager.

    transformers refuses an explicitly requested implementation a model lacks (Gemma-2 has no sdpa: its
    attention soft-capping needs the eager kernel); the classes declare what they support.
    """
    if requested == "eager" or getattr(model_class, _ATTENTION_FLAGS[requested], False):
        return requested
    chosen = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    note = f"{model_class.config_class.model_type}: {requested} not supported, using {chosen}"
    if note not in _noted:
        _noted.add(note)
        print(note)
    return chosen


def load_llava(folder: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(model, processor) from a Llava folder: ours, or any llava-hf checkpoint."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    folder = resolve_model_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    text_class = MODEL_MAPPING[type(config.text_config)]
    vision_class = MODEL_MAPPING[type(config.vision_config)]
    attention = {
        "": attn_implementation,
        "text_config": supported_attention(text_class, attn_implementation),
        "vision_config": supported_attention(vision_class, attn_implementation),
    }
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation=attention)
    processor = AutoProcessor.from_pretrained(folder)
    return model, processor


def load_for_chat(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) for ``align chat``: a Llava folder, or one of the inference-only classes align assembles.

    The Idefics3 and LLaVA-NeXT folders (:data:`INFERENCE_ONLY`) are not trained by the stages, but they chat
    through transformers' own class and processor like any export.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checked = resolve_model_folder(folder, expect=None)
    if read_model_config(checked)["model_type"] not in INFERENCE_ONLY:
        return load_llava(folder, dtype)  # refuses anything that is not a Llava folder, with the reason
    model = AutoModelForImageTextToText.from_pretrained(checked, dtype=dtype, attn_implementation="sdpa")
    return model, AutoProcessor.from_pretrained(checked)


def image_seq_len(processor, image=None) -> int:
    """How many image tokens one ``<image>`` expands to, measured with the processor itself.

    ``image``: a PIL image to measure with (anyres processors expand by image size; None: a small blank one).
    """
    from PIL import Image

    # A Llava processor resizes any image to the tower's input, so a blank one measures the expansion.
    image = Image.new("RGB", (48, 40)) if image is None else image
    text = processor(text=processor.image_token, images=[image], return_tensors="pt")
    return int((text["input_ids"] == processor.image_token_id).sum())


def eos_token_ids(tokenizer, generation_config) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and the generation config's (an int or a list)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else list(eos or []))}
    return sorted(i for i in ids if i is not None)
