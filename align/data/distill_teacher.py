"""The models ``align data distill`` talks to: teachers that write reasoning, captioners that describe images.

Owns:

* :class:`TeacherReply` (``content``, separate ``reasoning`` if the server sends one, ``finish_reason``);
* :class:`OpenAITeacher`: one ``POST {base_url}/chat/completions`` per call with the standard library
  (``urllib``); reads DeepSeek-R1's ``reasoning_content`` (and vLLM's ``reasoning``) next to ``content``;
* :class:`HFTeacher`: a local Hugging Face causal LM folder, run with ``generate``;
* :class:`HFCaptioner`: a local Hugging Face image-text model folder (a Llava folder of this project, or any
  processor that writes an ``image_token`` into the text), greedy, one description per image, cached;
* retrying: :class:`RetryPolicy` (exponential back-off with jitter, capped, ``Retry-After`` honoured) and
  :func:`call_with_retries`.

Errors: a failure worth retrying (timeout, connection error, HTTP 408/409/429/5xx, an unreadable body) raises
:class:`TeacherError` with ``retryable=True``; one that will not heal for this row (HTTP 400, 413, 422 ...)
with ``retryable=False``; one that will not heal for any row (HTTP 401/403/404: wrong key, URL or model) raises
:class:`TeacherFatal`, an :class:`~align.errors.AlignError` that stops the run. Local models are not retried:
their exceptions are bugs or resource problems and propagate.

Tests: ``.venv/bin/pytest -q tests/test_distill.py``.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from align.checkpoint import eos_token_ids
from align.data.encode import generation_prefill
from align.errors import AlignError
from align.rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

T = TypeVar("T")
Messages = list[dict[str, str]]

_RETRY_STATUS = {408, 409, 429}  # and every 5xx
_FATAL_STATUS = {401: "the API key was refused", 403: "access is forbidden", 404: "the URL or model is wrong"}
_BODY_EXCERPT = 300


@dataclass(frozen=True)
class TeacherReply:
    content: str
    reasoning: str | None = (
        None  # a reasoning channel separate from content (DeepSeek-R1, vLLM reasoning parsers)
    )
    finish_reason: str | None = None  # "stop", "length" (hit max_tokens) ...


class TeacherError(Exception):
    """One failed teacher call; ``retries`` is set by :func:`call_with_retries` when it gives up."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.retries = 0


class TeacherFatal(AlignError):
    """A teacher failure no row can get past (credentials, URL, model name): stops the run."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int  # retries after the first attempt
    backoff: float  # seconds: the first delay is about this long, then it doubles
    max_backoff: float  # cap on any one delay, Retry-After included

    def delay(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): ``backoff * 2**retry`` capped, with "equal
        jitter" (between half and all of it) so that many rows failing together do not retry together."""
        ceiling = min(self.max_backoff, self.backoff * 2**retry)
        wait = ceiling / 2 + rng.uniform(0, ceiling / 2)
        return min(self.max_backoff, max(wait, retry_after or 0.0))


def call_with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    rng: random.Random,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[T, int]:
    """``(call(), retries used)``; retryable :class:`TeacherError` s are retried up to ``policy.max_retries``
    times. When it gives up, the last error is raised with ``.retries`` set."""
    retry = 0
    while True:
        try:
            return call(), retry
        except TeacherError as err:
            if not err.retryable or retry >= policy.max_retries:
                err.retries = retry
                if err.retryable:
                    err.args = (f"{err} (gave up after {retry + 1} attempts)",)
                raise
            sleep(policy.delay(retry, rng, err.retry_after))
            retry += 1


def _retry_after(value: str | None) -> float | None:
    """The ``Retry-After`` header in seconds (its HTTP-date form is rare for APIs and ignored)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, DeepSeek, OpenAI ...), one request per call.

    Thread-safe: each call opens its own connection. ``timeout`` is urllib's: seconds the connection may stay
    silent (connecting, or waiting for the next bytes of the answer), not a bound on the whole reply.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None,
        temperature: float,
        max_tokens: int,
        timeout: float,
        api_key_env: str | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.api_key_env = api_key_env  # only to name it in errors
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout = timeout

    def __call__(self, messages: Messages) -> TeacherReply:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except urllib.error.URLError as err:  # refused, DNS, or a timeout while connecting
            raise TeacherError(f"POST {self.url}: {err.reason}", retryable=True) from None
        except (TimeoutError, http.client.HTTPException, ConnectionError) as err:
            what = f"no reply within {self.timeout:g} s" if isinstance(err, TimeoutError) else repr(err)
            raise TeacherError(f"POST {self.url}: {what}", retryable=True) from None
        return self._parse(raw)

    def _http_error(self, err: urllib.error.HTTPError) -> Exception:
        try:
            text = err.read().decode("utf-8", "replace")[:_BODY_EXCERPT]
        except OSError:
            text = ""
        message = f"POST {self.url}: HTTP {err.code} {err.reason}: {text.strip() or '(empty body)'}"
        if err.code in _FATAL_STATUS:
            hint = _FATAL_STATUS[err.code]
            if err.code in (401, 403):
                hint += f" (key from ${self.api_key_env})" if self.api_key_env else " (no api_key_env set)"
            else:
                hint += f" (teacher.base_url, teacher.model '{self.model}')"
            return TeacherFatal(f"{message}; {hint}")
        retryable = err.code in _RETRY_STATUS or err.code >= 500
        return TeacherError(message, retryable, _retry_after(err.headers.get("Retry-After")))

    def _parse(self, raw: bytes) -> TeacherReply:
        """The first choice of a chat-completion body; a body of another shape is retried (proxies and load
        balancers sometimes answer 200 with an HTML page)."""
        try:
            choice = json.loads(raw)["choices"][0]
            message = choice["message"]
            # content is null when the whole budget went to a separate reasoning channel
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if not isinstance(content, str) or not isinstance(reasoning, (str, type(None))):
                raise TypeError("content and reasoning must be text")
            return TeacherReply(content, reasoning, choice.get("finish_reason"))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            excerpt = raw[:_BODY_EXCERPT].decode("utf-8", "replace")
            raise TeacherError(
                f"POST {self.url}: not a chat completion: {excerpt!r}", retryable=True
            ) from None


def _load(what: str, path: str, loader: Callable[[], T]) -> T:
    if not (Path(path) / "config.json").is_file():
        raise AlignError(f"{what}: {path} is not a model folder (no config.json)")
    try:
        return loader()
    except (OSError, ValueError, KeyError) as err:
        raise AlignError(f"{what}: cannot load {path}: {type(err).__name__}: {err}") from err


def _sampling(temperature: float) -> dict[str, Any]:
    # Neutral values for greedy, not None: generate would fill None from the model's config (R1: 0.6) and warn.
    if temperature == 0:
        return {"do_sample": False, "temperature": 1.0, "top_p": 1.0}
    return {"do_sample": True, "temperature": temperature}


class HFTeacher:
    """A local causal LM folder as the teacher. One generation at a time (a lock), so any ``max_concurrency``
    is safe; the sampling seed is derived from the prompt, so a row gets the same reply on every run."""

    def __init__(self, path: str, *, temperature: float, max_tokens: int, seed: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = _load("teacher.model", path, lambda: AutoTokenizer.from_pretrained(path))
        self.model = _load("teacher.model", path, lambda: AutoModelForCausalLM.from_pretrained(path)).eval()
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self._lock = threading.Lock()

    def __call__(self, messages: Messages) -> TeacherReply:
        import torch

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The rendered template holds the BOS token already: the tokenizer must not add another.
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with self._lock, torch.no_grad():
            torch.manual_seed(self.seed + zlib.crc32(prompt.encode()))
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **_sampling(self.temperature),
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        # R1 templates end the prompt with "<think>\n": the reply starts inside the think block.
        prefill = generation_prefill(self.tokenizer)
        stopped = len(new) < self.max_tokens or int(new[-1]) in eos_token_ids(
            self.tokenizer, self.model.generation_config
        )
        return TeacherReply(prefill + text, None, "stop" if stopped else "length")


_ANSWER_TAGS = re.compile(rf"{re.escape(ANSWER_OPEN)}|{re.escape(ANSWER_CLOSE)}")


def caption_text(generated: str) -> str:
    """The description in a captioner's output: the text after the last ``</think>`` (answer tags removed),
    or, when that is empty or there is no ``</think>``, the think text itself. A stage-1 model of this project
    writes its caption right after the ``<think>\\n`` prefill and never closes it."""
    text = generated
    if THINK_CLOSE in generated:
        think, _, after = generated.rpartition(THINK_CLOSE)
        text = _ANSWER_TAGS.sub("", after).strip() or think
    return text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()


class HFCaptioner:
    """A local image-text model folder that describes one image per call (greedy), cached by image path."""

    def __init__(self, path: str, *, prompt: str, max_new_tokens: int, max_image_pixels: int):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = _load("description.captioner", path, lambda: AutoProcessor.from_pretrained(path))
        self.image_token = getattr(self.processor, "image_token", None)
        if not isinstance(self.image_token, str):
            raise AlignError(
                f"description.captioner: the processor of {path} ({type(self.processor).__name__}) has no "
                "image_token; use a Llava-style folder"
            )
        self.model = _load(
            "description.captioner", path, lambda: AutoModelForImageTextToText.from_pretrained(path)
        ).eval()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.max_image_pixels = max_image_pixels
        self._lock = threading.Lock()
        self._cache: dict[str, str] = {}

    def __call__(self, image: str) -> str:
        """The description of the image file ``image``; raises AlignError if it cannot be read."""
        import torch

        from align.data.images import load_image

        with self._lock:
            if image in self._cache:
                return self._cache[image]
            pixels = load_image(image, self.max_image_pixels)
            tokenizer = self.processor.tokenizer
            messages = [{"role": "user", "content": f"{self.image_token}\n{self.prompt}"}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = self.processor(text=text, images=[pixels], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **_sampling(0.0),
                )
            generated = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            self._cache[image] = caption_text(generated)
            return self._cache[image]
