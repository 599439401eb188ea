"""The ``kind: distill`` recipe and what it builds: the teacher and the image describer.

Owns the schemas :class:`DistillRecipe`, :class:`TeacherSpec` and :class:`DescriptionSpec` (their combination
checks raise :class:`~align.config.RecipeError` at the key), :func:`build_teacher` (the only place the API key
is read from the environment) and the describers (``Sample -> description``) :func:`column_description` and
:func:`captioner_description`. The run itself is :mod:`align.data.distill`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from align.config import MAX_SEED, MAX_TOKENS, RecipeError, ranged
from align.data.config import DataConfig
from align.data.distill_rows import Rejected
from align.data.distill_teacher import HFCaptioner, HFTeacher, Messages, OpenAITeacher, TeacherReply
from align.data.sample import Sample
from align.errors import AlignError

Teacher = Callable[[Messages], TeacherReply]
Describe = Callable[[Sample], str | None]


@dataclass
class DescriptionSpec:
    column: str | None = None  # a field of each input row that holds the image description
    captioner: str | None = None  # or: a local image-text model folder that writes one per image
    prompt: str = "Describe the image in detail."  # captioner only
    max_new_tokens: int = ranged(256, ge=1, le=MAX_TOKENS)  # captioner only

    def check(self) -> None:
        if (self.column is None) == (self.captioner is None):
            raise RecipeError.at(
                "column", "set exactly one of 'column' (a row field) or 'captioner' (a model)"
            )
        if not self.prompt.strip():
            raise RecipeError.at("prompt", "must not be empty")


@dataclass
class TeacherSpec:
    backend: Literal["openai", "hf"]
    model: str  # openai: the model name the server serves; hf: a local causal LM folder
    base_url: str | None = None  # openai: e.g. http://localhost:8000/v1 (POST {base_url}/chat/completions)
    api_key_env: str | None = None  # openai: name of the environment variable holding the API key
    temperature: float = ranged(0.6, ge=0, note="0: greedy")  # the R1 distills' recommended temperature
    max_tokens: int = ranged(8192, ge=1, le=MAX_TOKENS)  # per reply, reasoning included
    timeout: float = ranged(600.0, gt=0)  # seconds a request may stay silent
    max_retries: int = ranged(5, ge=0, le=100)  # backoff * 2**retry must stay a float (overflows past ~1000)
    backoff: float = ranged(2.0, ge=0)  # seconds before the first retry; doubles each retry (with jitter)
    max_backoff: float = ranged(60.0, ge=0)  # seconds, >= backoff: the cap on any one delay
    max_concurrency: int = ranged(8, ge=1)  # rows in flight at once

    def check(self) -> None:
        if self.backend == "openai":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise RecipeError.at(
                    "base_url", f"the openai backend needs an http(s) URL, got {self.base_url!r}"
                )
        else:
            for key in ("base_url", "api_key_env"):
                if getattr(self, key) is not None:
                    raise RecipeError.at(key, "applies to the openai backend only, not 'hf'")
        if self.max_backoff < self.backoff:
            raise RecipeError.at(
                "max_backoff", f"must be >= backoff ({self.backoff:g}), got {self.max_backoff:g}"
            )


@dataclass
class DistillRecipe:
    kind: Literal["distill"]
    data: DataConfig  # rows with a gold answer: formats rl, r1_onevision or hf
    description: DescriptionSpec
    teacher: TeacherSpec
    output_dir: str
    prompt: str | None = None  # teacher prompt file; default align/prompts/distill.txt
    seed: int = ranged(0, ge=0, le=MAX_SEED)  # random:N sampling (unless data.seed), retry jitter, teacher

    def check(self) -> None:
        for i, source in enumerate(self.data.sources):
            if source.format in ("llava", "messages"):
                raise RecipeError.at(
                    f"data.sources[{i}].format",
                    f"'{source.format}' rows have no gold answer to verify against; use rl, r1_onevision or hf",
                )
            if source.repeat != 1 or source.weight is not None:
                raise RecipeError.at(
                    f"data.sources[{i}]", "distill reads each row once: remove 'repeat' and 'weight'"
                )


def column_description(column: str) -> Describe:
    """Descriptions read from the row field ``column``."""

    def describe(sample: Sample) -> str | None:
        value = sample.meta.get(column)
        return value if isinstance(value, str) else None

    return describe


def captioner_description(caption: Callable[[str], str]) -> Describe:
    """Descriptions written by ``caption(image_path)``; several images are numbered."""

    def describe(sample: Sample) -> str | None:
        try:
            texts = [caption(str(image)) for image in sample.images]
        except AlignError as err:
            raise Rejected("image_error", str(err)) from None
        if len(texts) == 1:
            return texts[0]
        return "\n\n".join(f"Image {i}: {t}" for i, t in enumerate(texts, 1)) if all(texts) else None

    return describe


def build_teacher(spec: TeacherSpec, seed: int) -> Teacher:
    """The teacher a recipe names; the API key is read from the environment here and nowhere else."""
    if spec.backend == "hf":
        return HFTeacher(spec.model, temperature=spec.temperature, max_tokens=spec.max_tokens, seed=seed)
    api_key = None
    if spec.api_key_env is not None:
        api_key = os.environ.get(spec.api_key_env)
        if not api_key:
            raise AlignError(
                f"teacher.api_key_env: environment variable {spec.api_key_env} is not set or empty"
            )
    return OpenAITeacher(
        spec.base_url or "",
        spec.model,
        api_key=api_key,
        api_key_env=spec.api_key_env,
        temperature=spec.temperature,
        max_tokens=spec.max_tokens,
        timeout=spec.timeout,
    )


def build_describe(spec: DescriptionSpec, max_image_pixels: int) -> Describe:
    """The describer a recipe names; a captioner may be a model folder or a stage output (its model/)."""
    from align.checkpoint import resolve_model_folder

    if spec.column is not None:
        return column_description(spec.column)
    captioner = HFCaptioner(
        str(resolve_model_folder(spec.captioner or "", expect=None)),  # any image-text-to-text model
        prompt=spec.prompt,
        max_new_tokens=spec.max_new_tokens,
        max_image_pixels=max_image_pixels,
    )
    return captioner_description(captioner)
