"""The sampler's decode step for Llama-family language models (Llama, Qwen2): the same math, fewer ops.

At decode time each forward processes one token per row, so a small model's step is mostly overhead, and the
Hugging Face module stack adds plumbing to every token: a causal mask rebuilt, a ``DynamicCache`` grown by
``torch.cat`` (copying every layer's K/V), keyword routing through the Llava wrapper. :class:`StaticDecoder`
runs the language model's own weights directly: K/V buffers allocated once for the prompt plus
``max_new_tokens``, one additive mask, ``F.rms_norm``, each row's rotary angles looked up once per rollout, q
and k rotated together, and ``scaled_dot_product_attention`` with grouped K/V heads. RMSNorm is computed in
float32 and cast back as the HF modules do.

Small models (all projections together at most ``PACK_LIMIT_BYTES``) also get their weights packed once per
rollout: q/k/v into one matrix, gate/up into one, every matrix stored ``[in, out]`` contiguous. Their decode
step is per-call overhead more than arithmetic, and on CPU a contiguous ``[in, out]`` matmul beats
``F.linear``'s transposed one (16 x 128 by 128 x 64: 4.7 vs 15 µs). A large model's decode is bound by reading
its weights, and the copy would double them in memory, so it uses them in place.

The tests compare greedy tokens and their log-probs with the HF path (fp32 |Δ| < 1e-5, and bf16), rows
leaving the batch included, packed and in place. What it bought in the GRPO benchmark is in
``benchmarks/README.md``.

:func:`unsupported_reason` says why a model must take the HF path instead (another architecture, LoRA
layers, sliding-window attention, a non-SiLU MLP, ...); the sampler then uses HF's forward, so nothing
silently changes meaning. The decoder never runs backward and knows nothing about distribution: under
ZeRO-3 the engine has gathered the parameters before the sampler runs.

Run the tests: ``.venv/bin/pytest -q tests/test_sampler.py -k decoder``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Only these: Qwen3 and Gemma-3 normalise q/k per head, Gemma scales embeddings and soft-caps, Mistral slides
# its window, Phi-3 fuses qkv and gate/up; StaticDecoder computes none of that, so those sample through HF.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# packing pays where per-call overhead dominates (tiny/demo models are a few MB); 256 MB is ~64M fp32
# parameters, well before a decode step becomes bound by reading the weights
PACK_LIMIT_BYTES = 256 * 2**20


def unsupported_reason(model: Any) -> str | None:
    """None when :class:`StaticDecoder` computes exactly what ``model`` (a Llava) computes, else why not."""
    config = model.config.text_config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"language model type {config.model_type!r} (the plain decoder knows {SUPPORTED_MODEL_TYPES})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in getattr(config, "layer_types", None) or []
    ):
        return "sliding-window attention"
    lm = model.model.language_model
    if lm.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout in training mode"
    for layer in lm.layers:
        for name in (*_LINEARS, *_MLP):
            if type(layer.get_submodule(name)) is not nn.Linear:  # LoRA and other wrappers change the math
                return f"{name} is a {type(layer.get_submodule(name)).__name__}, not a plain Linear"
    return None


class _Projection:
    """``x`` -> the outputs of one or more ``nn.Linear`` side by side; packed: one matmul on an ``[in, out]`` copy."""

    def __init__(self, linears: list[nn.Linear], pack: bool):
        self.linears = None if pack else linears
        if pack:
            self.weight = torch.cat([linear.weight for linear in linears]).t().contiguous()
            self.bias = None
            if any(linear.bias is not None for linear in linears):  # a missing bias is a zero bias
                self.bias = torch.cat(
                    [
                        linear.weight.new_zeros(linear.out_features) if linear.bias is None else linear.bias
                        for linear in linears
                    ]
                )

    def __call__(self, x: Tensor) -> Tensor:
        if self.linears is not None:
            outs = [F.linear(x, linear.weight, linear.bias) for linear in self.linears]
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


class StaticDecoder:
    """Decodes one token per row per call, continuing a prefilled ``DynamicCache`` of N rows.

    Every row writes slot ``P + t`` at call ``t`` (rows advance together; finished rows are removed with
    :meth:`keep`, never left behind), so one additive mask serves all layers and steps: the prompt's
    left-padding followed by the generated slots.
    """

    def __init__(self, model: Any, cache: Any, prompt_mask: Tensor, max_new_tokens: int):
        self.lm = model.model.language_model
        config = model.config.text_config
        self.eps = config.rms_norm_eps
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads = (config.num_attention_heads, config.num_key_value_heads)
        self.scale = self.lm.layers[0].self_attn.scaling
        linears = [layer.get_submodule(name) for layer in self.lm.layers for name in (*_LINEARS, *_MLP)]
        size = sum(linear.weight.nelement() * linear.weight.element_size() for linear in linears)
        size += model.lm_head.weight.nelement() * model.lm_head.weight.element_size()
        pack = size <= PACK_LIMIT_BYTES
        self.projections = []
        for layer in self.lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.projections.append(
                (
                    _Projection([attn.q_proj, attn.k_proj, attn.v_proj], pack),
                    _Projection([attn.o_proj], pack),
                    _Projection([mlp.gate_proj, mlp.up_proj], pack),
                    _Projection([mlp.down_proj], pack),
                )
            )
        self.lm_head = _Projection([model.lm_head], pack)
        n, prompt_len = prompt_mask.shape
        width = prompt_len + max_new_tokens
        self.keys, self.values = [], []
        for layer in cache.layers:
            k = layer.keys.new_empty(n, config.num_key_value_heads, width, self.head_dim)
            v = layer.values.new_empty(n, config.num_key_value_heads, width, self.head_dim)
            k[:, :, :prompt_len] = layer.keys
            v[:, :, :prompt_len] = layer.values
            self.keys.append(k)
            self.values.append(v)
        # 0 where a slot is attended, -inf on the prompt's left padding: added to the scores (sdpa converts a
        # boolean mask into this on every call)
        self.mask = self.keys[0].new_zeros(n, width)
        self.mask[:, :prompt_len].masked_fill_(prompt_mask == 0, float("-inf"))
        self.prompt_len = self.slot = prompt_len
        # each row's rotary angles for every step it can take, looked up once: [n, max_new_tokens, head_dim]
        device = prompt_mask.device
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(max_new_tokens, device=device)
        probe = self.keys[0].new_empty(1, 1, self.head_dim)
        cos, sin = self.lm.rotary_emb(probe, torch.arange(int(positions.max()) + 1, device=device)[None])
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * sin with its first half negated: one op instead of four
        sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self.cos, self.sin = cos[0][positions], sin[positions]

    def keep(self, rows: Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch), as ``DynamicCache.batch_select_indices``."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.mask = self.mask[rows]
        self.cos, self.sin = self.cos[rows], self.sin[rows]

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the same arithmetic in one op
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Float32 logits ``[n, V]`` for the next token after ``tokens`` ``[n]`` (one per row, in row order)."""
        n = tokens.shape[0]
        s = self.slot
        t = s - self.prompt_len
        mask = self.mask[:, None, None, : s + 1]
        cos = self.cos[:, t, None, :]  # [n, 1, head_dim]: the same angles for every head of a row
        sin = self.sin[:, t, None, :]
        half = self.head_dim // 2
        heads, kv_heads = self.heads
        h = F.embedding(tokens, self.lm.embed_tokens.weight)  # [n, d]
        for layer, (qkv, o, gate_up, down), k_buf, v_buf in zip(
            self.lm.layers, self.projections, self.keys, self.values, strict=True
        ):
            x = self._norm(h, layer.input_layernorm.weight)
            x = qkv(x).view(n, heads + 2 * kv_heads, self.head_dim)
            qk = x[:, : heads + kv_heads]
            qk = qk * cos + qk.roll(half, -1) * sin  # q and k rotated together
            k_buf[:, :, s] = qk[:, heads:]
            v_buf[:, :, s] = x[:, heads + kv_heads :]
            out = F.scaled_dot_product_attention(
                qk[:, :heads, None],  # [n, heads, 1, head_dim]
                k_buf[:, :, : s + 1],
                v_buf[:, :, : s + 1],
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            h = h + o(out.view(n, heads * self.head_dim))
            x = self._norm(h, layer.post_attention_layernorm.weight)
            gate, up = gate_up(x).chunk(2, dim=-1)
            h = h + down(F.silu(gate) * up)
        self.slot = s + 1
        return self.lm_head(self._norm(h, self.lm.norm.weight)).float()
