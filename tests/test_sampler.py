"""Shared-prefix sampler and training forward against transformers' own generate and a naive full forward.

Models are tiny Llavas built from configs (random init, fp32, eval mode): a SigLIP tower + Qwen2 LM and a
CLIP tower + Llama LM, 16 image tokens per 32x32 image.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from align.errors import AlignError
from align.grpo.decoder import unsupported_reason
from align.grpo.logps import Completions, completion_logps, completion_logps_and_entropy
from align.grpo.sampler import (
    TOWER_ON_TEXT_ONLY,
    Rollout,
    SamplingSettings,
    SharedPrefixSampler,
    draw,
    generate,
    run_tower_on_text_only,
    warp_logits,
)

VOCAB, IMAGE_TOKEN, TOKENS_PER_IMAGE, PAD = 300, 299, 16, 0


def _tiny_llava(tower: str) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        # peakier random logits: greedy argmax never hinges on a near-tie
        initializer_range=0.2,
    )
    if tower == "siglip":  # no CLS token: keep all patches of the last layer
        vision_config = SiglipVisionConfig(image_size=32, patch_size=8, **vision)
        text_config = Qwen2Config(**text)
        select = dict(vision_feature_select_strategy="full", vision_feature_layer=-1)
    else:  # CLIP: drop the CLS token of the second-to-last layer, as LLaVA does
        vision_config = CLIPVisionConfig(image_size=32, patch_size=8, **vision)
        text_config = LlamaConfig(**text)
        select = dict(vision_feature_select_strategy="default", vision_feature_layer=-2)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_IMAGE,
        **select,
    )
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=["siglip", "clip"])
def model(request: pytest.FixtureRequest) -> LlavaForConditionalGeneration:
    return _tiny_llava(request.param)


@pytest.fixture(scope="module")
def qwen() -> LlavaForConditionalGeneration:
    return _tiny_llava("siglip")


def _image_prompts() -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """Three prompts of different lengths in one batch: two with one image each, then a text-only one."""
    image = [IMAGE_TOKEN] * TOKENS_PER_IMAGE
    prompts = [[5, 6, 7, *image, 8, 9], [11, *image, 12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22, 23, 24]]
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return prompts, pixel_values, [1, 1, 0]


def _text_prompts() -> tuple[list[list[int]], None, list[int]]:
    return [[3, 4, 5, 6, 7, 8, 9], [30, 31]], None, [0, 0]


PROMPTS = {"images": _image_prompts, "text": _text_prompts}


GREEDY = dict(
    num_generations=1,
    max_new_tokens=10,
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    eos_token_ids=[],
    pad_token_id=PAD,
)


def _sample(model, prompts, pixel_values, images, generator=None, plain_decoder=True, **overrides) -> Rollout:
    sampling = SamplingSettings(**(GREEDY | overrides))
    return generate(model, prompts, pixel_values, images, sampling, generator, plain_decoder=plain_decoder)


def _hf_greedy(model, prompt: list[int], pixel_values: torch.Tensor | None, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    # HF generate runs the vision tower whenever the key is present, even with None
    images = {} if pixel_values is None else {"pixel_values": pixel_values}
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=PAD,
        **images,
    )
    return out[0, len(prompt) :].tolist()


def _images_of(pixel_values, images_per_prompt, i):
    if pixel_values is None or images_per_prompt[i] == 0:
        return None
    start = sum(images_per_prompt[:i])
    return pixel_values[start : start + images_per_prompt[i]]


@pytest.mark.parametrize("prompt_kind", ["images", "text"])
def test_greedy_equals_hf_generate(model, prompt_kind: str) -> None:
    prompts, pixel_values, images = PROMPTS[prompt_kind]()
    rollout = _sample(model, prompts, pixel_values, images, max_new_tokens=12)
    for i, prompt in enumerate(prompts):
        expected = _hf_greedy(model, prompt, _images_of(pixel_values, images, i), 12)
        assert rollout.completion_ids[i].tolist() == expected, f"prompt {i}"
    assert rollout.is_truncated.all()
    assert rollout.lengths.tolist() == [12] * len(prompts)
    assert rollout.completion_mask.all()


def test_greedy_groups_are_identical(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()
    single = _sample(qwen, prompts, pixel_values, images)
    grouped = _sample(qwen, prompts, pixel_values, images, num_generations=4)
    assert grouped.completion_ids.shape == (12, 10)
    assert torch.equal(grouped.completion_ids, single.completion_ids.repeat_interleave(4, dim=0))


def test_sampling_is_reproducible_and_seed_dependent(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()

    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return _sample(
            qwen, prompts, pixel_values, images, num_generations=4, temperature=1.0, generator=generator
        ).completion_ids

    first = draw(0)
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))
    # different members of a group differ: each row draws on its own
    assert len({tuple(row) for row in first[:4].tolist()}) > 1


def test_draw_follows_the_distribution_and_never_draws_a_zero() -> None:
    probs = torch.tensor(
        [[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 2.0]]
    )  # row 2 unnormalised
    generator = torch.Generator().manual_seed(0)
    tokens = torch.stack([draw(probs, generator) for _ in range(20000)])  # [draws, rows]
    counts = torch.stack([torch.bincount(tokens[:, row], minlength=6) for row in range(2)]).float() / 20000
    assert counts[1].tolist() == [0, 0, 0, 0, 0, 1]
    assert counts[0, [0, 2, 5]].sum() == 0
    # 3 standard errors of a frequency near 0.5 over 20000 draws is 0.011
    assert torch.allclose(counts[0], probs[0], atol=0.011)
    assert torch.equal(
        draw(probs, torch.Generator().manual_seed(5)), draw(probs, torch.Generator().manual_seed(5))
    )


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "do_sample"),
    [(0.7, 1, 1.0, True), (1.3, 0, 1e-6, True), (1.0, 50, 1.0, False), (0.0, 0, 0.9, True)],
)
def test_settings_that_leave_one_token_equal_greedy(qwen, temperature, top_k, top_p, do_sample) -> None:
    prompts, pixel_values, images = _image_prompts()
    greedy = _sample(qwen, prompts, pixel_values, images, num_generations=2)
    sampled = _sample(
        qwen,
        prompts,
        pixel_values,
        images,
        num_generations=2,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        do_sample=do_sample,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(sampled.completion_ids, greedy.completion_ids)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, 0, 1.0),
        (0.6, 0, 1.0),
        (1.0, 5, 1.0),
        (1.0, 0, 0.8),
        (0.7, 20, 0.9),
        (2.0, 3, 0.5),
        (1.0, 400, 1.0),
    ],
)
def test_warp_logits_equals_hf_warpers(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = 4.0  # ties at the top-k boundary: HF keeps every tied token
    hf = LogitsProcessorList()
    if temperature != 1.0:
        hf.append(TemperatureLogitsWarper(temperature))
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        hf.append(TopPLogitsWarper(top_p))
    assert torch.equal(warp_logits(logits, temperature, top_k, top_p), hf(None, logits.clone()))


def test_end_of_turn_stops_masks_and_pads(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()
    free = _sample(qwen, prompts, pixel_values, images, max_new_tokens=8).completion_ids
    # stop prompt 0 at its 3rd token and prompt 2 at its 6th; choose tokens not produced earlier by them
    eos_a, eos_b = free[0, 2].item(), free[2, 5].item()
    assert eos_a not in free[0, :2].tolist() and eos_b not in free[2, :5].tolist()
    eos = [eos_a, eos_b]
    stop_at = []
    for row in free.tolist():
        hits = [t for t, token in enumerate(row) if token in eos]
        stop_at.append(hits[0] + 1 if hits else None)
    rollout = _sample(
        qwen, prompts, pixel_values, images, max_new_tokens=8, eos_token_ids=eos, pad_token_id=-1
    )
    for i, n in enumerate(stop_at):
        row = rollout.completion_ids[i].tolist()
        mask = rollout.completion_mask[i].tolist()
        if n is None:  # never met an end-of-turn token: full length, truncated, same tokens as unconstrained
            assert row == free[i].tolist() and mask == [1] * 8
            assert rollout.is_truncated[i] and rollout.lengths[i] == 8
        else:  # the end-of-turn token is the last masked-in token; pad after it
            assert row[:n] == free[i, :n].tolist() and row[n:] == [-1] * (8 - n)
            assert mask == [1] * n + [0] * (8 - n)
            assert not rollout.is_truncated[i] and rollout.lengths[i] == n
    assert stop_at[0] == 3 and stop_at[2] <= 6


def test_all_finished_stops_early_and_trims(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()
    free = _sample(qwen, prompts, pixel_values, images, max_new_tokens=3).completion_ids
    first_tokens = free[:, 0].tolist()
    rollout = _sample(qwen, prompts, pixel_values, images, max_new_tokens=50, eos_token_ids=first_tokens)
    assert rollout.completion_ids.shape == (3, 1)
    assert rollout.completion_ids[:, 0].tolist() == first_tokens
    assert not rollout.is_truncated.any()


@pytest.mark.parametrize("plain_decoder", [False, True])
def test_one_vision_pass_and_one_prefill(qwen, plain_decoder: bool) -> None:
    prompts, pixel_values, images = _image_prompts()
    tower_calls: list[int] = []
    lm_widths: list[tuple[int, int]] = []
    hooks = [
        qwen.model.vision_tower.register_forward_hook(
            lambda m, a, k, o: tower_calls.append(1), with_kwargs=True
        ),
        qwen.model.language_model.register_forward_hook(
            lambda m, a, k, o: lm_widths.append(tuple(k["inputs_embeds"].shape[:2])), with_kwargs=True
        ),
    ]
    try:
        _sample(
            qwen,
            prompts,
            pixel_values,
            images,
            num_generations=8,
            max_new_tokens=6,
            temperature=1.0,
            plain_decoder=plain_decoder,
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert len(tower_calls) == 1
    longest = max(len(p) for p in prompts)
    # one prefill over the 3 prompts, then (HF path) one single-token step for all 24 rows per new token
    # but the last; the plain decoder runs those steps without the HF module
    assert lm_widths == [(3, longest)] + ([] if plain_decoder else [(24, 1)] * 5)


def _pack_weights(monkeypatch, packed: bool) -> list[bool]:
    """Make the decoder pack its weights (the tiny models' default) or use them in place; record what it did."""
    import align.grpo.decoder as decoder

    if not packed:
        monkeypatch.setattr(decoder, "PACK_LIMIT_BYTES", 0)
    seen: list[bool] = []
    init = decoder._Projection.__init__

    def recording(self, linears, pack):
        seen.append(pack)
        init(self, linears, pack)

    monkeypatch.setattr(decoder._Projection, "__init__", recording)
    return seen


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("prompt_kind", ["images", "text"])
def test_plain_decoder_equals_the_hf_forward(model, prompt_kind: str, packed: bool, monkeypatch) -> None:
    """Same greedy tokens and log-probs, with rows leaving the batch at an end-of-turn token along the way.

    Greedy, because a sampled draw near a boundary of the cumulative distribution flips on a 1e-7 change.
    """
    assert unsupported_reason(model) is None
    pack_flags = _pack_weights(monkeypatch, packed)
    prompts, pixel_values, images = PROMPTS[prompt_kind]()
    common = dict(max_new_tokens=16, return_logps=True)
    hf_path = _sample(model, prompts, pixel_values, images, plain_decoder=False, **common)
    # the commonest greedy token ends rows early, so that the decoder drops rows as the HF cache does
    eos = int(hf_path.completion_ids[:, 1:].flatten().mode().values)
    runs = {
        plain: _sample(
            model, prompts, pixel_values, images, plain_decoder=plain, eos_token_ids=[eos], **common
        )
        for plain in (False, True)
    }
    assert len(set(runs[False].lengths.tolist())) > 1  # rows left at different steps
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    assert torch.equal(runs[True].lengths, runs[False].lengths)
    assert torch.allclose(runs[True].logps, runs[False].logps, atol=1e-5, rtol=0)
    assert pack_flags and set(pack_flags) == {packed}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(
    "tower,weights", [("siglip", "bf16"), ("clip", "bf16"), ("siglip", "fp32 + bf16 autocast")]
)
def test_plain_decoder_in_bf16_follows_the_hf_forward(
    tower: str, weights: str, packed: bool, monkeypatch
) -> None:
    """bf16 weights (ZeRO in bf16) or fp32 weights under bf16 autocast (single/DDP in bf16): RMSNorm in float32
    then cast back, as the HF modules do, so the paths agree to bf16 rounding."""
    pack_flags = _pack_weights(monkeypatch, packed)
    model = _tiny_llava(tower)
    autocast = weights != "bf16"
    if not autocast:
        model = model.to(torch.bfloat16)
    prompts, pixel_values, images = _image_prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        runs = {
            plain: _sample(
                model,
                prompts,
                pixel_values.to(torch.float32 if autocast else torch.bfloat16),
                images,
                max_new_tokens=12,
                return_logps=True,
                plain_decoder=plain,
            )
            for plain in (False, True)
        }
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    assert torch.allclose(runs[True].logps, runs[False].logps, atol=1e-2, rtol=0)
    assert pack_flags and set(pack_flags) == {packed}


def _with(model, **text_config) -> LlavaForConditionalGeneration:
    config = model.config.to_dict()
    config["text_config"].update(text_config)
    return LlavaForConditionalGeneration(type(model.config).from_dict(config)).eval()


def test_plain_decoder_refuses_what_it_does_not_compute(qwen) -> None:
    from peft import LoraConfig, get_peft_model

    reasons = {
        "mistral": unsupported_reason(_with(qwen, model_type="mistral")),
        "gelu": unsupported_reason(_with(qwen, hidden_act="gelu")),
        "sliding": unsupported_reason(_with(qwen, use_sliding_window=True, max_window_layers=0)),
        "lora": unsupported_reason(
            get_peft_model(_tiny_llava("siglip"), LoraConfig(r=2, target_modules=["q_proj"])).base_model.model
        ),
    }
    assert "'mistral'" in reasons["mistral"]
    assert "'gelu'" in reasons["gelu"]
    assert reasons["sliding"] == "sliding-window attention"
    assert "q_proj is a Linear" in reasons["lora"] and "not a plain Linear" in reasons["lora"]
    # such a model still samples, through its own forward
    gelu = _with(qwen, hidden_act="gelu")
    prompts, pixel_values, images = _image_prompts()
    rollout = _sample(gelu, prompts, pixel_values, images, max_new_tokens=5)
    for i, prompt in enumerate(prompts):
        assert rollout.completion_ids[i].tolist() == _hf_greedy(
            gelu, prompt, _images_of(pixel_values, images, i), 5
        )


def test_image_token_count_mismatch_names_the_prompt(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()
    prompts[1] = [*prompts[1][:-1], IMAGE_TOKEN]
    with pytest.raises(AlignError, match=r"prompt 1 has 17 image tokens .* give 16 features"):
        _sample(qwen, prompts, pixel_values, images)
    with pytest.raises(AlignError, match=r"sums to 2 but pixel_values holds 1"):
        _sample(qwen, prompts, pixel_values[:1], images)


def test_backend_is_the_sampler(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()
    backend = SharedPrefixSampler(qwen)
    sampling = SamplingSettings(
        num_generations=2,
        max_new_tokens=5,
        temperature=1.0,
        top_p=0.9,
        top_k=10,
        eos_token_ids=[7],
        pad_token_id=PAD,
    )
    a = backend.generate(prompts, pixel_values, images, sampling, torch.Generator().manual_seed(5))
    b = generate(qwen, prompts, pixel_values, images, sampling, torch.Generator().manual_seed(5))
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_sampler_logps_equal_the_training_forward(qwen) -> None:
    prompts, pixel_values, images = _image_prompts()
    rollout = _sample(
        qwen,
        prompts,
        pixel_values,
        images,
        num_generations=3,
        max_new_tokens=8,
        temperature=0.8,
        top_k=30,
        eos_token_ids=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # many stop tokens: varied lengths
        generator=torch.Generator().manual_seed(0),
        return_logps=True,
    )
    with torch.no_grad():
        reference = completion_logps(
            qwen,
            Completions(prompts, pixel_values, images, rollout.completion_ids, rollout.completion_mask, 3),
            temperature=0.8,
            shared_prefix=False,
        )
    mask = rollout.completion_mask.bool()
    assert (rollout.logps[~mask] == 0).all()
    torch.testing.assert_close(rollout.logps[mask], reference[mask], atol=1e-5, rtol=0)


def _completions(n_rows: int, lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, IMAGE_TOKEN, (n_rows, width), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("prompt_kind", ["images", "text"])
def test_shared_prefix_equals_naive_values_and_gradients(model, prompt_kind: str) -> None:
    prompts, pixel_values, images = PROMPTS[prompt_kind]()
    g = 3
    lengths = [9, 4, 1, 9, 7, 2, 5, 9, 3][: len(prompts) * g]
    ids, mask = _completions(len(lengths), lengths, 9)
    ids[0, 3] = IMAGE_TOKEN  # a sampled image token in a completion is text, not an image slot
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(4))

    def run(shared: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logps, entropy = completion_logps_and_entropy(
            model,
            Completions(prompts, pixel_values, images, ids, mask, g),
            temperature=0.7,
            shared_prefix=shared,
        )
        # a token-mean like the GRPO loss: gradients O(1), so 1e-5 is fp32 round-off, not a loose bound
        assert logps.requires_grad and not entropy.requires_grad  # entropy is a metric, outside the graph
        ((logps * weights * mask).sum() / mask.sum()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), entropy.detach(), grads

    shared_logps, shared_entropy, shared_grads = run(True)
    naive_logps, naive_entropy, naive_grads = run(False)
    model.zero_grad(set_to_none=True)
    on = mask.bool()
    torch.testing.assert_close(shared_logps[on], naive_logps[on], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_entropy[on], naive_entropy[on], atol=1e-5, rtol=0)
    assert shared_grads.keys() == naive_grads.keys()
    components = {name.split(".")[1] for name in shared_grads if name.startswith("model.")}
    expected = (
        {"language_model", "multi_modal_projector", "vision_tower"}
        if pixel_values is not None
        else {"language_model"}
    )
    assert components == expected
    for name, grad in shared_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=0, msg=name)
    # the plain function is the gather of the same numbers
    plain = completion_logps(
        model,
        Completions(prompts, pixel_values, images, ids, mask, g),
        temperature=0.7,
        shared_prefix=True,
    )
    torch.testing.assert_close(plain.detach()[on], shared_logps[on], atol=1e-5, rtol=0)


def _logps_and_grads(model, prompts, pixel_values, images, ids, mask, g: int, shared: bool):
    model.zero_grad(set_to_none=True)
    batch = Completions(prompts, pixel_values, images, ids, mask, g)
    logps = completion_logps(model, batch, temperature=1.0, shared_prefix=shared)
    ((logps * mask).sum() / mask.sum()).backward()  # a token mean: O(1) gradients, 1e-5 is round-off
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads


@pytest.mark.parametrize("shared", [True, False])
def test_text_only_batch_with_a_blank_image_runs_the_tower_and_changes_nothing(qwen, shared: bool) -> None:
    """What keeps multi-process ranks in step: the tower and projector run forward and backward, adding 0."""
    prompts, _, images = _text_prompts()
    ids, mask = _completions(4, [3, 1, 2, 3], 3)
    calls: list[str] = []
    hooks = [
        qwen.model.vision_tower.register_forward_hook(lambda *a: calls.append("tower")),
        qwen.model.multi_modal_projector.register_forward_hook(lambda *a: calls.append("projector")),
    ]
    try:
        plain, plain_grads = _logps_and_grads(qwen, prompts, None, images, ids, mask, 2, shared)
        assert calls == []
        run_tower_on_text_only(qwen)
        blank, blank_grads = _logps_and_grads(qwen, prompts, None, images, ids, mask, 2, shared)
        assert calls == ["tower", "projector"]
    finally:
        delattr(qwen, TOWER_ON_TEXT_ONLY)
        for hook in hooks:
            hook.remove()
    assert torch.equal(blank, plain)
    trained = {name.split(".")[1] for name in blank_grads if name.startswith("model.")}
    assert trained == {"language_model", "multi_modal_projector", "vision_tower"}
    for name, grad in blank_grads.items():
        if name in plain_grads:
            assert torch.equal(grad, plain_grads[name]), name
        else:
            assert not grad.any(), name


def test_one_token_completions_still_run_the_completion_forward(qwen) -> None:
    """Every rank calls the same modules (ZeRO-3 gathers collectively), whatever its completions' length."""
    prompts, pixel_values, images = _image_prompts()
    ids, mask = _completions(6, [1] * 6, 1)
    widths: list[int] = []
    hook = qwen.model.language_model.register_forward_hook(
        lambda m, a, k, o: widths.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        shared, shared_grads = _logps_and_grads(qwen, prompts, pixel_values, images, ids, mask, 2, True)
    finally:
        hook.remove()
    assert len(widths) == 2 and widths[1] == 1  # the prefill, then the completions (one unused column)
    naive, naive_grads = _logps_and_grads(qwen, prompts, pixel_values, images, ids, mask, 2, False)
    torch.testing.assert_close(shared, naive, atol=1e-5, rtol=0)
    assert shared_grads.keys() == naive_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, naive_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("do_sample", [False, True])
def test_the_image_token_is_never_sampled(do_sample: bool) -> None:
    model = _tiny_llava("siglip")

    def favour_image_token(module, inputs, logits):  # by far the most likely next token everywhere
        logits[..., model.config.image_token_id] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour_image_token)
    prompts, pixel_values, images = _image_prompts()
    rollout = _sample(model, prompts, pixel_values, images, do_sample=do_sample, temperature=1.0)
    assert not (rollout.completion_ids == model.config.image_token_id).any()
