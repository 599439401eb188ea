"""Assembly options (issue 14 B): projector activation, several feature layers, CLS policy, pixel-shuffle tokens.

Each option is assembled from the tiny zoo, saved, reloaded by transformers' own class and compared logit for
logit with the in-memory model; the Llava options are then run through what our stages compute outside the HF
forward (the feature cache + projector path of the projector/SFT stages, the GRPO sampler and its plain
decoder) and through the projector and GRPO stages themselves. Options the export classes cannot hold are
refused by the recipe check, and the stages refuse an Idefics3 folder before loading it.

Run: ``.venv/bin/pytest -q tests/test_assembly_options.py`` (``-m "not slow"`` skips the stage runs).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from align.assemble import AssembleRecipe, assemble, check_image_tokens, compose
from align.checkpoint import image_seq_len, load_llava, weight_names
from align.cli import main
from align.config import RecipeError, from_dict, load_any
from align.errors import AlignError
from align.feature_cache import FeatureCache, cache_fingerprint, tower_features
from align.grpo.decoder import unsupported_reason
from align.grpo.sampler import SamplingSettings, generate, prefill
from align.plan import plan_model, resolve_config
from align.stages.common import freeze_unreachable_vision
from align.stages.sft import _image_features

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


def spec(
    zoo: Path, tower: str, llm: str, out: Path, projector: dict | None = None, **vision
) -> AssembleRecipe:
    data = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / tower), **vision},
        "llm": {"name_or_path": str(zoo / llm)},
        "output_dir": str(out),
    }
    if projector is not None:
        data["projector"] = projector
    return from_dict(AssembleRecipe, data, file="test.yaml")


def picture(size: tuple[int, int] = (80, 60)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((5, 5, 35, 35), fill="red")
    draw.rectangle((45, 20, 75, 55), fill="blue")
    return image


def prompt(processor, images: int = 1):
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" * images + "How many circles?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return processor(text=text, images=[picture()] * images, return_tensors="pt")


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- recipe checks (no loading)


@pytest.mark.parametrize(
    "projector, message",
    [
        ({"type": "linear"}, r"projector.type: 'linear' does not fit LlavaMultiModalProjector.*not in vLLM"),
        (
            {"type": "mlp3x_gelu"},
            r"projector.type: 'mlp3x_gelu': LlavaMultiModalProjector has exactly 2 Linear",
        ),
        ({"type": "mlp2x_swish"}, r"activation 'swish' is not one transformers and vLLM both name"),
        ({"type": "resampler"}, r"'resampler' is not a projector; expected mlp2x_<act> or pixel_shuffle"),
        ({"type": "pixel_shuffle"}, r"projector.scale_factor: pixel_shuffle needs a scale_factor"),
        ({"type": "mlp2x_gelu", "scale_factor": 2}, r"only pixel_shuffle takes a scale_factor"),
        ({"type": "pixel_shuffle", "scale_factor": 0}, r"projector.scale_factor: .*0"),
    ],
)
def test_projectors_the_export_classes_cannot_hold_are_refused_with_the_reason(tmp_path, projector, message):
    with pytest.raises(RecipeError, match=message):
        spec(Path("/zoo"), "siglip-hf", "llama-r1", tmp_path, projector)


@pytest.mark.parametrize(
    "vision, projector, message",
    [
        ({"feature_layer": []}, None, r"vision.feature_layer: an empty list selects no hidden state"),
        ({"feature_layer": [-2, "x"]}, None, r"vision.feature_layer"),
        (
            {"feature_layer": [-1, -2]},
            {"type": "pixel_shuffle", "scale_factor": 2},
            r"vision.feature_layer: pixel_shuffle \(Idefics3\) reads one hidden state",
        ),
        (
            {"select_strategy": "default"},
            {"type": "pixel_shuffle", "scale_factor": 2},
            r"vision.select_strategy: pixel_shuffle \(Idefics3\) keeps every patch token",
        ),
    ],
)
def test_feature_selections_that_cannot_work_are_refused(tmp_path, vision, projector, message):
    with pytest.raises(RecipeError, match=message):
        spec(Path("/zoo"), "siglip-hf", "llama-r1", tmp_path, projector, **vision)


@pytest.mark.parametrize(
    "tower, llm, extra, message",
    [
        ("clip-hf", "llama-r1", {}, r"vision: pixel_shuffle \(Idefics3\) needs a SigLIP tower"),
        (
            "siglip-hf",
            "qwen2-r1",
            {},
            r"llm.name_or_path: pixel_shuffle \(Idefics3\): vLLM builds .* 'qwen2'",
        ),
        (
            "siglip-hf",
            "llama-r1",
            {"scale_factor": 3},
            r"projector.scale_factor: 3 does not divide the tower's 8 x 8 patch grid; use one of \[2, 4, 8\] "
            r"\(16 tokens, 4 tokens, 1 tokens\)",
        ),
    ],
)
def test_pixel_shuffle_refuses_towers_llms_and_scales_it_cannot_serve(
    zoo, tmp_path, tower, llm, extra, message
):
    projector = {"type": "pixel_shuffle", "scale_factor": 2, **extra}
    with pytest.raises(RecipeError, match=message):
        compose(spec(zoo, tower, llm, tmp_path, projector), "test.yaml")


def test_each_feature_layer_of_a_list_is_range_checked(zoo, tmp_path):
    with pytest.raises(RecipeError, match=r"test.yaml: vision.feature_layer: 5 is out of range"):
        compose(spec(zoo, "clip-hf", "llama-r1", tmp_path, feature_layer=[-2, 5]), "test.yaml")


# --------------------------------------------------------------------------- Llava options: export parity

LLAVA_OPTIONS = {
    # name: (tower, llm, projector, vision) -> expected (image tokens, projector input width)
    "relu": ("siglip-hf", "qwen2-r1", {"type": "mlp2x_relu"}, {}),
    "silu-llama": ("siglip-hf", "llama-r1", {"type": "mlp2x_silu"}, {}),
    "layers-full-cls": (
        "clip-hf",
        "llama-r1",
        None,
        {"feature_layer": [-2, 0, 1], "select_strategy": "full"},
    ),
    "layers-default": ("clip-hf", "qwen2-r1", None, {"feature_layer": [1, -1], "select_strategy": "default"}),
    "layers-siglip": ("siglip-hf", "qwen2-r1", {"type": "mlp2x_quick_gelu"}, {"feature_layer": [-3, -2]}),
}
EXPECTED = {
    "relu": (64, 64, "relu"),
    "silu-llama": (64, 64, "silu"),
    "layers-full-cls": (65, 3 * 64, "gelu"),
    "layers-default": (64, 2 * 64, "gelu"),
    "layers-siglip": (64, 2 * 64, "quick_gelu"),
}


@pytest.fixture(scope="module")
def folders(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("options")
    return {
        name: quiet(assemble, spec(zoo, tower, llm, root / name, projector, **vision))
        for name, (tower, llm, projector, vision) in LLAVA_OPTIONS.items()
    }


@pytest.mark.parametrize("name", list(LLAVA_OPTIONS))
def test_llava_option_reloads_in_transformers_with_equal_logits(zoo, tmp_path, folders, name):
    tower, llm, projector, vision = LLAVA_OPTIONS[name]
    model, processor, _ = compose(spec(zoo, tower, llm, tmp_path / "m", projector, **vision))
    folder = folders[name]
    loaded = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    loaded_processor = AutoProcessor.from_pretrained(folder)
    tokens, width, act = EXPECTED[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["projector_hidden_act"] == act
    assert config["vision_feature_layer"] == vision.get("feature_layer", -2)
    assert loaded.model.multi_modal_projector.linear_1.in_features == width
    assert image_seq_len(loaded_processor) == tokens == check_image_tokens(loaded, loaded_processor)
    inputs, loaded_inputs = prompt(processor), prompt(loaded_processor)
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        a, b = model(**inputs).logits, loaded(**loaded_inputs).logits
    assert (a - b).abs().max().item() < 1e-5
    # the option changes the model: the same parts with LLaVA-1.5's defaults give other logits
    default, default_processor, _ = compose(spec(zoo, tower, llm, tmp_path / "d"))
    with torch.no_grad():
        c = default(**prompt(default_processor)).logits
    assert c.shape != a.shape or (a - c).abs().max().item() > 1e-3


# --------------------------------------------------------------------------- Llava options through our stages


@pytest.mark.parametrize("name", ["layers-full-cls", "layers-default", "layers-siglip"])
def test_feature_cache_and_projector_path_equal_the_hf_image_features(folders, tmp_path, name):
    """Projector/SFT stages: cached tower features (concatenated layers, CLS policy) -> projector == HF."""
    model, processor = load_llava(folders[name])
    cfg = model.config
    images = [picture(), picture((40, 90))]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    feats = tower_features(tower, pixels, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
    tokens, width, _ = EXPECTED[name]
    assert feats.shape == (2, tokens, width)
    fingerprint = cache_fingerprint(tower, processor.image_processor.to_dict(), cfg.vision_feature_layer, "x")
    cache = FeatureCache(fingerprint, "memory")
    with torch.no_grad():
        theirs = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        cold = _image_features(model, images, processor, cache, max_pixels=10**8)
        warm = _image_features(model, images, processor, cache, max_pixels=10**8)
    assert cache.counts() == {"feature_cache_hits": 2, "feature_cache_misses": 2}
    assert next(iter(cache.memory.values())).shape == (tokens, width), "the cache stores the concatenation"
    assert torch.allclose(cold, theirs, atol=1e-6) and torch.equal(cold, warm)
    # another layer list is another cache
    other = cache_fingerprint(tower, processor.image_processor.to_dict(), cfg.vision_feature_layer[:1], "x")
    assert other != fingerprint


def test_only_layers_after_the_deepest_listed_one_are_frozen(folders):
    model, _ = load_llava(folders["layers-default"])  # feature layers [1, -1] of a 2-layer CLIP: all feed
    model.requires_grad_(True)
    frozen = freeze_unreachable_vision(model)
    assert not any(".layers." in name for name in frozen), frozen
    model, _ = load_llava(folders["layers-full-cls"])  # [-2, 0, 1]: layer 1 (index 1 of 0..1) feeds nothing
    model.requires_grad_(True)
    frozen = freeze_unreachable_vision(model)
    assert any("layers.1." in name for name in frozen) and not any("layers.0." in name for name in frozen)


@pytest.mark.parametrize("name", ["layers-full-cls", "layers-siglip"])
def test_grpo_sampler_prefill_and_decoder_equal_the_hf_forward(folders, name):
    model, processor = load_llava(folders[name])
    inputs = prompt(processor)
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        hf = model(**inputs).logits[0, -1]
        prefix = prefill(model, [ids], inputs["pixel_values"], [1])
    assert (prefix.last_logits[0] - hf).abs().max().item() < 1e-5
    assert unsupported_reason(model) is None, "the plain decoder must be the path under test"
    tok = processor.tokenizer
    sampling = SamplingSettings(
        num_generations=2,
        max_new_tokens=6,
        temperature=0,
        eos_token_ids=[],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        return_logps=True,
    )
    ours = generate(model, [ids], inputs["pixel_values"], [1], sampling)
    with torch.no_grad():
        theirs = model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=[model.config.image_token_id],
            min_new_tokens=6,
        )
    new = theirs[0, inputs["input_ids"].shape[1] :]
    assert torch.equal(ours.completion_ids[0], new) and torch.equal(ours.completion_ids[1], new)


@pytest.mark.slow
def test_projector_and_grpo_stages_train_a_multi_layer_full_cls_folder(folders, tmp_path):
    from align.data.synth import synthesize

    synthesize(tmp_path / "synth", train=8, test=1)
    out = tmp_path / "projector"
    argv = [
        "projector",
        str(TINY / "projector.yaml"),
        f"model={folders['layers-full-cls']}",
        f"output_dir={out}",
        f"data.sources.0.path={tmp_path / 'synth/train/captions.jsonl'}",
        "run.micro_batch_size=4",
        "run.epochs=2",
        "run.tensorboard=false",
    ]
    assert quiet(main, argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["feature_cache_misses"], summary["feature_cache_hits"]) == (8, 8)
    assert summary["feature_cache_mb"] == pytest.approx(8 * 65 * 3 * 64 * 4 / 2**20)  # 65 tokens x 3 layers
    trained, _ = load_llava(out / "model")
    assert trained.config.vision_feature_layer == [-2, 0, 1]
    grpo = tmp_path / "grpo"
    argv = [
        "grpo",
        str(TINY / "grpo.yaml"),
        f"model={out}",
        f"output_dir={grpo}",
        f"data.sources.0.path={tmp_path / 'synth/train/rl.jsonl'}",
        "grpo.max_completion_length=8",
        "run.max_steps=2",
        "run.tensorboard=false",
    ]
    assert quiet(main, argv) == 0
    rows = [json.loads(line) for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["completion_tokens"] > 0 for r in rows)


# --------------------------------------------------------------------------- pixel shuffle (Idefics3)


@pytest.fixture(scope="module")
def shuffled(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("idefics3") / "model"
    return quiet(
        assemble, spec(zoo, "siglip-hf", "llama-r1", out, {"type": "pixel_shuffle", "scale_factor": 2})
    )


def test_pixel_shuffle_folder_reloads_as_idefics3_with_equal_logits_and_4x_fewer_tokens(
    zoo, tmp_path, shuffled
):
    model, processor, _ = compose(
        spec(zoo, "siglip-hf", "llama-r1", tmp_path / "m", {"type": "pixel_shuffle", "scale_factor": 2})
    )
    loaded = AutoModelForImageTextToText.from_pretrained(shuffled).eval()
    loaded_processor = AutoProcessor.from_pretrained(shuffled)
    assert type(loaded).__name__ == "Idefics3ForConditionalGeneration"
    assert json.loads((shuffled / "config.json").read_text())["architectures"] == [
        "Idefics3ForConditionalGeneration"
    ]
    names = weight_names(shuffled)
    assert "model.connector.modality_projection.proj.weight" in names and not any(
        ".head." in n for n in names
    )
    assert image_seq_len(loaded_processor) == 16 == check_image_tokens(loaded, loaded_processor)  # 8x8 / 2^2
    inputs, loaded_inputs = prompt(processor, images=2), prompt(loaded_processor, images=2)
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 16
    with torch.no_grad():
        a, b = model(**inputs).logits, loaded(**loaded_inputs).logits
        assert (a - b).abs().max().item() < 1e-5
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        assert torch.equal(model.generate(**inputs, **greedy), loaded.generate(**loaded_inputs, **greedy))


def test_pixel_shuffle_tower_is_the_siglip_tower_cut_after_the_feature_layer(zoo, tmp_path):
    from transformers import SiglipVisionModel

    siglip = SiglipVisionModel.from_pretrained(zoo / "siglip-hf").eval()
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        hidden = siglip(pixels, output_hidden_states=True).hidden_states
        norm = getattr(siglip, "vision_model", siglip).post_layernorm
        for layer, scale, tokens in ((-1, 2, 16), (-2, 4, 4), (1, 1, 64)):
            model, processor, _ = compose(
                spec(
                    zoo,
                    "siglip-hf",
                    "llama-r1",
                    tmp_path / "m",
                    {"type": "pixel_shuffle", "scale_factor": scale},
                    feature_layer=layer,
                )
            )
            ours = model.model.vision_model(pixels).last_hidden_state
            assert torch.allclose(ours, norm(hidden[layer]), atol=1e-6), layer
            assert len(model.model.vision_model.encoder.layers) == (2 if layer == -1 else 1)
            assert image_seq_len(processor) == tokens


@pytest.mark.parametrize("side", [8, 16, 24, 27, 32, 37])
def test_idefics3_position_buckets_equal_siglip_positions_for_a_full_image(side):
    """Idefics3 finds each patch's position embedding by bucketing; for an unpadded image it must be SigLIP's."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    config = Idefics3VisionConfig(hidden_size=8, image_size=side * 2, patch_size=2)
    embeddings = Idefics3VisionEmbeddings(config)
    with torch.no_grad():
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.bias.zero_()
        out = embeddings(torch.zeros(1, 3, side * 2, side * 2), torch.ones(1, side, side, dtype=torch.bool))
    assert torch.equal(out[0], embeddings.position_embedding.weight)


def test_stages_refuse_an_idefics3_folder_before_loading_it(shuffled, tmp_path, capsys):
    with pytest.raises(
        AlignError, match=r"model_type is 'idefics3', expected 'llava'; .*stages train and run Llava"
    ):
        load_llava(shuffled)
    for command in ("sft", "grpo"):  # the recipes' data do not exist here: the model folder is checked first
        argv = [
            command,
            str(TINY / f"{command}.yaml"),
            f"model={shuffled}",
            f"output_dir={tmp_path / command}",
        ]
        assert quiet(main, argv) == 2
        err = capsys.readouterr().err
        assert "model_type is 'idefics3', expected 'llava'" in err and "mlp2x_<act>" in err, err
        assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- anyres (LLaVA-NeXT)

GRIDS = ["1x2", "2x1", "2x2"]


@pytest.fixture(scope="module")
def tiled(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llava_next") / "model"
    return quiet(assemble, spec(zoo, "clip-hf", "llama-r1", out, feature_layer=[-2, -1], anyres_grids=GRIDS))


def test_anyres_folder_reloads_as_llava_next_with_equal_logits_for_every_image_shape(zoo, tmp_path, tiled):
    from align.assemble import anyres_max_tokens

    model, processor, _ = compose(
        spec(zoo, "clip-hf", "llama-r1", tmp_path / "m", feature_layer=[-2, -1], anyres_grids=GRIDS)
    )
    loaded = AutoModelForImageTextToText.from_pretrained(tiled).eval()
    loaded_processor = AutoProcessor.from_pretrained(tiled)
    assert type(loaded).__name__ == "LlavaNextForConditionalGeneration"
    config = json.loads((tiled / "config.json").read_text())
    assert config["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert config["image_grid_pinpoints"] == [[64, 128], [128, 64], [128, 128]]
    assert "image_newline" in weight_names(tiled)
    # a tower-sized image: 64 (whole image, CLS dropped) + 8 rows x (8 + 1) of the one tile it fills
    assert check_image_tokens(loaded, loaded_processor) == 64 + 8 * 9
    tok = processor.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nHow many circles?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    counts = {}
    for size in ((80, 60), (30, 120), (64, 64), (128, 128), (300, 150)):
        inputs = processor(text=text, images=[picture(size)], return_tensors="pt")
        loaded_inputs = loaded_processor(text=text, images=[picture(size)], return_tensors="pt")
        assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
        counts[size] = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            a, b = model(**inputs).logits, loaded(**loaded_inputs).logits
        assert (a - b).abs().max().item() < 1e-5, size
    # an image shaped like a grid fills it: 64 + 2 x 8 rows x (2 x 8 + 1) = 336, the most; others unpad to less
    assert counts[(128, 128)] == anyres_max_tokens(64, 8, [[1, 2], [2, 1], [2, 2]]) == 336
    assert counts[(300, 150)] == 64 + 8 * (16 + 1)  # 1 x 2 tiles, wide: 8 rows of 16 features + separator
    assert len(set(counts.values())) > 2 and max(counts.values()) == 336


def test_anyres_refuses_what_its_class_cannot_lay_out(zoo, tmp_path):
    with pytest.raises(
        RecipeError, match=r"vision.select_strategy: anyres \(LLaVA-NeXT\) .* CLS token must be dropped"
    ):
        compose(
            spec(zoo, "clip-hf", "llama-r1", tmp_path, select_strategy="full", anyres_grids=GRIDS),
            "test.yaml",
        )
    with pytest.raises(RecipeError, match=r"vision.anyres_grids: anyres tiling is LLaVA-NeXT's"):
        spec(
            zoo,
            "siglip-hf",
            "llama-r1",
            tmp_path,
            {"type": "pixel_shuffle", "scale_factor": 2},
            anyres_grids=GRIDS,
        )
    with pytest.raises(
        RecipeError, match=r"vision.anyres_grids\[1\]: expected ROWSxCOLS with 1..12 tiles each"
    ):
        spec(zoo, "siglip-hf", "llama-r1", tmp_path, anyres_grids=["1x2", "2x0"])
    with pytest.raises(RecipeError, match=r"vision.anyres_grids: \['2x2', '2x2'\] names a grid twice"):
        spec(zoo, "siglip-hf", "llama-r1", tmp_path, anyres_grids=["2x2", "2x2"])
    with pytest.raises(RecipeError, match=r"vision.anyres_grids: an empty list allows no grid"):
        spec(zoo, "siglip-hf", "llama-r1", tmp_path, anyres_grids=[])


def test_stages_refuse_an_anyres_folder_before_loading_it(tiled):
    with pytest.raises(
        AlignError, match=r"model_type is 'llava_next', expected 'llava'; .*vision.anyres_grids"
    ):
        load_llava(tiled)


# --------------------------------------------------------------------------- served by vLLM, without our code

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_OPTIONS = {  # name: (tower, llm, projector, vision)
    "relu": LLAVA_OPTIONS["relu"],
    "cls-full": ("clip-hf", "llama-r1", {"type": "mlp2x_silu"}, {"select_strategy": "full"}),
    "pixel-shuffle": (
        "siglip-hf",
        "llama-r1",
        {"type": "pixel_shuffle", "scale_factor": 2},
        {"feature_layer": -1},
    ),
    "anyres-layers": (
        "clip-hf",
        "llama-r1",
        None,
        {"feature_layer": [-2, -1], "anyres_grids": ["1x2", "2x2"]},
    ),
    "llava-layers": LLAVA_OPTIONS["layers-full-cls"],  # last: vLLM refuses it (see the test)
}


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm (scripts/setup_vllm.sh installs vLLM's CPU build)"
)
def test_vllm_serves_each_option_with_the_tokens_and_logprobs_of_transformers(zoo, tmp_path):
    """vLLM (CPU build, fp32) loads each folder by its `architectures` and generates what transformers does.

    Except one: vLLM's LlavaForConditionalGeneration sizes its projector for ONE feature layer (its LLaVA-NeXT
    concatenates a list), so a Llava folder with a feature-layer list fails to load there; this test records it.
    """
    import os
    import subprocess

    picture((80, 60)).save(tmp_path / "picture.png")
    folders, expected = [], {}
    for name, (tower, llm, projector, vision) in VLLM_OPTIONS.items():
        out = quiet(assemble, spec(zoo, tower, llm, tmp_path / name, projector, **vision))
        processor = AutoProcessor.from_pretrained(out)
        text = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": "<image>\nHow many circles?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        folders.append({"model_dir": str(out), "prompt": text, "image": str(tmp_path / "picture.png")})
        if name == "llava-layers":
            continue
        model = AutoModelForImageTextToText.from_pretrained(out).eval()
        inputs = processor(text=text, images=[picture((80, 60))], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(
                **inputs,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        ids = generated.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [step[0].log_softmax(-1)[i].item() for step, i in zip(generated.logits, ids, strict=True)]
        expected[str(out)] = (inputs["input_ids"][0].tolist(), ids, logprobs)
    (tmp_path / "job.json").write_text(json.dumps({"folders": folders, "max_new_tokens": 6}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env.update(PYTHONPATH=str(ROOT), VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    script = ROOT / "tests" / "vllm_scripts" / "assembled_greedy.py"
    run = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(tmp_path / "job.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    served = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    for folder, (prompt_ids, ids, logprobs) in expected.items():
        got = served[folder]
        assert "error" not in got, (folder, got)
        assert got["prompt_ids"] == prompt_ids and got["ids"] == ids, folder
        assert max(abs(a - b) for a, b in zip(got["logprobs"], logprobs, strict=True)) < 1e-3, folder
    refused = served[str(tmp_path / "llava-layers")]
    assert "error" in refused, (
        "vLLM now loads a multi-layer Llava folder: update the README row and assemble's note"
    )


# --------------------------------------------------------------------------- every class in bfloat16


@pytest.mark.parametrize(
    "tower, llm, projector, vision",
    [
        ("clip-hf", "llama-r1", {"type": "mlp2x_silu"}, {"feature_layer": [-2, -1]}),
        ("siglip-hf", "llama-r1", {"type": "pixel_shuffle", "scale_factor": 2}, {}),
        ("siglip-hf", "qwen2-r1", None, {"anyres_grids": ["1x2", "2x2"]}),
    ],
    ids=["llava", "idefics3", "llava_next"],
)
def test_bfloat16_assembly_stores_bfloat16_and_reloads_with_equal_logits(
    zoo, tmp_path, tower, llm, projector, vision
):
    """The real recipes assemble in bfloat16: the seeded projector is stored in the LLM's dtype, not float32."""
    from safetensors.torch import load_file

    recipe = spec(zoo, tower, llm, tmp_path / "m", projector, **vision)
    recipe.dtype = "bfloat16"
    model, processor, _ = compose(recipe)
    out = quiet(assemble, recipe)
    for shard in out.glob("*.safetensors"):
        assert {t.dtype for t in load_file(str(shard)).values()} == {torch.bfloat16}
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).eval()
    inputs = prompt(processor)
    with torch.no_grad():
        a, b = model(**inputs).logits, loaded(**prompt(AutoProcessor.from_pretrained(out))).logits
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- plan and inspect per option


def test_plan_counts_each_option_like_the_assembled_model(zoo, folders, shuffled):
    vision = resolve_config(str(zoo / "clip-hf"))
    text = resolve_config(str(zoo / "llama-r1"))
    model, _ = load_llava(folders["layers-full-cls"])
    plan = plan_model(vision, text, [-2, 0, 1], "full", vocab=model.config.text_config.vocab_size)
    assert plan.projector == sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert plan.image_tokens == 65
    siglip = resolve_config(str(zoo / "siglip-hf"))
    loaded = AutoModelForImageTextToText.from_pretrained(shuffled)
    plan = plan_model(
        siglip,
        text,
        -2,
        None,
        vocab=loaded.config.text_config.vocab_size,
        projector="pixel_shuffle",
        scale_factor=2,
    )
    assert (plan.image_tokens, plan.export_class) == (16, "Idefics3ForConditionalGeneration")
    assert plan.projector == 64 * 4 * 128
    assert plan.vision == sum(p.numel() for p in loaded.model.vision_model.parameters())
    assert plan.llm == sum(
        p.numel() for n, p in loaded.named_parameters() if "text_model." in n or "lm_head" in n
    )


def test_plan_counts_anyres_like_the_assembled_model(zoo, tiled):
    loaded = AutoModelForImageTextToText.from_pretrained(tiled)
    plan = plan_model(
        resolve_config(str(zoo / "clip-hf")),
        resolve_config(str(zoo / "llama-r1")),
        [-2, -1],
        None,
        vocab=loaded.config.text_config.vocab_size,
        anyres_grids=[[1, 2], [2, 1], [2, 2]],
    )
    assert (plan.export_class, plan.anyres_base, plan.image_tokens) == (
        "LlavaNextForConditionalGeneration",
        64,
        336,
    )
    projector = [
        p for n, p in loaded.named_parameters() if "multi_modal_projector" in n or "image_newline" in n
    ]
    assert plan.projector == sum(p.numel() for p in projector)
    assert plan.total == sum(p.numel() for p in loaded.parameters())


def test_plan_cli_reports_tokens_and_memory_of_the_shipped_option_recipes(capsys, zoo):
    for name, tokens, export in (
        ("assemble_pixel_shuffle.yaml", 16, "Idefics3ForConditionalGeneration"),
        ("assemble_multilayer_cls.yaml", 65, "LlavaForConditionalGeneration"),
        ("assemble_relu.yaml", 64, "LlavaForConditionalGeneration"),
        ("assemble_anyres.yaml", 336, "LlavaNextForConditionalGeneration"),
    ):
        recipe = load_any(TINY / name)
        parts = [
            f"vision.name_or_path={zoo / Path(recipe.vision.name_or_path).name}",
            f"llm.name_or_path={zoo / Path(recipe.llm.name_or_path).name}",
        ]
        argv = ["plan", str(TINY / name), *parts, "--gpus", "2"]
        assert main([*argv, "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["params"]["image_tokens"] == tokens and data["export_class"] == export
        assert data["stages"]["sft"]["memory_bytes"]["zero3"]["total"] > 0
        assert main(argv) == 0
        text = capsys.readouterr().out
        assert (
            f"image tokens per image: {'up to ' if 'anyres' in name else ''}{tokens}" in text
            and export in text
        )


@pytest.mark.parametrize(
    "recipe, tokens, projector, export",
    [  # published shapes: SigLIP-so400m hidden 1152, 27 x 27 patches; CLIP-L/14-336 1024, 24 x 24; Llama-8B 4096
        ("assemble_siglip_so400m_pixel_shuffle_r1_llama8b.yaml", 81, 1152 * 9 * 4096, "Idefics3"),
        (
            "assemble_clip_l336_anyres_r1_llama8b.yaml",
            576 + 48 * 49,
            1024 * 4096 + 4096 * 4096 + 3 * 4096,
            "LlavaNext",
        ),
    ],
)
def test_plan_of_the_real_option_recipes_offline(capsys, recipe, tokens, projector, export):
    assert main(["plan", str(ROOT / "recipes" / "real" / recipe), "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"]["image_tokens"] == tokens and data["params"]["projector"] == projector
    assert data["export_class"] == f"{export}ForConditionalGeneration"
    assert 7.9e9 < data["params"]["llm"] < 8.1e9


def test_inspect_reports_the_options(folders, shuffled, tiled, capsys):
    assert main(["inspect", str(folders["layers-full-cls"])]) == 0
    text = capsys.readouterr().out
    assert "feature layer [-2, 0, 1], full" in text and "65 per <image>" in text and "mlp2x_gelu" in text
    assert main(["inspect", str(shuffled), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["image_tokens"] == 16 and info["projector"] == "pixel_shuffle x2" and info["llm"] == "llama"
    assert main(["inspect", str(tiled), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class"] == "LlavaNextForConditionalGeneration" and info["canonical_layout"]
    assert info["projector"] == "mlp2x_gelu, anyres 1x2, 2x1, 2x2" and info["image_tokens"] == 136
