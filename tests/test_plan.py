"""``align plan``: meta-device parameter counts against published sizes, memory accounting, the CLI, the zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from align.cli import main
from align.errors import AlignError
from align.plan import (
    MODELS_DIR,
    Plan,
    image_tokens,
    lora_parameters,
    memory_per_gpu,
    plan_model,
    resolve_config,
    resolve_vision_config,
)

ROOT = Path(__file__).resolve().parent.parent
QWEN7B_RECIPE = ROOT / "recipes/real/assemble_siglip_so400m_r1_qwen7b.yaml"
LLAMA8B_RECIPE = ROOT / "recipes/real/assemble_clip_l336_r1_llama8b.yaml"


def shipped(hub_id: str):
    return AutoConfig.from_pretrained(MODELS_DIR / hub_id.replace("/", "--"))


def within(actual: int, published: float, tolerance: float = 0.01) -> bool:
    return abs(actual - published) <= tolerance * published


def run_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --- published sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, llm, vision, tokens",
    [
        (QWEN7B_RECIPE, 7.62e9, 428e6, 729),  # SigLIP-so400m: 428M with its (unused) pooling head
        (LLAMA8B_RECIPE, 8.03e9, 303.5e6, 576),  # CLIP-L/14-336 tower without the CLIP projection
    ],
)
def test_real_recipes_match_published_sizes(capsys, recipe, llm, vision, tokens):
    params = run_json(capsys, str(recipe), "--gpus", "8")["params"]
    assert within(params["llm"], llm), params["llm"]
    assert within(params["vision"], vision), params["vision"]
    assert params["image_tokens"] == tokens
    assert params["total"] == params["vision"] + params["projector"] + params["llm"]
    assert params["llm_head"] == params["llm_embed"]  # untied, like the real checkpoints


@pytest.mark.parametrize(
    "hub_id, published",
    [
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 1.78e9),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7.62e9),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 14.77e9),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 32.76e9),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 8.03e9),
    ],
)
def test_shipped_llm_configs_match_published_sizes(hub_id, published):
    vision = shipped("google/siglip-base-patch16-224")
    plan = plan_model(vision, shipped(hub_id), -2, None)
    assert within(plan.llm, published), plan.llm
    # vision_config.hidden_size -> text hidden -> text hidden, with biases
    hidden = shipped(hub_id).hidden_size
    assert plan.projector == 768 * hidden + hidden + hidden * hidden + hidden


def test_siglip_pooling_head_is_reported_separately():
    plan = plan_model(
        shipped("google/siglip-so400m-patch14-384"),
        shipped("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
        -2,
        None,
    )
    # attention pooling: probe + in/out projections + layernorm + MLP of the so400m width (1152, MLP 4304)
    h, m = 1152, 4304
    head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * m + m + m * h + h)
    assert plan.vision_head == head
    assert within(plan.vision - plan.vision_head, 413e6)
    assert (
        plan_model(
            shipped("openai/clip-vit-large-patch14-336"),
            shipped("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
            -2,
            None,
        ).vision_head
        == 0
    )


def test_lora_count_from_shapes_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config)
    expected = lora_parameters(model.model, rank=8)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert expected == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # hand count per layer: q 32->32, k/v 32->16, o 32->32, gate/up 32->48, down 48->32
    assert expected == 2 * 8 * (64 + 48 + 48 + 64 + 80 + 80 + 80)


# --- image tokens and checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hub_id, strategy, tokens",
    [
        ("openai/clip-vit-large-patch14-336", "default", 576),
        ("openai/clip-vit-large-patch14-336", "full", 577),
        ("openai/clip-vit-large-patch14", "default", 256),
        ("google/siglip-so400m-patch14-384", "full", 729),
        ("google/siglip-base-patch16-224", "full", 196),
    ],
)
def test_image_tokens(hub_id, strategy, tokens):
    assert image_tokens(shipped(hub_id), strategy) == tokens


def test_default_strategy_on_siglip_is_refused():
    with pytest.raises(AlignError, match=r"no CLS token.*729"):
        image_tokens(shipped("google/siglip-so400m-patch14-384"), "default")


@pytest.mark.parametrize("layer", [-26, 25, 100])
def test_feature_layer_out_of_range(layer):
    vision = shipped("openai/clip-vit-large-patch14-336")  # 24 layers: hidden states -25..24
    with pytest.raises(AlignError, match=f"feature_layer {layer} .* 24 layers"):
        plan_model(vision, shipped("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"), layer, None)


def test_unknown_hub_id_names_the_id_and_where_to_put_the_config(tmp_path):
    with pytest.raises(
        AlignError, match=r"no-such-org/no-such-model.*no-such-org--no-such-model/config.json"
    ):
        resolve_config("no-such-org/no-such-model", models_dir=tmp_path)


# --- memory accounting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trainable, frozen, gpus, strategy, weights, grads, optim",
    [
        # DDP: everything replicated: 2 B/param weights, 2 B + 12 B per trainable param
        (100, 900, 8, "ddp", 2000, 200, 1200),
        # ZeRO-2: weights replicated, grads and optimizer split in 8 (ceil(100 / 8) = 13 params each)
        (100, 900, 8, "zero2", 2000, 26, 156),
        # ZeRO-3: weights split too: ceil(1000 / 8) = 125 params
        (100, 900, 8, "zero3", 250, 26, 156),
        # one GPU: nothing to shard
        (100, 900, 1, "zero3", 2000, 200, 1200),
        # frozen model (projector stage of nothing): weights only
        (0, 1000, 4, "zero2", 2000, 0, 0),
        (0, 1000, 4, "zero3", 500, 0, 0),
    ],
)
def test_memory_per_gpu(trainable, frozen, gpus, strategy, weights, grads, optim):
    memory = memory_per_gpu(trainable, frozen, gpus, strategy)
    assert memory == {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "total": weights + grads + optim,
    }


@pytest.mark.parametrize("gpus, strategy", [(0, "ddp"), (8, "zero1"), (8, "fsdp")])
def test_memory_per_gpu_rejects(gpus, strategy):
    with pytest.raises(ValueError):
        memory_per_gpu(1, 1, gpus, strategy)


@pytest.mark.parametrize(
    "stage, trainable, frozen",
    [
        ("projector", 20, 1000 + 5000),
        ("sft", 5020, 1000),
        ("grpo", 5020, 1000),
        ("sft-lora", 20 + 300, 1000 + 5000),  # adapters are extra parameters; the base stays frozen
    ],
)
def test_stage_freezing(stage, trainable, frozen):
    plan = Plan(
        vision=1000,
        vision_head=0,
        projector=20,
        llm=5000,
        llm_embed=0,
        llm_head=0,
        vocab=0,
        image_tokens=0,
        lora=300,
    )
    assert plan.split(stage) == (trainable, frozen)


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_prints_table(capsys):
    assert main(["plan", str(LLAMA8B_RECIPE), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for text in ("image tokens per image: 576", "ZeRO-2", "ZeRO-3", "sft-lora", "activations", "8 GPU(s)"):
        assert text in out
    assert "8,030,269,440" in out  # Llama-8B + one <image> row in embed_tokens and lm_head (2 x 4096)


def test_cli_json_memory_is_the_accounting_of_its_counts(capsys):
    data = run_json(capsys, str(QWEN7B_RECIPE), "--gpus", "4")
    p = data["params"]
    sft = data["stages"]["sft"]
    assert sft["trainable"] == p["projector"] + p["llm"]
    assert sft["memory_bytes"]["zero3"] == memory_per_gpu(sft["trainable"], sft["frozen"], 4, "zero3")
    lora = data["stages"]["sft-lora"]
    assert lora["trainable"] == p["projector"] + p["lora"]
    # Qwen-7B, r=128 on q,k,v,o (3584->3584, ->512, ->512, ->3584) and gate,up,down (3584<->18944), 28 layers
    assert p["lora"] == 28 * 128 * (2 * 7168 + 2 * 4096 + 3 * 22528)


def test_cli_reports_missing_config(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "kind: assemble\nvision: {source: hf, name_or_path: nobody/nothing}\n"
        "llm: {name_or_path: deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}\noutput_dir: out\n"
    )
    assert main(["plan", str(recipe)]) == 2
    assert "nobody/nothing" in capsys.readouterr().err


# --- the tiny zoo: plan == what assemble builds ----------------------------------------------------------


@pytest.mark.parametrize("vision_part, llm_part", [("clip-hf", "qwen2-r1"), ("siglip-hf", "llama-r1")])
def test_zoo_plan_equals_assembled_model(zoo, tmp_path, capsys, vision_part, llm_part):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from align.assemble import build_llava
    from align.model import parameter_table

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"kind: assemble\nvision: {{source: hf, name_or_path: {zoo / vision_part}}}\n"
        f"llm: {{name_or_path: {zoo / llm_part}}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    data = run_json(capsys, str(recipe), "--gpus", "2")
    assert not (tmp_path / "out").exists()

    vision = AutoModel.from_pretrained(zoo / vision_part)
    tokenizer = AutoTokenizer.from_pretrained(zoo / llm_part)
    has_cls = vision_part == "clip-hf"
    model, _ = build_llava(
        vision,
        AutoImageProcessor.from_pretrained(zoo / vision_part),
        AutoModelForCausalLM.from_pretrained(zoo / llm_part),
        tokenizer,
        has_cls=has_cls,
        feature_layer=-2,
        select_strategy="default" if has_cls else "full",
        image_token="<image>",
        seed=0,
    )
    built = {component: total for component, total, _ in parameter_table(model)}
    params = data["params"]
    assert {c: params[c] for c in built} == built
    assert params["vocab"] == model.get_input_embeddings().weight.shape[0]
    assert params["image_tokens"] == model.config.image_seq_length
    assert data["vision"]["select_strategy"] == model.config.vision_feature_select_strategy


def test_vision_config_of_a_dual_encoder_folder_is_its_vision_half(tmp_path):
    from transformers import CLIPConfig

    CLIPConfig(vision_config={"hidden_size": 48, "image_size": 32, "patch_size": 8}).save_pretrained(tmp_path)
    config = resolve_vision_config("hf", str(tmp_path), None)
    assert (config.model_type, config.hidden_size) == ("clip_vision_model", 48)


def test_zoo_open_clip_tower_plans_as_its_hf_conversion(zoo, tmp_path, capsys):
    from align.vision import load_vision_tower

    name = f"local-dir:{zoo / 'openclip-vit'}"
    recipe = tmp_path / "openclip.yaml"
    recipe.write_text(
        f"kind: assemble\nvision: {{source: open_clip, name_or_path: '{name}'}}\n"
        f"llm: {{name_or_path: {zoo / 'qwen2-r1'}}}\noutput_dir: {tmp_path / 'out'}\n"
    )
    data = run_json(capsys, str(recipe))
    tower, _, info = load_vision_tower("open_clip", name)
    assert data["params"]["vision"] == sum(p.numel() for p in tower.parameters())
    assert data["params"]["image_tokens"] == info.num_patches
