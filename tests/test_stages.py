"""Stages 1 and 2 (``align projector``, ``align sft``) on the tiny zoo: what trains, what does not, what is written.

Every stage run goes through the real command line (``align.cli.main``) with the recipes in ``recipes/tiny``
and reads back the files the run wrote. The in-memory checks cover what a run cannot show by itself: merged
LoRA logits, packed vs padded loss, the feature-cache path vs Llava's own image path, per-component LRs.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_stages.py
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from align.assemble import AssembleRecipe, assemble
from align.checkpoint import CANONICAL_PREFIXES, image_seq_len, load_llava, save_llava, weight_names
from align.cli import main
from align.config import RecipeError, from_dict, load_any
from align.data.batching import pack, packed_collate, pad_collate
from align.data.config import DataSource
from align.data.encode import encode_sft
from align.data.images import load_image
from align.data.mixing import build_mix
from align.data.synth import synthesize
from align.engine import Dist, setup
from align.errors import AlignError
from align.feature_cache import FeatureCache, cache_fingerprint, tower_features
from align.lora import NON_LORA_TRAINABLES, apply_lora, merge_lora_state_dict
from align.model import apply_trainability
from align.stages.common import OptimSpec, param_groups
from align.stages.sft import forward_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
REAL = ROOT / "recipes" / "real"
SINGLE = Dist(0, 1, 0, torch.device("cpu"), distributed=False)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class World:
    model: Path  # an assembled SigLIP + Qwen2 Llava folder
    clip_model: Path  # an assembled CLIP (CLS token) + Llama folder
    captions: Path
    sft: Path


def assembled(zoo: Path, tower: str, llm: str, out: Path) -> Path:
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / tower)},
        "llm": {"name_or_path": str(zoo / llm)},
        "output_dir": str(out),
    }
    return assemble(from_dict(AssembleRecipe, spec))


@pytest.fixture(scope="module")
def world(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("stages")
    synthesize(root / "synth", train=16, test=1)
    return World(
        model=assembled(zoo, "siglip-hf", "qwen2-r1", root / "siglip-qwen2"),
        clip_model=assembled(zoo, "clip-hf", "llama-r1", root / "clip-llama"),
        captions=root / "synth" / "train" / "captions.jsonl",
        sft=root / "synth" / "train" / "sft.jsonl",
    )


def stage(command: str, recipe: Path, out: Path, *overrides: str, resume: bool = False) -> Path:
    argv = [command, str(recipe), f"output_dir={out}", "run.tensorboard=false", *overrides]
    assert main([*argv, "--resume"] if resume else argv) == 0
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def changed(before: dict, after: dict, prefix: str) -> dict[str, bool]:
    """{name: changed?} for every tensor whose canonical name starts with ``prefix``."""
    assert before.keys() == after.keys()
    return {k: not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}


def assert_llava_folder(folder: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    names = weight_names(folder)
    assert names and all(n.startswith(CANONICAL_PREFIXES) for n in names), names[:5]
    assert not any("lora_" in n or "base_layer" in n for n in names)
    LlavaForConditionalGeneration.from_pretrained(folder)  # loads with every weight present
    assert (folder / "recipe.resolved.yaml").is_file()


def assert_run_outputs(out: Path, steps: int) -> None:
    assert_llava_folder(out / "model")
    assert (out / "recipe.resolved.yaml").is_file()
    assert [m["step"] for m in metrics(out)] == list(range(1, steps + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["tokens_per_s"] > 0 and summary["peak_memory_mb"] > 0
    assert (out / "plots" / "loss.png").stat().st_size > 0, "a stage plots its metrics when it ends"


def loss_drop(out: Path) -> tuple[float, float]:
    losses = [m["loss"] for m in metrics(out)]
    return sum(losses[:3]) / 3, sum(losses[-3:]) / 3


# ---------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def stage1(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("projector") / "run"
    # 16 captions, 4 per step, 3 epochs: 12 steps; epochs 2 and 3 read every image's features from the cache.
    return stage(
        "projector",
        TINY / "projector.yaml",
        out,
        f"model={world.model}",
        f"data.sources.0.path={world.captions}",
        "run.micro_batch_size=4",
        "run.epochs=3",
        "run.tensorboard=true",
    )


@pytest.mark.slow
def test_projector_stage_trains_only_the_projector(world: World, stage1: Path) -> None:
    assert_run_outputs(stage1, steps=12)
    assert (stage1 / "tensorboard").is_dir()
    first, last = loss_drop(stage1)
    assert last < first - 0.05, f"caption loss {first:.4f} -> {last:.4f}"
    before, after = weights(world.model), weights(stage1 / "model")
    for frozen in ("vision_tower.", "language_model."):
        moved = [k for k, c in changed(before, after, frozen).items() if c]
        assert not moved, f"frozen tensors changed: {moved[:5]}"
    projector = changed(before, after, "multi_modal_projector.")
    assert len(projector) == 4 and all(projector.values()), projector
    summary = json.loads((stage1 / "summary.json").read_text())
    assert (summary["feature_cache_misses"], summary["feature_cache_hits"]) == (16, 32)
    assert summary["feature_cache_mb"] == pytest.approx(16 * 64 * 64 * 4 / 2**20)  # 64 tokens x 64 dims fp32


@pytest.mark.slow
def test_feature_cache_gives_the_losses_of_the_uncached_run(
    world: World, stage1: Path, tmp_path: Path
) -> None:
    uncached = stage(
        "projector",
        TINY / "projector.yaml",
        tmp_path / "uncached",
        f"model={world.model}",
        f"data.sources.0.path={world.captions}",
        "run.micro_batch_size=4",
        "run.epochs=3",
        "feature_cache=none",
    )
    assert "feature_cache_hits" not in metrics(uncached)[-1]
    assert [m["loss"] for m in metrics(uncached)] == pytest.approx(
        [m["loss"] for m in metrics(stage1)], abs=1e-5
    )


# ---------------------------------------------------------------- stage 2


def sft(world: World, stage1: Path, out: Path, *overrides: str) -> Path:
    # 16 rows, 2 per micro-batch x 2 accumulation: 4 steps per epoch.
    return stage(
        "sft",
        TINY / "sft.yaml",
        out,
        f"model={stage1}",  # a stage output folder: its model/ is used
        f"data.sources.0.path={world.sft}",
        "data.max_length=384",
        "run.micro_batch_size=2",
        "run.save_every=0",
        *overrides,
    )


@pytest.mark.slow
def test_sft_trains_projector_and_llm_but_not_the_tower(world: World, stage1: Path, tmp_path: Path) -> None:
    out = sft(world, stage1, tmp_path / "sft", "run.epochs=2")
    assert_run_outputs(out, steps=8)
    first, last = loss_drop(out)
    assert last < first - 0.2, f"SFT loss {first:.4f} -> {last:.4f}"
    before, after = weights(stage1 / "model"), weights(out / "model")
    assert not any(changed(before, after, "vision_tower.").values())
    for trained in ("multi_modal_projector.", "language_model."):
        unchanged = [k for k, c in changed(before, after, trained).items() if not c]
        assert not unchanged, f"trainable tensors unchanged: {unchanged[:5]}"


@pytest.mark.slow
def test_sft_with_a_trainable_tower_trains_every_tensor_that_feeds_the_features(
    world: World, stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = sft(world, stage1, tmp_path / "vision", "trainable.vision=true", "run.max_steps=2")
    moved = changed(weights(stage1 / "model"), weights(out / "model"), "vision_tower.")
    # The zoo tower has 2 layers and Llava reads layer -2: layer 1, the post-LayerNorm and SigLIP's pooling head
    # feed nothing, stay frozen (DDP would stop on them) and are reported.
    unreachable = ("encoder.layers.1.", "post_layernorm.", "head.")
    expect = {k: not k.removeprefix("vision_tower.vision_model.").startswith(unreachable) for k in moved}
    assert moved == expect
    assert sum(expect.values()) > 10
    printed = capsys.readouterr().out
    n_frozen = sum(not v for v in expect.values())
    assert f"vision: {n_frozen} tensors feed no image feature (layer -2) and stay frozen" in printed


@pytest.mark.slow
def test_packing_trains_on_fewer_longer_rows(world: World, stage1: Path, tmp_path: Path, capsys) -> None:
    out = sft(
        world,
        stage1,
        tmp_path / "packed",
        "data.packing=true",
        "data.max_length=1024",
        "run.micro_batch_size=1",
        "run.grad_accum=1",
        "run.epochs=3",
    )
    printed = capsys.readouterr().out
    units = int(printed.split(" units, global batch")[0].rsplit("\n", 1)[-1])
    assert 4 <= units < 8, printed  # 16 rows of 191-337 tokens in rows of at most 1024 tokens
    rows = metrics(out)
    assert len(rows) == 3 * units
    first, last = loss_drop(out)
    assert last < first - 0.2, f"packed SFT loss {first:.4f} -> {last:.4f}"
    # Every epoch supervises exactly the tokens the unpacked rows supervise: nothing lost at row boundaries.
    model, processor = load_llava(world.model)
    samples, _ = build_mix([DataSource(name="sft", path=str(world.sft), format="messages")], 0, True)
    n_labels = sum(
        encode_sft(s, processor.tokenizer, model.config.image_token_id, image_seq_len(processor)).n_labels
        for s in samples
    )
    for epoch in range(3):
        assert sum(r["supervised_tokens"] for r in rows if r["epoch"] == epoch) == n_labels


def test_packed_batches_give_the_loss_of_padded_batches(world: World) -> None:
    model, processor = load_llava(world.model)
    samples, _ = build_mix([DataSource(name="sft", path=str(world.sft), format="messages")], 0, True)
    items = [
        encode_sft(s, processor.tokenizer, model.config.image_token_id, image_seq_len(processor))
        for s in samples[:3]
    ]
    pad = processor.tokenizer.pad_token_id
    padded = {**pad_collate(items, pad), "images": [im for it in items for im in it.images]}
    rows = pack(items, 1024)
    assert len(rows) == 1
    packed = {**packed_collate(rows, pad), "images": rows[0].images}
    with torch.no_grad():
        loss_padded, n_padded = forward_loss_sum(
            model, model, padded, processor, None, 10**8, torch.device("cpu")
        )
        loss_packed, n_packed = forward_loss_sum(
            model, model, packed, processor, None, 10**8, torch.device("cpu")
        )
    assert n_packed == n_padded == sum(it.n_labels for it in items)
    assert float(loss_packed) == pytest.approx(float(loss_padded), rel=1e-5)


# ---------------------------------------------------------------- LoRA


@pytest.mark.slow
def test_lora_adapts_llm_linears_only_and_saves_merged_weights(
    world: World, stage1: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = sft(
        world,
        stage1,
        tmp_path / "lora",
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0.0",
        "optim.lr=2.0e-3",
        "optim.projector_lr=1.0e-3",
        "optim.schedule=constant",
        "optim.warmup_ratio=0",
        "run.max_steps=3",
    )
    assert_run_outputs(out, steps=3)
    assert {(m["lr_llm"], m["lr_projector"]) for m in metrics(out)} == {(2e-3, 1e-3)}
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * len(LORA_TARGETS) * 2  # 2 layers x 7 linears x (A, B)
    for key in adapter:
        assert ".language_model." in key and key.split(".")[-3] in LORA_TARGETS, key

    # The merged folder changed exactly the adapted linears (and the fully trained projector).
    before, after = weights(stage1 / "model"), weights(out / "model")
    for key, moved in changed(before, after, "").items():
        # LoRA (bias="none") adds to the weight of an adapted linear, never to its bias (Qwen2's q/k/v have one)
        adapted = (
            key.startswith("language_model.")
            and key.split(".")[-2] in LORA_TARGETS
            and key.endswith(".weight")
        )
        assert moved == (adapted or key.startswith("multi_modal_projector.")), key
    extra = load_file(str(out / "adapter" / NON_LORA_TRAINABLES))
    assert sorted(extra) == sorted(k for k in after if k.startswith("multi_modal_projector."))
    assert all(torch.equal(extra[k], after[k]) for k in extra)

    # The input model + the adapter + the non-LoRA trainables is the model that trained: same logits as merged.
    base = LlavaForConditionalGeneration.from_pretrained(stage1 / "model")
    base.load_state_dict({f"model.{k}": v for k, v in extra.items()}, strict=False)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = LlavaForConditionalGeneration.from_pretrained(out / "model").eval()
    processor = AutoProcessor.from_pretrained(out / "model")
    sample = build_mix([DataSource(name="sft", path=str(world.sft), format="messages")], 0, True)[0][0]
    item = encode_sft(sample, processor.tokenizer, merged.config.image_token_id, image_seq_len(processor))
    pixels = processor.image_processor(images=[load_image(item.images[0], 10**8)], return_tensors="pt")
    pixels = pixels["pixel_values"]
    ids = torch.tensor([item.input_ids])
    with torch.no_grad():
        a = peft_model(input_ids=ids, pixel_values=pixels).logits
        b = merged(input_ids=ids, pixel_values=pixels).logits
    assert (a - b).abs().max() < 1e-5


def test_merged_lora_weights_give_the_in_memory_peft_logits(world: World, tmp_path: Path) -> None:
    model, processor = load_llava(world.model)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=list(LORA_TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0 (a no-op adapter); make the delta real
                p.normal_(0, 0.2)
    peft_model.eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids).logits
    assert (expected - without).abs().max() > 1e-3  # the adapters really change the model
    merged = merge_lora_state_dict(peft_model.state_dict(), scaling=8 / 4)
    base = peft_model.get_base_model()
    save_llava(tmp_path / "m", config=base.config, state_dict=merged, processor=processor)
    reloaded, _ = load_llava(tmp_path / "m")
    with torch.no_grad():
        got = reloaded.eval()(input_ids=ids).logits
    assert (expected - got).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("trainable", "lora", "optim", "groups"),
    [
        # (vision, projector, llm), LoRA r, OptimSpec kwargs, {group: (lr, weight decay, kind of parameters)}
        ((False, True, False), 0, {"lr": 1e-3}, {"projector": (1e-3, 0.0, "projector")}),
        (
            (False, True, True),
            0,
            {"lr": 2e-5},
            {"projector": (2e-5, 0.0, "projector"), "llm": (2e-5, 0.0, "llm")},
        ),
        (
            (False, True, True),
            8,
            {"lr": 2e-4, "projector_lr": 2e-5},
            {"projector": (2e-5, 0.0, "projector"), "llm": (2e-4, 0.0, "lora")},
        ),
        (
            (True, True, True),
            0,
            {"lr": 2e-5, "vision_lr": 2e-6, "projector_lr": 0.0},
            {
                "vision": (2e-6, 0.0, "vision"),
                "projector": (0.0, 0.0, "projector"),
                "llm": (2e-5, 0.0, "llm"),
            },
        ),
        (
            (False, True, False),
            0,
            {"lr": 1e-3, "weight_decay": 0.1},
            {"projector": (1e-3, 0.1, "projector-2d"), "projector_no_decay": (1e-3, 0.0, "projector-1d")},
        ),
    ],
)
def test_each_component_gets_its_learning_rate(
    world: World, trainable, lora: int, optim: dict, groups: dict
) -> None:
    model, _ = load_llava(world.model)
    if lora:
        model = apply_lora(model, r=lora, alpha=16, dropout=0.0, target_modules=list(LORA_TARGETS))
    vision, projector, llm = trainable
    apply_trainability(model, vision=vision, projector=projector, llm=llm, lora=lora)
    names = {id(p): n for n, p in model.named_parameters()}
    built = param_groups(model, OptimSpec(**optim))
    assert [g.name for g in built] == list(groups)
    kinds = {
        "vision": lambda n, p: "vision_tower." in n,
        "projector": lambda n, p: "multi_modal_projector." in n,
        "projector-2d": lambda n, p: "multi_modal_projector." in n and p.ndim == 2,
        "projector-1d": lambda n, p: "multi_modal_projector." in n and p.ndim == 1,
        "llm": lambda n, p: "language_model." in n or "lm_head." in n,
        "lora": lambda n, p: "lora_" in n,
    }
    for group in built:
        lr, decay, kind = groups[group.name]
        assert (group.lr, group.weight_decay) == (lr, decay)
        members = {names[id(p)] for p in group.params}
        expected = {n for n, p in model.named_parameters() if p.requires_grad and kinds[kind](n, p)}
        assert members == expected, group.name
    engine = setup(model, built, dist=SINGLE, strategy="single", micro_batch_size=1)
    assert engine.lrs() == {name: spec[0] for name, spec in groups.items()}
    assert [(g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups] == [
        s[:2] for s in groups.values()
    ]


# ---------------------------------------------------------------- feature cache


@pytest.mark.parametrize("which", ["model", "clip_model"])
def test_tower_features_are_what_llava_projects(world: World, which: str) -> None:
    """The cached path (tower_features -> projector) equals Llava's own get_image_features (CLS dropped for CLIP)."""
    model, processor = load_llava(getattr(world, which))
    cfg = model.config
    pixels = torch.rand(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        ours = model.model.multi_modal_projector(
            tower_features(
                model.model.vision_tower, pixels, cfg.vision_feature_layer, cfg.vision_feature_select_strategy
            )
        )
        theirs = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    assert ours.shape == theirs.shape == (2, image_seq_len(processor), cfg.text_config.hidden_size)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_disk_feature_cache_persists_and_computes_only_misses(tmp_path: Path) -> None:
    from PIL import Image

    images = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)
        images.append(str(path))
    calls: list[int] = []

    def compute(batch):
        calls.append(len(batch))
        return torch.stack([torch.full((2, 3), float(images.index(im))) for im in batch])

    first = FeatureCache("fp", "disk", tmp_path / "cache")
    assert first.get(images[:2], compute)[:, 0, 0].tolist() == [0.0, 1.0]
    assert first.get(images, compute)[:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert calls == [2, 1] and (first.hits, first.misses) == (2, 3)
    again = FeatureCache("fp", "disk", tmp_path / "cache")  # a new run: everything comes from disk
    assert again.get(images[::-1], compute)[:, 0, 0].tolist() == [2.0, 1.0, 0.0]
    assert calls == [2, 1] and again.hits == 3
    assert len(list((tmp_path / "cache" / "fp").glob("*.pt"))) == 3
    other = FeatureCache("other-fp", "memory")
    other.get(images[:1], compute)
    assert calls == [2, 1, 1] and other.nbytes == 2 * 3 * 4


def test_cache_fingerprint_changes_with_the_tower_the_processor_and_the_layer(world: World) -> None:
    model, processor = load_llava(world.model)
    tower, ip = model.model.vision_tower, processor.image_processor.to_dict()
    base = cache_fingerprint(tower, ip, -2, "full")
    assert cache_fingerprint(tower, dict(ip), -2, "full") == base
    assert cache_fingerprint(tower, {**ip, "image_mean": [0.4, 0.4, 0.4]}, -2, "full") != base
    assert cache_fingerprint(tower, ip, -1, "full") != base
    assert cache_fingerprint(tower, ip, -2, "default") != base
    with torch.no_grad():
        next(tower.parameters()).add_(1e-3)
    assert cache_fingerprint(tower, ip, -2, "full") != base


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainable.vision=false", "trainable.projector=false", "trainable.llm=false"],
            "trainable: nothing would train",
        ),
        (["lora.r=8", "trainable.llm=false"], "lora.r: LoRA adapts the LLM"),
        (["feature_cache=memory", "trainable.vision=true"], "feature_cache: caches frozen-tower features"),
        (
            ["feature_cache=disk", "run.strategy=zero3", "run.deepspeed_config=recipes/deepspeed/zero3.json"],
            "feature_cache: ZeRO-3 partitions the tower",
        ),
        (["run.strategy=zero2"], "run.deepspeed_config: strategy zero2 needs a DeepSpeed JSON"),
        (["run.max_steps=0"], "run.max_steps: must be >= 1"),
        (["run.save_every=-1"], "run.save_every: must be >= 0"),
        (["lora.r=-1"], "lora.r: must be >= 0"),
        (["optim.warmup_ratio=1.5"], "optim.warmup_ratio: must be in [0, 1)"),
        (["data.packing=maybe"], "data.packing"),
    ],
)
def test_impossible_recipes_are_refused_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_any(TINY / "sft.yaml", overrides, expect="sft")


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(world: World, tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints" / "step-0000004" / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000004" / "state" / "engine.json").write_text("{}")
    argv = ["sft", str(TINY / "sft.yaml"), f"output_dir={tmp_path}", f"model={world.model}"]
    assert main(argv) == 2
    assert (
        "holds 1 checkpoint(s) of an earlier run (latest step-0000004); pass --resume"
        in capsys.readouterr().err
    )
    # a folder with checkpoints/ but no model/ is an unfinished run, and the error says how to resume it
    with pytest.raises(AlignError, match=r"this run is unfinished .*--resume"):
        data = f"data.sources.0.path={world.sft}"
        main(
            [
                "sft",
                str(TINY / "sft.yaml"),
                f"output_dir={tmp_path / 'x'}",
                f"model={tmp_path}",
                data,
                "--debug",
            ]
        )


REAL_RECIPES = {
    # file: (kind, global batch on 8 GPUs, lr, trainable (vision, projector, llm))
    "projector_siglip_so400m_r1_qwen7b.yaml": ("projector", 256, 1e-3, (False, True, False)),
    "projector_clip_l336_r1_llama8b.yaml": ("projector", 256, 1e-3, (False, True, False)),
    "sft_siglip_so400m_r1_qwen7b.yaml": ("sft", 128, 2e-5, (False, True, True)),
    "sft_clip_l336_r1_llama8b.yaml": ("sft", 128, 2e-5, (False, True, True)),
}


@pytest.mark.parametrize("name", sorted(REAL_RECIPES))
def test_real_recipes_have_the_llava_1_5_hyper_parameters(name: str) -> None:
    kind, global_batch, lr, trainable = REAL_RECIPES[name]
    path = REAL / name
    recipe = load_any(path, expect=kind)
    run, optim = recipe.run, recipe.optim
    assert run.micro_batch_size * run.grad_accum * 8 == global_batch
    assert (optim.lr, optim.schedule, optim.warmup_ratio, optim.weight_decay) == (lr, "cosine", 0.03, 0.0)
    assert (recipe.trainable.vision, recipe.trainable.projector, recipe.trainable.llm) == trainable
    assert recipe.data.max_length == 2048 and run.epochs == 1 and run.precision == "bf16"
    assert run.strategy in ("zero2", "zero3") and (ROOT / run.deepspeed_config).is_file()
    assert recipe.feature_cache == "none"  # one epoch over distinct images: a cache would only hold memory
    header = path.read_text().split("\nkind:")[0]
    assert f"torchrun --nproc_per_node 8 -m align.cli {kind} {path.relative_to(ROOT)}" in header
    assert "--nnodes" in header  # the multi-node launch too
    assert yaml.safe_load(path.read_text())["kind"] == kind


def test_stage_refuses_broken_rows_before_loading_the_model(
    world: World, tmp_path, capsys, monkeypatch
) -> None:
    import align.stages.common as common_stage

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    monkeypatch.setattr(common_stage, "load_llava", no_loading)
    rows = tmp_path / "rows.jsonl"
    good = {
        "messages": [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "ok"}],
        "images": ["missing.png"],
    }
    rows.write_text(json.dumps(good) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"kind: sft\nmodel: {world.model}\noutput_dir: {tmp_path}/out\n"
        f"data: {{sources: [{{name: rows, path: {rows}, format: messages}}]}}\n"
    )
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{rows}:1" in err and "missing.png" in err
    assert not (tmp_path / "out").exists()


def test_the_one_image_embedding_path_equals_transformers(siglip_qwen2: Path) -> None:
    """align.model.image_features (SFT, the sampler's prefill, the log-prob passes) gives transformers'
    get_image_features numbers bitwise, from pixels and from the tower output the feature cache keeps."""
    from align.checkpoint import load_llava
    from align.feature_cache import tower_features
    from align.model import image_features

    model, _ = load_llava(siglip_qwen2)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cfg = model.config
    with torch.no_grad():
        theirs = torch.stack(
            list(model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output)
        )
        cached = tower_features(
            model.model.vision_tower, pixels, cfg.vision_feature_layer, cfg.vision_feature_select_strategy
        )
        assert torch.equal(image_features(model, pixels), theirs)
        assert torch.equal(image_features(model, tower_output=cached), theirs)
