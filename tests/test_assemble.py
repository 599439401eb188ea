"""Assembly: every zoo encoder x LLM becomes a standard Llava folder that transformers loads with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor, LlavaForConditionalGeneration

from align.assemble import AssembleRecipe, assemble, check_image_tokens, compose
from align.checkpoint import CANONICAL_PREFIXES, canonical_key, weight_names
from align.cli import main
from align.config import RecipeError, from_dict
from align.errors import AlignError
from align.inspect import describe

ENCODERS = {
    "clip-hf": ("hf", "{zoo}/clip-hf"),
    "siglip-hf": ("hf", "{zoo}/siglip-hf"),
    "openclip-vit": ("open_clip", "local-dir:{zoo}/openclip-vit"),
    "openclip-siglip": ("open_clip", "local-dir:{zoo}/openclip-siglip"),
}
LLMS = ("qwen2-r1", "llama-r1")


def recipe(zoo, encoder: str, llm: str, out, **vision) -> AssembleRecipe:
    source, name = ENCODERS[encoder]
    data = {
        "kind": "assemble",
        "vision": {"source": source, "name_or_path": name.format(zoo=zoo), **vision},
        "llm": {"name_or_path": str(zoo / llm)},
        "output_dir": str(out),
    }
    return from_dict(AssembleRecipe, data, file="test.yaml")


def picture() -> Image.Image:
    image = Image.new("RGB", (80, 60), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((5, 5, 35, 35), fill="red")
    draw.rectangle((45, 20, 75, 55), fill="blue")
    return image


def prompt_inputs(processor):
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nHow many circles?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return processor(text=text, images=[picture()], return_tensors="pt")


@pytest.mark.parametrize("llm", LLMS)
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_saved_folder_loads_with_equal_logits_and_greedy_tokens(zoo, tmp_path, encoder, llm) -> None:
    r = recipe(zoo, encoder, llm, tmp_path / "m")
    model, processor, _ = compose(r)
    out = assemble(r)
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    loaded_processor = AutoProcessor.from_pretrained(out)

    names = weight_names(out)
    assert names and all(n.startswith(CANONICAL_PREFIXES) for n in names)
    assert sorted(canonical_key(k) for k in model.state_dict()) == names

    inputs = prompt_inputs(processor)
    loaded_inputs = prompt_inputs(loaded_processor)
    assert torch.equal(inputs["input_ids"], loaded_inputs["input_ids"])
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == model.config.image_seq_length == 64
    with torch.no_grad():
        a = model(**inputs).logits
        b = loaded(**loaded_inputs).logits
        assert (a - b).abs().max().item() < 1e-4
        greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        assert torch.equal(model.generate(**inputs, **greedy), loaded.generate(**loaded_inputs, **greedy))
    assert (out / "recipe.resolved.yaml").exists()
    assert (
        json.loads((out / "generation_config.json").read_text())["pad_token_id"]
        == loaded_processor.tokenizer.pad_token_id
    )


def test_image_token_and_pad_are_added_with_mean_rows(zoo, tmp_path) -> None:
    model, processor, _ = compose(recipe(zoo, "clip-hf", "llama-r1", tmp_path / "m"))
    tok = processor.tokenizer
    assert tok.pad_token is not None, "the Llama distill has no pad token: assembly must add one"
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (
        image_id == model.config.image_token_id and len(tok.encode("<image>", add_special_tokens=False)) == 1
    )
    emb = model.get_input_embeddings().weight
    old = emb[: min(image_id, tok.pad_token_id)]
    assert torch.allclose(emb[image_id], old.mean(0), atol=1e-6)
    assert "<think>" not in tok.all_special_tokens, "<think> must stay an ordinary token"


def test_clip_drops_cls_and_siglip_keeps_all(zoo, tmp_path) -> None:
    clip, _, _ = compose(recipe(zoo, "clip-hf", "qwen2-r1", tmp_path / "a"))
    siglip, _, _ = compose(recipe(zoo, "siglip-hf", "qwen2-r1", tmp_path / "b"))
    assert clip.config.vision_feature_select_strategy == "default"
    assert siglip.config.vision_feature_select_strategy == "full"
    full_clip, processor, _ = compose(
        recipe(zoo, "clip-hf", "qwen2-r1", tmp_path / "c", select_strategy="full")
    )
    assert full_clip.config.image_seq_length == 65 and check_image_tokens(full_clip, processor) == 65


def test_impossible_combinations_fail_before_loading(zoo, tmp_path) -> None:
    with pytest.raises(
        RecipeError, match=r"test.yaml: vision.select_strategy: 'default' drops the first token"
    ):
        compose(recipe(zoo, "siglip-hf", "qwen2-r1", tmp_path / "m", select_strategy="default"), "test.yaml")
    with pytest.raises(RecipeError, match=r"vision.feature_layer: 7 is out of range"):
        compose(recipe(zoo, "clip-hf", "qwen2-r1", tmp_path / "m", feature_layer=7), "test.yaml")


def test_processor_model_disagreement_names_both_numbers(zoo, tmp_path) -> None:
    model, processor, _ = compose(recipe(zoo, "clip-hf", "qwen2-r1", tmp_path / "m"))
    processor.patch_size = 16  # the processor would now expand <image> to 16 tokens; the tower gives 64
    with pytest.raises(
        AlignError, match=r"expands <image> to 16 tokens but the vision tower gives 64 features"
    ):
        check_image_tokens(model, processor)


def test_inspect_reports_components_tokens_and_template(zoo, tmp_path, capsys) -> None:
    out = assemble(recipe(zoo, "siglip-hf", "qwen2-r1", tmp_path / "m"))
    info = describe(out)
    assert info["image_tokens"] == 64 and info["canonical_layout"]
    assert info["chat_template"]["prefills_think"] and info["chat_template"]["strips_reasoning_from_history"]
    assert info["parameters"]["projector"] == 64 * 128 + 128 + 128 * 128 + 128
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "64 per <image>" in text and "canonical llava-hf" in text and "prefills <think>: True" in text


def test_cli_assemble_writes_the_folder(zoo, tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"kind: assemble\nvision: {{source: hf, name_or_path: {zoo}/siglip-hf}}\n"
        f"llm: {{name_or_path: {zoo}/qwen2-r1}}\noutput_dir: {tmp_path}/x\n"
    )
    assert main(["assemble", str(path), f"output_dir={tmp_path}/y"]) == 0
    assert (tmp_path / "y" / "config.json").exists() and not (tmp_path / "x").exists()


def test_config_names_the_architecture_for_vllm_and_trl(zoo, tmp_path) -> None:
    out = assemble(recipe(zoo, "siglip-hf", "qwen2-r1", tmp_path / "m"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
