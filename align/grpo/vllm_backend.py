"""vLLM as the GRPO rollout backend (``grpo.rollout.backend: vllm``): colocated or as a separate server.

This module owns talking to vLLM: turning our prompts into vLLM inputs, vLLM's outputs into a
:class:`~align.grpo.sampler.Rollout`, and pushing the policy's weights into vLLM. It imports vLLM lazily (only
:class:`VLLMColocated` does), so that align installs, tests and runs its demo without it; vLLM is the optional
extra ``pip install -e ".[vllm]"``.

* **colocate** (TRL's default, ``vllm_mode: colocate``): :class:`VLLMColocated` runs ``vllm.LLM`` inside each
  training process, its engine core in-process too (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weight chunks
  reach the worker as tensors (``vllm_gpu_memory_utilization`` of the GPU; ``vllm_enable_sleep_mode`` frees
  its weights and KV cache between rollout phases). With several processes each gets its own engine through
  vLLM's ``external_launcher`` executor (TRL's setup, tensor parallel 1). Tested here on CPU in one process
  (``tests/vllm_scripts/colocated.py``); several processes, GPUs and sleep mode are written as TRL does them
  but untested.
* **server** (``vllm_mode: server``, R1-V's "7 GPUs train, 1 generates"): :class:`VLLMServer` talks HTTP to
  a vLLM server started on its own GPUs with::

      VLLM_SERVER_DEV_MODE=1 PYTHONPATH=<this repository> python -m vllm.entrypoints.openai.api_server \\
          --model <grpo input model folder> --enable-scale-out --logprobs-mode processed_logprobs \\
          --worker-extension-cls align.grpo.vllm_worker.WeightSync

  (rows with several images: ``--limit-mm-per-prompt '{"image": N}'``). Rollouts go through vLLM's token-in/token-out endpoint ``POST /inference/v1/generate`` (``--enable-scale-out``),
  images as ``content_parts`` PNG data URLs; each rank sends its own questions. Weight updates: rank 0 writes
  each chunk as a safetensors file into a temporary folder and calls ``POST /collective_rpc`` (dev mode) with
  :meth:`align.grpo.vllm_worker.WeightSync.align_update_file` between ``align_update_begin`` and
  ``align_update_end``, then resets the prefix, multi-modal and encoder caches (``POST /reset_*_cache``). That file
  transport needs the server to see this machine's ``/tmp`` (same host: loopback, or the trainer's rank 0 on the
  server's node) and costs a disk round trip per chunk. A server on other nodes needs the tensors broadcast over
  NCCL instead: vLLM 0.32's own weight-transfer engine (``/init_weight_transfer_engine``,
  ``/start_weight_update``, ``/update_weights``, ``/finish_weight_update`` with its ``nccl`` backend) or TRL's
  ``vllm_client``; that is **not implemented** here.

The ``<image>`` expansion is vLLM's: our prompts hold each image's n image tokens already
(:func:`align.data.encode.encode_prompt`), and vLLM 0.32 given a token prompt with ``multi_modal_data`` expands
the first image token again (73 ids became 136 here), so :func:`collapse_image_tokens` sends one image token per
image and the backends check that the ids vLLM reports back equal ours.

Log-probs: vLLM runs with ``logprobs_mode="processed_logprobs"`` (as TRL does), the log-probs of the tokens
after temperature (and top-k/top-p) scaling, i.e. the sampler's own, which is what the importance-sampling
correction (:func:`align.grpo.loss.vllm_importance_sampling`) compares with the trainer's. Unlike our sampler,
vLLM may sample the image token id (its decoding places image features at the prompt's placeholders only);
the training forward scores such a token like any other (:mod:`align.grpo.logps`). Banning it with a logit
bias was tried and dropped: it shifts every vLLM log-prob by ``log(1 - p(image token))``, ~1e-3 per token on
the tiny zoo model (near-uniform over ~1000 ids), which the sequence-level ratio sums to 0.955 over 48 tokens.

Weights: :func:`weight_chunks` turns the engine's per-module chunks
(:meth:`align.engine.Engine.gathered_parameters_in_chunks`, gathered one module at a time under ZeRO-3) into
canonical llava-hf names, LoRA merged (``W + scaling * B @ A``), and :func:`sync_weights` pushes them after
every optimizer step (before the next rollout phase).

Tests: ``.venv/bin/pytest -q tests/test_vllm_backend.py tests/test_vllm_importance_sampling.py`` (the vLLM ones
need ``scripts/setup_vllm.sh`` and skip without it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.checkpoint import canonical_key
from align.errors import AlignError
from align.grpo.sampler import Rollout, SamplingSettings
from align.model import component_of

PEFT_PREFIX = "base_model.model."


def collapse_image_tokens(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """``prompt_ids`` with every run of image tokens cut to one: the prompt form vLLM expands itself."""
    out: list[int] = []
    for token in prompt_ids:
        if token == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(token)
    return out


def png_data_url(image: Any) -> str:
    """A PIL image as a lossless ``data:image/png;base64,...`` URL (the pixels vLLM decodes are ours)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sampling_seeds(generator: torch.Generator | None, n: int) -> list[int | None]:
    """One vLLM request seed per prompt, drawn from the stage's generator (reproducible rollouts)."""
    if generator is None:
        return [None] * n
    return torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()


def to_rollout(
    completions: list[tuple[list[int], list[float], bool]], pad_token_id: int, max_new_tokens: int
) -> Rollout:
    """``[(token_ids, logprobs, stopped), ...]`` (question-major) as a :class:`Rollout` with ``logps``.

    ``stopped``: vLLM ended the completion on an end-of-turn token (its finish reason ``stop``), else it is
    truncated. The end-of-turn token is part of ``token_ids`` and of the mask, as in our sampler.
    """
    width = max(1, max(len(ids) for ids, _, _ in completions))
    n = len(completions)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    logps = torch.zeros((n, width))
    lengths = torch.zeros(n, dtype=torch.long)
    truncated = torch.zeros(n, dtype=torch.bool)
    for row, (tokens, token_logps, stopped) in enumerate(completions):
        if len(tokens) > max_new_tokens or len(token_logps) != len(tokens):
            raise AlignError(
                f"vLLM returned {len(tokens)} tokens with {len(token_logps)} log-probs for "
                f"max_new_tokens {max_new_tokens}"
            )
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        logps[row, : len(tokens)] = torch.tensor(token_logps, dtype=torch.float32)
        lengths[row] = len(tokens)
        truncated[row] = not stopped
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return Rollout(ids, mask, lengths, truncated, logps)


def check_expansion(sent: Sequence[int], reported: Sequence[int] | None, prompt: int) -> None:
    """vLLM's expanded prompt must be ours token for token (else the trainer scores other prompts)."""
    if reported is None or list(reported) == list(sent):
        return
    raise AlignError(
        f"prompt {prompt}: vLLM expanded it to {len(reported)} token ids, ours has {len(sent)}; the image "
        "token expansion differs (image size, processor or vLLM version)"
    )


def weight_chunks(
    chunks: Iterable[list[tuple[str, Tensor]]],
    lora_scaling: float | None,
    strip: str = "",
) -> Iterator[list[tuple[str, Tensor]]]:
    """Engine chunks (in-memory names, see ``Engine.gathered_parameters_in_chunks``) as canonical llava-hf
    chunks of CPU copies, LoRA merged.

    ``strip``: a prefix of the engine's names to drop (the stage's ``PolicyLogps`` wrapper: ``"model."``).
    With LoRA (``lora_scaling`` not None) a layer's ``base_layer.weight`` is held until its ``lora_A`` and
    ``lora_B`` arrive (the next modules in ``named_modules`` order), then ``W + scaling * B @ A`` is emitted
    under the plain layer name; adapter tensors are not sent. Pass a ``select`` to the engine that keeps the
    trainable parameters and the adapted layers' base weights: frozen ones never change.
    """
    held: dict[str, Tensor] = {}  # LoRA layer stem -> base weight, or lora_A / lora_B
    for chunk in chunks:
        out = []
        for name, tensor in chunk:
            name = name.removeprefix(strip).removeprefix(PEFT_PREFIX)
            if lora_scaling is None:
                out.append((canonical_key(name), tensor.to("cpu", copy=True)))
                continue
            for part in (".base_layer.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
                if name.endswith(part):
                    stem = name[: -len(part)]
                    held[stem + part] = tensor.to("cpu", copy=True)
                    parts = [held.get(stem + p) for p in (".base_layer.weight", ".lora_A.default.weight")]
                    b = held.get(stem + ".lora_B.default.weight")
                    if parts[0] is not None and parts[1] is not None and b is not None:
                        base, a = parts
                        merged = (base.float() + lora_scaling * (b.float() @ a.float())).to(base.dtype)
                        out.append((canonical_key(stem + ".weight"), merged))
                        for p in (".base_layer.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
                            del held[stem + p]
                    break
            else:
                if "lora_" not in name:
                    out.append(
                        (canonical_key(name.replace(".base_layer.", ".")), tensor.to("cpu", copy=True))
                    )
        if out:
            yield out
    if held:
        raise AlignError(f"LoRA layers with a missing part: {sorted(held)[:3]}")


class VLLMColocated:
    """``vllm.LLM`` in this process (TRL's ``vllm_mode="colocate"``)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        image_token_id: int,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        seed: int = 0,
        distributed: bool = False,
        max_images_per_prompt: int = 1,
    ):
        # The engine core in this process (as TRL's external_launcher has it): weight chunks then reach the worker
        # as tensors; through vLLM's engine-core process they arrive mangled ("'list' object has no attribute
        # 'dtype'" here). Read by vLLM when the engine is built.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.image_token_id = image_token_id
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",
            max_num_batched_tokens=4096,  # TRL: vLLM's profiler misreads memory with its 32768 default
            limit_mm_per_prompt={"image": max(1, max_images_per_prompt)},
            worker_extension_cls="align.grpo.vllm_worker.WeightSync",
            **({"distributed_executor_backend": "external_launcher"} if distributed else {}),
        )
        if enable_sleep_mode:
            self.llm.sleep(level=1)

    def load_weights(self, chunks: Iterable[list[tuple[str, Tensor]]]) -> int:
        """Load canonical-named chunks into the engine (in-process: tensors are passed, not copied to disk)."""
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
        n = 0
        self.llm.collective_rpc("align_update_begin")
        for chunk in chunks:
            n += sum(self.llm.collective_rpc("align_update_tensors", args=(chunk,)))
        self.llm.collective_rpc("align_update_end")
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)
        return n

    def generate(
        self,
        prompt_ids: list[list[int]],
        pixel_values: Tensor | None,
        images_per_prompt: list[int],
        sampling: SamplingSettings,
        generator: torch.Generator | None = None,
        images: Sequence[Any] | None = None,
    ) -> Rollout:
        """The :class:`~align.grpo.sampler.RolloutBackend` method; ``images`` (PIL, prompt order) replace
        ``pixel_values`` (vLLM runs the processor itself); ``logps`` are always returned (vLLM's)."""
        from vllm import SamplingParams

        images = _per_prompt(images, images_per_prompt)
        if self.enable_sleep_mode:
            self.llm.wake_up()
        requests, params = [], []
        for i, (ids, seed) in enumerate(
            zip(prompt_ids, sampling_seeds(generator, len(prompt_ids)), strict=True)
        ):
            request: dict[str, Any] = {"prompt_token_ids": collapse_image_tokens(ids, self.image_token_id)}
            if images[i]:
                request["multi_modal_data"] = {"image": images[i] if len(images[i]) > 1 else images[i][0]}
            requests.append(request)
            params.append(SamplingParams(**_sampling_kwargs(sampling, seed)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)
        completions = []
        for i, out in enumerate(outputs):
            check_expansion(prompt_ids[i], out.prompt_token_ids, i)
            for c in out.outputs:
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)]
                completions.append((list(c.token_ids), lps, c.finish_reason == "stop"))
        return to_rollout(completions, sampling.pad_token_id, sampling.max_new_tokens)


class VLLMServer:
    """A vLLM server reached over HTTP (TRL's ``vllm_mode="server"``); see the module docstring to start one."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        image_token_id: int,
        timeout: float = 240.0,
        request_timeout: float = 600.0,
    ):
        self.base = f"http://{host}:{port}"
        self.image_token_id = image_token_id
        self.request_timeout = request_timeout
        self.wait_until_up(timeout)

    def _post(self, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(
            self.base + path, data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise AlignError(f"vLLM server {self.base}{path}: HTTP {err.code}: {detail}") from None
        return json.loads(raw) if raw else None

    def wait_until_up(self, timeout: float) -> None:
        """Poll ``/health`` for up to ``timeout`` seconds (TRL's ``vllm_server_timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AlignError(
                    f"no vLLM server answered at {self.base}/health within {timeout:g} s "
                    "(grpo.rollout.vllm_server_host / vllm_server_port / vllm_server_timeout)"
                )
            time.sleep(1.0)

    def load_weights(self, chunks: Iterable[list[tuple[str, Tensor]]]) -> int:
        """Each chunk as a safetensors file the server loads through ``/collective_rpc`` (same host)."""
        from safetensors.torch import save_file

        n = 0
        self._post("/collective_rpc", {"method": "align_update_begin"})
        with tempfile.TemporaryDirectory(prefix="align-vllm-sync-") as folder:
            for i, chunk in enumerate(chunks):
                path = os.path.join(folder, f"chunk-{i:05d}.safetensors")
                save_file({name: t.contiguous() for name, t in chunk}, path)
                reply = self._post("/collective_rpc", {"method": "align_update_file", "args": [path]})
                n += sum(int(r) for r in reply["results"])
                os.remove(path)
        self._post("/collective_rpc", {"method": "align_update_end"})
        for cache in ("prefix", "mm", "encoder"):  # all computed with the old weights
            self._post(f"/reset_{cache}_cache")
        return n

    def generate(
        self,
        prompt_ids: list[list[int]],
        pixel_values: Tensor | None,
        images_per_prompt: list[int],
        sampling: SamplingSettings,
        generator: torch.Generator | None = None,
        images: Sequence[Any] | None = None,
    ) -> Rollout:
        """As :meth:`VLLMColocated.generate`; one request per prompt (``n`` = G), sent concurrently."""
        images = _per_prompt(images, images_per_prompt)
        seeds = sampling_seeds(generator, len(prompt_ids))

        def one(i: int) -> dict:
            body: dict[str, Any] = {
                "token_ids": collapse_image_tokens(prompt_ids[i], self.image_token_id),
                "sampling_params": _sampling_kwargs(sampling, seeds[i]),
                "return_token_ids": True,
            }
            if images[i]:
                body["content_parts"] = [{"type": "image_url", "url": png_data_url(im)} for im in images[i]]
            return self._post("/inference/v1/generate", body)

        with ThreadPoolExecutor(max_workers=min(8, len(prompt_ids))) as pool:
            replies = list(pool.map(one, range(len(prompt_ids))))
        completions = []
        for i, reply in enumerate(replies):
            check_expansion(prompt_ids[i], reply.get("prompt_token_ids"), i)
            for c in sorted(reply["choices"], key=lambda c: c["index"]):
                lps = [entry["logprob"] for entry in (c.get("logprobs") or {}).get("content") or []]
                completions.append((list(c["token_ids"]), lps, c["finish_reason"] == "stop"))
        return to_rollout(completions, sampling.pad_token_id, sampling.max_new_tokens)


def _per_prompt(images: Sequence[Any] | None, images_per_prompt: list[int]) -> list[list[Any]]:
    images = list(images or [])
    if len(images) != sum(images_per_prompt):
        raise AlignError(
            f"images_per_prompt sums to {sum(images_per_prompt)} but {len(images)} images were given "
            "(the vLLM backend needs the decoded images, not only pixel_values)"
        )
    out, at = [], 0
    for n in images_per_prompt:
        out.append(images[at : at + n])
        at += n
    return out


def _sampling_kwargs(sampling: SamplingSettings, seed: int | None) -> dict[str, Any]:
    """vLLM ``SamplingParams`` fields for our sampler's options (greedy: temperature 0)."""
    return {
        "n": sampling.num_generations,
        "max_tokens": sampling.max_new_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_p": 1.0 if sampling.top_p is None else sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k else 0,
        "stop_token_ids": list(sampling.eos_token_ids),
        "logprobs": 0,  # the sampled token's log-prob only
        "seed": seed,
        "skip_special_tokens": False,
        "detokenize": False,
    }


def sync_weights(
    backend: Any | None,
    chunks: Callable[[], Iterable[list[tuple[str, Tensor]]]],
    lora_scaling: float | None,
    strip: str = "",
) -> int:
    """Push the policy's current weights into ``backend`` (``None`` on ranks without one, which still walk
    the chunks: under ZeRO-3 the gathers are collective). Returns the tensors sent (0 without a backend)."""
    converted = weight_chunks(chunks(), lora_scaling, strip)
    if backend is None:
        for _ in converted:
            pass
        return 0
    return backend.load_weights(converted)


class PolicyWeightSync:
    """Keeps the backend's weights those of the policy being trained.

    Called before every rollout phase: when an optimizer step happened since the last sync, every rank walks
    the policy one module at a time (ZeRO-3 gathers each module collectively, then frees it) and the changed
    components go to vLLM in llava-hf names, LoRA merged. Colocated, each rank sends to its own engine; server
    mode, rank 0 alone sends (``sends`` false elsewhere) and every rank waits at a barrier until it is done.
    """

    def __init__(
        self,
        backend: Any,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        lora_scaling: float | None,
        *,
        sends: bool,
        synced_at: int | None,
        strip: str = "",
    ):
        self.backend = backend if sends else None
        self.select = changing_parameters(named_parameters)
        self.lora_scaling = lora_scaling
        self.synced_at = (
            synced_at  # the optimizer steps the backend's weights reflect; None: unknown (a server)
        )
        self.strip = strip  # what the engine's module adds in front of the model's names
        self.announced = False  # the first sync is printed

    def __call__(self, engine: Any, dist: Any) -> float:
        """Sync if the policy changed since the last sync (every rank calls it); returns the seconds taken."""
        if self.synced_at == engine.optimizer_steps:
            return 0.0
        t0 = time.perf_counter()
        chunks = lambda: engine.gathered_parameters_in_chunks(self.select)  # noqa: E731
        sent = sync_weights(self.backend, chunks, self.lora_scaling, strip=self.strip)
        # server mode: another rank generating before the last chunk landed would run a half-reloaded model
        # (vLLM: "Tensor on device meta is not on the expected device cpu")
        dist.barrier()
        seconds = time.perf_counter() - t0
        if not self.announced:
            self.announced = True
            dist.log(f"vllm: synced {sent} tensors in {seconds:.2f} s (after every update)")
        self.synced_at = engine.optimizer_steps
        return seconds


def changing_parameters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> Callable[[str, Any], bool]:
    """A ``select`` for ``Engine.gathered_parameters_in_chunks``: every parameter of each Llava component
    (vision tower, projector, language model) that has a trainable parameter (LoRA adapters count for the
    language model). Whole components, not only the trainable tensors: vLLM fuses q/k/v and gate/up, and a
    fused layer is reloaded only once all its parts arrived (see :class:`align.grpo.vllm_worker.WeightSync`)."""

    training = {component_of(n) for n, p in named if p.requires_grad}
    return lambda name, p: component_of(name) in training


def open_backend(
    mode: str,
    model_dir: str | Path,
    *,
    image_token_id: int,
    host: str,
    port: int,
    timeout: float,
    gpu_memory_utilization: float,
    enable_sleep_mode: bool,
    max_model_len: int | None,
    dtype: str,
    seed: int,
    distributed: bool,
    max_images_per_prompt: int,
) -> VLLMColocated | VLLMServer:
    """The backend for ``grpo.rollout.vllm_mode`` (the recipe's values, TRL's meanings)."""
    if mode == "server":
        return VLLMServer(host, port, image_token_id=image_token_id, timeout=timeout)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise AlignError(
            'grpo.rollout.backend vllm (colocate) needs vLLM in this environment: pip install -e ".[vllm]"'
        ) from None
    return VLLMColocated(
        model_dir,
        image_token_id=image_token_id,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_sleep_mode=enable_sleep_mode,
        max_model_len=max_model_len,
        seed=seed,
        distributed=distributed,
        max_images_per_prompt=max_images_per_prompt,
    )
