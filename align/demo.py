"""The embedded demo's preparation: synthetic data, and tiny parts that know a little about the synthetic world.

``align run recipes/demo/pipeline.yaml`` (``scripts/demo.sh``) calls :func:`prepare` first
(``prepare: align.demo:prepare``). Randomly initialised zoo parts would make the three stages meaningless at this
scale, so the demo gives its parts a little knowledge first, the way a real encoder and a real reasoning LLM come
pre-trained. Everything below is built from the synthetic TRAIN split only (the test split is never read here):

* ``synth/`` — ``align data synth`` output (3000 train / 500 val / 1000 test scenes of captions, SFT and RL rows;
  val is where the demo's settings were chosen, test is what the report scores);
* ``clip/`` — a tiny open_clip CLIP (ViT image tower + text tower) trained contrastively (open_clip's
  ``ClipLoss``) on train images and their captions, saved in open_clip's ``local-dir:`` layout so that
  ``align assemble`` converts it for real;
* ``llm/`` — a tiny Qwen2 with the zoo's R1 tokenizer and chat template, pre-trained as a plain causal LM
  (text only, next-token loss on whole documents) on task text rendered with the chat template: a scene
  *described in words* followed by a question and its step-by-step answer, and a described scene re-described
  in another caption style. So the LLM knows the task language and how to reason about a scene it is told
  about; it has never seen an image. Stage 1 must teach the projector to "tell" it the scene.

Known limit, measured (2026-12-04; ``docs/demo.md`` has the tables): the models name shapes at chance, and the
cause is the tiny LLM, not the tower. A linear probe reads an object's shape from the tower's patch feature of
its cell 78% of the time on val scenes (colour 99.9%); 96-pixel images (80%) and hard-negative captions with a
shape swapped (78%) did not change that. The pre-trained LLM, told a scene in words, copies each object's colour
into its listing (p = 0.995 per colour word on val text) and its position (0.95) but not its shape (0.334:
uniform over three). With position first in the listing and the captions it copied the position (0.87) and no
longer the colour (0.40): it copies the first attribute after each list number, keyed to the line, and never
learned to continue from the word before (an induction step), at 4 or 8 heads and 3 epochs. Through the
projector the same holds: the attribute probe (:mod:`align.demo_probe`) gives shape about 0.5 after every stage.

Each part is cached under ``checkpoints/demo-cache/<part>/`` with a ``demo-part.json`` marker holding the hash
of its settings and of what it was built from (the CLIP and the LLM: the train split's settings and the synth
code, so more val or test scenes rebuild only the data); a part whose marker matches is skipped, so only the
first run pays for it. Parts are built in a temporary sibling folder and renamed into place.

Try it: ``.venv/bin/python -c "from align.demo import prepare; prepare()"`` (measured on 2 otherwise idle CPU
cores, 2026-12-04: 2.1 s synth, 34.9 s CLIP, 289.2 s LLM the first time; seconds afterwards).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.data.synth import CAPTION_PROMPTS, INSTRUCTION, synthesize
from align.data.synth_scenes import GRID, Obj, Scene, caption
from align.data.synth_tasks import make_task, sft_reply
from align.errors import AlignError
from align.stages.common import lr_at

MARKER = "demo-part.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"


@dataclass(frozen=True)
class SynthSettings:
    train: int = 3000
    val: int = 500  # for choosing the demo's settings; the report's numbers are on test only
    test: int = 1000
    image_size: int = 64
    seed: int = 0

    def train_split(self) -> dict:
        """What the train split depends on (synth draws it first, so val/test sizes leave it unchanged)."""
        return {"train": self.train, "image_size": self.image_size, "seed": self.seed}


@dataclass(frozen=True)
class ClipSettings:
    """A tiny CLIP ViT whose patches are the synthetic scenes' grid cells, with a text context for whole captions.

    Scenes are a 3x3 grid of cells, one object at most per cell; at 48 pixels with 16-pixel patches each of the
    9 image tokens sees exactly one cell, so perception is "what is in each cell" (and sequences stay short).
    """

    image_size: int = 48  # the synth images (64 pixels) are resized to this, as open_clip's transform does
    patch_size: int = 16
    width: int = 128
    layers: int = 3
    head_width: int = 32
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 64  # the longest synth caption is 53 CLIP tokens + start and end
    embed_dim: int = 64
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class LMSettings:
    """A tiny Qwen2 (R1-distill shaped: GQA, untied embeddings) and its text-only pre-training.

    Copying from the context (the described objects into the listing) appears late: after one epoch the LLM
    writes well-formed reasoning about objects it makes up; after three it copies colours (not shapes, see the
    module docstring). This small model trained for more steps got further than a 256-wide one for fewer.
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    docs_per_scene: int = 2  # question documents per train scene (families cycle), plus one re-description
    seq_len: int = 256  # documents are packed into rows of this many tokens
    batch_size: int = 8
    epochs: int = 3
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class DemoSettings:
    root: str = "checkpoints/demo-cache"
    zoo: str = "checkpoints/zoo"
    synth: SynthSettings = field(default_factory=SynthSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)
    lm: LMSettings = field(default_factory=LMSettings)


@dataclass(frozen=True)
class DemoParts:
    synth: Path  # has train/ and test/
    clip: Path  # open_clip local-dir folder
    llm: Path  # HF causal LM folder with the R1 tokenizer


# ------------------------------------------------------------------------------------------------- caching


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, key: str, build: Callable[[Path], dict], what: str) -> Path:
    """``path`` if its marker holds ``key``; else ``build(staging)`` (returns facts for the marker), renamed in."""
    try:
        if json.loads((path / MARKER).read_text())["key"] == key:
            print(f"demo: {what}: cached ({path})")
            return path
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    print(f"demo: {what} -> {path}", flush=True)
    t0 = time.perf_counter()
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    facts = build(staging)
    seconds = round(time.perf_counter() - t0, 1)
    (staging / MARKER).write_text(json.dumps({"key": key, "seconds": seconds, **facts}, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    print(f"demo: {what}: done in {seconds}s", flush=True)
    return path


def _synth_code() -> str:
    """The synth modules' source: a change to how scenes, captions or derivations are written rebuilds the data
    and the parts that learned from it."""
    from align.data import synth, synth_scenes, synth_tasks

    return _hash(*(Path(m.__file__).read_text() for m in (synth, synth_scenes, synth_tasks)))


def prepare(settings: DemoSettings | None = None) -> DemoParts:
    """Build (or reuse) the demo's data and pre-trained parts; prints what it does and how long each part takes."""
    s = settings or DemoSettings()
    root = Path(s.root)
    t0 = time.perf_counter()
    from align.zoo import build_part

    tokenizer_dir = build_part("qwen2-r1", Path(s.zoo))  # the zoo's R1 tokenizer, chat template and specials
    code = _synth_code()
    synth = _cached(
        root / "synth",
        _hash("synth", dataclasses.asdict(s.synth), code),
        lambda out: _build_synth(out, s.synth),
        f"synthetic tasks ({s.synth.train} train / {s.synth.val} val / {s.synth.test} test scenes)",
    )
    # the parts learn from the train split only
    train_key = _hash("synth-train", s.synth.train_split(), code)
    clip = _cached(
        root / "clip",
        _hash("clip", dataclasses.asdict(s.clip), train_key),
        lambda out: pretrain_clip(synth / "train", out, s.clip),
        "contrastive pre-training of the tiny open_clip CLIP on train image/caption pairs",
    )
    llm = _cached(
        root / "llm",
        _hash("llm", dataclasses.asdict(s.lm), train_key, (tokenizer_dir / "zoo-part.json").read_text()),
        lambda out: pretrain_lm(synth / "train", tokenizer_dir, out, s.lm),
        "causal-LM pre-training of the tiny Qwen2 on train task text",
    )
    print(f"demo: prepared in {time.perf_counter() - t0:.1f}s")
    return DemoParts(synth, clip, llm)


def _build_synth(out: Path, s: SynthSettings) -> dict:
    summary = synthesize(out, s.train, s.test, s.image_size, s.seed, val=s.val)
    print(summary.table())
    return {}


# -------------------------------------------------------------------------------------------------- scenes


def read_scenes(split_dir: Path) -> list[tuple[str, Scene]]:
    """(image path, Scene) for every row of a split's ``scenes.jsonl`` (the ground truth synth wrote)."""
    scenes = []
    for line in (split_dir / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        size = row["size"][0]
        objects = []
        for o in row["objects"]:
            x1, y1, x2, y2 = o["box"]
            # each object sits inside its own grid cell, so the box centre names the cell
            col, r = (
                min(GRID - 1, (x1 + x2) * GRID // (2 * size)),
                min(GRID - 1, (y1 + y2) * GRID // (2 * size)),
            )
            obj = Obj(o["shape"], o["colour"], r, col, (x1, y1, x2, y2))
            if obj.where != o["position"]:
                raise AlignError(
                    f"{split_dir / 'scenes.jsonl'}: row {row['id']}: box {o['box']} lies in the cell "
                    f"'{obj.where}' but the row says '{o['position']}'; regenerate with align data synth"
                )
            objects.append(obj)
        scenes.append((str(split_dir / row["image"]), Scene(size, tuple(objects))))
    return scenes


# ------------------------------------------------------------------------------------------------ the encoder


def clip_config(s: ClipSettings) -> dict:
    """open_clip ``model_cfg`` of the demo's CLIP."""
    return {
        "embed_dim": s.embed_dim,
        "vision_cfg": {
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "width": s.width,
            "layers": s.layers,
            "head_width": s.head_width,
            "mlp_ratio": 2.0,
        },
        "text_cfg": {
            "context_length": s.context_length,
            "vocab_size": 49408,  # open_clip's default tokenizer (bundled, no download)
            "width": s.text_width,
            "heads": max(1, s.text_width // 32),
            "layers": s.text_layers,
        },
    }


def pretrain_clip(train_dir: Path, out: Path, s: ClipSettings) -> dict:
    """Contrastive training (open_clip ``ClipLoss``) on train images, each epoch with fresh caption styles."""
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    scenes = read_scenes(train_dir)
    size = s.image_size
    cfg = clip_config(s)
    preprocess_cfg = dict(
        size=size, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic", resize_mode="shortest"
    )
    torch.manual_seed(s.seed)
    model = open_clip.model.CLIP(**json.loads(json.dumps(cfg)))
    transform = open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in scenes])
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.1)
    steps_per_epoch = len(scenes) // s.batch_size
    total = s.epochs * steps_per_epoch
    rng = random.Random(f"demo-clip:{s.seed}")
    model.train()
    step, t0, accuracy = 0, time.perf_counter(), 0.0
    for epoch in range(s.epochs):
        order = rng.sample(range(len(scenes)), len(scenes))
        texts = [caption(scenes[i][1], rng.randrange(3)) for i in range(len(scenes))]
        for b in range(steps_per_epoch):
            idx = order[b * s.batch_size : (b + 1) * s.batch_size]
            tokens = open_clip.tokenize([texts[i] for i in idx], context_length=s.context_length)
            _set_lr(optimizer, lr_at(step, total, s.lr, "cosine", total // 10))
            image_f, text_f, scale = model(pixels[idx], tokens)
            loss = loss_fn(image_f, text_f, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
                hits = (image_f @ text_f.T).argmax(1) == torch.arange(len(idx))
                accuracy = (
                    0.9 * accuracy + 0.1 * float(hits.float().mean()) if step else float(hits.float().mean())
                )
            step += 1
        print(
            f"  clip epoch {epoch + 1}/{s.epochs}: loss {float(loss.detach()):.3f}, image->caption top-1 in batch "
            f"{accuracy:.2f} (chance {1 / s.batch_size:.3f}), {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    state = {k: v.contiguous() for k, v in sorted(model.state_dict().items())}
    save_file(state, str(out / OPENCLIP_WEIGHTS))
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
    )
    return {"steps": step, "final_loss": float(loss.detach()), "batch_top1": accuracy}


# ---------------------------------------------------------------------------------------------------- the LLM


def lm_documents(train_dir: Path, docs_per_scene: int, seed: int) -> Iterator[list[dict[str, str]]]:
    """Text-only chats about train scenes, each scene told in words by its object-list caption (style 0, the one
    that determines the scene): described scene + question -> reasoning and answer, and described scene ->
    another caption style. A caption that does not determine the listing would teach the LLM to make it up."""
    for index, (_, scene) in enumerate(read_scenes(train_dir)):
        rng = random.Random(f"demo-lm:{seed}:{index}")
        told = caption(scene, 0)
        for k in range(docs_per_scene):
            task = make_task(scene, index + 2 * k, rng)  # a different family per document
            user = f"{told}\n{task.question} {INSTRUCTION}"
            yield [{"role": "user", "content": user}, {"role": "assistant", "content": sft_reply(task)}]
        user = f"{told}\n{rng.choice(CAPTION_PROMPTS)}"
        yield [
            {"role": "user", "content": user},
            {"role": "assistant", "content": caption(scene, rng.randrange(3))},
        ]


def pretrain_lm(train_dir: Path, tokenizer_dir: Path, out: Path, s: LMSettings) -> dict:
    """Next-token loss over packed chat-rendered documents (all tokens), AdamW with cosine decay."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream: list[int] = []
    for messages in lm_documents(train_dir, s.docs_per_scene, s.seed):
        stream += _chat_ids(tokenizer, messages)
    rows = torch.tensor(stream[: len(stream) // s.seq_len * s.seq_len]).view(-1, s.seq_len)
    base = AutoConfig.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=base.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=base.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        rope_parameters=base.rope_parameters,
        use_sliding_window=False,
        max_window_layers=s.layers,
    )
    torch.manual_seed(s.seed)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01, betas=(0.9, 0.95))
    steps_per_epoch = len(rows) // s.batch_size
    total = s.epochs * steps_per_epoch
    print(
        f"  {len(stream):,} tokens in {len(rows)} rows of {s.seq_len}; {total} steps of {s.batch_size} rows"
    )
    generator = torch.Generator().manual_seed(s.seed)
    model.train()
    step, t0, loss = 0, time.perf_counter(), torch.tensor(0.0)
    for _ in range(s.epochs):
        order = torch.randperm(len(rows), generator=generator)
        for b in range(steps_per_epoch):
            batch = rows[order[b * s.batch_size : (b + 1) * s.batch_size]]
            _set_lr(optimizer, lr_at(step, total, s.lr, "cosine", max(1, total // 20)))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % max(1, total // 10) == 0 or step == total:
                print(
                    f"  lm step {step}/{total}: loss {float(loss.detach()):.3f}, {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
    model.generation_config = GenerationConfig.from_pretrained(tokenizer_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"steps": step, "tokens": len(stream), "final_loss": float(loss.detach())}


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A chat as SFT and inference tokenise it (see align.data.encode): the rendered prompt, which ends with the
    R1 prefill ``<think>\\n``, then the reply without that prefill, tokenised on its own, then end-of-turn."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    reply = messages[-1]["content"].removeprefix("<think>\n") + tokenizer.eos_token
    return (
        tokenizer(prompt, add_special_tokens=False).input_ids
        + tokenizer(reply, add_special_tokens=False).input_ids
    )


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
