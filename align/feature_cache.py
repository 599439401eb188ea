"""Frozen-tower feature cache for projector alignment.

When the vision tower is frozen its selected-layer features (after CLS handling, before the projector) are a
pure function of the image, the tower weights and the preprocessing. They are computed once per image and
reused across epochs, in memory or on disk. The cache key covers the tower weights, the image processor's
settings, the feature layer and the selection strategy, so a changed encoder or processor never reuses
stale features. Image keys are file path + size + mtime, or a hash of the pixels for in-memory images.

Cached features live in host memory (and on disk in ``disk`` mode), never on the accelerator: one
SigLIP-so400m/384 image is 729 x 1152 values, so a large caption set only fits where memory is plentiful. The
cache pays off when images are seen more than once (several epochs, or rows sharing an image).

Benchmark: ``python benchmarks/bench_feature_cache.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def _without_pooling_head(vision_tower: nn.Module) -> Iterator[None]:
    """Skip SigLIP's attention-pooling head, whose output Llava never reads.

    Besides wasted compute, the head is an ``nn.MultiheadAttention`` that reads ``out_proj.weight`` without
    calling ``out_proj``, so under ZeRO-3 that weight is never gathered and the forward fails.
    """
    inner = getattr(vision_tower, "vision_model", vision_tower)
    if not getattr(inner, "use_head", False):
        yield
        return
    inner.use_head = False
    try:
        yield
    finally:
        inner.use_head = True


def tower_features(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int | list[int], strategy: str
) -> torch.Tensor:
    """Selected hidden states exactly as ``LlavaModel.get_image_features`` selects them (without projecting).

    A ``feature_layer`` list concatenates those hidden states along features, in list order, each without its
    CLS token under the ``default`` strategy.
    """
    with _without_pooling_head(vision_tower):
        out = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    feats = [out.hidden_states[layer] for layer in layers]
    if strategy == "default":
        feats = [f[:, 1:] for f in feats]
    return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


def cache_fingerprint(
    vision_tower: nn.Module, processor_config: dict, feature_layer: int | list[int], strategy: str
) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(vision_tower.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps(processor_config, sort_keys=True, default=str).encode())
    h.update(f"{feature_layer}/{strategy}".encode())
    return h.hexdigest()[:16]


def image_key(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        st = os.stat(image)
        return hashlib.sha256(f"{os.path.abspath(image)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[
            :24
        ]
    return hashlib.sha256(image.tobytes() + str(image.size).encode()).hexdigest()[:24]


class FeatureCache:
    """``get(images, compute)`` -> [n, tokens, hidden] features, computing only the ones not cached."""

    def __init__(self, fingerprint: str, mode: str, directory: Path | None = None):
        if mode not in ("memory", "disk"):
            raise ValueError(f"feature cache mode must be memory or disk, got {mode!r}")
        self.mode = mode
        self.memory: dict[str, torch.Tensor] = {}
        self.directory = None if directory is None else Path(directory) / fingerprint
        if mode == "disk":
            if self.directory is None:
                raise ValueError("a disk feature cache needs a directory")
            self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _load(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.mode == "disk":
            path = self.directory / f"{key}.pt"
            if path.exists():
                t = torch.load(path, weights_only=True)
                self.memory[key] = t
                return t
        return None

    def _store(self, key: str, features: torch.Tensor) -> None:
        self.memory[key] = features
        if self.mode == "disk":
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            torch.save(features, tmp)
            tmp.replace(self.directory / f"{key}.pt")

    def get(self, images: list[Any], compute) -> torch.Tensor:
        """Features for ``images`` (on the host); ``compute(list_of_images) -> Tensor[n, T, H]`` fills the misses."""
        keys = [image_key(im) for im in images]
        found = [self._load(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute([images[i] for i in missing]).detach().to("cpu")
            for j, i in enumerate(missing):
                found[i] = fresh[j].clone()  # a view would keep the whole batch tensor alive
                self._store(keys[i], found[i])
        return torch.stack(found)

    def counts(self) -> dict[str, int]:
        """Lookups so far: ``feature_cache_hits`` and ``feature_cache_misses``."""
        return {"feature_cache_hits": self.hits, "feature_cache_misses": self.misses}

    @property
    def nbytes(self) -> int:
        """Host memory held by cached features."""
        return sum(t.numel() * t.element_size() for t in self.memory.values())
