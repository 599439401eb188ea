"""Rows in each public system's own published layout, written from the synthetic scenes: the data of the
tiny twins of ``recipes/seeds/`` (one recipe per system), so that every layout is read and trained in CI.

``align data seeds --out checkpoints/seeds/data`` writes one folder per system (:data:`SYSTEMS`), named and laid
out as that system publishes its data: the same file kind (JSON array, JSON lines, a ``save_to_disk`` folder,
parquet shards), the same columns, the same image form (paths, ``datasets.Image`` columns, base64 text, RGBA
pixels, JPEG files) and the gold where the system keeps it. The answers come from the scene's ground truth,
so each row's gold is right. Where a system's documents leave a detail open, the choice is named in
``docs/seeds.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from align.data.synth import INSTRUCTION, synthesize
from align.errors import AlignError
from align.rewards.extract import extract_answer

SCENES = 8  # rows per system: two GRPO steps of two questions each, with rows to spare
_SUFFIX = " " + INSTRUCTION  # what the synthetic questions end with, taken off where a system adds its own


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _json_array(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))


def _hf(rows: list[dict], image_columns: dict[str, bool]) -> Any:
    """A ``datasets.Dataset`` whose image columns are ``datasets.Image`` (a list of them where True)."""
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    for column, is_list in image_columns.items():
        kind = datasets.Image()
        dataset = dataset.cast_column(column, datasets.Sequence(kind) if is_list else kind)
    return dataset


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_base64(image: Image.Image, data_url: bool) -> str:
    text = base64.b64encode(_png_bytes(image)).decode("ascii")
    return f"data:image/png;base64,{text}" if data_url else text


def _box_1000(box: list[int], size: list[int]) -> list[int]:
    """A pixel box on Visual-RFT's 0-1000 scale."""
    return [round(v * 1000 / size[i % 2]) for i, v in enumerate(box)]


def _unique_object(scene: dict) -> dict | None:
    """An object no other object of the scene shares colour and shape with: a referring expression names it."""
    for obj in scene["objects"]:
        same = [o for o in scene["objects"] if (o["colour"], o["shape"]) == (obj["colour"], obj["shape"])]
        if len(same) == 1:
            return obj
    return None


class Scenes:
    """The synthetic rows of one split, side by side: ``rl``, ``sft``, ``captions`` and ``scenes`` rows."""

    def __init__(self, split: Path):
        self.split = split
        self.rows = {
            name: [json.loads(line) for line in (split / f"{name}.jsonl").read_text().splitlines()]
            for name in ("rl", "sft", "captions", "scenes")
        }

    def image(self, i: int, mode: str = "RGB") -> Image.Image:
        with Image.open(self.split / self.rows["scenes"][i]["image"]) as image:
            return image.convert(mode)

    def copy_image(self, i: int, to: Path, fmt: str = "PNG") -> None:
        to.parent.mkdir(parents=True, exist_ok=True)
        self.image(i).save(to, format=fmt)

    def sft_question(self, i: int) -> str:
        """The SFT row's question without its ``<image>`` and the synthetic instruction."""
        content = self.rows["sft"][i]["messages"][0]["content"]
        return content.replace("<image>\n", "").removesuffix(_SUFFIX)

    def sft_reply(self, i: int) -> str:
        return self.rows["sft"][i]["messages"][1]["content"]

    def sft_answer(self, i: int) -> str:
        """What the SFT row's reply holds in ``<answer>``."""
        return extract_answer(self.sft_reply(i)) or ""

    def count(self, i: int) -> int:
        return len(self.rows["scenes"][i]["objects"])


def r1_v(s: Scenes, out: Path) -> None:
    """R1-V's CLEVR counting set (``leonardPKU/clevr_cogen_a_train``): ``image`` (RGBA, as CLEVR renders are),
    ``problem``, ``solution`` = ``<answer> N </answer>``; a ``save_to_disk`` folder."""
    rows = [
        {
            "image": s.image(i, "RGBA"),
            "problem": "How many items are there in the image?",
            "solution": f"<answer> {s.count(i)} </answer>",
        }
        for i in range(SCENES)
    ]
    _hf(rows, {"image": False}).save_to_disk(str(out / "clevr_cogen_a_train"))


def open_r1_multimodal(s: Scenes, out: Path) -> None:
    """``lmms-lab/multimodal-open-r1-8k-verified``: ``image``, ``problem``, ``solution`` =
    ``<think>…</think>\\n<answer>…</answer>`` (the verified reasoning with the answer), ``original_question``,
    ``original_answer``; a ``save_to_disk`` folder."""
    rows = []
    for i in range(SCENES):
        reply = s.sft_reply(i)
        answer = s.sft_answer(i)
        rows.append(
            {
                "image": s.image(i),
                "problem": s.sft_question(i),
                "solution": reply,
                "original_question": s.sft_question(i),
                "original_answer": f"The answer is {answer}.",
            }
        )
    _hf(rows, {"image": False}).save_to_disk(str(out / "multimodal-open-r1-8k-verified"))


def visualthinker_r1_zero(s: Scenes, out: Path) -> None:
    """VisualThinker-R1-Zero's SAT file (``SAT_train_15000.json``, a JSON array made by its
    ``process_dataset.py``): ``messages`` (the user turn ``<image> Answer in natural language. {question}
    Choose between the following options: a, b or c``; the assistant turn the correct option) and ``images``
    (``SAT_images_train/{i}_0.png``)."""
    rng = random.Random("seeds:visualthinker")
    rows = []
    for i in range(SCENES):
        scene = s.rows["scenes"][i]
        shape = scene["objects"][0]["shape"]
        n = sum(o["shape"] == shape for o in scene["objects"])  # >= 1: the first object has that shape
        options = [str(n), str(n + 1), str(n + 2)]
        rng.shuffle(options)
        question = f"How many {shape}s are in the image?"
        path = f"SAT_images_train/{i}_0.png"
        s.copy_image(i, out / "SAT" / path)
        user = (
            f"<image> Answer in natural language. {question} Choose between the following options: "
            f"{options[0]}, {options[1]} or {options[2]}"
        )
        rows.append(
            {
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": str(n)}],
                "images": [path],
            }
        )
    _json_array(out / "SAT" / "SAT_train_15000.json", rows)


def vlm_r1_rec(s: Scenes, out: Path) -> None:
    """VLM-R1's RefCOCO rows (``rec_jsons_processed/refcoco_train.jsonl``, its ``grpo_jsonl`` layout): ``id``,
    ``image`` (a COCO file name under the image folder), ``conversations`` (human: ``<image>`` and the referring
    question; gpt: the box ``[x1, y1, x2, y2]`` in the image's pixels); JPEG images in ``train2014/``, both as
    unpacked from the ``omlab/VLM-R1`` dataset repository."""
    rows = []
    for i in range(len(s.rows["scenes"])):
        obj = _unique_object(s.rows["scenes"][i])
        if obj is None:
            continue
        name = f"COCO_train2014_{i:012d}.jpg"
        s.copy_image(i, out / "VLM-R1" / "train2014" / name, "JPEG")
        question = (
            "Please provide the bounding box coordinate of the region this sentence describes: "
            f"the {obj['colour']} {obj['shape']}."
        )
        rows.append(
            {
                "id": len(rows),
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>{question}"},
                    {"from": "gpt", "value": json.dumps(obj["box"])},
                ],
            }
        )
    _jsonl(out / "VLM-R1" / "rec_jsons_processed" / "refcoco_train.jsonl", rows)


VISUAL_RFT_DETECTION = (
    "Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
    "(between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal places).\n"
    "If no object belonging to the category '{category}' in the image, return 'No Objects'.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "The output answer format should be as follows:\n"
    "<think> ... </think> <answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': number}}, ...]</answer>\n"
    "Please strictly follow the format."
)


def visual_rft(s: Scenes, out: Path) -> None:
    """Visual-RFT's detection set (``laolao77/ViRFT_COCO_base65``): ``image``, ``problem`` (the whole detection
    instruction for one category), ``solution`` = ``<answer>[{'Position': [x1, y1, x2, y2], 'Confidence':
    1}, ...]</answer>`` (Python-literal quotes, boxes on 0-1000); a ``save_to_disk`` folder."""
    rows = []
    for i in range(SCENES):
        scene = s.rows["scenes"][i]
        category = scene["objects"][0]["shape"]
        boxes = [_box_1000(o["box"], scene["size"]) for o in scene["objects"] if o["shape"] == category]
        listed = ", ".join(f"{{'Position': {b}, 'Confidence': 1}}" for b in boxes)
        rows.append(
            {
                "image": s.image(i),
                "problem": VISUAL_RFT_DETECTION.format(category=category),
                "solution": f"<answer>[{listed}]</answer>",
            }
        )
    _hf(rows, {"image": False}).save_to_disk(str(out / "ViRFT_COCO_base65"))


VISUAL_RFT_CLASSIFICATION = (
    "This is an image containing shapes. Please identify the colour and kind of the largest shape in the image.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "The output answer format should be as follows:\n<think> ... </think> <answer>shape name</answer>\n"
    "Please strictly follow the format."
)


def visual_rft_classification(s: Scenes, out: Path) -> None:
    """Visual-RFT's few-shot classification sets (``laolao77/ViRFT_CLS_fgvc_aircraft_4_shot`` and its siblings):
    ``image``, ``problem``, ``solution`` = ``<answer>label</answer>``, as parquet whose image column is the
    ``{"bytes", "path"}`` struct without the ``datasets`` metadata that would decode it (what pandas or pyarrow
    write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(SCENES):
        largest = max(
            s.rows["scenes"][i]["objects"],
            key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]),
        )
        rows.append(
            {
                "image": {"bytes": _png_bytes(s.image(i)), "path": f"{i:06d}.png"},
                "problem": VISUAL_RFT_CLASSIFICATION,
                "solution": f"<answer>{largest['colour']} {largest['shape']}</answer>",
            }
        )
    folder = out / "ViRFT_CLS_fgvc_aircraft_4_shot" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")


def r1_onevision(s: Scenes, out: Path) -> None:
    """R1-Onevision: the SFT set (``Fancy-MLLM/R1-Onevision``, parquet shards in one folder per source): ``id``,
    ``image`` as base64 text (with and without a ``data:`` prefix), ``conversations`` whose human turn has no
    ``<image>``; and the RL rows of its VLM-R1 fork (``grpo_jsonl``: ``image`` path, ``conversations`` with the
    gold in ``<answer>`` as the gpt turn, ``accu_reward_method``)."""
    import datasets

    hint = "Hint: Please answer the question and provide the final answer at the end.\nQuestion: "
    for part, indices in (("ai2d", range(0, SCENES, 2)), ("intergps", range(1, SCENES, 2))):
        rows = [
            {
                "id": f"{part}-{i}",
                "image": _png_base64(s.image(i), data_url=part == "intergps"),
                "conversations": [
                    {"from": "human", "value": hint + s.sft_question(i)},
                    {"from": "gpt", "value": s.sft_reply(i)},
                ],
            }
            for i in indices
        ]
        folder = out / "R1-Onevision" / part
        folder.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    rl = []
    for i in range(SCENES):
        path = f"images/{i:06d}.png"
        s.copy_image(i, out / "R1-Onevision-RL" / path)
        if i % 4 == 3:  # a multiple-choice row, scored by its letter
            n = s.count(i)
            question = f"How many objects are in the image?\nA. {n + 1}\nB. {n}\nC. {n + 2}"
            gold, method = "B", "mcq"
        else:
            question, gold, method = s.rows["rl"][i]["problem"], s.rows["rl"][i]["solution"], "default"
        rl.append(
            {
                "image": path,
                "conversations": [
                    {"from": "human", "value": f"<image>{question}"},
                    {"from": "gpt", "value": f"<answer>{gold}</answer>"},
                ],
                "accu_reward_method": method,
            }
        )
    _jsonl(out / "R1-Onevision-RL" / "rl.jsonl", rl)


def deepseek_r1_vision(s: Scenes, out: Path) -> None:
    """deepseek-r1-vision's distilled set (a JSON array, LLaMA-Factory's sharegpt ``messages`` layout): ``id``,
    ``messages`` (assistant turns ``<think>\\n…\\n</think>\\n\\n`` + the answer, without ``<answer>`` tags; one
    row two rounds long), ``images``."""
    rows = []
    for i in range(SCENES):
        path = f"images/{i:06d}.png"
        s.copy_image(i, out / "deepseek-r1-vision" / path)
        reply = s.sft_reply(i)
        think = reply[: reply.find("</think>") + len("</think>")]
        answer = s.sft_answer(i)
        messages = [
            {"role": "user", "content": "<image>" + s.sft_question(i)},
            {"role": "assistant", "content": f"{think}\n\nThe answer is {answer}."},
        ]
        if i == 0:
            messages += [
                {"role": "user", "content": "How many objects are there in total?"},
                {"role": "assistant", "content": f"<think>\nI count them.\n</think>\n\n{s.count(i)}."},
            ]
        rows.append({"id": f"single-en-{i:09d}", "messages": messages, "images": [path]})
    _json_array(out / "deepseek-r1-vision" / "distill.json", rows)


def align_ds_v(s: Scenes, out: Path) -> None:
    """Align-DS-V's two sets: LLaVA-Pretrain's captions (``blip_laion_cc_sbu_558k.json``, a JSON array of
    LLaVA rows, images in numbered sub-folders) for the projector, and align-anything's text-image-to-text rows
    (``PKU-Alignment/Align-Anything-TI2T-Instruction-100K``: ``prompt``, ``image`` (RGBA), ``response``; a
    ``save_to_disk`` folder) for SFT."""
    captions = []
    for i, row in enumerate(s.rows["captions"]):
        path = f"00000/{i:09d}.jpg"
        s.copy_image(i, out / "LLaVA-Pretrain" / "images" / path, "JPEG")
        captions.append({"id": f"{i:09d}", "image": path, "conversations": row["conversations"]})
    _json_array(out / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json", captions)
    rows = [
        {"prompt": s.sft_question(i), "image": s.image(i, "RGBA"), "response": s.sft_reply(i)}
        for i in range(SCENES)
    ]
    _hf(rows, {"image": False}).save_to_disk(str(out / "Align-Anything-TI2T-Instruction-100K"))


def ms_swift(s: Scenes, out: Path) -> None:
    """ms-swift's multimodal GRPO rows (its CLEVR counting example): ``messages`` with the instruction written
    into the user turn and no ``<image>``, ``images`` (a list of paths), ``solution`` = ``<answer> N </answer>``."""
    rows = []
    for i in range(SCENES):
        path = f"images/{i:06d}.png"
        s.copy_image(i, out / "clevr_count" / path)
        question = (
            "How many items are there in the image? Output the thinking process in <think> </think> and\n"
            " final answer (number) in <answer> </answer> tags."
        )
        rows.append(
            {
                "images": [path],
                "messages": [{"role": "user", "content": question}],
                "solution": f"<answer> {s.count(i)} </answer>",
            }
        )
    _jsonl(out / "clevr_count" / "train.jsonl", rows)


def easyr1(s: Scenes, out: Path) -> None:
    """EasyR1's Geometry3K (``hiyouga/geometry3k``, a DatasetDict with train / validation / test): ``images``
    (a list of ``datasets.Image``), ``problem`` with its ``<image>``, ``answer``, ``id``, ``choices``,
    ``ground_truth`` (the choice letter); a ``save_to_disk`` folder."""
    import datasets

    def rows(indices: range) -> list[dict]:
        out_rows = []
        for i in indices:
            n = s.count(i)
            choices = [str(n + 1), str(n), str(n + 2), str(n + 3)]  # the gold is B
            out_rows.append(
                {
                    "images": [s.image(i)],
                    "problem": "<image>How many shapes are drawn in the figure?",
                    "answer": str(n),
                    "id": i,
                    "choices": choices,
                    "ground_truth": "B",
                }
            )
        return out_rows

    splits = {"train": range(SCENES), "validation": range(2), "test": range(2)}
    datasets.DatasetDict({k: _hf(rows(v), {"images": True}) for k, v in splits.items()}).save_to_disk(
        str(out / "geometry3k")
    )


SYSTEMS: dict[str, Callable[[Scenes, Path], None]] = {
    "r1_v": r1_v,
    "open_r1_multimodal": open_r1_multimodal,
    "visualthinker_r1_zero": visualthinker_r1_zero,
    "vlm_r1_rec": vlm_r1_rec,
    "visual_rft": visual_rft,
    "visual_rft_classification": visual_rft_classification,
    "r1_onevision": r1_onevision,
    "deepseek_r1_vision": deepseek_r1_vision,
    "align_ds_v": align_ds_v,
    "ms_swift": ms_swift,
    "easyr1": easyr1,
}


def write_seed_rows(out: str | Path, force: bool = False) -> dict[str, Path]:
    """Every system's rows under ``out/<system>/``; returns ``{system: folder}``."""
    import datasets

    datasets.disable_progress_bars()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise AlignError(f"{out} is not empty; pass --force to write the seed rows again")
        shutil.rmtree(out)
    synthesize(out / "_scenes", train=SCENES * 2, test=1)
    scenes = Scenes(out / "_scenes" / "train")
    folders = {}
    for name, write in SYSTEMS.items():
        folders[name] = out / name
        write(scenes, folders[name])
    return folders


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="checkpoints/seeds/data", help="output folder (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="replace a previous output in --out")


def run(args: argparse.Namespace) -> int:
    folders = write_seed_rows(args.out, args.force)
    for name, folder in folders.items():
        print(f"{name:22s} {folder}")
    print("recipes: recipes/seeds/tiny/<system>.yaml read these folders (docs/seeds.md)")
    return 0
