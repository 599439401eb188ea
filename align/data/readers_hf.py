"""Hugging Face ``datasets`` sources for :mod:`align.data.readers` (``format: hf``).

``path`` is a ``load_from_disk`` folder (a DatasetDict picks ``split``, default ``train``) or parquet / JSON
file(s), read with ``load_dataset("parquet" | "json", data_files=path)``. Rows with a messages column
(``messages`` / ``conversations``) are conversations; otherwise a question column (``problem`` / ``question`` /
``prompt``) and an answer column (``solution`` / ``answer``) make RL-style rows, and a ``response`` column
(align-anything's ``prompt`` / ``image`` / ``response`` rows) makes the question and its response an SFT
conversation (with a gold too when there is an answer column). ``columns:`` maps our names to other
column names. Image columns may hold decoded images (``datasets.Image``), encoded bytes, or paths resolved
against ``image_root``. Origins are ``path[index]``. ``datasets`` is imported only when such a source is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from align.data.config import DataSource
from align.data.rows import (
    Row,
    RowContext,
    RowError,
    RowProblem,
    finish_messages,
    question_row,
    row_images,
    row_meta,
    row_turns,
    template_first_user_turn,
)
from align.data.sample import Sample
from align.errors import AlignError

_HF_DEFAULTS = {
    "image": ("image", "images"),
    "question": ("problem", "question", "prompt"),
    "answer": ("solution", "answer"),
    "response": ("response",),
    "messages": ("messages", "conversations"),
}


def _load_hf(source: DataSource) -> Any:
    import datasets

    path = Path(source.path)
    split = source.split or "train"
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise AlignError(f"{path}: no split '{split}' (splits: {', '.join(loaded)}); set split:")
            return loaded[split]
        return loaded
    builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(path.suffix)
    if builder is None:
        raise AlignError(f"{path}: hf sources are load_from_disk folders or .parquet / .json / .jsonl files")
    if not any(c in str(path) for c in "*?[") and not path.is_file():
        raise AlignError(f"{path}: data file not found")
    return datasets.load_dataset(builder, data_files=str(path), split=split)


def _hf_columns(source: DataSource, names: list[str]) -> dict[str, str]:
    columns = {}
    for ours, candidates in _HF_DEFAULTS.items():
        if ours in source.columns:
            if source.columns[ours] not in names:
                raise AlignError(
                    f"{source.path}: columns.{ours} is '{source.columns[ours]}', which is not a column "
                    f"(columns: {', '.join(names)})"
                )
            columns[ours] = source.columns[ours]
        else:
            found = [c for c in candidates if c in names]
            if found:
                columns[ours] = found[0]
    if "messages" not in columns and "question" not in columns:
        raise AlignError(
            f"{source.path}: no messages column ({'/'.join(_HF_DEFAULTS['messages'])}) and no question column "
            f"({'/'.join(_HF_DEFAULTS['question'])}); map one with columns: (columns: {', '.join(names)})"
        )
    return columns


def _response_row(
    record: dict, columns: dict[str, str], images: list, used: set[str], ctx: RowContext, origin: str
) -> Sample:
    """A question and its response as an SFT conversation; its answer column, if any, is the gold."""
    response = record[columns["response"]]
    if not isinstance(response, str) or not response.strip():
        raise RowError("answer", f"empty or missing response ({columns['response']})")
    question, solution = record[columns["question"]], record.get(columns.get("answer", ""))
    if solution is None:
        # question_row needs a gold; the response stands in for it and is dropped again below
        sample = question_row(record, question, response, images, used, ctx)
        sample.answer = None
    else:
        sample = question_row(record, question, solution, images, used, ctx)
    sample.messages = [*sample.messages, {"role": "assistant", "content": response}]
    sample.origin = origin
    return sample


def read_hf(source: DataSource, ctx: RowContext) -> Iterator[Row]:
    """Every row of an hf source; a dataset that cannot be loaded is one file-level RowProblem."""
    try:
        dataset = _load_hf(source)
        columns = _hf_columns(source, list(dataset.column_names))
    except AlignError as err:
        yield RowProblem(source.path, "file", str(err))
        return
    except Exception as err:  # datasets raises many types for unreadable files; report, don't crash
        yield RowProblem(source.path, "file", f"cannot load dataset: {type(err).__name__}: {err}")
        return
    for i in range(len(dataset)):
        origin = f"{source.path}[{i}]"
        try:
            record = dataset[i]
            images = row_images(record.get(columns["image"]) if "image" in columns else None, ctx)
            used = set(columns.values())
            if "messages" in columns:
                messages = row_turns(record[columns["messages"]], columns["messages"], images, ctx)
                messages = template_first_user_turn(messages, ctx)
                messages = finish_messages(messages, images, ctx, needs_assistant=True)
                yield Sample(ctx.source, origin, messages, images, meta=row_meta(record, used))
            elif "response" in columns:
                yield _response_row(record, columns, images, used, ctx, origin)
            else:
                question = record[columns["question"]]
                solution = record.get(columns["answer"]) if "answer" in columns else None
                sample = question_row(record, question, solution, images, used, ctx)
                sample.origin = origin
                yield sample
        except RowError as bad:
            yield RowProblem(origin, bad.kind, bad.reason)
        except Image.DecompressionBombError as err:  # `datasets` decoded the image with PIL's global limit
            yield RowProblem(origin, "image-too-large", f"embedded image: {err}")
        except (OSError, ValueError) as err:  # an undecodable embedded image
            yield RowProblem(origin, "image-corrupt", f"cannot decode row: {err}")
