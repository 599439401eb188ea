"""SFT step time: ``align sft`` vs TRL's ``SFTTrainer`` on the same tiny Llava, rows, batch and optimizer.

Both train the projector + LLM (tower frozen) on the synthetic reasoning rows, WITH their images, loss on the
assistant completion only, AdamW lr 2e-5, cosine schedule with 3% warm-up, no weight decay, clipping at 1.0,
4 rows per step, no accumulation, no packing, fp32 on CPU, one process.

TRL gets the rows as a vision prompt-completion dataset: ``prompt`` is the chat template's generation prompt
with one ``<image>`` per image (the Llava processor expands it), ``completion`` the tokens ``align`` supervises,
``images`` the PIL images. The conversational form cannot be used: TRL turns message contents into lists of
parts, which the DeepSeek-R1 chat template (``'<｜User｜>' + content``) cannot render. TRL settings, in full:
``use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, per_device_train_batch_size=4,
gradient_accumulation_steps=1, learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.03,
weight_decay=0.0, max_grad_norm=1.0, max_length=1024, packing=False, padding_free=False,
completion_only_loss=True, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
dataloader_num_workers=0, seed=0``. Rows come in random order in TRL (transformers 5 has no length grouping),
so ``align`` runs with ``data.group_by_length=false``.

Step time: the interval between consecutive optimizer-step ends (data loading + forward + backward +
optimizer), first step of each run excluded; median over all runs' steps.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sft_vs_trl.py [--rows 64 --steps 16 --repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

from bench_feature_cache import DEFAULT_WORK, ROOT, prepare, run_stage

BATCH, LR, MAX_LENGTH = 4, 2e-5, 1024


def trl_dataset(model_dir: Path, sft: Path):
    """The rows ``align`` trains on, as TRL's vision prompt-completion format, plus their total token count."""
    from datasets import Dataset
    from PIL import Image

    from align.checkpoint import image_seq_len, load_llava
    from align.data.config import DataSource
    from align.data.encode import encode_sft
    from align.data.mixing import build_mix

    model, processor = load_llava(model_dir)
    tok = processor.tokenizer
    samples, _ = build_mix([DataSource(name="sft", path=str(sft), format="messages")], 0, True)
    rows, tokens = [], 0
    for sample in samples:
        item = encode_sft(sample, tok, model.config.image_token_id, image_seq_len(processor))
        prompt = tok.apply_chat_template(sample.messages[:-1], tokenize=False, add_generation_prompt=True)
        completion = tok.decode(item.input_ids[item.prompt_length :])
        images = [Image.open(path).convert("RGB") for path in item.images]
        rows.append({"prompt": prompt, "completion": completion, "images": images})
        tokens += len(item)
    return Dataset.from_list(rows), tokens / len(rows)


def trl_step_times(model_dir: Path, dataset, steps: int, out: Path) -> list[float]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    model.model.vision_tower.requires_grad_(False)  # as align's default: tower frozen
    processor = AutoProcessor.from_pretrained(model_dir)
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    config = SFTConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=MAX_LENGTH,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=processor, callbacks=[StepEnds()]
    )
    trainer.train()
    return [b - a for a, b in itertools.pairwise(ends)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    paths = prepare(args.work, args.rows)
    dataset, mean_tokens = trl_dataset(paths["model"], paths["sft"])
    overrides = [
        f"model={paths['model']}",
        f"data.sources.0.path={paths['sft']}",
        f"data.max_length={MAX_LENGTH}",
        "data.group_by_length=false",
        f"run.micro_batch_size={BATCH}",
        "run.grad_accum=1",
        f"run.max_steps={args.steps}",
        f"optim.lr={LR}",
        "optim.projector_lr=null",
        "optim.schedule=cosine",
        "optim.warmup_ratio=0.03",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        "run.precision=fp32",
        "run.gradient_checkpointing=false",
    ]
    times: dict[str, list[float]] = {"align sft": [], "TRL SFTTrainer": []}
    for i in range(args.repeats):
        rows = run_stage("sft", ROOT / "recipes" / "tiny" / "sft.yaml", args.work / "vs-trl-align", overrides)
        times["align sft"] += [r["step_time_s"] for r in rows[1:]]
        steps = trl_step_times(paths["model"], dataset, args.steps, args.work / f"vs-trl-trl-{i}")
        times["TRL SFTTrainer"] += steps[1:]

    print(
        f"\nSFT with images, tiny zoo (SigLIP + Qwen2), {args.rows} rows (mean {mean_tokens:.0f} tokens incl. 64 image "
        f"tokens), batch {BATCH}, {args.steps} steps, fp32 CPU, {args.threads} thread(s), median step of {args.repeats} runs"
    )
    print("| trainer | median step s | rows/s | tokens/s |")
    print("|---|---|---|---|")
    for name, values in times.items():
        step = statistics.median(values)
        print(f"| {name} | {step:.3f} | {BATCH / step:.1f} | {BATCH * mean_tokens / step:.0f} |")
    ratio = statistics.median(times["TRL SFTTrainer"]) / statistics.median(times["align sft"])
    print(f"align sft step time = TRL step time / {ratio:.2f}")


if __name__ == "__main__":
    main()
