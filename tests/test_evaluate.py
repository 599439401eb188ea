"""align eval: numbers equal a hand-computed check, and it runs on real data in several formats."""

from __future__ import annotations

import json

import pytest
import torch

import align.evaluate as evaluate_module
from align.assemble import AssembleRecipe, assemble
from align.cli import main
from align.config import from_dict
from align.data.config import DataSource
from align.data.synth import RL_QUESTION_TEMPLATE, synthesize
from align.evaluate import evaluate, gold_answer
from align.grpo.sampler import Rollout


@pytest.fixture(scope="module")
def llava(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "m"
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")},
        "llm": {"name_or_path": str(zoo / "qwen2-r1")},
        "output_dir": str(out),
    }
    return assemble(from_dict(AssembleRecipe, spec))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, train=4, test=6, image_size=64, seed=3)
    return out


def scripted(tokenizer, replies: list[str]):
    """A stand-in for the sampler that 'generates' the given replies in order, as token ids."""
    queue = list(replies)

    def fake_generate(model, prompt_ids, pixel_values, images_per_prompt, sampling, generator=None):
        num_generations = sampling.num_generations
        texts = [queue.pop(0) for _ in range(len(prompt_ids) * num_generations)]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        width = max(len(i) for i in ids)
        out = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(out)
        for r, row in enumerate(ids):
            out[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        lengths = mask.sum(1)
        return Rollout(out, mask, lengths, torch.zeros(len(ids), dtype=torch.bool))

    return fake_generate


def test_summary_equals_hand_computed_numbers(llava, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    rows = [
        {"image": None, "problem": "How many red circles?", "solution": "2", "family": "count"},
        {"image": None, "problem": "What colour is the square?", "solution": "blue", "family": "colour"},
        {
            "image": None,
            "problem": "Are there more circles than squares?",
            "solution": "yes",
            "family": "compare",
        },
        {"image": None, "problem": "How many objects?", "solution": "5", "family": "count"},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    tokenizer = AutoTokenizer.from_pretrained(llava)
    replies = [
        "reasoning</think><answer>2</answer>",  # right, well formed (the prefill supplies <think>)
        "reasoning</think><answer>red</answer>",  # wrong, well formed
        "reasoning</think>yes",  # right (no answer tags: the text after </think>), badly formed
        "reasoning</think><answer>5</answer> trailing",  # right, badly formed (text after </answer>)
    ]
    monkeypatch.setattr(evaluate_module, "generate", scripted(tokenizer, replies))
    source = DataSource(name="rows", path=str(data), format="rl")
    summary = evaluate(llava, [source], tmp_path / "out", batch_size=3)
    groups = summary["groups"]
    assert groups["all"]["questions"] == 4
    assert groups["all"]["accuracy"] == 0.75  # 3 of 4 right
    assert groups["all"]["format"] == 0.5  # 2 of 4 well formed
    assert groups["family=count"]["accuracy"] == 1.0 and groups["family=count"]["questions"] == 2
    assert groups["family=colour"]["accuracy"] == 0.0
    assert groups["all"]["accuracy_se"] == 0.25  # std of (1, 0, 1, 1) = 0.5, over sqrt(4)
    assert groups["all"]["accuracy_ci95"] == [0.26, 1.0]  # 0.75 -+ 0.49, clipped at 1
    predictions = [
        json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["prediction"] for p in predictions] == ["2", "red", "yes", "5"]
    assert [p["rewards"]["accuracy"] for p in predictions] == [1.0, 0.0, 1.0, 1.0]
    assert predictions[0]["completion"].startswith("<think>\n"), "the R1 prefill is put back before scoring"
    assert (tmp_path / "out" / "summary.md").read_text().startswith("| group | questions | accuracy | format")


def test_pass_at_k_takes_the_best_sample(llava, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    data = tmp_path / "rows.jsonl"
    data.write_text(
        json.dumps({"problem": "2+2?", "solution": "4"})
        + "\n"
        + json.dumps({"problem": "1+1?", "solution": "2"})
        + "\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(llava)
    replies = [
        "x</think><answer>3</answer>",
        "x</think><answer>4</answer>",
        "x</think><answer>7</answer>",
        "x</think><answer>8</answer>",
    ]
    monkeypatch.setattr(evaluate_module, "generate", scripted(tokenizer, replies))
    summary = evaluate(
        llava,
        [DataSource(name="q", path=str(data), format="rl")],
        tmp_path / "out",
        samples=2,
        temperature=1.0,
    )
    assert summary["groups"]["all"]["accuracy"] == 0.25  # 1 of 4 samples
    assert summary["groups"]["all"]["pass@2"] == 0.5  # 1 of 2 questions has a right sample


def test_gold_comes_from_the_solution_or_the_final_answer() -> None:
    from align.data.sample import Sample

    rl = Sample("s", "f:1", [{"role": "user", "content": "q"}], answer="7")
    sft = Sample(
        "s",
        "f:2",
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>r</think><answer>B</answer>"},
        ],
    )
    caption = Sample(
        "s", "f:3", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a red circle"}]
    )
    assert gold_answer(rl) == "7" and gold_answer(sft) == "B"
    assert gold_answer(caption) == "a red circle"


@pytest.mark.parametrize(
    ("name", "fmt", "template"), [("rl.jsonl", "rl", RL_QUESTION_TEMPLATE), ("sft.jsonl", "messages", None)]
)
def test_real_generation_on_synthetic_test_split(llava, synth, tmp_path, capsys, name, fmt, template) -> None:
    args = [
        "eval",
        str(llava),
        "--data",
        str(synth / "test" / name),
        "--format",
        fmt,
        "--max-new-tokens",
        "6",
        "--out",
        str(tmp_path / "e"),
    ]
    if template:
        args += ["--question-template", template]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "family=" in text and "accuracy" in text
    assert "eval: batch 1/1, questions 6/6, elapsed " in text  # progress, one line per generation batch
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["questions"] == 6
    lines = (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["length"] <= 6 for line in lines)


@pytest.mark.parametrize(
    ("values", "mean", "se"),
    [
        ([1.0], 1.0, 0.0),
        ([0.0, 1.0], 0.5, 0.5),  # std 0.7071 / sqrt(2)
        ([1.0, 1.0, 1.0, 1.0], 1.0, 0.0),
        ([1.0, 0.0, 0.0, 0.0], 0.25, 0.25),  # std 0.5 / sqrt(4)
        ([0.5, 0.5], 0.5, 0.0),
    ],
)
def test_mean_and_se(values, mean, se) -> None:
    from align.evaluate import mean_and_se

    assert mean_and_se(values) == pytest.approx((mean, se))


def test_se_of_1000_binary_questions_resolves_5_points() -> None:
    """The demo's target: at p ~ 0.5, 1000 questions give SE ~ 0.016, so 5 points are > 3 SE."""
    from align.evaluate import interval95, mean_and_se

    mean, se = mean_and_se([1.0] * 500 + [0.0] * 500)
    assert se == pytest.approx(0.0158, abs=1e-4) and 3 * se < 0.05
    assert interval95(mean, se) == pytest.approx((0.469, 0.531), abs=1e-3)
    assert interval95(0.99, 0.05) == pytest.approx((0.892, 1.0))  # clipped to [0, 1]


def _pred(origin: str, acc: float | None) -> dict:
    return {"origin": origin, "rewards": {"accuracy": acc}}


@pytest.mark.parametrize(
    ("before", "after", "gain", "se", "n"),
    [
        # the same 4 questions; one more right after: +0.25, differences (0, 0, 0, 1)
        ([("a", 1), ("b", 0), ("c", 0), ("d", 0)], [("a", 1), ("b", 0), ("c", 0), ("d", 1)], 0.25, 0.25, 4),
        # paired: the same answers give gain 0 with SE 0 however noisy each accuracy is
        ([("a", 1), ("b", 0)], [("a", 1), ("b", 0)], 0.0, 0.0, 2),
        # samples: a question's score is its mean over samples; None (unscored) counts 0
        ([("a", 0), ("a", 0)], [("a", 1), ("a", None)], 0.5, 0.0, 1),
        # only shared questions count
        ([("a", 0), ("x", 1)], [("a", 1), ("y", 0)], 1.0, 0.0, 1),
    ],
)
def test_paired_gain(before, after, gain, se, n) -> None:
    from align.evaluate import paired_gain

    result = paired_gain([_pred(*p) for p in before], [_pred(*p) for p in after])
    assert result == pytest.approx((gain, se, n))


def test_paired_gain_needs_shared_questions() -> None:
    from align.evaluate import paired_gain

    with pytest.raises(ValueError, match="share no question"):
        paired_gain([_pred("a", 1)], [_pred("b", 1)])
