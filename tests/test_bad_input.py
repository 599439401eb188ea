"""Bad input through the real CLI: every case must stop with exit code 2, one line ``error: ...`` that names the
key, file or row at fault, and nothing written (no output folder appears; a folder or file that was there is
left as it was).

Each case is a command (a stage, ``assemble``, ``data check``, ``export``) on a world of good parts (the tiny
zoo, synthetic data, an assembled Llava folder) with one thing broken: a recipe value, a data row, an image, a
model folder, the output folder. The cases run in this process through ``align.cli.main``; the refusal must
come before any training, so the whole table takes seconds.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_bad_input.py
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from align.cli import main
from align.data.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class World:
    root: Path
    zoo: Path
    model: Path  # an assembled Llava folder
    sft_rows: Path  # messages rows
    rl_rows: Path
    images: Path

    def rows(self, name: str, rows: list[dict | str]) -> Path:
        """A JSONL file next to the good data (relative image paths resolve), rows as given (str: raw line)."""
        path = self.sft_rows.parent / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    def good_sft(self, n: int = 3) -> list[dict]:
        return [json.loads(line) for line in self.sft_rows.read_text().splitlines()[:n]]

    def good_rl(self, n: int = 3) -> list[dict]:
        return [json.loads(line) for line in self.rl_rows.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def world(zoo: Path, siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    synthesize(root / "synth", train=8, test=1)
    train = root / "synth" / "train"
    return World(root, zoo, siglip_qwen2, train / "sft.jsonl", train / "rl.jsonl", train / "images")


@dataclass
class Case:
    id: str
    command: str  # sft | grpo | projector | assemble | check | export
    overrides: list[str] = field(default_factory=list)
    prepare: Callable[[World, Path], list[str]] | None = None  # makes broken parts, returns more overrides
    expect: tuple[str, ...] = ()  # in the error line; "{out}" and "{data}" are filled in
    output_is_there: bool = False  # the case puts something at output_dir itself


def data_file(make: Callable[[World], Path]) -> Callable[[World, Path], list[str]]:
    def prepare(w: World, tmp: Path) -> list[str]:
        return [f"data.sources.0.path={make(w)}"]

    return prepare


def model_folder(
    make: Callable[[World, Path], Path], key: str = "model"
) -> Callable[[World, Path], list[str]]:
    def prepare(w: World, tmp: Path) -> list[str]:
        return [f"{key}={make(w, tmp)}"]

    return prepare


def plain_llm(w: World, tmp: Path) -> Path:
    return w.zoo / "qwen2-r1"


def pickle_only(w: World, tmp: Path) -> Path:
    folder = tmp / "pickled"
    shutil.copytree(w.model, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    return folder


def no_model_type(w: World, tmp: Path) -> Path:
    folder = tmp / "typeless"
    shutil.copytree(w.zoo / "qwen2-r1", folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("model_type")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def a_file(w: World, tmp: Path) -> Path:
    path = tmp / "out"
    path.write_text("not a folder\n")
    return path


def under_a_file(w: World, tmp: Path) -> Path:
    path = tmp / "plain-file"
    path.write_text("not a folder\n")
    return path / "run"


def truncated_png(w: World) -> Path:
    rows = w.good_sft()
    source = w.images / Path(rows[1]["images"][0]).name
    broken = w.images / "truncated.png"
    broken.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    rows[1]["images"] = ["images/truncated.png"]
    return w.rows("truncated_png.jsonl", rows)


def rl_with(solution, name: str) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        rows = w.good_rl()
        rows[1]["solution"] = solution
        return w.rows(name, rows)

    return make


SFT_CASES = [
    # recipe values: ranges, types, keys, combinations
    Case("lr-negative", "sft", ["optim.lr=-1"], expect=("optim.lr",)),
    Case("lr-nan", "sft", ["optim.lr=nan"], expect=("optim.lr",)),
    Case("lr-inf", "sft", ["optim.lr=.inf"], expect=("optim.lr",)),
    Case("weight-decay-negative", "sft", ["optim.weight_decay=-0.1"], expect=("optim.weight_decay",)),
    Case("max-grad-norm-negative", "sft", ["optim.max_grad_norm=-1"], expect=("optim.max_grad_norm",)),
    Case("beta2-one", "sft", ["optim.betas=[0.9, 1.0]"], expect=("optim.betas",)),
    Case("beta1-negative", "sft", ["optim.betas=[-0.1, 0.99]"], expect=("optim.betas",)),
    Case("three-betas", "sft", ["optim.betas=[0.9, 0.99, 0.999]"], expect=("optim.betas",)),
    Case("warmup-ratio-above-1", "sft", ["optim.warmup_ratio=1.5"], expect=("optim.warmup_ratio",)),
    Case("max-length-absurd", "sft", ["data.max_length=1000000000000"], expect=("data.max_length",)),
    Case("micro-batch-0", "sft", ["run.micro_batch_size=0"], expect=("run.micro_batch_size",)),
    Case("save-every-negative", "sft", ["run.save_every=-1"], expect=("run.save_every",)),
    Case("epochs-a-word", "sft", ["run.epochs=two"], expect=("run.epochs", "expected int")),
    Case("unknown-key", "sft", ["optim.lrr=1e-4"], expect=("optim.lrr", "did you mean 'lr'")),
    Case("unknown-section", "sft", ["optimizer.lr=1e-4"], expect=("optimizer", "unknown key")),
    Case("strategy-unknown", "sft", ["run.strategy=fsdp"], expect=("run.strategy",)),
    Case("zero3-without-config", "sft", ["run.strategy=zero3"], expect=("run.deepspeed_config",)),
    Case("lora-dropout-1", "sft", ["lora.r=4", "lora.dropout=1.0"], expect=("lora.dropout",)),
    Case("lora-r-negative", "sft", ["lora.r=-4"], expect=("lora.r",)),
    Case(
        "nothing-trainable",
        "sft",
        ["trainable.vision=false", "trainable.projector=false", "trainable.llm=false"],
        expect=("trainable", "nothing would train"),
    ),
    Case("lora-on-a-frozen-llm", "sft", ["lora.r=4", "trainable.llm=false"], expect=("lora.r",)),
    Case(
        "lora-targets-match-nothing",
        "sft",
        ["lora.r=4", "lora.target_modules=[q_prj, v_proj]"],
        expect=("lora.target_modules", "'q_prj'", "q_proj"),
    ),
    Case(
        "lora-all-linear-and-more",
        "sft",
        ["lora.r=4", "lora.target_modules=[all-linear, q_proj]"],
        expect=("lora.target_modules", "list it alone"),
    ),
    Case(
        "feature-cache-with-trained-tower",
        "sft",
        ["feature_cache=memory", "trainable.vision=true"],
        expect=("feature_cache",),
    ),
    Case("override-not-key-value", "sft", ["optim.lr"], expect=("optim.lr", "key.path=value")),
    # the output folder
    Case(
        "output-dir-is-a-file",
        "sft",
        prepare=model_folder(a_file, "output_dir"),
        expect=("output_dir", "is a file"),
        output_is_there=True,
    ),
    Case(
        "output-dir-under-a-file",
        "sft",
        prepare=model_folder(under_a_file, "output_dir"),
        expect=("output_dir",),
    ),
    # the model folder
    Case("model-missing", "sft", ["model=/nonexistent/model"], expect=("/nonexistent/model",)),
    Case("model-is-a-plain-llm", "sft", prepare=model_folder(plain_llm), expect=("qwen2-r1", "llava")),
    Case(
        "model-pickle-weights-only",
        "sft",
        prepare=model_folder(pickle_only),
        expect=("pytorch_model.bin", "safetensors"),
    ),
    # data files and rows
    Case(
        "data-file-missing",
        "sft",
        ["data.sources.0.path=/nonexistent/rows.jsonl"],
        expect=("/nonexistent/rows.jsonl",),
    ),
    Case(
        "data-file-empty",
        "sft",
        prepare=data_file(lambda w: w.rows("empty.jsonl", [])),
        expect=("empty.jsonl",),
    ),
    Case(
        "data-row-not-json",
        "sft",
        prepare=data_file(lambda w: w.rows("not_json.jsonl", [*w.good_sft(2), "{not json"])),
        expect=("not_json.jsonl:3",),
    ),
    Case(
        "data-row-two-placeholders-one-image",
        "sft",
        prepare=data_file(
            lambda w: w.rows(
                "placeholders.jsonl",
                [
                    *w.good_sft(2),
                    {
                        **w.good_sft(1)[0],
                        "messages": [
                            {"role": "user", "content": "<image>\n<image>\nWhat is this?"},
                            {"role": "assistant", "content": "<think>\nx\n</think>\n<answer>1</answer>"},
                        ],
                    },
                ],
            )
        ),
        expect=("placeholders.jsonl:3",),
    ),
    Case(
        "data-row-image-missing",
        "sft",
        prepare=data_file(
            lambda w: w.rows(
                "missing_image.jsonl", [{**w.good_sft(1)[0], "images": ["images/none.png"]}, *w.good_sft(2)]
            )
        ),
        expect=("missing_image.jsonl:1",),
    ),
    Case(
        "data-row-truncated-png", "sft", prepare=data_file(truncated_png), expect=("truncated_png.jsonl:2",)
    ),
    Case(
        "data-row-overlong-with-overlong-error",
        "sft",
        ["data.overlong=error", "data.max_length=512"],
        prepare=data_file(
            lambda w: w.rows(
                "overlong.jsonl",
                [
                    *w.good_sft(2),
                    {
                        "messages": [
                            {"role": "user", "content": "word " * 600_000},
                            {"role": "assistant", "content": "<think>\nx\n</think>\n<answer>1</answer>"},
                        ]
                    },
                ],
            )
        ),
        expect=("overlong.jsonl:3",),
    ),
]

GRPO_CASES = [
    Case("epsilon-negative", "grpo", ["grpo.epsilon=-0.1"], expect=("grpo.epsilon",)),
    Case(
        "epsilon-high-below-epsilon",
        "grpo",
        ["grpo.epsilon=0.2", "grpo.epsilon_high=0.1"],
        expect=("grpo.epsilon_high",),
    ),
    Case("one-generation", "grpo", ["grpo.num_generations=1"], expect=("grpo.num_generations",)),
    Case("temperature-0", "grpo", ["grpo.temperature=0"], expect=("grpo.temperature",)),
    Case("top-p-above-1", "grpo", ["grpo.top_p=1.5"], expect=("grpo.top_p",)),
    Case("beta-negative", "grpo", ["grpo.beta=-0.04"], expect=("grpo.beta",)),
    Case("reward-unknown", "grpo", ["grpo.reward_funcs=[acuracy]"], expect=("grpo.reward_funcs", "acuracy")),
    Case(
        "reward-function-missing",
        "grpo",
        [f"grpo.reward_funcs=[{ROOT / 'tests/dist_scripts/grpo_rewards.py'}:no_such_function]"],
        expect=("no_such_function",),
    ),
    Case(
        "solution-a-dict",
        "grpo",
        prepare=data_file(rl_with({"answer": 3}, "dict_solution.jsonl")),
        expect=("dict_solution.jsonl:2",),
    ),
    Case(
        "box-three-numbers",
        "grpo",
        prepare=data_file(rl_with("[1, 2, 3]", "box3.jsonl")),
        expect=("box3.jsonl:2",),
    ),
    Case(
        "box-inverted-corners",
        "grpo",
        ["data.strict=true"],
        prepare=data_file(rl_with("[30, 30, 10, 10]", "box_inverted.jsonl")),
        expect=("box_inverted.jsonl:2",),
    ),
    Case(
        "box-nan",
        "grpo",
        prepare=data_file(rl_with("[NaN, 1, 5, 5]", "box_nan.jsonl")),
        expect=("box_nan.jsonl:2",),
    ),
    Case(
        "rl-data-empty",
        "grpo",
        prepare=data_file(lambda w: w.rows("rl_empty.jsonl", [])),
        expect=("rl_empty.jsonl",),
    ),
    Case("grpo-model-is-a-plain-llm", "grpo", prepare=model_folder(plain_llm), expect=("qwen2-r1", "llava")),
]

OTHER_CASES = [
    Case(
        "assemble-llm-is-a-vision-tower",
        "assemble",
        prepare=model_folder(lambda w, t: w.zoo / "siglip-hf", "llm.name_or_path"),
        expect=("siglip-hf",),
    ),
    Case(
        "assemble-llm-without-model-type",
        "assemble",
        prepare=model_folder(no_model_type, "llm.name_or_path"),
        expect=("typeless", "model_type"),
    ),
    Case(
        "assemble-llm-missing",
        "assemble",
        ["llm.name_or_path=/nonexistent/llm"],
        expect=("/nonexistent/llm",),
    ),
    Case(
        "assemble-output-is-a-file",
        "assemble",
        prepare=model_folder(a_file, "output_dir"),
        expect=("output_dir", "is a file"),
        output_is_there=True,
    ),
    Case(
        "check-empty-data-file",
        "check",
        prepare=data_file(lambda w: w.rows("check_empty.jsonl", [])),
        expect=("check_empty.jsonl",),
    ),
    Case("check-unknown-key", "check", ["data.sourcez=[]"], expect=("data.sourcez",)),
    Case(
        "export-out-is-a-file",
        "export",
        prepare=model_folder(a_file, "--out"),
        expect=("--out", "is a file"),
        output_is_there=True,
    ),
    Case(
        "export-source-is-a-plain-llm",
        "export",
        prepare=model_folder(plain_llm, "source"),
        expect=("qwen2-r1", "llava"),
    ),
]

CASES = SFT_CASES + GRPO_CASES + OTHER_CASES


def write_recipe(w: World, tmp: Path, command: str, out: Path) -> Path:
    if command in ("sft", "check"):
        recipe = yaml.safe_load((ROOT / "recipes/tiny/sft.yaml").read_text())
        recipe["data"]["sources"][0]["path"] = str(w.sft_rows)
        recipe["data"]["max_length"] = 512
        recipe["run"] = {"micro_batch_size": 1, "grad_accum": 1, "max_steps": 1, "tensorboard": False}
    elif command == "grpo":
        recipe = yaml.safe_load((ROOT / "recipes/tiny/grpo.yaml").read_text())
        recipe["data"]["sources"][0]["path"] = str(w.rl_rows)
        recipe["run"] = {"micro_batch_size": 1, "max_steps": 1, "tensorboard": False}
    else:
        recipe = yaml.safe_load((ROOT / "recipes/tiny/assemble_siglip_qwen2.yaml").read_text())
        recipe["vision"]["name_or_path"] = str(w.zoo / "siglip-hf")
        recipe["llm"]["name_or_path"] = str(w.zoo / "qwen2-r1")
    if command in ("sft", "grpo", "check"):
        recipe["model"] = str(w.model)
    recipe["output_dir"] = str(out)
    path = tmp / f"{command}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def argv_for(case: Case, w: World, tmp: Path) -> tuple[list[str], Path]:
    """The command line of ``case`` and the output folder it must not create."""
    out = tmp / "out"
    extra = case.prepare(w, tmp) if case.prepare else []
    overrides = [*case.overrides, *extra]
    for item in list(overrides):
        if item.startswith(("output_dir=", "--out=")):
            out = Path(item.split("=", 1)[1])
    if case.command == "export":
        source = next((o.split("=", 1)[1] for o in overrides if o.startswith("source=")), str(w.model))
        return ["export", source, "--out", str(out)], out
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    recipe = write_recipe(w, tmp, case.command, out)
    command = ["data", "check"] if case.command == "check" else [case.command]
    return [*command, str(recipe), *overrides], out


def snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_stops_with_one_line_naming_the_fault_and_writes_nothing(
    world: World, tmp_path: Path, case: Case
) -> None:
    argv, out = argv_for(case, world, tmp_path)
    before = snapshot(out)
    assert (before is not None) == case.output_is_there
    model_before = snapshot(world.model)
    with (
        contextlib.redirect_stdout(io.StringIO()) as printed,
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = main(argv)
    # progress bars (transformers' "Loading weights") are for the eye and go to stderr too; the rest is the error
    message = "\n".join(line for line in err.getvalue().strip().splitlines() if "it/s]" not in line)
    assert code == 2, f"exit {code}; stderr: {message[-2000:]}\nstdout: {printed.getvalue()[-2000:]}"
    assert message.startswith("error: ") and "\n" not in message, f"not one line:\n{message}"
    for expected in case.expect:
        assert expected in message, f"{expected!r} not in: {message}"
    assert snapshot(out) == before, f"{out} was written"
    assert snapshot(world.model) == model_before


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
