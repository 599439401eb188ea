"""Padding, length grouping and packing (align/data/batching.py), with a packing parity check on a tiny Qwen2."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from align.data.batching import length_grouped_batches, pack, packed_collate, pad_collate
from align.data.encode import IGNORE_INDEX, Encoded

VOCAB = 97


def _item(length: int, prompt: int, images: int = 0, seed: int = 0, name: str = "row") -> Encoded:
    """A row of random ids whose last ``length - prompt`` tokens are supervised."""
    ids = random.Random(seed).choices(range(1, VOCAB), k=length)
    return Encoded(
        input_ids=ids,
        labels=[IGNORE_INDEX] * prompt + ids[prompt:],
        n_images=images,
        origin=f"{name}:{seed}",
        prompt_length=prompt,
        n_image_tokens=0,
        images=[f"{name}-{seed}-{k}.png" for k in range(images)],
    )


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collate(side: str) -> None:
    items = [_item(5, 2, images=1, seed=1), _item(3, 1, seed=2), _item(7, 3, images=2, seed=3)]
    batch = pad_collate(items, pad_id=0, pad_side=side)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 7)
    for row, item in enumerate(items):
        real = batch["attention_mask"][row].bool()
        assert real.sum() == len(item)
        assert batch["input_ids"][row][real].tolist() == item.input_ids
        assert batch["labels"][row][real].tolist() == item.labels
        assert (batch["input_ids"][row][~real] == 0).all() and (
            batch["labels"][row][~real] == IGNORE_INDEX
        ).all()
        # Padding sits on the requested side only.
        assert bool(real[0] if side == "right" else real[-1])
    assert batch["n_images"].tolist() == [1, 0, 2] and bool(batch["has_images"])
    assert not bool(pad_collate([_item(3, 1)], pad_id=0)["has_images"])


def _lengths(n: int, seed: int = 0) -> list[int]:
    return [random.Random(seed + i).randint(10, 2000) for i in range(n)]


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize(
    "n,batch_size,megabatch,max_padding",  # max_padding: padded tokens relative to random batches
    [(1, 4, 50, None), (7, 3, 2, None), (1000, 8, 50, 0.05), (1001, 16, 4, 0.3)],
)
def test_length_grouped_batches(n: int, batch_size: int, megabatch: int, max_padding: float | None) -> None:
    lengths = _lengths(n)
    batches = length_grouped_batches(lengths, batch_size, seed=3, epoch=0, megabatch=megabatch)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert sum(len(b) < batch_size for b in batches) <= 1 and all(len(b) <= batch_size for b in batches)
    assert max(lengths) in [lengths[i] for i in batches[0]]
    assert batches == length_grouped_batches(lengths, batch_size, seed=3, epoch=0, megabatch=megabatch)
    if max_padding is not None:
        assert batches != length_grouped_batches(lengths, batch_size, seed=3, epoch=1, megabatch=megabatch)
        assert batches != length_grouped_batches(lengths, batch_size, seed=4, epoch=0, megabatch=megabatch)
        shuffled = list(range(n))
        random.Random(0).shuffle(shuffled)
        plain = [shuffled[k : k + batch_size] for k in range(0, n, batch_size)]
        assert _padding(batches, lengths) < max_padding * _padding(plain, lengths)


def test_length_grouped_batches_edge_cases() -> None:
    assert length_grouped_batches([], 4, seed=0, epoch=0) == []
    with pytest.raises(ValueError, match="batch_size and megabatch must be >= 1"):
        length_grouped_batches([1, 2], 0, seed=0, epoch=0)


def test_pack_rows() -> None:
    items = [
        _item(n, 2, images=n % 3, seed=i) for i, n in enumerate([40, 7, 33, 64, 12, 5, 60, 20, 9, 18, 3])
    ]
    rows = pack(items, max_length=64)
    assert sorted(i for row in rows for i in row.items) == list(range(len(items)))
    assert len(rows) == -(-sum(len(it) for it in items) // 64)  # these lengths pack with no wasted row
    for row in rows:
        assert len(row) <= 64 and row.items == sorted(row.items)
        assert row.input_ids == [t for i in row.items for t in items[i].input_ids]
        assert row.images == [im for i in row.items for im in items[i].images]  # Llava fills images in order
        assert row.position_ids == [p for i in row.items for p in range(len(items[i]))]
        starts = [p for p, pos in enumerate(row.position_ids) if pos == 0]
        assert all(row.labels[s] == IGNORE_INDEX for s in starts)
        assert [x for p, x in enumerate(row.labels) if p not in starts] == [
            x for i in row.items for x in items[i].labels[1:]
        ]
    with pytest.raises(ValueError, match="row:3: 64 tokens do not fit max_length 63"):
        pack(items, max_length=63)


def test_packed_collate_pads_as_a_separate_sequence() -> None:
    rows = pack([_item(5, 1, images=1, seed=0), _item(4, 1, seed=1), _item(6, 1, seed=2)], max_length=9)
    batch = packed_collate(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["labels"].shape == (2, 9)
    assert batch["n_images"].tolist() == [row.n_images for row in rows] and bool(batch["has_images"])
    short = min(range(2), key=lambda r: len(rows[r]))
    n = len(rows[short])
    assert batch["position_ids"][short, n:].tolist() == list(range(9 - n))
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()


def _tiny_qwen2(attn: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_separate_rows(attn: str) -> None:
    model = _tiny_qwen2(attn)
    items = [_item(n, p, seed=i) for i, (n, p) in enumerate([(17, 5), (9, 2), (23, 20), (12, 4), (30, 10)])]
    rows = pack(items, max_length=48)
    assert len(rows) == 2 and all(len(row.items) > 1 for row in rows)
    batch = packed_collate(rows, pad_id=0)
    batch.pop("n_images"), batch.pop("has_images")
    with torch.no_grad():
        packed = model(**batch)
        alone = [
            model(input_ids=torch.tensor([it.input_ids]), labels=torch.tensor([it.labels])) for it in items
        ]

    for r, row in enumerate(rows):
        start = 0
        for i in row.items:
            end = start + len(items[i])
            delta = (packed.logits[r, start:end] - alone[i].logits[0]).abs().max().item()
            assert delta < 1e-5, (attn, i, delta)
            start = end
    # One mean over every supervised token = per-row means weighted by their (shifted) label counts.
    counts = [sum(label != IGNORE_INDEX for label in it.labels[1:]) for it in items]
    weighted = sum(c * out.loss.item() for c, out in zip(counts, alone, strict=True)) / sum(counts)
    assert packed.loss.item() == pytest.approx(weighted, abs=1e-5)


def test_packed_llava_fills_images_in_row_order() -> None:
    """Through a tiny Llava: packed rows with images give the same logits as each row alone."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    image_id, seq_len = VOCAB, 16  # 32x32 image, patch 8 -> 16 patches (the CLS is dropped)
    text = dict(vocab_size=VOCAB + 1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    text |= dict(num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision, text_config=Qwen2Config(**text), image_token_id=image_id)
    model = LlavaForConditionalGeneration(config).eval()

    def with_images(seed: int, n_images: int) -> Encoded:
        item = _item(12, 4, images=0, seed=seed)
        ids = item.input_ids[:2] + [image_id] * seq_len * n_images + item.input_ids[2:]
        labels = [IGNORE_INDEX] * (len(ids) - 8) + ids[-8:]
        images = [
            torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed * 10 + k))
            for k in range(n_images)
        ]
        return Encoded(ids, labels, n_images, f"llava:{seed}", len(ids) - 8, seq_len * n_images, images)

    items = [with_images(0, 1), with_images(1, 0), with_images(2, 2), with_images(3, 1)]
    rows = pack(items, max_length=64)
    assert len(rows) == 2 and any(len(row.items) > 1 and row.n_images > 1 for row in rows)
    batch = packed_collate(rows, pad_id=0)
    batch.pop("n_images"), batch.pop("has_images")
    pixel_values = torch.stack([image for row in rows for image in row.images])
    with torch.no_grad():
        packed = model(**batch, pixel_values=pixel_values).logits
        for r, row in enumerate(rows):
            start = 0
            for i in row.items:
                item = items[i]
                pixels = torch.stack(item.images) if item.images else None
                alone = model(input_ids=torch.tensor([item.input_ids]), pixel_values=pixels).logits[0]
                assert (packed[r, start : start + len(item)] - alone).abs().max().item() < 1e-5
                start += len(item)
