"""The demo's attribute probe: does the LLM see each object's colour, shape and position through the projector?

Projector alignment (stage 1) teaches the projector to "tell" the frozen LLM what is in the image, so it is
measured by what it is for: for every held-out scene, the model's log-likelihood of the scene's caption
(the object-list style, after "Describe the image.") against three captions that differ from it in one
attribute of one object: another colour, another shape, or the object moved to an empty cell. A pair scores
1 when the true caption is the more likely one (0.5 on a tie), so chance is 0.5 for each attribute, whatever
the LLM's text prior; a model that sees nothing (the assembled model's untrained projector) stays near it.

The pipeline calls it after every stage (``eval.probe: align.demo_probe:attribute_probe`` in
``recipes/demo/pipeline.yaml``, on the test scenes) and reports each attribute's mean, standard error and paired gain.
Run alone::

    .venv/bin/python -c "from align.demo_probe import attribute_probe as p; \\
        s = p('checkpoints/demo/projector/model', 'checkpoints/demo-cache/synth/val'); print({k: sum(v) / len(v) for k, v in s.items()})"
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from align.data.config import DEFAULT_MAX_IMAGE_PIXELS
from align.data.encode import IGNORE_INDEX, encode_sft
from align.data.images import pixel_values
from align.data.sample import Sample
from align.data.synth import CAPTION_PROMPTS
from align.data.synth_scenes import ATTRIBUTES, caption, distractor


def pair_score(true_logp: float, other_logp: float) -> float:
    """1 if the true caption is the more likely, 0.5 on a tie, else 0."""
    return 1.0 if true_logp > other_logp else 0.5 if true_logp == other_logp else 0.0


@torch.no_grad()
def caption_logps(
    model, processor, n_image_tokens: int, image: str, captions: list[str], origin: str
) -> list[float]:
    """Sum of the model's log-probabilities of each caption's tokens (and end of turn) after the prompt."""
    tokenizer = processor.tokenizer
    encoded = [
        encode_sft(
            Sample(
                source="probe",
                origin=origin,
                messages=[
                    {"role": "user", "content": f"<image>\n{CAPTION_PROMPTS[0]}"},
                    {"role": "assistant", "content": text},
                ],
                images=[image],
            ),
            tokenizer,
            model.config.image_token_id,
            n_image_tokens,
        )
        for text in captions
    ]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([e.input_ids + [pad] * (width - len(e)) for e in encoded])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    pixels, _ = pixel_values([image], processor.image_processor, DEFAULT_MAX_IMAGE_PIXELS, [origin])
    pixels = pixels.to(model.dtype).expand(len(captions), *pixels.shape[1:])  # one image, decoded once
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.float()
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (targets != IGNORE_INDEX)).sum(1).tolist()


def attribute_probe(model_dir: str | Path, scenes_dir: str | Path, seed: int = 0) -> dict[str, list[float]]:
    """Per held-out scene, the pair score for each attribute and their mean ("all"): lists in scene order."""
    from align.checkpoint import image_seq_len, load_llava
    from align.demo import read_scenes

    model, processor = load_llava(model_dir)
    model.eval()
    n_image_tokens = image_seq_len(processor)
    scores: dict[str, list[float]] = {name: [] for name in (*ATTRIBUTES, "all")}
    for index, (image, scene) in enumerate(read_scenes(Path(scenes_dir))):
        rng = random.Random(f"probe:{seed}:{index}")
        texts = [caption(scene, 0)] + [caption(distractor(scene, a, rng), 0) for a in ATTRIBUTES]
        origin = f"{scenes_dir}/scenes.jsonl:{index}"
        true_logp, *others = caption_logps(model, processor, n_image_tokens, image, texts, origin)
        row = [pair_score(true_logp, other) for other in others]
        for name, value in zip(ATTRIBUTES, row, strict=True):
            scores[name].append(value)
        scores["all"].append(sum(row) / len(row))
    return scores
