"""The shared-prefix GRPO forward with gradient checkpointing: the naive forward's log-probs and gradients.

With the language model's layers checkpointed, :mod:`align.grpo.logps` runs each decoder layer as one
checkpointed function of (prompt hidden states, completion hidden states). Here, with checkpointing ON in
training mode, its log-probs, entropies and the gradients of every trainable parameter (LLM, projector, vision
tower; LoRA adapters) equal those of the naive full forward (TRL's way, HF's own checkpointing) within fp32
round-off, on the zoo's SigLIP + Qwen2 and CLIP + Llama Llavas (sdpa and eager) and on every other LLM family
of the zoo; prompts are left-padded to different lengths, two with an image and one text-only, and a completion
holds the image token id. Each layer's attention is counted to show the layers really are recomputed in
backward. A GRPO stage run through the CLI with ``run.gradient_checkpointing=true`` and ``shared_prefix``
closes the module.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_grpo_prefix_checkpointing.py
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import align.grpo.logps as logps_module
from align.assemble import AssembleRecipe, assemble
from align.checkpoint import load_llava
from align.cli import main
from align.config import from_dict
from align.errors import AlignError
from align.grpo.logps import Completions, completion_logps, completion_logps_and_entropy
from align.grpo.sampler import run_tower_on_text_only
from align.lora import apply_lora
from align.zoo import FAMILIES, build_families

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
G = 3
QUESTIONS = ["<image>\nHow many circles?", "<image>\nWhich colour is the biggest square on the left?", "Why?"]


def _assemble(zoo: Path, vision: str, llm: Path, out: Path) -> Path:
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / vision)},
        "llm": {"name_or_path": str(llm)},
        "output_dir": str(out),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        return assemble(from_dict(AssembleRecipe, spec))


@pytest.fixture(scope="module")
def folders(zoo: Path, siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> an assembled Llava folder: ``qwen2``, ``llama`` and the zoo's other families (built on first use)."""
    root = tmp_path_factory.mktemp("prefix-ckpt")
    built = {"qwen2": siglip_qwen2}

    def get(name: str) -> Path:
        if name not in built:
            if name == "llama":
                built[name] = _assemble(zoo, "clip-hf", zoo / "llama-r1", root / name)
            else:
                if not (root / "families").is_dir():
                    build_families(root / "families")
                built[name] = _assemble(zoo, "siglip-hf", root / "families" / name, root / name)
        return built[name]

    return get


def _checkpointed(folder: Path, attn: str = "sdpa"):
    model, processor = load_llava(folder, attn_implementation=attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), processor  # the zoo's configs have no dropout: training mode changes no number


def _picture(seed: int) -> Image.Image:
    noise = torch.randint(
        0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    return Image.fromarray(noise.numpy())


def _batch(processor, vocab: int, image_token_id: int):
    """3 prompts of different lengths (2 with an image, 1 text-only) and G completions each, right-padded."""
    prompts, pixels = [], []
    for seed, question in enumerate(QUESTIONS):
        images = [_picture(seed)] if "<image>" in question else None
        inputs = processor(text=question, images=images, return_tensors="pt")
        prompts.append(inputs["input_ids"][0].tolist())
        if images:
            pixels.append(inputs["pixel_values"])
    assert len({len(p) for p in prompts}) == 3, "the prompts must need left padding"
    lengths = [7, 3, 1, 7, 5, 2, 4, 7, 6]
    ids = torch.randint(0, vocab, (len(lengths), 7), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[0, 2] = image_token_id  # a sampled image token in a completion is text, not an image slot
    return prompts, torch.cat(pixels), [1, 1, 0], ids, mask


def _run(model, batch, shared: bool):
    """Log-probs, entropies and the gradients of a token-mean loss (O(1) gradients: 1e-5 is round-off)."""
    prompts, pixels, images, ids, mask = batch
    model.zero_grad(set_to_none=True)
    completions = Completions(prompts, pixels, images, ids, mask, G)
    logps, entropy = completion_logps_and_entropy(model, completions, temperature=0.7, shared_prefix=shared)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(4))
    ((logps * weights * mask).sum() / mask.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), entropy, grads


def _attention_calls(model) -> tuple[list[int], list]:
    counts = [0] * len(model.model.language_model.layers)
    hooks = [
        layer.self_attn.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    return counts, hooks


def _assert_equal_to_naive(model, batch, expected_components: set[str], atol: float = 1e-5) -> None:
    counts, hooks = _attention_calls(model)
    try:
        shared_logps, shared_entropy, shared_grads = _run(model, batch, shared=True)
        # prompts, then completions; recomputed in backward: each layer's attention runs 4 times
        assert counts == [4] * len(counts), counts
        counts[:] = [0] * len(counts)
        naive_logps, naive_entropy, naive_grads = _run(model, batch, shared=False)
        assert counts == [2] * len(counts), counts  # HF's own checkpointing: forward + recompute
    finally:
        for hook in hooks:
            hook.remove()
    on = batch[-1].bool()
    torch.testing.assert_close(shared_logps[on], naive_logps[on], atol=atol, rtol=0)
    torch.testing.assert_close(shared_entropy[on], naive_entropy[on], atol=atol, rtol=0)
    assert shared_grads.keys() == naive_grads.keys()
    assert shared_grads.keys() <= {name for name, p in model.named_parameters() if p.requires_grad}
    components = {name.split(".")[1] for name in shared_grads if name.startswith("model.")}
    assert components == expected_components
    for name, grad in shared_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, naive_grads[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_checkpointed_shared_prefix_equals_naive_values_and_gradients(folders, name: str, attn: str) -> None:
    model, processor = _checkpointed(folders(name), attn)
    batch = _batch(processor, model.config.text_config.vocab_size, model.config.image_token_id)
    _assert_equal_to_naive(model, batch, {"language_model", "multi_modal_projector", "vision_tower"})


def test_one_token_completions(folders) -> None:
    """The completions' pass still runs on its one (unscored) column: every rank calls the same modules."""
    model, processor = _checkpointed(folders("qwen2"))
    *prompts, ids, mask = _batch(processor, model.config.text_config.vocab_size, model.config.image_token_id)
    _assert_equal_to_naive(
        model,
        (*prompts, ids[:, :1], mask[:, :1]),
        {"language_model", "multi_modal_projector", "vision_tower"},
    )


def test_checkpointed_shared_prefix_with_lora_equals_naive(folders) -> None:
    model, processor = _checkpointed(folders("qwen2"))
    batch = _batch(processor, model.config.text_config.vocab_size, model.config.image_token_id)
    policy = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    with torch.no_grad():  # B = 0 at init would leave lora_A without a gradient
        for param_name, p in policy.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.2)
    for (
        param_name,
        p,
    ) in model.named_parameters():  # what the GRPO stage trains with LoRA: adapters + projector
        p.requires_grad_("lora_" in param_name or "multi_modal_projector" in param_name)
    _assert_equal_to_naive(model, batch, {"language_model", "multi_modal_projector"})
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)


def test_text_only_batch_with_a_blank_image_runs_the_tower_and_changes_nothing(folders) -> None:
    model, processor = _checkpointed(folders("qwen2"))
    _, _, _, ids, mask = _batch(processor, model.config.text_config.vocab_size, model.config.image_token_id)
    text = [processor(text=q.removeprefix("<image>\n"))["input_ids"][0] for q in QUESTIONS]
    batch = (text, None, [0, 0, 0], ids, mask)
    plain, _, plain_grads = _run(model, batch, shared=True)
    run_tower_on_text_only(model)  # a fresh model of this test's own
    blank, _, blank_grads = _run(model, batch, shared=True)
    naive, _, _ = _run(model, batch, shared=False)
    assert torch.equal(blank, plain)
    torch.testing.assert_close(blank[mask.bool()], naive[mask.bool()], atol=1e-5, rtol=0)
    trained = {name.split(".")[1] for name in blank_grads if name.startswith("model.")}
    assert trained == {"language_model", "multi_modal_projector", "vision_tower"}
    for name, grad in blank_grads.items():
        if name in plain_grads:
            torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=0, msg=name)
        else:
            assert not grad.any(), name


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen2-tied", "llama-tied")])
def test_other_families_equal_naive(folders, family: str) -> None:
    """Qwen3 (q/k norms), Mistral (+ sliding window), Gemma-2/3 (scaled embeddings, alternating windows), Phi-3."""
    model, processor = _checkpointed(folders(family), "eager" if family == "gemma2" else "sdpa")
    batch = _batch(processor, model.config.text_config.vocab_size, model.config.image_token_id)
    window = getattr(model.config.text_config, "sliding_window", None)
    if window is not None and family != "mistral":
        assert max(len(p) for p in batch[0]) > window, "a windowed family must slide over the prompts"
    _assert_equal_to_naive(model, batch, {"language_model", "multi_modal_projector", "vision_tower"})


def test_an_unknown_family_is_refused_with_the_way_out(folders, monkeypatch) -> None:
    model, processor = _checkpointed(folders("qwen2"))
    prompts, pixels, images, ids, mask = _batch(
        processor, model.config.text_config.vocab_size, model.config.image_token_id
    )
    monkeypatch.setattr(logps_module, "LAYER_LOOP_MODEL_TYPES", ("llama",))
    with pytest.raises(AlignError, match=r"not language model type 'qwen2': use shared_prefix=False"):
        completion_logps(
            model, Completions(prompts, pixels, images, ids, mask, G), temperature=1.0, shared_prefix=True
        )
    model.eval()  # not checkpointing: the cached shared prefix, any family
    assert completion_logps(
        model, Completions(prompts, pixels, images, ids, mask, G), temperature=1.0, shared_prefix=True
    ).requires_grad


@pytest.mark.slow
def test_grpo_stage_runs_with_checkpointing_and_shared_prefix(
    siglip_qwen2: Path, tmp_path: Path, monkeypatch
) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["data", "synth", "--out", str(tmp_path / "synth"), "--train", "4", "--test", "1"]) == 0
    calls = []
    checkpointed = logps_module._checkpointed_shared_prefix_logits
    monkeypatch.setattr(
        logps_module,
        "_checkpointed_shared_prefix_logits",
        lambda *a: calls.append(1) or checkpointed(*a),
    )
    argv = [
        "grpo",
        str(ROOT / "recipes/tiny/grpo.yaml"),
        f"model={siglip_qwen2}",
        f"output_dir={tmp_path / 'out'}",
        f"data.sources.0.path={tmp_path / 'synth/train/rl.jsonl'}",
        "run.tensorboard=false",
        "run.gradient_checkpointing=true",
        "grpo.shared_prefix=true",
        "grpo.max_completion_length=8",
        "run.max_steps=2",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0, stdout.getvalue()[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["grad_norm"] > 0
    assert len(calls) == 2  # one policy forward per step went through the checkpointed layer pairs
