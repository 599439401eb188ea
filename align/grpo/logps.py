"""Per-token log-probs (and entropies) of GRPO completions under the current policy, with gradients.

This module owns the training forward of the GRPO loss: given B prompts (with their images) and the
B * G completions sampled for them (question-major rows ``q * G + g``, right-padded, as
:class:`align.grpo.sampler.Rollout` returns them), it returns ``log p(token_t | prompt, tokens_<t)`` for every
completion token, computed from ``logits / temperature`` over the whole vocabulary as TRL does.

Two ways, same numbers and same gradients (the tests check both to 1e-5 in fp32):

* ``shared_prefix=True``: the images go through the vision tower ONCE and each prompt through the language
  model ONCE (:func:`align.grpo.sampler.prefill`, with gradients); the prefix K/V cache is repeated G times
  along the batch (``repeat_interleave``, differentiable) and the G completions run against it. Prefix
  activations are computed and stored once per question instead of G times. Measured on CPU (2 shared
  cores; B=2, G=8, prompts ~94 tokens incl. 64 image tokens, completions 64 tokens; forward + backward, best
  of 7): 1.6-2.1x faster than the naive way on a tiny Qwen2 Llava (hidden 64) and 1.7-1.85x on hidden 256,
  4 layers, vocab 4000 (the language model sees 1,196 tokens instead of 2,528; the tower 2 images, not 16).
* ``shared_prefix=False``: the reference, TRL's way: each of the B * G rows is the full prompt + completion,
  images repeated per row. Image features go into the prompt part only, so a completion that happens to
  contain the image token id is scored like any other token (both ways agree on that).

With gradient checkpointing (the language model's layers checkpointed and training with gradients),
transformers drops the KV cache inside checkpointed layers, so the shared prefix runs the decoder layers
itself: the model's own forwards run once with every layer replaced by the identity, which embeds the prompts
(images scattered in, a blank image's zero added, by :func:`align.grpo.sampler.prefill`) and the completions
and builds each layer's masks and rotary angles exactly as for a cached forward (eager and sdpa are tested;
flash_attention_2 gets the 2D masks of a cached forward, as in generate, untested here without a GPU, and the
stages load sdpa; sliding-window layers keep every prompt key, their mask does the window); then each layer is ONE ``torch.utils.checkpoint`` (non-reentrant) function of
(prompt hidden ``[B, P, D]``, completion hidden ``[B * G, L, D]``): the layer on the prompts, their K/V
repeated G times, the layer on the completions against [prompt K/V, own K/V]. Backward recomputes each prompt
once per group and keeps only those two inputs per layer; the final norm and ``lm_head`` run outside. The
families it knows are :data:`LAYER_LOOP_MODEL_TYPES` (each tested against the naive path); another is refused
with the way out. Measured on CPU (``benchmarks/bench_prefix_checkpointing.py``, 1 thread on a shared machine,
best of 3; random SigLIP + Qwen2 Llava, hidden 512, 8 layers, vocab 8192; B=2, G=8, prompts 98-104 tokens incl.
64 image tokens, completions 128 tokens; forward + backward, peak RSS growth over the pass):

=============================  ========  ================
training forward               time (s)  peak memory (MB)
=============================  ========  ================
naive                          9.9       +1961
shared prefix                  7.4       +1275
naive, checkpointed            14.0      +1086
shared prefix, checkpointed    7.5       +628
=============================  ========  ================

``model`` is the ``LlavaForConditionalGeneration`` itself, not a DDP/DeepSpeed/PEFT wrapper; with
``shared_prefix=True`` it is called twice (prompts, then completions) before the one backward.

Run the tests: ``.venv/bin/pytest -q tests/test_sampler.py tests/test_grpo_prefix_checkpointing.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from align.errors import AlignError
from align.grpo.sampler import (
    blank_image_term,
    check_prompts,
    encode_images,
    filler_token,
    left_pad,
    prefill,
)


@dataclass(frozen=True)
class Completions:
    """B prompts (with their images) and the B * G completions sampled for them: rows ``q * G + g``,
    right-padded (``completion_mask`` 1 on real tokens), as :class:`align.grpo.sampler.Rollout` holds them."""

    prompt_ids: list[list[int]]
    pixel_values: Tensor | None  # every prompt's images, in prompt order
    images_per_prompt: list[int]
    completion_ids: Tensor  # [B * G, L]
    completion_mask: Tensor  # [B * G, L]
    num_generations: int

    def __post_init__(self) -> None:
        ids, mask, expected = (
            self.completion_ids,
            self.completion_mask,
            len(self.prompt_ids) * self.num_generations,
        )
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(
                f"completion_ids {tuple(ids.shape)} and completion_mask {tuple(mask.shape)} "
                "must be the same [rows, length] shape"
            )
        if ids.shape[1] == 0:
            raise ValueError("completion_ids has no columns: there is nothing to score")
        if ids.shape[0] != expected:
            raise ValueError(
                f"{ids.shape[0]} completion rows for {len(self.prompt_ids)} prompts x "
                f"num_generations={self.num_generations} (expected {expected})"
            )


def completion_logps(model: Any, batch: Completions, *, temperature: float, shared_prefix: bool) -> Tensor:
    """``[B * G, L]`` log-probs of the completion tokens (values on padding are not meaningful: mask them).

    ``temperature`` 0 means 1 (greedy rollouts are scored unscaled, as the sampler's ``return_logps`` does).
    """
    logits = _completion_logits(model, batch, temperature, shared_prefix)
    ids = batch.completion_ids.to(logits.device)
    return logits.gather(-1, ids[..., None]).squeeze(-1) - logits.logsumexp(-1)


def completion_logps_and_entropy(
    model: Any, batch: Completions, *, temperature: float, shared_prefix: bool
) -> tuple[Tensor, Tensor]:
    """:func:`completion_logps` and the ``[B * G, L]`` entropy of each next-token distribution."""
    logits = _completion_logits(model, batch, temperature, shared_prefix)
    log_probs = logits.log_softmax(-1)
    with torch.no_grad():  # a metric: recording it for backward would keep two more [rows, L, V] tensors
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    ids = batch.completion_ids.to(logits.device)
    return log_probs.gather(-1, ids[..., None]).squeeze(-1), entropy


def _checkpointing_drops_cache(language_model: torch.nn.Module) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and m.training
        for m in language_model.modules()
    )


def _completion_logits(model: Any, batch: Completions, temperature: float, shared_prefix: bool) -> Tensor:
    """``[B * G, L, V]`` float32 logits predicting each completion token, divided by ``temperature``."""
    forward = _shared_prefix_logits if shared_prefix else _full_logits
    logits = forward(
        model,
        batch.prompt_ids,
        batch.pixel_values,
        batch.images_per_prompt,
        batch.completion_ids.to(model.device),
        batch.completion_mask.to(model.device).long(),
        batch.num_generations,
    )
    return logits.float() / (temperature or 1.0)


def _shared_prefix_logits(
    model: Any,
    prompt_ids: list[list[int]],
    pixel_values: Tensor | None,
    images_per_prompt: list[int],
    completion_ids: Tensor,
    completion_mask: Tensor,
    num_generations: int,
) -> Tensor:
    if _checkpointing_drops_cache(model.model.language_model):
        return _checkpointed_shared_prefix_logits(
            model,
            prompt_ids,
            pixel_values,
            images_per_prompt,
            completion_ids,
            completion_mask,
            num_generations,
        )
    prefix = prefill(model, prompt_ids, pixel_values, images_per_prompt)
    first = prefix.last_logits.repeat_interleave(num_generations, dim=0)[:, None]
    cache = prefix.cache
    cache.batch_repeat_interleave(num_generations)
    inputs, mask, positions = _completion_inputs(
        completion_ids, completion_mask, prefix.attention_mask, prefix.next_position, num_generations
    )
    out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return torch.cat([first, out.logits[:, : completion_ids.shape[1] - 1]], dim=1)


def _completion_inputs(
    completion_ids: Tensor,
    completion_mask: Tensor,
    prompt_mask: Tensor,
    next_position: Tensor,
    num_generations: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The completion tokens fed after a shared prompt, their mask over [prompt, completion] keys, and their
    positions. The last completion token predicts nothing we score, so it is not fed; but with 1-token
    completions the forward still runs (its logits unused), so that every rank calls the same modules (ZeRO-3)."""
    inputs = completion_ids[:, : max(completion_ids.shape[1] - 1, 1)]
    mask = torch.cat(
        [prompt_mask.repeat_interleave(num_generations, dim=0), completion_mask[:, : inputs.shape[1]]], dim=1
    )
    steps = torch.arange(inputs.shape[1], device=inputs.device)
    positions = next_position.repeat_interleave(num_generations)[:, None] + steps
    return inputs, mask, positions


# Language models whose forward the checkpointed shared prefix is tested against (tests/
# test_grpo_prefix_checkpointing.py): embeddings in (scaled where the family scales them), each decoder layer
# called once, in order, with its mask and rotary angles, then the final ``norm``.
LAYER_LOOP_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3")


def _checkpointed_shared_prefix_logits(
    model: Any,
    prompt_ids: list[list[int]],
    pixel_values: Tensor | None,
    images_per_prompt: list[int],
    completion_ids: Tensor,
    completion_mask: Tensor,
    num_generations: int,
) -> Tensor:
    """The shared prefix when the language model's layers are checkpointed: each layer is ONE checkpointed
    function of (prompt hidden states, completion hidden states), so that backward recomputes each prompt once
    per group, and only the two inputs of each layer are kept (see the module docstring)."""
    text_config = model.config.text_config
    if text_config.model_type not in LAYER_LOOP_MODEL_TYPES:
        raise AlignError(
            f"shared_prefix=True with gradient checkpointing runs the decoder layers itself and knows "
            f"{', '.join(LAYER_LOOP_MODEL_TYPES)}, not language model type {text_config.model_type!r}: "
            "use shared_prefix=False or turn gradient checkpointing off"
        )
    lm = model.model.language_model
    layers = list(lm.layers[: text_config.num_hidden_layers])
    # The model's own forwards run with every layer the identity: they embed (images scattered in, a blank
    # image's zero added, by the sampler's prefill) and build each layer's masks and rotary angles exactly as
    # for a cached forward; the layers themselves run below. The prefill's logits are of no use here.
    with _layer_inputs(layers) as prefix_calls:
        prompt_mask = prefill(model, prompt_ids, pixel_values, images_per_prompt).attention_mask
    width = completion_ids.shape[1]
    inputs, mask, positions = _completion_inputs(
        completion_ids, completion_mask, prompt_mask, prompt_mask.sum(-1), num_generations
    )
    rows, prompt_len = inputs.shape[0], prompt_mask.shape[1]
    # A cache that holds prompt_len past tokens per row, so that the completions' masks span [prompt, completion]
    # keys; full length in every layer: sliding-window layers see all prompt keys and their mask does the window.
    sizing = DynamicCache()
    placeholder = torch.zeros(1, 1, 1, 1, device=inputs.device).expand(rows, 1, prompt_len, 1)
    for index in range(len(layers)):
        sizing.update(placeholder, placeholder, index)
    with _layer_inputs(layers) as completion_calls:
        lm(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=sizing, use_cache=False)
    prefix, hidden = prefix_calls[0][0], completion_calls[0][0]
    for layer, (_, prefix_kwargs), (_, completion_kwargs) in zip(
        layers, prefix_calls, completion_calls, strict=True
    ):
        pair = partial(
            _layer_on_prefix_and_completions, layer, prefix_kwargs, completion_kwargs, num_generations
        )
        prefix, hidden = checkpoint(pair, prefix, hidden, use_reentrant=False)
    first = model.lm_head(lm.norm(prefix[:, -1:])).repeat_interleave(num_generations, dim=0)
    return torch.cat([first, model.lm_head(lm.norm(hidden[:, : width - 1]))], dim=1)


@contextmanager
def _layer_inputs(layers: list[nn.Module]) -> Iterator[list[tuple[Tensor, dict[str, Any]]]]:
    """Inside, every layer returns its input unchanged; yields each call's (hidden states, keyword arguments)."""
    calls: list[tuple[Tensor, dict[str, Any]]] = []

    def record(index: int, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        if index != len(calls):
            raise AlignError(
                f"the language model called decoder layer {index} as call {len(calls)}: not in order"
            )
        calls.append((hidden_states, kwargs))
        return hidden_states

    # a forward set on the instance (accelerate's hooks do that) is put back afterwards
    own = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = partial(record, index)
    try:
        yield calls
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if len(calls) != len(layers):
        raise AlignError(f"the language model called {len(calls)} of its {len(layers)} decoder layers")


def _layer_on_prefix_and_completions(
    layer: nn.Module,
    prefix_kwargs: dict[str, Any],
    completion_kwargs: dict[str, Any],
    num_generations: int,
    prefix: Tensor,
    completions: Tensor,
) -> tuple[Tensor, Tensor]:
    """One decoder layer on the B prompts, then on the B * G completions against [prompt K/V x G, own K/V]."""
    cache = _RepeatedPrefixCache(num_generations)
    before = layer.gradient_checkpointing
    # checkpointed here, as a pair: the layer's own checkpointing would drop the cache
    layer.gradient_checkpointing = False
    try:
        prefix = layer(prefix, **{**prefix_kwargs, "cache": cache})
        completions = layer(completions, **{**completion_kwargs, "cache": cache})
    finally:
        layer.gradient_checkpointing = before
    return prefix, completions


class _RepeatedPrefixCache:
    """One layer's cache within :func:`_layer_on_prefix_and_completions`: the first update is the prompts'."""

    def __init__(self, num_generations: int):
        self.num_generations = num_generations
        self.prefix: tuple[Tensor, Tensor] | None = None

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.prefix is None:
            self.prefix = keys, values
            return keys, values
        g = self.num_generations
        prefix_keys, prefix_values = (t.repeat_interleave(g, dim=0) for t in self.prefix)
        return torch.cat([prefix_keys, keys], dim=-2), torch.cat([prefix_values, values], dim=-2)


def _full_logits(
    model: Any,
    prompt_ids: list[list[int]],
    pixel_values: Tensor | None,
    images_per_prompt: list[int],
    completion_ids: Tensor,
    completion_mask: Tensor,
    num_generations: int,
) -> Tensor:
    check_prompts(prompt_ids, pixel_values, images_per_prompt)
    repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
    image_token_id = model.config.image_token_id
    prompt, prompt_mask, prompt_positions = left_pad(repeated, filler_token(image_token_id), model.device)
    ids = torch.cat([prompt, completion_ids], dim=1)
    steps = torch.arange(completion_ids.shape[1], device=ids.device)
    positions = torch.cat([prompt_positions, prompt_mask.sum(-1, keepdim=True) + steps], dim=1)
    embeds = model.get_input_embeddings()(ids)
    if pixel_values is not None:  # every row gets its own copy of its prompt's images, as in TRL
        groups = torch.split(pixel_values, images_per_prompt)
        images = torch.cat([group for group in groups for _ in range(num_generations)])
        per_row = [n for n in images_per_prompt for _ in range(num_generations)]
        features = encode_images(model, prompt, images, per_row)["image"].pooler_output
        # Scatter into the prompt part only: a sampled completion may contain the image token id too.
        slots = torch.cat(
            [prompt == image_token_id, torch.zeros_like(completion_ids, dtype=torch.bool)], dim=1
        )
        embeds = embeds.masked_scatter(slots[..., None], torch.cat(features).to(embeds.dtype))
    elif (zero := blank_image_term(model)) is not None:
        embeds = embeds + zero.to(embeds.dtype)
    out = model(
        inputs_embeds=embeds,
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        position_ids=positions,
        use_cache=False,
        logits_to_keep=completion_ids.shape[1] + 1,
    )
    return out.logits[:, :-1]
