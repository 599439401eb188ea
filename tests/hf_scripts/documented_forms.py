"""Greedy token ids of transformers' documented image-text forms on a model folder; transformers, torch and PIL only.

Usage: ``python documented_forms.py SPEC.json OUT.json``. SPEC: ``{"folder", "image", "max_new_tokens",
"cases": {name: {"form": "chat_template" | "pipeline" | "render", "messages": [...], "images": bool}}}``.
OUT: ``{name: token ids}`` (the prompt and the generated ids, as ``generate`` returns them) or, for ``render``,
``{name: rendered text}``. It must not import align: it is what a user of the exported folder runs.
"""

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

spec = json.loads(Path(sys.argv[1]).read_text())
processor = AutoProcessor.from_pretrained(spec["folder"])
model = AutoModelForImageTextToText.from_pretrained(spec["folder"], dtype=torch.float32).eval()
greedy = {"do_sample": False, "max_new_tokens": spec["max_new_tokens"]}
chat = None
out = {}
for name, case in spec["cases"].items():
    if case["form"] == "render":
        out[name] = processor.apply_chat_template(case["messages"], add_generation_prompt=True)
    elif case["form"] == "chat_template":
        extra = {"processor_kwargs": {"images": [Image.open(spec["image"])]}} if case.get("images") else {}
        inputs = processor.apply_chat_template(
            case["messages"],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **extra,
        )
        with torch.no_grad():
            out[name] = model.generate(**inputs, **greedy)[0].tolist()
    else:
        if chat is None:
            chat = pipeline("image-text-to-text", model=spec["folder"], dtype=torch.float32)
        result = chat(text=case["messages"], return_tensors=True, generate_kwargs=greedy)
        out[name] = [int(i) for i in result[0]["generated_token_ids"]]
Path(sys.argv[2]).write_text(json.dumps(out))
