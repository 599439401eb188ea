"""Batching of :class:`~align.data.encode.Encoded` rows: padding, length grouping and packing.

This module owns the tensors a training step feeds the model; it knows nothing of devices or ranks.

* :func:`pad_collate` pads a list of rows (right for training, left for generation).
* :func:`length_grouped_batches` shuffles, then groups rows of similar length (megabatches, as LLaVA's and
  transformers' length-grouped samplers do) so padding stays small. Deterministic in ``(seed, epoch)``.
* :func:`pack` puts several rows into one sequence of at most ``max_length`` tokens and :func:`packed_collate`
  turns packed rows into ``input_ids``, ``labels`` and ``position_ids`` restarting at 0 for every row, with NO
  ``attention_mask``. transformers (``masking_utils.find_packed_sequence_indices``) then reads the row
  boundaries from the position ids and builds a block-diagonal causal mask for sdpa and eager attention alike
  (no flash-attention needed). That detection only runs when there is no KV cache, so the batch carries
  ``use_cache=False``; do not override it. The first token of every packed row has label -100, so no token is
  ever predicted from the previous row.

Images: Llava writes image features into the image-token positions in order (``masked_scatter`` over the
flattened batch), so the images of a batch must be given in row order. Each :class:`PackedRow` lists its
``images`` in that order; for padded batches use ``[image for item in items for image in item.images]``.

Text-only batches: with DDP or ZeRO-3 every rank must run the vision tower at every step, or ranks wait on
each other's collectives (and unused parameters break DDP's reducer). Both collates return ``has_images`` and
``n_images``; a stage seeing ``has_images == False`` runs the vision tower and projector on one dummy image and
adds ``0 * features.sum()`` to the loss, so gradients (zero) flow through the same parameters on every rank.
``n_images`` and ``has_images`` are for the loop: pop them before calling the model.

Try it::

    HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/test_batching.py
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from align.data.encode import IGNORE_INDEX, Encoded


def _image_counts(counts: Sequence[int]) -> dict[str, torch.Tensor]:
    n_images = torch.tensor(list(counts), dtype=torch.long)
    return {"n_images": n_images, "has_images": n_images.sum() > 0}


def pad_collate(
    items: Sequence[Encoded], pad_id: int, pad_side: Literal["right", "left"] = "right"
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) of shape (batch, longest), plus image counts."""
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    longest = max(len(item) for item in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item)
        where = slice(0, n) if pad_side == "right" else slice(longest - n, longest)
        input_ids[row, where] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, where] = torch.tensor(item.labels, dtype=torch.long)
        attention_mask[row, where] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        **_image_counts([item.n_images for item in items]),
    }


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, megabatch: int = 50
) -> list[list[int]]:
    """Batches of indices into ``lengths``; each index exactly once, similar lengths together.

    Indices are shuffled, cut into megabatches of ``megabatch * batch_size``, sorted by length inside each
    megabatch and cut into batches; batch order is shuffled again so a run does not see a length curriculum.
    The batch holding the longest row goes first: if it does not fit in memory, the run fails at step 1.
    Only the very last batch of the last megabatch can be smaller than ``batch_size``.
    """
    if batch_size < 1 or megabatch < 1:
        raise ValueError(f"batch_size and megabatch must be >= 1, got {batch_size} and {megabatch}")
    if not lengths:
        return []
    rng = random.Random(f"length-grouped:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = batch_size * megabatch
    batches = []
    for start in range(0, len(order), size):
        group = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


@dataclass(frozen=True)
class PackedRow:
    """Several encoded rows laid end to end; ``items`` are their indices in the list given to :func:`pack`."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    items: list[int]
    lengths: list[int]
    images: list[Any]  # the items' images in token order: what Llava's masked_scatter expects
    image_origins: list[str]  # the row (file:line) of each image, for errors

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_images(self) -> int:
        return len(self.images)


def _bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: each row goes into the fullest bin it still fits, longest rows first."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    return [sorted(b) for b in bins]  # data order inside a row


def pack(items: Sequence[Encoded], max_length: int) -> list[PackedRow]:
    """Pack ``items`` (already fitted to ``max_length``) into as few rows of at most ``max_length`` tokens."""
    too_long = [item for item in items if len(item) > max_length]
    if too_long:
        raise ValueError(
            f"{too_long[0].origin}: {len(too_long[0])} tokens do not fit max_length {max_length} "
            f"({len(too_long)} such rows); apply fit_length before packing"
        )
    rows = []
    for members in _bins([len(item) for item in items], max_length):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        images: list[Any] = []
        origins: list[str] = []
        for i in members:
            item = items[i]
            input_ids += item.input_ids
            # Nothing predicts a row's first token: the previous row's last token would otherwise be asked to.
            labels += [IGNORE_INDEX, *item.labels[1:]]
            position_ids += range(len(item))
            images += item.images
            origins += [item.origin] * len(item.images)
        rows.append(
            PackedRow(
                input_ids, labels, position_ids, members, [len(items[i]) for i in members], images, origins
            )
        )
    return rows


def image_origins(units: Sequence[Encoded | PackedRow]) -> list[str]:
    """The row (file:line) of every image of ``units``, in the order of ``[im for u in units for im in u.images]``."""
    return [
        origin
        for u in units
        for origin in (u.image_origins if isinstance(u, PackedRow) else [u.origin] * len(u.images))
    ]


def packed_collate(rows: Sequence[PackedRow], pad_id: int) -> dict[str, Any]:
    """``input_ids``, ``labels``, ``position_ids`` and ``use_cache=False`` for packed rows, plus image counts.

    There is deliberately no ``attention_mask``: transformers builds the per-row causal mask from the position
    ids. Padding gets positions 0, 1, ... of its own, so it forms a separate sequence nothing real attends to.
    """
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row)
        input_ids[r, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[r, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[r, n:] = torch.arange(longest - n)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "use_cache": False,
        **_image_counts([row.n_images for row in rows]),
    }
