"""Model folders answer transformers' documented image-text API, checked by a script that does not import align.

align builds the folders (an assembled Llava one and its export, and the Idefics3 and LLaVA-NeXT folders that
``projector.type: pixel_shuffle`` and ``vision.anyres_grids`` assemble); ``tests/hf_scripts/documented_forms.py`` then runs
structured ``content`` parts through ``processor.apply_chat_template(..., tokenize=True)`` + ``generate`` and
through ``pipeline("image-text-to-text")``, string content with ``<image>`` too, in a subprocess that imports
only transformers, torch and PIL. Each must give the prompt ids and greedy tokens ``align chat`` gives, with
exactly one BOS. The template's preamble is also checked on its own (:func:`content_parts_template`).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from align.chat import ChatSession, PlainDisplay, generation_settings
from align.checkpoint import content_parts_template, load_for_chat
from align.export import export

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).parent / "hf_scripts" / "documented_forms.py"
N_TOKENS = 6
QUESTION = "How many red objects?"
REPLY = "<think>\nI count them.</think>\n\n<answer>2</answer>"


def _parts(image: dict, text: str) -> list[dict]:
    return [{"type": "image", **image}, {"type": "text", "text": text}]


def _cases(png: str) -> dict[str, tuple[dict, list[dict], bool]]:
    """name -> (what the script runs, the same conversation as align chat holds it, has an image)."""
    as_chat = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    structured = [{"role": "user", "content": _parts({"path": png}, QUESTION)}]
    return {
        "parts_path": ({"form": "chat_template", "messages": structured, "images": False}, as_chat, True),
        "parts_url": (
            {
                "form": "chat_template",
                "messages": [{"role": "user", "content": _parts({"url": png}, QUESTION)}],
            },
            as_chat,
            True,
        ),
        "parts_image": (
            {
                "form": "chat_template",
                "messages": [{"role": "user", "content": _parts({"image": png}, QUESTION)}],
            },
            as_chat,
            True,
        ),
        "string_with_placeholder": (
            {"form": "chat_template", "messages": as_chat, "images": True},
            as_chat,
            True,
        ),
        "text_only_parts": (
            {
                "form": "chat_template",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2+3?"}]}],
                "images": False,
            },
            [{"role": "user", "content": "What is 2+3?"}],
            False,
        ),
        "multi_turn": (
            {
                "form": "chat_template",
                "messages": [
                    *structured,
                    {"role": "assistant", "content": [{"type": "text", "text": REPLY}]},
                    {"role": "user", "content": [{"type": "text", "text": "And blue ones?"}]},
                ],
                "images": False,
            },
            [
                *as_chat,
                {"role": "assistant", "content": REPLY},
                {"role": "user", "content": "And blue ones?"},
            ],
            True,
        ),
        "pipeline": ({"form": "pipeline", "messages": structured}, as_chat, True),
        "render_bare_image_part": (
            {
                "form": "render",
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
                ],
            },
            as_chat,
            True,
        ),
    }


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = Image.new("RGB", (64, 48), (250, 250, 250))
    for x in range(8, 24):
        for y in range(8, 24):
            image.putpixel((x, y), (220, 20, 20))
    path = tmp_path_factory.mktemp("hf_api") / "scene.png"
    image.save(path)
    return path


# the assemble options of the inference-only classes (tests/test_assembly_options.py checks their logits)
FAMILIES = {
    "idefics3": ("siglip-hf", {}, {"type": "pixel_shuffle", "scale_factor": 2}),
    "llava_next": ("clip-hf", {"feature_layer": [-2, -1], "anyres_grids": ["1x2", "2x1", "2x2"]}, None),
}


@pytest.fixture(scope="module", params=["assembled", "exported", *FAMILIES])
def folder(request, zoo: Path, siglip_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if request.param == "assembled":
        return siglip_qwen2
    if request.param == "exported":
        return export(siglip_qwen2, tmp_path_factory.mktemp("hf_api_export") / "export", "fp32")
    from align.assemble import AssembleRecipe, assemble
    from align.config import from_dict

    tower, vision, projector = FAMILIES[request.param]
    spec = {
        "kind": "assemble",
        "vision": {"source": "hf", "name_or_path": str(zoo / tower), **vision},
        "llm": {"name_or_path": str(zoo / "llama-r1")},
        "output_dir": str(tmp_path_factory.mktemp(request.param) / "model"),
        **({"projector": projector} if projector else {}),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        out = assemble(from_dict(AssembleRecipe, spec, file="test.yaml"))
    assert json.loads((out / "config.json").read_text())["model_type"] == request.param
    return out


def _align_chat(folder: Path, png: Path, cases: dict) -> dict[str, list[int] | str]:
    """What align chat renders and generates (greedy) for each case's conversation."""
    model, processor = load_for_chat(folder)
    model.eval()
    settings = generation_settings(model.generation_config, N_TOKENS, 0)
    session = ChatSession(model, processor, PlainDisplay(io.StringIO(), False), settings)
    image = Image.open(png).convert("RGB")
    out: dict[str, list[int] | str] = {}
    for name, (script_case, messages, has_image) in cases.items():
        if script_case["form"] == "render":
            out[name] = processor.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            continue
        inputs = session.model_inputs(messages, [image] if has_image else [])
        with torch.no_grad():
            out[name] = model.generate(**inputs, generation_config=settings)[0].tolist()
    return out


def test_documented_forms_match_align_chat(folder: Path, png: Path, tmp_path: Path) -> None:
    cases = _cases(str(png))
    spec = {
        "folder": str(folder),
        "image": str(png),
        "max_new_tokens": N_TOKENS,
        "cases": {name: case for name, (case, _, _) in cases.items()},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    ours = _align_chat(folder, png, cases)
    bos = json.loads((folder / "tokenizer_config.json").read_text())["bos_token"]
    from transformers import AutoTokenizer

    bos_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(bos)
    for name in cases:
        assert theirs[name] == ours[name], name
        if isinstance(ours[name], list):
            assert ours[name][0] == bos_id and ours[name].count(bos_id) == 1, name


TEMPLATES = {
    "r1": None,  # the folder's own (DeepSeek-R1-Distill's)
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
}


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ([{"type": "image"}, {"type": "text", "text": "Q"}], "<image>\nQ"),
        ([{"type": "text", "text": "Q"}, {"type": "image"}], "Q<image>"),
        ([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}], "<image>\n<image>\nQ"),
        ([{"type": "image", "url": "x.png"}, {"type": "text", "text": "\nQ"}], "<image>\nQ"),
        ([{"type": "text", "text": "A "}, {"type": "text", "text": "B"}], "A B"),
        ("<image>\nQ", "<image>\nQ"),
    ],
)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_content_parts_render_as_the_readers_text(
    siglip_qwen2: Path, template: str, content, text: str
) -> None:
    """Parts join as align's data readers join them (align/data/rows.py), so a structured prompt is the
    trained one; string content renders exactly as the template alone does (the encoder's ids do not move)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(siglip_qwen2)
    original = (TEMPLATES[template] or tokenizer.chat_template).split("end of content parts -#}")[-1]
    wrapped = content_parts_template(original, "<image>")
    assert content_parts_template(wrapped, "<image>") == wrapped  # idempotent on re-save

    def render(chat_template: str, messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )

    history = [{"role": "system", "content": "S"}, {"role": "user", "content": content}]
    as_text = [{"role": "system", "content": "S"}, {"role": "user", "content": text}]
    assert render(wrapped, history) == render(original, as_text)
    reply = [*as_text, {"role": "assistant", "content": REPLY}, {"role": "user", "content": "more"}]
    assert render(wrapped, reply) == render(original, reply)


def test_unknown_part_type_is_refused(siglip_qwen2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(siglip_qwen2)
    with pytest.raises(Exception, match="type 'image' and 'text' only, got video"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}]}], tokenize=False, add_generation_prompt=True
        )
