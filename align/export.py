"""``align export RUN_OR_MODEL --out DIR``: a self-contained Hugging Face Llava folder to publish or serve.

This module owns what goes into an exported folder: canonical llava-hf safetensors (sharded with an index when
larger than ``--max-shard-size``; written by :func:`align.checkpoint.save_llava`), config, tokenizer, processor,
chat template, a ``generation_config.json`` with the LLM card's sampling for R1 distills (temperature 0.6,
top_p 0.95), and a ``README.md`` model card with the lineage read back from the recipes (:func:`lineage`): each
stage output's ``recipe.resolved.yaml`` names its input ``model:``, back to the ``assemble`` recipe that names
the encoder and the LLM; data sources and final metrics come from each stage's recipe, ``summary.json`` and
``metrics.jsonl``. No pickle files: the folder is checked before it is moved into place.

A LoRA stage output already holds the merged model in ``model/``; exporting the stage output uses it.

Run: ``align export checkpoints/tiny/grpo --out exports/tiny --dtype bf16 [--max-shard-size 5GB]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from align.checkpoint import PICKLE_SUFFIXES
from align.errors import AlignError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The DeepSeek-R1-Distill model cards: "temperature within 0.5-0.7 (0.6 is recommended)", top-p 0.95.
R1_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
RECIPE_FILE = "recipe.resolved.yaml"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in ``5GB`` / ``500MB`` / ``2GiB`` / ``1000`` (GB = 10^9 as in transformers, GiB = 2^30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise AlignError(f"--max-shard-size: expected a size like 5GB, 500MB or 2GiB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1:
        raise AlignError(f"--max-shard-size: must be at least 1 byte, got {text!r}")
    return size


def is_r1_distill(chat_template: str | None) -> bool:
    """DeepSeek-R1-Distill chat templates open the assistant turn with ``<｜Assistant｜>`` and think in ``<think>``."""
    return bool(chat_template) and "<｜Assistant｜>" in chat_template and "<think>" in chat_template


def generation_config_for(source, chat_template: str | None):
    """A copy of ``source`` (a ``GenerationConfig``) with the R1 cards' sampling when the template is R1's."""
    config = source.__class__.from_dict(source.to_dict())
    if is_r1_distill(chat_template):
        for key, value in R1_SAMPLING.items():
            setattr(config, key, value)
    return config


def pickle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)


@dataclass
class StageRecord:
    """One step of a model's history, read from the files its stage left behind."""

    model_dir: Path
    recipe: dict[str, Any] | None  # None: a folder without a recipe (e.g. a downloaded llava-hf checkpoint)
    run_dir: Path | None  # the stage output holding model_dir, when it has a summary or metrics
    summary: dict[str, Any] | None
    final_metrics: dict[str, Any] | None  # the last row of metrics.jsonl
    note: str = ""  # why the walk stopped at this record, when it could not reach an assemble recipe

    @property
    def kind(self) -> str:
        return str(self.recipe.get("kind", "unknown")) if self.recipe is not None else "checkpoint"


def _read_mapping(path: Path, parse) -> dict | None:
    """A YAML/JSON mapping, or None when the file is missing or unreadable (a card is written regardless)."""
    if not path.is_file():
        return None
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _stage_record(model_dir: Path) -> StageRecord:
    from align.plot import METRICS_FILE, read_metrics

    parent = model_dir.parent
    is_stage_output = model_dir.name == "model" and any(
        (parent / name).is_file() for name in ("summary.json", METRICS_FILE, RECIPE_FILE)
    )
    run_dir = parent if is_stage_output else None
    recipe = _read_mapping(model_dir / RECIPE_FILE, yaml.safe_load)
    if recipe is None and run_dir is not None:
        recipe = _read_mapping(run_dir / RECIPE_FILE, yaml.safe_load)
    summary = _read_mapping(run_dir / "summary.json", json.loads) if run_dir else None
    final = None
    if run_dir is not None and (run_dir / METRICS_FILE).is_file():
        rows, _ = read_metrics(run_dir / METRICS_FILE)
        final = rows[-1] if rows else None
    return StageRecord(model_dir, recipe, run_dir, summary, final)


def lineage(model_dir: str | Path, max_stages: int = 32) -> list[StageRecord]:
    """The stages that made ``model_dir``, oldest first: each recipe's ``model:`` leads to the stage before,
    back to the ``assemble`` recipe (or to a folder without a recipe, or an input that no longer exists)."""
    from align.checkpoint import resolve_model_folder

    records: list[StageRecord] = []
    folder = Path(model_dir).resolve()
    while len(records) < max_stages:
        record = _stage_record(folder)
        records.append(record)
        if record.recipe is None or record.kind == "assemble":
            break
        source = record.recipe.get("model")
        if not isinstance(source, str):
            record.note = "its recipe names no input model"
            break
        try:
            folder = resolve_model_folder(source).resolve()
        except AlignError:
            record.note = (
                f"its input model {portable(source)} is not a model folder (from where the export ran)"
            )
            break
        if any(r.model_dir == folder for r in records):
            record.note = f"its input model {portable(folder)} is already in this lineage (cycle)"
            break
    return records[::-1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def portable(value: Any) -> Any:
    """``value`` with every absolute path shortened to ``…/parent/name`` (inside the working folder: relative).

    A published card must not carry the build machine's folders (home directories, cluster scratch paths);
    the last two parts still say which model or file it was. Mappings and lists are walked.
    """
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    path = Path(value)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return "…/" + "/".join(path.parts[-2:])


def _origin(config, assembled: dict | None, part: str) -> str:
    """Where a component came from: the assemble recipe when the lineage reaches it, else the config."""
    sub = config.vision_config if part == "vision" else config.text_config
    kind = f"`{sub.model_type}`"
    if assembled is not None:
        spec = portable(assembled.get(part) or {})
        where = f"`{spec.get('name_or_path')}`"
        if part == "vision":
            pretrained = f", pretrained `{spec['pretrained']}`" if spec.get("pretrained") else ""
            return f"{kind} from {spec.get('source')} {where}{pretrained}"
        return f"{kind} from {where}"
    name = portable(getattr(sub, "_name_or_path", "") or "")
    return f"{kind} from `{name}`" if name else kind


def _section(mapping: dict, key: str) -> dict:
    """``mapping[key]`` when it is a mapping, else empty: recipes of other versions must not break the card."""
    value = mapping.get(key)
    return value if isinstance(value, dict) else {}


def _stage_lines(number: int, record: StageRecord) -> list[str]:
    recipe = portable(record.recipe or {})
    lines = [f"### {number}. {record.kind}: `{portable(record.run_dir or record.model_dir)}`", ""]
    if record.kind == "assemble":
        vision, llm = _section(recipe, "vision"), _section(recipe, "llm")
        lines.append(
            f"- vision encoder: {vision.get('source')} `{vision.get('name_or_path')}` "
            f"(feature layer {vision.get('feature_layer')}, select strategy {vision.get('select_strategy') or 'auto'})"
        )
        lines.append(f"- language model: `{llm.get('name_or_path')}`")
        lines.append(
            f"- projector: {_section(recipe, 'projector').get('type', 'mlp2x_gelu')}, seed {recipe.get('seed')}"
        )
    elif record.recipe is None:
        lines.append("- a model folder without a recipe (e.g. a published llava-hf checkpoint)")
    else:
        lines.append(f"- input model: `{recipe.get('model')}`")
        sources = _section(recipe, "data").get("sources")
        for source in sources if isinstance(sources, list) else []:
            if not isinstance(source, dict):
                continue
            extra = f", weight {source['weight']}" if source.get("weight") is not None else ""
            lines.append(
                f"- data: `{source.get('name')}`: {source.get('format')} `{source.get('path')}`, "
                f"sampling {source.get('sampling', 'all')}{extra}"
            )
        lora = _section(recipe, "lora")
        if lora.get("r"):
            lines.append(f"- LoRA r={lora['r']} alpha={lora.get('alpha')} (merged into the weights)")
    if record.final_metrics:
        step = record.final_metrics.get("step")
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in record.final_metrics.items() if k != "step")
        lines.append(f"- final metrics (step {step}): {shown}")
    if record.summary:
        keys = (
            "steps",
            "wall_time_s",
            "tokens_per_s",
            "peak_memory_mb",
            "world_size",
            "strategy",
            "precision",
        )
        shown = ", ".join(f"{k} {_fmt(record.summary[k])}" for k in keys if k in record.summary)
        lines.append(f"- run: {shown}")
    if record.note:
        lines.append(f"- lineage stops here: {record.note}")
    if record.recipe is not None:
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip()
        lines += [
            "",
            "<details><summary>resolved recipe</summary>",
            "",
            "```yaml",
            text,
            "```",
            "",
            "</details>",
        ]
    return [*lines, ""]


def _usage_lines(name: str) -> list[str]:
    """The model card's "Usage" section: loading ``name`` and chatting about an image, two ways."""
    return [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline",
        "",
        f'model = LlavaForConditionalGeneration.from_pretrained("{name}")',
        f'processor = AutoProcessor.from_pretrained("{name}")',
        "messages = [",
        '    {"role": "user", "content": [{"type": "image", "path": "picture.png"}, '
        '{"type": "text", "text": "What is in this picture?"}]}',
        "]",
        "inputs = processor.apply_chat_template(",
        '    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"',
        ")",
        "output = model.generate(**inputs, max_new_tokens=1024)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "",
        f'chat = pipeline("image-text-to-text", model="{name}")',
        'print(chat(text=messages, max_new_tokens=1024, return_full_text=False)[0]["generated_text"])',
        "```",
    ]


def model_card(
    *,
    name: str,
    config,
    parameters: dict[str, int],
    dtype: str,
    generation: dict[str, Any],
    r1: bool,
    stages: list[StageRecord],
) -> str:
    """The README.md of an exported folder: components, usage, sampling, and the lineage of ``stages``."""
    assembled = next((s.recipe for s in stages if s.kind == "assemble"), None)
    vision = _origin(config, assembled, "vision")
    llm = _origin(config, assembled, "llm")
    sampling = ", ".join(
        f"{k} {generation[k]}" for k in ("do_sample", "temperature", "top_p") if k in generation
    )
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, vision-language, reasoning, align]",
        "---",
        "",
        f"# {name}",
        "",
        f"A LLaVA-style vision-language reasoning model: vision encoder {vision} -> "
        f"`mlp2x_{config.projector_hidden_act}` projector -> language model {llm}. Exported by `align export` as a standard `LlavaForConditionalGeneration` folder "
        f"(canonical llava-hf weight names, safetensors, {dtype}).",
        "",
        "| component | from | parameters |",
        "| --- | --- | ---: |",
        f"| vision encoder | {vision}, feature layer {config.vision_feature_layer}, "
        f"{config.vision_feature_select_strategy} | {parameters.get('vision', 0):,} |",
        f"| projector | mlp2x_{config.projector_hidden_act} (Linear -> {config.projector_hidden_act} -> Linear"
        f"{', on the listed layers concatenated' if isinstance(config.vision_feature_layer, list) else ''}) | "
        f"{parameters.get('projector', 0):,} |",
        f"| language model | {llm} | {parameters.get('llm', 0):,} |",
        "",
        f"Each image becomes {config.image_seq_length} image tokens.",
        "",
        *_usage_lines(name),
        "",
        "String content with an `<image>` placeholder works too "
        '(`"content": "<image>\\nWhat is in this picture?"`). The chat template writes the BOS token itself: '
        "to tokenize a rendered prompt yourself, call `processor(text=prompt, images=..., "
        "add_special_tokens=False)`, or the prompt starts with two.",
        "",
        f"`generation_config.json` samples with {sampling or 'the source defaults'}"
        + (
            " (the DeepSeek-R1-Distill recommendation). The chat template prefills `<think>\\n`: the generated "
            "text is the reasoning, then `</think>`, then the answer; earlier turns' reasoning is dropped from "
            "the history by the template."
            if r1
            else "."
        ),
        "",
        "## Lineage (oldest first)",
        "",
    ]
    for number, record in enumerate(stages, start=1):
        lines += _stage_lines(number, record)
    return "\n".join(lines).rstrip() + "\n"


def _source_dtype(config) -> torch.dtype:
    """The dtype the source folder was saved in (its text model's), fp32 when the config does not say."""
    name = str(getattr(config.text_config, "dtype", None) or getattr(config, "dtype", None) or "float32")
    return torch.bfloat16 if "bfloat16" in name else torch.float32


def export(
    source: str | Path,
    out: str | Path,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write the exported folder ``out`` from a model folder or stage output ``source``; returns ``out``.

    ``dtype`` is ``"fp32"``, ``"bf16"`` or ``None`` (keep the source's). ``out`` is replaced atomically; it
    may be a previous export but not the source, nor a non-empty folder that is not a model folder.
    """
    from transformers import AutoConfig, AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    from align.checkpoint import atomic_folder, resolve_model_folder, save_llava
    from align.model import parameter_table
    from align.runfolder import check_output_dir

    model_dir = resolve_model_folder(source).resolve()
    out = check_output_dir(out, "--out").resolve()
    if out == model_dir or model_dir in out.parents or out in model_dir.parents:
        raise AlignError(f"--out {out} overlaps the source model folder {model_dir}; choose another folder")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        # the folder is replaced as a whole: never a folder that is not a previous export
        raise AlignError(f"--out {out} exists and is not a model folder; refusing to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise AlignError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(model_dir)  # resolve_model_folder checked that it is a Llava
    torch_dtype = DTYPES[dtype] if dtype is not None else _source_dtype(config)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    template = processor.tokenizer.chat_template
    if (model_dir / "generation_config.json").exists():
        source_generation = GenerationConfig.from_pretrained(model_dir)
    else:
        source_generation = GenerationConfig.from_model_config(config.text_config)
    generation = generation_config_for(source_generation, template)
    stages = lineage(model_dir)
    card = model_card(
        name=out.name,
        config=model.config,
        parameters={component: total for component, total, _ in parameter_table(model)},
        dtype="bf16" if torch_dtype == torch.bfloat16 else "fp32",
        generation=generation.to_diff_dict(),
        r1=is_r1_distill(template),
        stages=stages,
    )
    with atomic_folder(out) as tmp:
        # save_llava writes atomically too: into a sibling of tmp, then renamed onto tmp.
        save_llava(
            tmp,
            config=model.config,
            state_dict=model.state_dict(),
            processor=processor,
            generation_config=generation,
            dtype=torch_dtype,
            max_shard_bytes=max_shard_bytes,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        pickled = pickle_files(tmp)
        if pickled:
            raise AlignError(
                f"export wrote pickle files {[p.name for p in pickled]}; refusing to publish {out}"
            )
    return out


def add_arguments(parser) -> None:
    parser.add_argument("source", help="a model folder or a stage output folder (its model/ is exported)")
    parser.add_argument("--out", required=True, help="the folder to write (replaced atomically if it exists)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the source's dtype")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )


def run(args) -> int:
    from align.checkpoint import weight_names

    out = export(args.source, args.out, args.dtype, parse_size(args.max_shard_size))
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {out}: {len(weight_names(out))} tensors; files: {', '.join(files)}")
    return 0
