"""``align run PIPELINE.yaml``: assemble -> projector -> sft -> grpo (any subset) -> export, evaluated after each.

Run::

    align run recipes/demo/pipeline.yaml                 # the embedded demo (scripts/demo.sh)
    torchrun --nproc_per_node 8 -m align.cli run recipes/real/pipeline_siglip_r1_qwen7b.yaml

One run folder (``output_dir``) holds every stage's output folder (``assembled/``, ``projector/``, ...), each
with its checkpoints, metrics, plots and ``eval/`` results, the exported model (``export/``) and the final
``report.md``. Each stage's input ``model`` is the previous stage's output; the pipeline sets ``model`` and
``output_dir`` of every stage recipe, which must not set them differently.

Re-running the same command continues where it stopped: a stage whose ``model/`` and ``summary.json`` exist
is done and skipped, an interrupted stage resumes from its last checkpoint, and evaluations already written
are reused. Like ``make``, a stage whose resolved recipe or input model changed since it ran (``input.json``
in its folder records both) starts over, and so does every stage after it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from align.config import MAX_TOKENS, RecipeError, load_any, ranged, read_yaml, save_resolved
from align.data.config import DataSource
from align.data.mixing import format_table
from align.engine import init_distributed
from align.errors import AlignError
from align.runfolder import hold_output_dir

STAGE_KINDS = ("projector", "sft", "grpo")


@dataclass
class StageEntry:
    recipe: str  # path to a projector / sft / grpo recipe (relative to the pipeline file)
    overrides: list[str] = field(default_factory=list)  # key.path=value applied to that recipe


@dataclass
class EvalSpec:
    data: list[DataSource]  # held-out rows with gold answers
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    max_new_tokens: int = ranged(256, ge=1, le=MAX_TOKENS)
    samples: int = ranged(1, ge=1)  # completions per question
    temperature: float = ranged(0.0, ge=0, note="0: greedy")
    batch_size: int = ranged(16, ge=1)  # questions per generation batch
    limit: int | None = ranged(None, ge=1, note="or null: every row")  # first rows scored
    # "module:function" called with each stage's model folder (and probe_params as keywords), returning
    # {metric: per-item scores}, the same items in the same order every stage; the report gives each metric's
    # mean, SE and paired gain
    probe: str | None = None
    probe_params: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.probe_params and self.probe is None:
            raise RecipeError.at("probe_params", "are given but no probe is")
        if self.probe is None:
            return
        if self.probe.count(":") != 1 or not all(self.probe.split(":")):
            raise RecipeError.at("probe", f"expected 'module:function', got {self.probe!r}")
        module, fn = self.probe.split(":")
        try:  # a typo stops here, not after the preparation and the first evaluation
            found = callable(getattr(importlib.import_module(module), fn, None))
        except ImportError as err:
            raise RecipeError.at("probe", f"cannot import {module!r}: {err}") from None
        if not found:
            raise RecipeError.at("probe", f"{module!r} has no function {fn!r}")


@dataclass
class PipelineRecipe:
    kind: Literal["pipeline"]
    output_dir: str
    assemble: str  # an assemble recipe, or a model folder to start from (relative to the pipeline file)
    stages: list[StageEntry] = field(default_factory=list)
    eval: EvalSpec | None = None
    export_dtype: Literal["fp32", "bf16", "none"] = "fp32"
    prepare: str | None = None  # "module:function" run first (the demo builds its data and tiny parts here)

    def check(self) -> None:
        for i, stage in enumerate(self.stages):
            if not stage.recipe.endswith((".yaml", ".yml")):
                raise RecipeError.at(f"stages[{i}].recipe", f"expected a recipe file, got {stage.recipe!r}")


def _stage_kind(path: Path, index: int, file: str) -> str:
    kind = read_yaml(path).get("kind")
    if kind not in STAGE_KINDS:
        raise RecipeError(
            f"{path} has kind {kind!r}; stages are {', '.join(STAGE_KINDS)}",
            key=f"stages[{index}].recipe",
            file=file,
        )
    return kind


def _relative_to(path: str, base: Path) -> Path:
    """A path as written if it exists from the working directory, else relative to the pipeline file's folder."""
    return Path(path) if Path(path).exists() else base / path


def _done(folder: Path) -> bool:
    return (folder / "model" / "config.json").exists() and (folder / "summary.json").exists()


def _stage_input(recipe, model_dir: Path) -> dict:
    """What a stage's result depends on: its resolved recipe and its input model's files (name, size, mtime)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    stamps = [[str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    # as it reads back from input.json (lists, strings), so that the two compare equal when nothing changed
    return json.loads(json.dumps({"recipe": dataclasses.asdict(recipe), "model_files": stamps}, default=str))


def _evaluate(spec: EvalSpec, model_dir: Path, out: Path, dist) -> dict:
    """The held-out evaluation of one stage's model (rank 0), reused when already written."""
    from align.evaluate import evaluate

    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    summary = None
    if dist.is_main:
        summary = evaluate(
            model_dir,
            spec.data,
            out,
            rewards=spec.rewards,
            samples=spec.samples,
            temperature=spec.temperature,
            max_new_tokens=spec.max_new_tokens,
            batch_size=spec.batch_size,
            limit=spec.limit,
        )
        print(summary.pop("table"))
    dist.barrier()
    return summary or json.loads((out / "summary.json").read_text())


def _probe(spec: EvalSpec, model_dir: Path, out: Path, dist) -> dict[str, list[float]]:
    """The probe's per-item scores for one stage's model (rank 0), reused when already written."""
    path = out / "probe.json"
    if not path.exists() and dist.is_main:
        module, fn = spec.probe.split(":")
        t0 = time.perf_counter()
        scores = getattr(importlib.import_module(module), fn)(model_dir, **spec.probe_params)
        summary = ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in scores.items())
        items = len(next(iter(scores.values())))
        print(f"probe {spec.probe}: {summary} ({items} items, {time.perf_counter() - t0:.1f}s)")
        path.write_text(json.dumps(scores))
    dist.barrier()
    return json.loads(path.read_text())


def _probe_table(probes: dict[str, dict[str, list[float]]], spec: str) -> list[str]:
    """report.md's probe table: each metric's mean ± SE per stage, and its paired gain over the stage above."""
    from align.evaluate import mean_and_se

    metrics = list(next(iter(probes.values())))
    md = [
        "",
        f"Probe `{spec}` (mean ± SE per item; in brackets the paired gain over the stage above, in SE):",
        "",
        "| stage | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    previous = None
    for name, scores in probes.items():
        cells = []
        for m in metrics:
            mean, se = mean_and_se(scores[m])
            cell = f"{mean:.3f} ± {se:.3f}"
            if previous is not None and len(previous[m]) == len(scores[m]):
                gain, gain_se = mean_and_se([b - a for a, b in zip(previous[m], scores[m], strict=True)])
                cell += f" ({gain:+.3f}" + (f", {gain / gain_se:+.1f} SE)" if gain_se > 0 else ")")
            cells.append(cell)
        md.append(f"| {name} | " + " | ".join(cells) + " |")
        previous = scores
    return md


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line]


def _pm(group: dict, key: str = "accuracy") -> str:
    """``0.470 ± 0.035`` from a summary group, or the bare value when it has no SE."""
    if key not in group:
        return ""
    se = group.get(f"{key}_se")
    return f"{group[key]:.3f} ± {se:.3f}" if se is not None else str(group[key])


def _report(timings: dict, evals: dict, eval_dirs: dict[str, Path]) -> tuple[list[list], list[str]]:
    """report.md's tables: per stage accuracy ± SE, 95% interval and the paired gain over the previous stage."""
    from align.evaluate import paired_gain

    headers = [
        "stage",
        "accuracy ± SE",
        "95% CI",
        "gain ± SE (paired)",
        "format",
        "mean_length",
        "wall_time_s",
    ]
    rows, previous = [headers], None
    for name in timings:
        group = evals.get(name, {}).get("groups", {}).get("all", {})
        ci = group.get("accuracy_ci95")
        gain = ""
        if previous is not None and name in eval_dirs and "accuracy" in group:
            g, se, _ = paired_gain(_predictions(eval_dirs[previous]), _predictions(eval_dirs[name]))
            gain = f"{g:+.3f} ± {se:.3f}" + (f" ({g / se:+.1f} SE)" if se > 0 else "")
        rows.append(
            [
                name,
                _pm(group),
                f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
                gain,
                group.get("format", ""),
                group.get("mean_length", ""),
                round(timings[name], 1),
            ]
        )
        if name in eval_dirs:
            previous = name
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows[1:]]
    questions = {e.get("questions") for e in evals.values()}
    if evals:
        md += [
            "",
            f"Held-out questions: {', '.join(str(q) for q in sorted(questions, key=str))}. SE: standard error over "
            "questions; 95% CI: accuracy ± 1.96 SE; gain: mean per-question accuracy difference from the stage "
            "above on the same questions, with the SE of those differences.",
        ]
    families = sorted({k for e in evals.values() for k in e.get("groups", {}) if k.startswith("family=")})
    if families:
        md += [
            "",
            "Accuracy ± SE per question family:",
            "",
            "| stage | " + " | ".join(f.removeprefix("family=") for f in families) + " |",
            "|---|" + "---|" * len(families),
        ]
        for name, e in evals.items():
            md.append(f"| {name} | " + " | ".join(_pm(e["groups"].get(f, {})) for f in families) + " |")
    md += _other_rewards(eval_dirs)
    return rows, md


def _other_rewards(eval_dirs: dict[str, Path]) -> list[str]:
    """Rewards besides accuracy and format (e.g. ``iou`` for grounding) per family where they apply."""
    from align.evaluate import mean_and_se

    per_stage = {}
    for name, folder in eval_dirs.items():
        values: dict[str, list[float]] = {}
        for p in _predictions(folder):
            for reward, value in p["rewards"].items():
                if reward not in ("accuracy", "format") and value is not None:
                    values.setdefault(f"{p['family']} {reward}", []).append(value)
        per_stage[name] = values
    columns = sorted({c for values in per_stage.values() for c in values})
    if not columns:
        return []
    md = [
        "",
        "Other rewards (mean ± SE over the completions they apply to):",
        "",
        "| stage | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, values in per_stage.items():
        cells = [("{:.3f} ± {:.3f}".format(*mean_and_se(values[c])) if c in values else "") for c in columns]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md


def _curve_links(out: Path, stages: list[str]) -> list[str]:
    """report.md's links to each stage's training-curve PNGs (the stage plotted them into ``plots/``)."""
    md = []
    for name in stages:
        pngs = sorted((out / name / "plots").glob("*.png"))
        if pngs:
            links = ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix()})" for p in pngs)
            md.append(f"- {name}: {links}")
    return ["", "Training curves:", "", *md] if md else []


def run_pipeline(recipe: PipelineRecipe, recipe_file: str, dist) -> Path:
    """Every stage in order, holding the pipeline's output_dir (each stage also holds its own folder)."""
    with hold_output_dir(recipe.output_dir, dist):
        return _run_pipeline(recipe, recipe_file, dist)


def _run_pipeline(recipe: PipelineRecipe, recipe_file: str, dist) -> Path:
    from align.assemble import assemble

    base = Path(recipe_file).parent
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        save_resolved(recipe, out)
    if recipe.prepare:
        module, fn = recipe.prepare.split(":")
        getattr(importlib.import_module(module), fn)()
    # assembly (or a given model folder)
    t0 = time.perf_counter()
    assembled = out / "assembled"
    source = _relative_to(recipe.assemble, base)
    if source.suffix in (".yaml", ".yml"):
        spec = load_any(source, [f"output_dir={assembled}"], expect="assemble")
        if recipe.stages and spec.export_class != "LlavaForConditionalGeneration":
            # before minutes of assembly: the stages train Llava folders only (checkpoint.INFERENCE_ONLY)
            raise AlignError(
                f"{source}: assembles a {spec.export_class} folder, which the stages do not train; "
                "drop the stages (assemble + eval only) or use an mlp2x_<act> projector without anyres_grids"
            )
        if not (assembled / "config.json").exists() and dist.is_main:
            assemble(spec, str(source))
        dist.barrier()
        current = assembled
    else:
        current = source
    timings = {"assembled": time.perf_counter() - t0}
    evals, eval_dirs, probes = {}, {}, {}
    if recipe.eval is not None:
        eval_dirs["assembled"] = out / "assembled-eval"
        evals["assembled"] = _evaluate(recipe.eval, current, eval_dirs["assembled"], dist)
        if recipe.eval.probe:
            probes["assembled"] = _probe(recipe.eval, current, eval_dirs["assembled"], dist)

    # stages, each reading the previous one's model
    for i, stage in enumerate(recipe.stages):
        path = _relative_to(stage.recipe, base)
        kind = _stage_kind(path, i, recipe_file)
        name = kind if kind not in evals else f"{kind}{i}"
        stage_out = out / name
        overrides = [*stage.overrides, f"model={current}", f"output_dir={stage_out}"]
        stage_recipe = load_any(path, overrides, expect=kind)
        t0 = time.perf_counter()
        stage_input = _stage_input(stage_recipe, current)
        marker = stage_out / "input.json"
        if marker.exists() and json.loads(marker.read_text()) != stage_input:
            if dist.is_main:
                print(f"== {name}: its recipe or input model changed since it ran; starting it over")
                shutil.rmtree(stage_out)
            dist.barrier()
        if _done(stage_out):
            if dist.is_main:
                print(f"== {name}: done already ({stage_out})")
        else:
            if dist.is_main:  # an evaluation of an earlier, unfinished attempt would describe another model
                shutil.rmtree(stage_out / "eval", ignore_errors=True)
                stage_out.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps(stage_input, indent=1))
            dist.barrier()
            module = importlib.import_module(f"align.stages.{kind}")
            if dist.is_main:
                print(f"== {name}: {path}")
            module.train(stage_recipe, dist, resume=True)
        summary = json.loads((stage_out / "summary.json").read_text())
        timings[name] = summary.get("wall_time_s", time.perf_counter() - t0)
        current = stage_out / "model"  # the stage plotted its metrics into stage_out/plots when it ended
        if recipe.eval is not None:
            eval_dirs[name] = stage_out / "eval"
            evals[name] = _evaluate(recipe.eval, current, eval_dirs[name], dist)
            if recipe.eval.probe:
                probes[name] = _probe(recipe.eval, current, eval_dirs[name], dist)

    # export and report
    if dist.is_main:
        if recipe.export_dtype != "none":
            from align.export import export

            export(current, out / "export", dtype=recipe.export_dtype)
            print(
                f"export: {out / 'export'} ({recipe.export_dtype}; loads in transformers and vLLM as it is)"
            )
        rows, md = _report(timings, evals, eval_dirs)
        if probes:
            md += _probe_table(probes, recipe.eval.probe)
        md += _curve_links(out, [name for name in timings if name != "assembled"])
        table = format_table(rows[0], rows[1:])
        (out / "report.md").write_text("\n".join(md) + "\n")
        print(table)
        print(f"report: {out / 'report.md'}")
    dist.barrier()
    return out


def add_arguments(parser) -> None:
    parser.add_argument("recipe", help="pipeline recipe (kind: pipeline)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")


def run(args) -> int:
    recipe = load_any(args.recipe, args.overrides, expect="pipeline")
    dist = init_distributed()
    run_pipeline(recipe, args.recipe, dist)
    return dist.shutdown(0)
