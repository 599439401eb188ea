"""`align data distill`: verdicts, retries, resume, concurrency and crash safety against a local fake endpoint.

The fake teacher is an OpenAI-compatible server on 127.0.0.1 (port 0) that answers from a table keyed by the
case named in each question; it counts requests per case and the requests in flight.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from align.cli import main
from align.config import RecipeError, from_dict, load_any
from align.data.config import DataSource
from align.data.distill import (
    KEPT_FILE,
    REJECTED_FILE,
    DistillRecipe,
    build_teacher,
    column_description,
    distill,
)
from align.data.distill_rows import REASONS, judge, load_prompt, read_log, render_prompt
from align.data.distill_teacher import (
    OpenAITeacher,
    RetryPolicy,
    TeacherError,
    call_with_retries,
    caption_text,
)
from align.data.encode import encode_sft
from align.data.readers import read_source
from align.data.sample import Sample
from align.errors import AlignError
from align.rewards import accuracy

ROOT = Path(__file__).resolve().parents[1]
GOOD = "<think>\nI count three circles.\n</think>\n<answer>3</answer>"


def reply(content: str | None, reasoning: str | None = None, finish: str = "stop") -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"status": 200, "body": {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}}


def status(code: int) -> dict:
    return {"status": code, "body": {"error": {"message": f"status {code} on purpose"}}}


# case -> the reply to each attempt (the last one repeats)
TABLE = {
    "correct": [reply(GOOD)],
    "wrong": [reply("<think>\nI count four.\n</think>\n<answer>4</answer>")],
    "untagged": [reply("There are 3 circles.")],
    "r1": [reply("<answer>3</answer>", reasoning="Left, middle, right: three circles.")],
    "empty": [reply("<think>\n</think>\n<answer>3</answer>")],
    "cut": [reply("<think>\nLet me count: one, two", finish="length")],
    "flaky": [status(500), reply(GOOD)],
    "slow": [{"sleep": 1.5, **reply(GOOD)}, reply(GOOD)],
    "down": [status(503)],
    "refused": [status(400)],
    "auth": [status(401)],
    "html": [{"status": 200, "raw": "<html>gateway</html>"}, reply(GOOD)],
}


class FakeTeacher:
    """A chat-completions endpoint on 127.0.0.1 answering from :data:`TABLE`."""

    def __init__(self, delay: float = 0.0):
        self.requests: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                case = prompt.split("case=")[1].split()[0]
                with fake.lock:
                    attempt = fake.requests[case]
                    fake.requests[case] += 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.prompts.append(prompt)
                    fake.headers.append(dict(self.headers))
                try:
                    answer = TABLE[case][min(attempt, len(TABLE[case]) - 1)]
                    time.sleep(answer.get("sleep", delay))
                    data = answer["raw"].encode() if "raw" in answer else json.dumps(answer["body"]).encode()
                    self.send_response(answer["status"])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the client gave up on the slow reply: writing to it fails, as it should

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def total(self) -> int:
        return sum(self.requests.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeTeacher()
    yield server
    server.close()


def write_rows(folder: Path, cases: list[str], extra: list[dict] = ()) -> Path:
    """An rl file: one row per case (gold 3, a description, its own image), plus ``extra`` rows."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(cases):
        Image.new("RGB", (16, 16), (i * 20 % 256, 0, 0)).save(folder / "images" / f"{i}.png")
        rows.append(
            {
                "id": f"r{i}",
                "image": f"images/{i}.png",
                "problem": f"case={case} How many circles are there?",
                "solution": "3",
                "description": "Three red circles in a row on a white background.",
            }
        )
    path = folder / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return path


def read_samples(path: Path) -> list[Sample]:
    rows = list(read_source(DataSource(name="in", path=str(path), format="rl")))
    assert all(isinstance(r, Sample) for r in rows), rows
    return rows


def run_distill(samples, out: Path, url: str, **kw):
    """Rows written by :func:`write_rows` (their images lie in ``<folder>/images``) against ``url``."""
    teacher = OpenAITeacher(url, "fake-r1", api_key=None, temperature=0.6, max_tokens=64, timeout=0.5)
    return distill(
        samples,
        out,
        teacher=teacher,
        describe=column_description("description"),
        template=load_prompt(None),
        image_root=Path(samples[0].images[0]).parents[1],
        policy=RetryPolicy(max_retries=2, backoff=0.01, max_backoff=0.05),
        max_concurrency=kw.pop("max_concurrency", 4),
        **kw,
    )


EXPECTED = {
    "kept": 5,  # correct, r1, flaky (after a 500), slow (after a timeout), html (after a non-JSON 200)
    "wrong_answer": 1,
    "no_answer": 1,
    "empty_reasoning": 1,
    "truncated": 1,
    "teacher_error": 2,  # down (503 three times), refused (400, not retried)
    "no_description": 1,
    "no_gold": 1,
    "image_error": 1,
}
CASES = ["correct", "wrong", "untagged", "r1", "empty", "cut", "flaky", "slow", "down", "refused", "html"]
EXTRA = [
    {"id": "nodesc", "image": "images/0.png", "problem": "case=correct Q", "solution": "3"},
    {
        "id": "nogold",
        "image": "images/0.png",
        "problem": "case=correct Q",
        "solution": "???",
        "description": "d",
    },
    {
        "id": "noimage",
        "image": "images/missing.png",
        "problem": "case=correct Q",
        "solution": "3",
        "description": "d",
    },
]


def test_report_counts_resume_and_crash_repair(tmp_path, fake, zoo):
    samples = read_samples(write_rows(tmp_path / "in", CASES, EXTRA))
    out = tmp_path / "out"
    report = run_distill(samples, out, fake.url)
    assert dict(report.outcomes) == EXPECTED
    assert dict(report.totals) == EXPECTED and (report.rows, report.skipped) == (14, 0)
    assert report.retries == 5  # flaky 1, slow 1, html 1, down 2
    expected_requests = {c: 1 for c in CASES} | {"flaky": 2, "slow": 2, "html": 2, "down": 3}
    assert dict(fake.requests) == expected_requests  # rows rejected before the teacher cost no request
    assert "Three red circles in a row" in fake.prompts[0] and "How many circles" in fake.prompts[0]

    rejected = {r["key"]: r for r in read_log(out / REJECTED_FILE)}
    assert {k: r["reason"] for k, r in rejected.items() if r["reason"] == "teacher_error"} == {
        "in#r8": "teacher_error",
        "in#r9": "teacher_error",
    }
    assert "HTTP 503" in rejected["in#r8"]["detail"] and "3 attempts" in rejected["in#r8"]["detail"]
    assert rejected["in#r1"]["answer"] == "4" and rejected["in#r2"]["reply"] == "There are 3 circles."

    # Kept rows are valid SFT rows: the messages reader takes them and encode_sft tokenises them.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo / "qwen2-r1")
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    source = DataSource(
        name="sft", path=str(out / KEPT_FILE), format="messages", image_root=report.image_root
    )
    kept = list(read_source(source))
    assert len(kept) == 5 and all(isinstance(s, Sample) for s in kept)
    for sample in kept:
        assert Path(sample.images[0]).is_file()
        assert sample.messages[0]["content"].startswith("<image>\ncase=")
        target = sample.messages[-1]["content"]
        assert accuracy(target, "3") == 1.0 and target.endswith("</think>\n<answer>3</answer>")
        encoded = encode_sft(sample, tokenizer, image_token_id, 4)
        assert encoded.n_labels > 0 and encoded.input_ids.count(image_token_id) == 4
    r1 = next(s for s in kept if "case=r1" in s.messages[0]["content"])
    assert (
        r1.messages[-1]["content"]
        == "<think>\nLeft, middle, right: three circles.\n</think>\n<answer>3</answer>"
    )

    # A rerun asks the teacher nothing: every row is done, kept or rejected.
    before = Counter(fake.requests)
    again = run_distill(samples, out, fake.url)
    assert (
        fake.requests == before and (again.skipped, again.done) == (14, 0) and dict(again.totals) == EXPECTED
    )

    # --retry-errors re-asks only the teacher errors (down: 3 attempts, refused: 1); they fail again.
    retried = run_distill(samples, out, fake.url, retry_errors=True)
    assert dict(fake.requests - before) == {"down": 3, "refused": 1}
    assert dict(retried.outcomes) == {"teacher_error": 2} and dict(retried.totals) == EXPECTED

    # A crash in the middle of writing a row leaves half a line: the next run drops it and redoes that row only.
    data = (out / KEPT_FILE).read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    (out / KEPT_FILE).write_bytes(data[: last + (len(data) - last) // 2])
    before = Counter(fake.requests)
    repaired = run_distill(samples, out, fake.url)
    assert (
        (fake.requests - before).total() == 1
        and dict(repaired.outcomes) == {"kept": 1}
        and dict(repaired.totals) == EXPECTED
    )
    lines = (out / KEPT_FILE).read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["reason"] == "kept" for line in lines)


def test_concurrency_limit_is_respected(tmp_path):
    server = FakeTeacher(delay=0.15)
    try:
        samples = read_samples(write_rows(tmp_path / "in", ["correct"] * 9))
        report = run_distill(samples, tmp_path / "out", server.url, max_concurrency=3)
    finally:
        server.close()
    assert report.outcomes == Counter(kept=9) and server.total() == 9
    assert server.max_in_flight == 3  # parallel, and never more than the limit


def test_fatal_status_stops_the_run_and_keeps_finished_rows(tmp_path, fake):
    samples = read_samples(write_rows(tmp_path / "in", ["correct", "auth", *["correct"] * 6]))
    with pytest.raises(AlignError, match=r"HTTP 401.*API key was refused"):
        run_distill(samples, tmp_path / "out", fake.url, max_concurrency=1)
    assert fake.requests["auth"] == 1  # not retried
    assert [r["key"] for r in read_log(tmp_path / "out" / KEPT_FILE)] == ["in#r0"]


def test_api_key_comes_from_the_named_environment_variable(tmp_path, fake, monkeypatch):
    recipe = tiny_recipe(tmp_path, fake.url, api_key_env="ALIGN_TEST_KEY")
    monkeypatch.delenv("ALIGN_TEST_KEY", raising=False)
    with pytest.raises(AlignError, match="ALIGN_TEST_KEY is not set"):
        build_teacher(recipe.teacher, 0)
    monkeypatch.setenv("ALIGN_TEST_KEY", "sk-test")
    teacher = build_teacher(recipe.teacher, 0)
    assert teacher([{"role": "user", "content": "case=r1 q"}]).reasoning.startswith("Left")
    assert fake.headers[-1]["Authorization"] == "Bearer sk-test"


@pytest.mark.parametrize(
    ("content", "reasoning", "finish", "reason", "answer"),
    [
        (GOOD, None, "stop", "kept", "3"),
        ("I count.\n</think>\n\n<answer>3</answer>", None, "stop", "kept", "3"),  # prefill not echoed
        ("<answer>3</answer>", "three", "stop", "kept", "3"),  # DeepSeek-R1: reasoning_content
        ("Counting them: 3.\n<answer>3</answer>", None, "stop", "kept", "3"),  # no think tags
        ("<think>\nso\n</think>\nThe result is \\boxed{3}.", None, "stop", "kept", "3"),
        ("<think>\nso\n</think>\n<answer>4</answer>", None, "stop", "wrong_answer", "4"),
        ("<think>\nso\n</think>\nThe answer is 3.", None, "stop", "no_answer", None),
        ("<think>\nstill counting", None, "length", "truncated", None),
        ("", "I was still thinking", "length", "truncated", None),
        ("<think>\nstill counting", None, "stop", "no_answer", None),
        ("<answer>3</answer>", None, "stop", "empty_reasoning", "3"),
        ("<think>\n</think><answer>3</answer>", "  ", "stop", "empty_reasoning", "3"),
        ("<think>a</think><think>b</think><answer>3</answer>", None, "stop", "bad_format", None),
        ("<think>\nsee <answer>2</answer> no\n</think>\n<answer>3</answer>", None, "stop", "bad_format", "3"),
    ],
)
def test_judge(content, reasoning, finish, reason, answer):
    verdict = judge(content, reasoning, finish, "3")
    assert (verdict.reason, verdict.answer) == (reason, answer)
    if reason == "kept":
        assert verdict.target.startswith("<think>\n") and verdict.target.endswith(
            "</think>\n<answer>3</answer>"
        )
    else:
        assert verdict.target is None and reason in REASONS


def test_judge_unusable_gold():
    assert judge(GOOD, None, "stop", "???").reason == "no_gold"


def test_retries_back_off_exponentially_with_jitter():
    sleeps: list[float] = []
    outcomes = iter([TeacherError("500", True), TeacherError("429", True, retry_after=3.0), "ok"])

    def call() -> str:
        item = next(outcomes)
        if isinstance(item, Exception):
            raise item
        return item

    policy = RetryPolicy(max_retries=5, backoff=1.0, max_backoff=10.0)
    assert call_with_retries(call, policy, random.Random(0), sleeps.append) == ("ok", 2)
    assert 0.5 <= sleeps[0] <= 1.0 and sleeps[1] == 3.0  # jittered first delay; Retry-After wins
    rng = random.Random(1)
    for retry, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        assert ceiling / 2 <= policy.delay(retry, rng) <= ceiling
    assert policy.delay(0, rng, retry_after=60.0) == 10.0  # capped


@pytest.mark.parametrize(("retryable", "attempts"), [(True, 3), (False, 1)])
def test_retries_give_up(retryable, attempts):
    calls = []

    def call() -> str:
        calls.append(1)
        raise TeacherError("boom", retryable)

    with pytest.raises(TeacherError) as info:
        call_with_retries(call, RetryPolicy(2, 0.0, 0.0), random.Random(0), lambda s: None)
    assert len(calls) == attempts and info.value.retries == attempts - 1


def test_prompt_files(tmp_path):
    default = load_prompt(None)
    assert "{description}" in default and "{question}" in default
    text = render_prompt("D: {description}\nQ: {question}\n\\boxed{x} {other}", "a {question} here", " Why? ")
    assert text == "D: a {question} here\nQ: Why?\n\\boxed{x} {other}"
    bad = tmp_path / "p.txt"
    bad.write_text("Q: {question}")
    with pytest.raises(AlignError, match=r"p\.txt: must contain \{description\}"):
        load_prompt(bad)
    with pytest.raises(AlignError, match="not found"):
        load_prompt(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    ("generated", "description"),
    [
        ("A red circle.", "A red circle."),  # stage-1 model: the caption right after the prefill
        ("<think>\nA red circle.", "A red circle."),
        ("looking...</think>\n<answer>A red circle.</answer>", "A red circle."),
        ("A red circle.</think>\n\n", "A red circle."),
        ("", ""),
    ],
)
def test_caption_text(generated, description):
    assert caption_text(generated) == description


def tiny_recipe(tmp_path: Path, url: str, **teacher: object) -> DistillRecipe:
    data = {
        "kind": "distill",
        "data": {"sources": [{"name": "in", "path": str(tmp_path / "in" / "rl.jsonl"), "format": "rl"}]},
        "description": {"column": "description"},
        "teacher": {"backend": "openai", "base_url": url, "model": "fake-r1", "timeout": 0.5, **teacher},
        "output_dir": str(tmp_path / "out"),
    }
    return from_dict(DistillRecipe, data)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"description": {}}, "description.column"),
        ({"description": {"column": "d", "captioner": "m"}}, "description.column"),
        ({"teacher": {"backend": "openai", "model": "m"}}, "teacher.base_url"),
        ({"teacher": {"backend": "hf", "model": "m", "api_key_env": "K"}}, "teacher.api_key_env"),
        (
            {"teacher": {"backend": "openai", "model": "m", "base_url": "http://x", "max_concurrency": 0}},
            "teacher.max_concurrency",
        ),
        (
            {
                "teacher": {
                    "backend": "openai",
                    "model": "m",
                    "base_url": "http://x",
                    "backoff": 5,
                    "max_backoff": 1,
                }
            },
            "teacher.max_backoff",
        ),
        ({"data": {"sources": [{"name": "s", "path": "x", "format": "messages"}]}}, "data.sources[0].format"),
        ({"data": {"sources": [{"name": "s", "path": "x", "format": "rl", "repeat": 2}]}}, "data.sources[0]"),
    ],
)
def test_recipe_errors_name_the_key(change, key):
    data = {
        "kind": "distill",
        "data": {"sources": [{"name": "s", "path": "x.jsonl", "format": "rl"}]},
        "description": {"column": "description"},
        "teacher": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"},
        "output_dir": "out",
        **change,
    }
    with pytest.raises(RecipeError) as info:
        from_dict(DistillRecipe, data, file="r.yaml")
    assert info.value.key == key and info.value.file == "r.yaml"


def test_tiny_recipe_loads():
    recipe = load_any(ROOT / "recipes" / "tiny" / "distill.yaml", expect="distill")
    assert recipe.teacher.backend == "hf" and recipe.description.captioner == "checkpoints/tiny/run/projector"


def test_cli_writes_report_and_sft_source(tmp_path, fake, capsys):
    write_rows(tmp_path / "in", ["correct", "wrong", "r1"])
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(
        "kind: distill\n"
        f"data: {{sources: [{{name: in, path: {tmp_path / 'in' / 'rl.jsonl'}, format: rl}}]}}\n"
        "description: {column: description}\n"
        f"teacher: {{backend: openai, base_url: '{fake.url}', model: fake-r1, backoff: 0.01}}\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    assert main(["data", "distill", str(recipe), "teacher.max_concurrency=2"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["this_run"] == report["total"] == {"kept": 2, "wrong_answer": 1}
    assert report["sft_source"]["image_root"] == str(tmp_path / "in")
    assert (tmp_path / "out" / "recipe.resolved.yaml").is_file()
    assert '"format": "messages"' in capsys.readouterr().out


def test_local_hf_teacher_and_captioner(tmp_path, zoo):
    """Random tiny models: the pipeline runs end to end; what is kept verifies, the rest has a reason."""
    from align.assemble import AssembleRecipe, assemble
    from align.data.distill import DescriptionSpec, TeacherSpec, build_describe

    llava = tmp_path / "llava"
    spec = {"kind": "assemble", "vision": {"source": "hf", "name_or_path": str(zoo / "siglip-hf")}}
    assemble(
        from_dict(
            AssembleRecipe, {**spec, "llm": {"name_or_path": str(zoo / "qwen2-r1")}, "output_dir": str(llava)}
        )
    )
    samples = read_samples(write_rows(tmp_path / "in", ["correct", "wrong", "r1"]))
    samples.append(
        Sample(
            "in", "extra", [dict(samples[0].messages[0])], list(samples[0].images), "3", {"id": "same-image"}
        )
    )
    teacher = build_teacher(TeacherSpec(backend="hf", model=str(zoo / "qwen2-r1"), max_tokens=24), seed=0)
    describe = build_describe(DescriptionSpec(captioner=str(llava), max_new_tokens=12), 10**7)
    report = distill(
        samples,
        tmp_path / "out",
        teacher=teacher,
        describe=describe,
        template=load_prompt(None),
        image_root=tmp_path / "in",
        policy=RetryPolicy(0, 0.0, 0.0),
        max_concurrency=2,
    )
    assert report.done == 4 and sum(report.totals.values()) == 4
    records = read_log(tmp_path / "out" / KEPT_FILE) + read_log(tmp_path / "out" / REJECTED_FILE)
    assert len(records) == 4
    for record in records:
        assert record["description"].strip()  # the captioner wrote something for every image
        if record["reason"] == "kept":
            assert accuracy(record["messages"][-1]["content"], "3") == 1.0
        else:
            assert record["reason"] in {
                "truncated",
                "no_answer",
                "wrong_answer",
                "empty_reasoning",
                "bad_format",
            }
    by_key = {r["key"]: r for r in records}
    assert by_key["in#same-image"]["description"] == by_key["in#r0"]["description"]
