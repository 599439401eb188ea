"""Vision towers: descriptions from configs, HF loading, and open_clip -> HF conversion that reproduces
open_clip's pixels and hidden states.

Parity is checked on the zoo's open_clip ViT and SigLIP (a timm ViT, as open_clip's real SigLIP towers are), on
copies of both with every weight perturbed (default LayerNorm weights of 1 and biases of 0 would hide swapped or
dropped tensors), and on more tiny timm SigLIP towers built here (timm reads their shape from a ``local-dir:``
config.json). Assembled Llava folders must reload, through a plain ``AutoProcessor.from_pretrained``, a
processor giving open_clip's pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    PilBackend,
    SiglipVisionModel,
)

from align.assemble import assemble
from align.config import RecipeError, load_any
from align.errors import AlignError
from align.vision import (
    VisionInfo,
    check_feature_selection,
    describe_vision,
    hf_vision_config,
    load_vision_tower,
    openclip_image_processor,
)
from align.zoo import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, register_openclip

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"

PIXEL_TOL = 1e-5
HIDDEN_TOL = 1e-4
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
SIGLIP_PREPROCESS = {
    "size": 32,
    "mean": SIGLIP_MEAN,
    "std": SIGLIP_STD,
    "interpolation": "bicubic",
    "resize_mode": "squash",
}
# timm model_args of tiny SigLIP towers: SigLIP's architecture (no class token, MAP head) at toy size.
TIMM_SIGLIPS = {
    "timm-siglip": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
    "timm-siglip-tanh-nobias": {
        "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 3.0,
        "act_layer": "gelu_tanh", "qkv_bias": False,
    },
}  # fmt: skip


def picture(width: int, height: int) -> Image.Image:
    """A non-square image with gradients, hard edges and thin lines: resampling differences show up."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 5, height // 4, width // 2, height * 3 // 4], fill=(250, 20, 40))
    draw.rectangle([width // 2, height // 6, width - 4, height - 6], outline=(10, 10, 240), width=2)
    draw.line([0, height - 1, width - 1, 0], fill=(255, 255, 255), width=1)
    return image


def perturb(folder: Path, seed: int) -> None:
    """Add noise to every weight of an open_clip folder, so that every tensor is distinctive."""
    path = folder / "open_clip_model.safetensors"
    generator = torch.Generator().manual_seed(seed)
    state = load_file(path)
    noisy = {
        k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }
    save_file({k: v.contiguous() for k, v in noisy.items()}, str(path))


def openclip_folder(folder: Path, model_cfg: dict, preprocess_cfg: dict, seed: int = 0) -> str:
    """Write an open_clip local-dir folder (config + perturbed random weights); returns its model name."""
    folder.mkdir(parents=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    name = f"local-dir:{folder}"
    torch.manual_seed(seed)
    model = open_clip.create_model(name)  # no weights in the folder yet: random init
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    perturb(folder, seed)
    return name


def timm_siglip_folder(folder: Path, model_args: dict, proj: str = "none") -> str:
    timm_dir = folder.parent / f"{folder.name}-timm"
    timm_dir.mkdir(parents=True)
    timm_config = {
        "architecture": "vit_base_patch16_siglip_224",
        "model_args": model_args,
        "pretrained_cfg": {},
    }
    (timm_dir / "config.json").write_text(json.dumps(timm_config))
    vision = {"image_size": 32, "timm_model_name": f"local-dir:{timm_dir}", "timm_model_pretrained": False,
              "timm_pool": "map", "timm_proj": proj}  # fmt: skip
    text = {**TINY_TEXT, "no_causal_mask": True, "proj_bias": True, "pool_type": "last"}
    model_cfg = {
        "embed_dim": 32,
        "custom_text": True,
        "init_logit_bias": -10,
        "vision_cfg": vision,
        "text_cfg": text,
    }
    return openclip_folder(folder, model_cfg, SIGLIP_PREPROCESS)


@pytest.fixture(scope="module")
def towers(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Name -> open_clip model name (``local-dir:...``) of every tower with a parity test."""
    root = tmp_path_factory.mktemp("towers")
    names = {}
    for part in ("openclip-vit", "openclip-siglip"):
        names[part] = f"local-dir:{zoo / part}"
        # The copy of openclip-siglip still names the zoo's timm folder (absolute): it only gives the shape.
        perturbed = root / f"{part}-perturbed"
        shutil.copytree(zoo / part, perturbed)
        perturb(perturbed, seed=1)
        names[f"{part}-perturbed"] = f"local-dir:{perturbed}"
    for key, args in TIMM_SIGLIPS.items():
        names[key] = timm_siglip_folder(root / key, args)
    names["timm-siglip-linear-proj"] = timm_siglip_folder(
        root / "timm-siglip-linear-proj", TIMM_SIGLIPS["timm-siglip"], "linear"
    )
    return names


def openclip_reference(
    name: str, pretrained: str | None, image: Image.Image
) -> tuple[torch.Tensor, list, torch.Tensor, torch.nn.Module]:
    """open_clip's own pixels, hidden states (block 0 input, then each block's output) and pooled output."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    visual = model.visual.eval()
    blocks = visual.trunk.blocks if hasattr(visual, "trunk") else visual.transformer.resblocks
    states: list[torch.Tensor] = []
    blocks[0].register_forward_pre_hook(lambda _m, args: states.append(args[0].detach().clone()))
    for block in blocks:
        block.register_forward_hook(lambda _m, _args, out: states.append(out.detach().clone()))
    pixels = preprocess(image).unsqueeze(0)
    with torch.no_grad():
        pooled = visual(pixels)
    return pixels, states, pooled, visual


def max_errors(name: str, pretrained: str | None = None) -> dict[str, float]:
    image = picture(97, 61)
    pixels, states, pooled, visual = openclip_reference(name, pretrained, image)
    model, processor, info = load_vision_tower("open_clip", name, pretrained)
    hf_pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        # open_clip projects the pooled feature; HF stops before the projection (LLaVA reads hidden states)
        hf_pooled = (
            out.pooler_output @ visual.proj if hasattr(visual, "proj") else visual.head(out.pooler_output)
        )
    assert len(out.hidden_states) == len(states) == info.num_layers + 1
    errors = {
        f"hidden[{k}]": (out.hidden_states[k] - states[k]).abs().max().item() for k in range(len(states))
    }
    errors["pixels"] = (hf_pixels - pixels).abs().max().item()
    errors["pooled"] = (hf_pooled - pooled).abs().max().item()
    return errors


@pytest.mark.parametrize(
    "tower",
    [
        "openclip-vit",
        "openclip-vit-perturbed",
        "openclip-siglip",
        "openclip-siglip-perturbed",
        "timm-siglip",
        "timm-siglip-tanh-nobias",
        "timm-siglip-linear-proj",
    ],
)
def test_converted_tower_reproduces_openclip_pixels_and_hidden_states(
    towers: dict[str, str], tower: str
) -> None:
    errors = max_errors(towers[tower])
    print(tower, {k: f"{v:.1e}" for k, v in errors.items()})
    assert errors["pixels"] < PIXEL_TOL
    assert max(errors.values()) < HIDDEN_TOL, errors


@pytest.mark.parametrize("tower", ["openclip-vit-perturbed", "openclip-siglip", "openclip-siglip-perturbed"])
def test_feature_layers_minus_one_and_minus_two_are_the_last_two_blocks(
    towers: dict[str, str], tower: str
) -> None:
    image = picture(80, 120)
    _, states, _, _ = openclip_reference(towers[tower], None, image)
    model, processor, _ = load_vision_tower("open_clip", towers[tower])
    with torch.no_grad():
        hidden = model(
            **processor(images=image, return_tensors="pt"), output_hidden_states=True
        ).hidden_states
    errors = {layer: (hidden[layer] - states[layer]).abs().max().item() for layer in (-1, -2)}
    print(tower, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < HIDDEN_TOL, errors
    assert (hidden[-1] - hidden[-2]).abs().max().item() > 1e-2  # the two layers do differ


def test_name_plus_weights_file_loads_the_same_tower_as_its_folder(zoo: Path) -> None:
    name, weights = register_openclip(zoo / "openclip-vit")
    by_name, _, info = load_vision_tower("open_clip", name, weights)
    by_dir, _, _ = load_vision_tower("open_clip", f"local-dir:{zoo / 'openclip-vit'}")
    assert info.kind == "clip" and info.image_mean == pytest.approx(CLIP_MEAN)
    for (key, a), b in zip(by_name.state_dict().items(), by_dir.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert max(max_errors(name, weights).values()) < HIDDEN_TOL


@pytest.mark.parametrize(
    ("source", "part", "model_class", "kind", "mean"),
    [
        ("hf", "clip-hf", CLIPVisionModel, "clip", CLIP_MEAN),
        ("hf", "siglip-hf", SiglipVisionModel, "siglip", SIGLIP_MEAN),
        ("open_clip", "openclip-vit", CLIPVisionModel, "clip", CLIP_MEAN),
        ("open_clip", "openclip-siglip", SiglipVisionModel, "siglip", SIGLIP_MEAN),
    ],
)
def test_zoo_towers_load_as_hf_models_matching_their_description(
    zoo, source, part, model_class, kind, mean
) -> None:
    name = str(zoo / part) if source == "hf" else f"local-dir:{zoo / part}"
    model, processor, info = load_vision_tower(source, name, dtype=torch.bfloat16)
    assert type(model) is model_class and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert info == describe_vision(source, name)
    expected = dict(
        kind=kind,
        has_cls=kind == "clip",
        hidden_size=64,
        image_size=64,
        patch_size=8,
        num_patches=64,
        num_layers=2,
    )
    assert {k: getattr(info, k) for k in expected} == expected
    assert info.image_mean == pytest.approx(mean) and list(processor.image_mean) == pytest.approx(mean)
    pixels = processor(images=picture(90, 70), return_tensors="pt")["pixel_values"].to(torch.bfloat16)
    assert pixels.shape == (1, 3, 64, 64)
    out = model(pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (1, info.image_tokens("full"), 64)


def test_zoo_openclip_siglip_loads_from_any_working_directory(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # its timm tower is named by absolute path, not relative to the caller
    model, _, info = load_vision_tower("open_clip", f"local-dir:{zoo / 'openclip-siglip'}")
    assert type(model) is SiglipVisionModel and model.config.vision_use_head
    assert (info.kind, info.has_cls, info.image_tokens("full")) == ("siglip", False, 64)


@pytest.fixture(scope="module")
def hf_dual_encoders(tmp_path_factory: pytest.TempPathFactory, zoo: Path) -> dict[str, Path]:
    """Full CLIPModel / SiglipModel folders (vision + text), as the real hub checkpoints are."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("hf_dual")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    folders = {}
    for kind, model_class, config_class, part in (("clip", CLIPModel, CLIPConfig, "clip-hf"),
                                                  ("siglip", SiglipModel, SiglipConfig, "siglip-hf")):  # fmt: skip
        torch.manual_seed(0)
        folders[kind] = root / kind
        model_class(config_class(vision_config=vision, text_config=text)).save_pretrained(folders[kind])
        shutil.copy(zoo / part / "preprocessor_config.json", folders[kind])
    return folders


@pytest.mark.parametrize(("kind", "model_class"), [("clip", CLIPVisionModel), ("siglip", SiglipVisionModel)])
def test_full_dual_encoder_checkpoint_gives_its_vision_half(hf_dual_encoders, kind, model_class) -> None:
    from safetensors.torch import load_file as load

    folder = hf_dual_encoders[kind]
    model, _, info = load_vision_tower("hf", str(folder))
    assert type(model) is model_class and info.kind == kind and info.num_layers == 3
    saved = load(folder / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[f"vision_model.{key}"]), key


@pytest.mark.parametrize(
    ("name", "pretrained", "expected", "hf"),
    [
        (
            "ViT-L-14-336", "openai",
            dict(kind="clip", has_cls=True, hidden_size=1024, image_size=336, patch_size=14, num_patches=576, num_layers=24,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD),
            dict(hidden_act="quick_gelu", intermediate_size=4096, num_attention_heads=16, layer_norm_eps=1e-5),
        ),
        (
            "ViT-SO400M-14-SigLIP-384", "webli",
            dict(kind="siglip", has_cls=False, hidden_size=1152, image_size=384, patch_size=14, num_patches=729,
                 num_layers=27, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
            dict(hidden_act="gelu", intermediate_size=4304, num_attention_heads=16, layer_norm_eps=1e-6, vision_use_head=True),
        ),
    ],
)  # fmt: skip
def test_real_openclip_towers_are_described_offline_from_configs(name, pretrained, expected, hf) -> None:
    info = describe_vision("open_clip", name, pretrained)
    assert {k: getattr(info, k) for k in expected} == expected
    config = hf_vision_config(name, pretrained)
    assert {k: getattr(config, k) for k in hf} == hf


# A 64-wide crop of a 61-high image resized to 67 wide: torchvision rounds the 1.5-pixel offset to 2, HF floors it.
SHIFTED = (64, 61)


CLIP_NORM = {"mean": CLIP_MEAN, "std": CLIP_STD}
SIGLIP_NORM = {"mean": SIGLIP_MEAN, "std": SIGLIP_STD}


@pytest.mark.parametrize(
    ("norm", "size", "mode", "interpolation", "width_height"),
    [
        (CLIP_NORM, 64, "shortest", "bicubic", (97, 61)),
        (CLIP_NORM, 64, "shortest", "bilinear", (61, 97)),
        (CLIP_NORM, 32, "shortest", "bicubic", (200, 130)),
        (CLIP_NORM, 64, "shortest", "bicubic", (40, 30)),  # upscaling
        (CLIP_NORM, 64, "shortest", "bicubic", (64, 64)),  # already the right size
        (CLIP_NORM, 48, "squash", "bilinear", (50, 300)),
        (SIGLIP_NORM, 64, "squash", "bicubic", (97, 61)),
        (SIGLIP_NORM, 64, "squash", "bicubic", (61, 97)),  # torchvision's resize is 17/255 off here
        (SIGLIP_NORM, 48, "shortest", "bicubic", (300, 200)),
        (CLIP_NORM, 64, "shortest", "bicubic", SHIFTED),
    ],
)
def test_image_processor_gives_openclip_pixels_also_after_saving(
    tmp_path, norm, size, mode, interpolation, width_height
) -> None:
    preprocess = {"size": size, **norm, "interpolation": interpolation, "resize_mode": mode}
    image = picture(*width_height)
    expected = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)(image)
    processor = openclip_image_processor(preprocess)
    processor.save_pretrained(tmp_path)
    # A saved PilBackend reloads as itself whichever backend is asked for (the default is torchvision).
    reloaded = {
        b: AutoImageProcessor.from_pretrained(tmp_path, backend=b) for b in (None, "torchvision", "pil")
    }
    for name, p in {"built": processor, **{f"reloaded, backend={b}": r for b, r in reloaded.items()}}.items():
        assert type(p) is PilBackend, name
        pixels = p(images=image, return_tensors="pt")["pixel_values"][0]
        assert pixels.shape == expected.shape == (3, size, size)
        if width_height == SHIFTED:  # documented difference: the crop starts one pixel earlier
            assert (pixels - expected).abs().max().item() > 0.1
            assert (pixels[..., 1:] - expected[..., :-1]).abs().max().item() < PIXEL_TOL, name
        else:
            assert (pixels - expected).abs().max().item() < PIXEL_TOL, name


@pytest.mark.parametrize(
    ("recipe", "part", "llm"),
    [
        ("assemble_openclip_vit_qwen2.yaml", "openclip-vit", "qwen2-r1"),
        ("assemble_openclip_siglip_llama.yaml", "openclip-siglip", "llama-r1"),
        ("assemble_openclip_siglip_llama.yaml", "openclip-siglip", "qwen2-r1"),
    ],
)
def test_assembled_llava_folder_reloads_openclip_pixels_and_features(
    zoo, tmp_path, recipe, part, llm
) -> None:
    overrides = [
        f"vision.name_or_path=local-dir:{zoo / part}",
        f"llm.name_or_path={zoo / llm}",
        f"output_dir={tmp_path / 'llava'}",
    ]
    out = assemble(load_any(RECIPES / recipe, overrides, expect="assemble"))
    processor = AutoProcessor.from_pretrained(out)  # what users and the stage programs do
    assert type(processor.image_processor) is PilBackend
    assert processor._get_num_multimodal_tokens(image_sizes=[(61, 97)]).num_image_tokens == [64]
    name = f"local-dir:{zoo / part}"
    errors = {}
    for width_height in [(97, 61), (61, 97), (64, 64)]:
        image = picture(*width_height)
        expected, states, _, _ = openclip_reference(name, None, image)
        pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        errors[f"pixels {width_height}"] = (pixels - expected).abs().max().item()
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    errors[f"hidden[{layer}]"] = (hidden[layer] - states[layer]).abs().max().item()
    print(recipe, llm, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(v for k, v in errors.items() if k.startswith("pixels")) < PIXEL_TOL, errors
    assert errors[f"hidden[{layer}]"] < HIDDEN_TOL, errors


CLIP_INFO = VisionInfo("clip", True, 64, 64, 8, 64, 2, CLIP_MEAN, CLIP_STD)
SIGLIP_INFO = VisionInfo("siglip", False, 64, 64, 8, 64, 2, SIGLIP_MEAN, SIGLIP_STD)


@pytest.mark.parametrize(
    ("info", "layer", "strategy", "resolved", "tokens"),
    [
        (CLIP_INFO, -2, None, "default", 64),
        (CLIP_INFO, -3, "full", "full", 65),
        (CLIP_INFO, 2, "default", "default", 64),
        (SIGLIP_INFO, -1, None, "full", 64),
        (SIGLIP_INFO, 0, "full", "full", 64),
    ],
)
def test_feature_selection_resolves_strategy_and_token_count(info, layer, strategy, resolved, tokens) -> None:
    assert check_feature_selection(info, layer, strategy) == resolved
    assert info.image_tokens(resolved) == tokens


@pytest.mark.parametrize(
    ("info", "layer", "strategy", "key", "message"),
    [
        (SIGLIP_INFO, -2, "default", "select_strategy", "no CLS token; use 'full' (all 64 patch tokens)"),
        (CLIP_INFO, -4, None, "feature_layer", "-4 is out of range: the clip tower has 2 layers"),
        (CLIP_INFO, 3, None, "feature_layer", "indexed -3..2"),
    ],
)
def test_impossible_feature_selection_names_the_key(info, layer, strategy, key, message) -> None:
    with pytest.raises(RecipeError) as err:
        check_feature_selection(info, layer, strategy)
    assert err.value.key == key and message in err.value.message


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("unsupported")
    vit = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    clip_preprocess = {"mean": CLIP_MEAN, "std": CLIP_STD}
    return {
        "layer-scale": openclip_folder(
            root / "ls", {"embed_dim": 16, "vision_cfg": {**vit, "ls_init_value": 0.1}, "text_cfg": TINY_TEXT}, clip_preprocess
        ),
        "longest": openclip_folder(
            root / "longest", {"embed_dim": 16, "vision_cfg": vit, "text_cfg": TINY_TEXT}, {**clip_preprocess, "resize_mode": "longest"}
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("source", "name", "pretrained", "message"),
    [
        ("open_clip", "ViT-L-14-336", None, "needs pretrained: one of its tags (openai)"),
        ("open_clip", "ViT-L-14-336", "laion400m", "got 'laion400m'"),
        ("open_clip", "ViT-L-14-337", "openai", "no model 'ViT-L-14-337' (close: ViT-L-14-336"),
        ("open_clip", "hf-hub:timm/ViT-SO400M-14-SigLIP-384", None, "use local-dir:FOLDER"),
        ("open_clip", "RN50", "openai", "ModifiedResNet is not supported"),
        ("open_clip", "ViT-L-14-CLIPA-336", "datacomp1b", "no pre-LayerNorm"),
        ("open_clip", "coca_ViT-L-14", "laion2b_s13b_b90k", "attention pooling"),
        ("open_clip", "local-dir:{zoo}/openclip-vit", "openai", "takes its weights from the folder"),
        ("open_clip", "local-dir:{zoo}/nowhere", None, "open_clip_config.json not found"),
        ("open_clip", "{layer-scale}", None, "'transformer.resblocks.0.ls_1.gamma'"),
        ("open_clip", "{longest}", None, "resize_mode 'longest'"),
        ("hf", "{zoo}/clip-hf", "openai", "only open_clip towers take pretrained"),
        ("hf", "{zoo}/qwen2-r1", None, "is a qwen2 model; the vision tower must be CLIP or SigLIP"),
        ("hf", "{zoo}/nowhere", None, "cannot read the config of vision tower"),
    ],
)
def test_unusable_towers_fail_early_naming_the_problem(
    zoo, unsupported, source, name, pretrained, message
) -> None:
    name = name.format(zoo=zoo, **unsupported)
    with pytest.raises(AlignError) as err:
        describe_vision(source, name, pretrained)
    assert message in str(err.value)


def test_hf_folder_without_preprocessor_config_is_rejected(zoo: Path, tmp_path: Path) -> None:
    shutil.copytree(zoo / "clip-hf", tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    with pytest.raises(AlignError, match=r"no usable preprocessor_config\.json"):
        load_vision_tower("hf", str(tmp_path / "clip"))
