"""The tiny offline zoo: every part loads through its real loader, rebuilds are byte-identical, and the
tokenizers behave like the DeepSeek-R1-Distill ones (specials, bos handling, chat template).

openclip-siglip names its timm tower by absolute path, so builds in different folders are compared with each
folder's own path replaced by a placeholder, and a rebuild into the same folder must be byte-identical as is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
    SiglipVisionModel,
)

from align.errors import AlignError
from align.zoo import (
    MARKER,
    PARTS,
    TIMM_DIR,
    build_part,
    build_zoo,
    fingerprint,
    read_marker,
    register_openclip,
)
from align.zoo_tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    VOCAB_SIZE,
    build_r1_tokenizer,
    chat_template,
    training_corpus,
)

LLMS = ("qwen2-r1", "llama-r1")
IMAGE = Image.new("RGB", (96, 72), (200, 30, 30))


def _hashes(root: Path, normalise: bool = False) -> dict[str, str]:
    """Relative path -> sha256. ``normalise`` replaces the absolute location of ``root`` in every file and drops
    the markers' fingerprints (a hash that includes openclip-siglip's location; checked against fingerprint())."""
    location = str(root.resolve()).encode()

    def content(path: Path) -> bytes:
        data = path.read_bytes()
        if not normalise:
            return data
        if path.name == MARKER:
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "fingerprint"}).encode()
        return data.replace(location, b"<zoo>")

    return {
        str(p.relative_to(root)): hashlib.sha256(content(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tokenizers(zoo: Path) -> dict:
    return {part: AutoTokenizer.from_pretrained(zoo / part) for part in LLMS}


def test_zoo_has_every_part_with_a_current_marker(zoo: Path) -> None:
    assert sorted(p.name for p in zoo.iterdir()) == sorted(PARTS)
    for part in PARTS:
        marker = read_marker(zoo / part)
        assert marker is not None and marker["part"] == part
        assert marker["fingerprint"] == fingerprint(part, zoo / part)
        assert marker["parameters"] > 0


def test_rebuild_is_byte_identical(zoo: Path, tmp_path: Path) -> None:
    build_zoo(tmp_path)
    first, second = _hashes(zoo, normalise=True), _hashes(tmp_path, normalise=True)
    assert len(first) >= 6 * 3
    assert first == second
    assert all(read_marker(tmp_path / p)["fingerprint"] == fingerprint(p, tmp_path / p) for p in PARTS)
    # Only the location-bound part's configs (and its marker's fingerprint) name the folder they live in.
    differing = {k for k, v in _hashes(zoo).items() if _hashes(tmp_path)[k] != v}
    assert differing == {
        "openclip-siglip/open_clip_config.json",
        "openclip-siglip/zoo-ViT-T-8-SL.json",
        f"openclip-siglip/{MARKER}",
    }

    before = _hashes(tmp_path)
    build_part("openclip-siglip", tmp_path, force=True)
    assert _hashes(tmp_path) == before


def test_moved_openclip_siglip_is_stale_and_rebuilds_in_its_new_home(zoo: Path, tmp_path: Path) -> None:
    moved = tmp_path / "openclip-siglip"
    shutil.copytree(zoo / "openclip-siglip", moved)
    assert read_marker(moved)["fingerprint"] != fingerprint("openclip-siglip", moved)
    build_part("openclip-siglip", tmp_path)
    assert read_marker(moved)["fingerprint"] == fingerprint("openclip-siglip", moved)
    timm_name = json.loads((moved / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"][
        "timm_model_name"
    ]
    assert timm_name == f"local-dir:{(moved / TIMM_DIR).resolve()}"
    weights = "open_clip_model.safetensors"
    assert (moved / weights).read_bytes() == (zoo / "openclip-siglip" / weights).read_bytes()


def test_built_parts_are_skipped_unless_forced_or_stale(tmp_path: Path) -> None:
    path = build_part("clip-hf", tmp_path)
    weights = path / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert build_part("clip-hf", tmp_path) == path
    assert weights.stat().st_mtime_ns == built

    build_part("clip-hf", tmp_path, force=True)
    assert weights.stat().st_mtime_ns != built

    stale = json.loads((path / MARKER).read_text())
    stale["fingerprint"] = "from an older zoo"
    (path / MARKER).write_text(json.dumps(stale))
    rebuilt = weights.stat().st_mtime_ns
    build_part("clip-hf", tmp_path)
    assert weights.stat().st_mtime_ns != rebuilt
    assert read_marker(path)["fingerprint"] == fingerprint("clip-hf", path)
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


@pytest.mark.parametrize(
    ("part", "model_class", "n_tokens", "mean"),
    [
        ("clip-hf", CLIPVisionModel, 64 + 1, 0.48145466),  # CLIP has a CLS token
        ("siglip-hf", SiglipVisionModel, 64, 0.5),
    ],
)
def test_hf_vision_towers_load(zoo: Path, part: str, model_class: type, n_tokens: int, mean: float) -> None:
    model = model_class.from_pretrained(zoo / part)
    processor = AutoImageProcessor.from_pretrained(zoo / part)
    pixels = processor(images=IMAGE, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 64, 64)
    assert processor.image_mean[0] == pytest.approx(mean)
    hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, n_tokens, 64)
    cfg = model.config
    assert (cfg.image_size, cfg.patch_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 8, 2, 4)
    assert cfg.intermediate_size == 128
    assert sum(p.numel() for p in model.parameters()) == read_marker(zoo / part)["parameters"]


@pytest.mark.parametrize(
    ("part", "model_class", "mean", "resize_mode", "embed_dim"),
    [
        ("openclip-vit", open_clip.CLIP, 0.48145466, "shortest", 32),
        ("openclip-siglip", open_clip.CustomTextCLIP, 0.5, "squash", 64),
    ],
)
def test_openclip_loads_from_local_dir_in_any_working_directory(
    zoo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    part: str,
    model_class: type,
    mean: float,
    resize_mode: str,
    embed_dim: int,
) -> None:
    monkeypatch.chdir(tmp_path)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{zoo / part}")
    assert type(model) is model_class
    assert model.visual.preprocess_cfg["mean"][0] == pytest.approx(mean)
    assert model.visual.preprocess_cfg["resize_mode"] == resize_mode
    pixels = preprocess(IMAGE).unsqueeze(0)
    assert pixels.shape == (1, 3, 64, 64)
    assert model.encode_image(pixels).shape == (1, embed_dim)
    text = open_clip.get_tokenizer(f"local-dir:{zoo / part}")(["a red circle"])
    assert model.encode_text(text).shape == (1, embed_dim)
    assert sum(p.numel() for p in model.parameters()) == read_marker(zoo / part)["parameters"]


def test_openclip_vit_is_open_clips_own_vit_with_a_class_token(zoo: Path) -> None:
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{zoo / 'openclip-vit'}")
    visual = model.visual
    assert type(visual) is open_clip.transformer.VisionTransformer
    assert isinstance(visual.ln_pre, torch.nn.LayerNorm)
    visual.output_tokens = True
    _, tokens = visual(torch.zeros(1, 3, 64, 64))
    assert tokens.shape == (1, 64, 64)  # the patch tokens; the class token is pooled


def test_openclip_siglip_is_a_timm_siglip_vit_like_the_real_ones(zoo: Path) -> None:
    # The shape of open_clip's ViT-B-16-SigLIP: a timm ViT, no class token, MAP head, no projection after it.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{zoo / 'openclip-siglip'}")
    visual = model.visual
    assert type(visual) is open_clip.timm_model.TimmModel and len(visual.head) == 0
    trunk = visual.trunk
    assert type(trunk).__name__ == "VisionTransformer" and trunk.cls_token is None
    assert trunk.num_prefix_tokens == 0 and trunk.global_pool == "map"
    assert trunk.attn_pool.latent_len == 1
    assert (trunk.embed_dim, len(trunk.blocks), trunk.blocks[0].attn.num_heads) == (64, 2, 4)
    assert trunk.blocks[0].mlp.fc1.out_features == 128 and trunk.blocks[0].norm1.eps == 1e-6
    assert trunk.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 64)  # 8x8 patches, nothing else
    assert model.logit_bias is not None


@pytest.mark.parametrize("part", ["openclip-vit", "openclip-siglip"])
def test_openclip_loads_by_registered_name_and_weights_file(zoo: Path, part: str) -> None:
    local, _, _ = open_clip.create_model_and_transforms(f"local-dir:{zoo / part}")
    name, pretrained = register_openclip(zoo / part)
    assert name in open_clip.list_models()
    mean = json.loads((zoo / part / "open_clip_config.json").read_text())["preprocess_cfg"]["mean"]
    named, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained, image_mean=mean)
    assert type(named) is type(local)
    assert named.visual.preprocess_cfg["mean"] == local.visual.preprocess_cfg["mean"]
    local_state, named_state = local.state_dict(), named.state_dict()
    assert local_state.keys() == named_state.keys()
    assert all(torch.equal(local_state[k], named_state[k]) for k in local_state)


def test_register_openclip_rejects_other_folders(zoo: Path) -> None:
    with pytest.raises(AlignError, match=r"zoo-part\.json.*expected a built open_clip zoo part.*'clip-hf'"):
        register_openclip(zoo / "clip-hf")


@pytest.mark.parametrize(
    ("part", "model_class"), [("qwen2-r1", Qwen2ForCausalLM), ("llama-r1", LlamaForCausalLM)]
)
def test_llms_load_and_match_their_tokenizer(
    zoo: Path, tokenizers: dict, part: str, model_class: type
) -> None:
    model = AutoModelForCausalLM.from_pretrained(zoo / part)
    tokenizer = tokenizers[part]
    assert type(model) is model_class
    cfg = model.config
    assert cfg.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (128, 2, 256)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.max_position_embeddings == 4096
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == cfg.eos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    ids = tokenizer("how many circles", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert sum(p.numel() for p in model.parameters()) == read_marker(zoo / part)["parameters"]


def test_llama_uses_llama3_rope_scaling(zoo: Path) -> None:
    rope = AutoModelForCausalLM.from_pretrained(zoo / "llama-r1").config.rope_parameters
    assert rope["rope_type"] == "llama3"
    assert rope["factor"] > 1 and rope["low_freq_factor"] < rope["high_freq_factor"]
    assert rope["original_max_position_embeddings"] < 4096


@pytest.mark.parametrize(("part", "pad"), [("qwen2-r1", PAD), ("llama-r1", None)])
def test_special_tokens_are_the_real_ones(tokenizers: dict, part: str, pad: str | None) -> None:
    tokenizer = tokenizers[part]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, pad)
    for token in (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    specials = set(tokenizer.all_special_tokens)
    assert {BOS, EOS} <= specials
    assert THINK_OPEN not in specials and THINK_CLOSE not in specials
    special_ids = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    assert {BOS, EOS, USER, ASSISTANT} <= special_ids
    assert not {THINK_OPEN, THINK_CLOSE} & special_ids


@pytest.mark.parametrize("part", LLMS)
@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("<think>\nthree circles</think>The answer is 3.", "<think>\nthree circles</think>The answer is 3."),
        (f"{USER}hi{ASSISTANT}<think>x</think>y{EOS}", "hi<think>x</think>y"),
    ],
)
def test_think_tags_survive_skip_special_tokens(tokenizers: dict, part: str, text: str, kept: str) -> None:
    tokenizer = tokenizers[part]
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == kept


@pytest.mark.parametrize("part", LLMS)
def test_encoding_adds_bos_and_chat_template_does_not_double_it(tokenizers: dict, part: str) -> None:
    tokenizer = tokenizers[part]
    bos = tokenizer.bos_token_id
    assert tokenizer("a red square").input_ids[0] == bos
    assert bos not in tokenizer("a red square", add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": "How many circles?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(BOS) and rendered.count(BOS) == 1
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids[0] == bos and ids.count(bos) == 1
    assert tokenizer.decode(ids) == rendered


@pytest.mark.parametrize("part", LLMS)
@pytest.mark.parametrize(
    ("messages", "generation_prompt", "expected"),
    [
        (
            [{"role": "user", "content": "Count."}],
            True,
            f"{BOS}{USER}Count.{ASSISTANT}<think>\n",
        ),
        (
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>r</think>a"}],
            False,
            f"{BOS}{USER}Q{ASSISTANT}a{EOS}",
        ),
        (
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>long\nreasoning</think>\n\nA1"},
                {"role": "user", "content": "Q2"},
            ],
            True,
            f"{BOS}S{USER}Q1{ASSISTANT}\n\nA1{EOS}{USER}Q2{ASSISTANT}<think>\n",
        ),
        (
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no reasoning"}],
            False,
            f"{BOS}{USER}Q{ASSISTANT}no reasoning{EOS}",
        ),
    ],
)
def test_chat_template_renders_r1_behaviour(
    tokenizers: dict, part: str, messages: list, generation_prompt: bool, expected: str
) -> None:
    tokenizer = tokenizers[part]
    assert tokenizer.chat_template == chat_template()
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert rendered == expected


@pytest.mark.parametrize("part", LLMS)
@pytest.mark.parametrize(
    "text",
    [
        "How many red circles are there in the image?",
        "The blue triangle is left of the green square.",
        "Let me count the yellow stars first, then check again.",
        "Therefore the total number of shapes is",
    ],
)
def test_task_text_tokenizes_compactly(tokenizers: dict, part: str, text: str) -> None:
    n_tokens = len(tokenizers[part](text, add_special_tokens=False).input_ids)
    assert n_tokens <= len(text.split()) + 2  # about one token per word, plus punctuation


@pytest.mark.parametrize("part", LLMS)
@pytest.mark.parametrize(
    "text", ["日本語 ✓ émoji 🙂", "tab\there\r\nand  spaces", r"$\frac{7}{8} \neq 0.875$"]
)
def test_byte_level_round_trips_anything(tokenizers: dict, part: str, text: str) -> None:
    tokenizer = tokenizers[part]
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize(
    ("part", "pieces"), [("qwen2-r1", ["1", "2", "3", "4", "Ġ", "5"]), ("llama-r1", ["123", "4", "Ġ", "5"])]
)
def test_digits_group_like_the_real_pretokenizers(tokenizers: dict, part: str, pieces: list[str]) -> None:
    # Qwen2 splits numbers into single digits; Llama-3 into runs of up to three.
    pre_tokenizer = tokenizers[part].backend_tokenizer.pre_tokenizer
    assert [piece for piece, _ in pre_tokenizer.pre_tokenize_str("1234 5")] == pieces


def test_cli_prints_each_part_with_its_parameter_count(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from align.cli import main

    out = tmp_path / "zoo"
    shutil.copytree(zoo, out)  # already built: the command reports (and rebuilds the location-bound part)
    assert main(["zoo", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PARTS)
    for line, part in zip(lines, PARTS, strict=True):
        assert str(out / part) in line
        assert f"{read_marker(out / part)['parameters']:,} parameters" in line


@pytest.mark.parametrize(("part", "flavour"), [("qwen2-r1", "qwen2"), ("llama-r1", "llama")])
def test_saved_tokenizer_encodes_like_the_built_one(tokenizers: dict, part: str, flavour: str) -> None:
    # AutoTokenizer rebuilds a qwen2 folder's tokenizer as Qwen2Tokenizer: it must still encode the same.
    built = build_r1_tokenizer(flavour)
    texts = [*training_corpus(seed=1, n_lines=200), "Ａ１２３ ﬁ café", "<think>\nx</think>y"]
    assert [tokenizers[part](t).input_ids for t in texts] == [built(t).input_ids for t in texts]
