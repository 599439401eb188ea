"""LLM families beyond Qwen2/Llama: each assembles, trains (2 SFT + 2 GRPO steps) and exports with parity.

The families are the zoo's :data:`align.zoo.FAMILIES` (tiny configs, the R1-distill tokenizer and template),
built once per session by the ``families`` fixture, apart from the default zoo so that other tests do not pay
for them. Every family gets the zoo's SigLIP tower. Per family:

* assembly: the in-memory model and the saved folder reloaded by plain transformers give equal logits, and on
  text the Llava computes the LLM's own logits (Gemma-2's final soft-capping aside, which Llava does not apply);
* the GRPO sampler: greedy tokens equal transformers' greedy ``generate``, through the plain decoder only for
  the families it implements exactly, and the shared-prefix log-probs equal the naive full forward;
* the stages: ``align sft`` and ``align grpo`` (2 steps each) and ``align export`` through the CLI; the export
  reloads in transformers with the GRPO output's logits.

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_llm_families.py
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from align import checkpoint
from align.assemble import AssembleRecipe, assemble, compose
from align.checkpoint import load_llava
from align.cli import main
from align.config import from_dict
from align.data.synth import synthesize
from align.grpo.decoder import unsupported_reason
from align.grpo.logps import Completions, completion_logps
from align.grpo.sampler import SamplingSettings, generate
from align.zoo import FAMILIES, WINDOW, build_families

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
# the families StaticDecoder computes exactly; every other one must sample through the HF forward
PLAIN_DECODER = {"qwen2-tied", "llama-tied"}
QUESTION = "<image>\nHow many circles are there in the image?"


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("families")
    build_families(root)
    return root


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("families-synth")
    synthesize(root, train=4, test=1)
    return root / "train"


def recipe(zoo: Path, llm: Path, out: Path) -> AssembleRecipe:
    data = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(llm)},
        "output_dir": str(out),
    }
    return from_dict(AssembleRecipe, data, file="test.yaml")


def picture(seed: int = 0) -> Image.Image:
    noise = torch.randint(
        0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )
    return Image.fromarray(noise.numpy())


def encode(processor, question: str = QUESTION, seed: int = 0) -> tuple[list[int], torch.Tensor | None]:
    """Prompt ids with ``<image>`` expanded, and the picture's pixels (None for a text-only question)."""
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    images = [picture(seed)] if "<image>" in question else None
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    return inputs["input_ids"][0].tolist(), inputs.get("pixel_values")


def llava_logits(model, ids: list[int], pixel_values: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_assembles_with_logit_parity(
    zoo: Path, families: Path, tmp_path: Path, family: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "_noted", set())  # the fallback note prints once per process: not earlier
    r = recipe(zoo, families / family, tmp_path / "m")
    model, processor, _ = compose(r)
    out = assemble(r)
    printed = capsys.readouterr().out
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()  # transformers' own choice of kernels
    ids, pixel_values = encode(processor)
    assert ids.count(model.config.image_token_id) == model.config.image_seq_length == 64
    assert len(ids) > 2 * WINDOW, "the windowed families must slide over the prompt"
    a, b = llava_logits(model, ids, pixel_values), llava_logits(loaded, ids, pixel_values)
    assert float((a - b).abs().max()) < 1e-4

    # on text, the Llava is the LLM: the same logits over the LLM's vocabulary
    llm = AutoModelForCausalLM.from_pretrained(families / family).eval()
    text, _ = encode(processor, "How many circles?")
    with torch.no_grad():
        expected = llm(input_ids=torch.tensor([text])).logits[0]
    got = llava_logits(loaded, text, None)[:, : expected.shape[-1]]
    cap = getattr(llm.config, "final_logit_softcapping", None)
    if family == "gemma2":
        assert cap == 30.0 and "gemma2: sdpa not supported, using eager" in printed
        assert f"final_logit_softcapping {cap} is not applied" in printed
        got = torch.tanh(got / cap) * cap
    else:
        assert cap is None and "not supported" not in printed
    assert float((got - expected).abs().max()) < 1e-4


@pytest.fixture(scope="module")
def assembled(zoo: Path, families: Path, tmp_path_factory: pytest.TempPathFactory):
    """family -> an assembled Llava folder (built on first use)."""
    root = tmp_path_factory.mktemp("families-assembled")
    folders: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in folders:
            with contextlib.redirect_stdout(io.StringIO()):
                folders[family] = assemble(recipe(zoo, families / family, root / family))
        return folders[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_sampler_equals_greedy_generate_and_shared_prefix_equals_full(assembled, family: str) -> None:
    model, processor = load_llava(assembled(family))
    model.eval()
    reason = unsupported_reason(model)
    assert (reason is None) == (family in PLAIN_DECODER), reason
    encoded = [
        encode(processor),
        encode(processor, "<image>\nWhat colour is the square on the left?", seed=1),
    ]
    prompts = [ids for ids, _ in encoded]
    pixel_values = torch.cat([pixels for _, pixels in encoded])
    pad = processor.tokenizer.pad_token_id
    rollout = generate(
        model,
        prompts,
        pixel_values,
        [1, 1],
        SamplingSettings(
            num_generations=2,
            max_new_tokens=12,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            eos_token_ids=[],
            pad_token_id=pad,
        ),
        None,
    )
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        expected = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixel_values[i : i + 1],
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=pad,
        )[0, len(prompt) :]
        for g in range(2):
            assert rollout.completion_ids[2 * i + g].tolist() == expected.tolist(), (family, i, g)
    batch = Completions(prompts, pixel_values, [1, 1], rollout.completion_ids, rollout.completion_mask, 2)
    with torch.no_grad():
        shared = completion_logps(model, batch, temperature=1.0, shared_prefix=True)
        full = completion_logps(model, batch, temperature=1.0, shared_prefix=False)
    assert float((shared - full).abs().max()) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_two_sft_and_two_grpo_steps_then_export_with_parity(
    assembled, synth: Path, tmp_path: Path, family: str
) -> None:
    base = assembled(family)
    common = ["run.tensorboard=false", "run.max_steps=2"]
    sft = [
        "sft",
        str(TINY / "sft.yaml"),
        f"model={base}",
        f"output_dir={tmp_path / 'sft'}",
        f"data.sources.0.path={synth / 'sft.jsonl'}",
        "run.micro_batch_size=2",
        "run.grad_accum=1",
        *common,
    ]
    grpo = [
        "grpo",
        str(TINY / "grpo.yaml"),
        f"model={tmp_path / 'sft'}",
        f"output_dir={tmp_path / 'grpo'}",
        f"data.sources.0.path={synth / 'rl.jsonl'}",
        "grpo.num_generations=2",
        "grpo.max_completion_length=8",
        *common,
    ]
    export = ["export", str(tmp_path / "grpo"), "--out", str(tmp_path / "export")]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        for argv in (sft, grpo, export):
            assert main(argv) == 0, printed.getvalue()[-2000:]
    for stage in ("sft", "grpo"):
        assert len((tmp_path / stage / "metrics.jsonl").read_text().splitlines()) == 2, stage
    trained, processor = load_llava(tmp_path / "grpo")
    before, _ = load_llava(base)
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any(".language_model." in k for k in moved), "the LLM did not train"
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    ids, pixel_values = encode(processor)
    a = llava_logits(trained.eval(), ids, pixel_values)
    b = llava_logits(exported, ids, pixel_values)
    assert float((a - b).abs().max()) < 1e-5
