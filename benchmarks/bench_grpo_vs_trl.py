"""Benchmark: one GRPO step of ``align grpo`` vs TRL 1.16's ``GRPOTrainer``, same Llava, data and settings.

Both sides train the same SigLIP + Qwen2 Llava (assembled here) on the synthetic RL questions with the
accuracy + format rewards: G = 8 completions for each of 2 questions per step (TRL:
``per_device_train_batch_size=16``), temperature 1, top-p 1, no top-k, beta 0.04 (a
frozen reference model), ``loss_type="grpo"``, ``scale_rewards="group"``, one iteration, AdamW lr 1e-6
constant, clip 1.0, fp32 on CPU, ``torch.set_num_threads(--threads)``. Every configuration runs in its own
process, so the peak RSS is per run. A step's cost is measured between step ends (after the optimizer step),
the first round left out as warm-up, as wall time and as this process's CPU time: on a shared machine the wall
time swings with other load, while with ``--threads 1`` the CPU time stays the work done. Medians over steps,
then over ``--repeat`` interleaved runs.

``--size`` picks the model:

* ``tiny`` (default): the zoo's parts as they are (SigLIP hidden 64, 2 layers, 64 image tokens; Qwen2 hidden
  128, 2 layers, vocab 1024), up to 64 new tokens: per-op overhead dominates;
* ``medium``: the zoo's parts re-initialised larger (seeded): SigLIP hidden 384, 6 layers, 224 px / patch 16 =
  196 image tokens; Qwen2 hidden 768, 12 layers, 12 heads / 4 K/V heads, MLP 2048 (~77M parameters, the zoo's
  R1 tokenizer, vocab 1024), up to 128 new tokens: arithmetic dominates. A random model rarely samples its
  end-of-turn token, so completions run to the limit on both sides.

Our variants switch one optimisation off at a time:

* ``hf_decode``: the sampler decodes with the model's own Hugging Face forward (mask rebuilt and
  ``DynamicCache`` grown every token) instead of :class:`align.grpo.decoder.StaticDecoder`;
* ``unpacked_decode``: the plain decoder uses the weights in place (as for models above
  ``PACK_LIMIT_BYTES``) instead of packed ``[in, out]`` copies with q/k/v and gate/up fused;
* ``adamw_per_tensor``: torch's AdamW updating one tensor at a time (``fused=False``, CPU's default before)
  instead of the fused one;
* ``repeat_prompts``: the sampler gets each prompt G times (one row per completion, images repeated), as HF
  ``generate`` in TRL does, instead of one prefill per question whose KV cache the G completions share;
* ``naive_forward``: the training and reference forwards run every completion row with its own copy of the
  image and prompt (``grpo.shared_prefix: false``), TRL's way;
* ``naive_all``: both of the above, i.e. TRL's algorithm on our loop;
* ``mu2`` / ``mu2_old_logps_forward``: ``num_iterations: 2`` with the old log-probs taken from the sampler
  (ours) vs computed by an extra no-grad forward after sampling (what TRL does when ``num_iterations > 1``).

TRL's settings, in full: ``GRPOTrainer(model=<folder path>, reward_funcs=[accuracy, format],
processing_class=<the folder's LlavaProcessor>, train_dataset=<prompt/image/solution rows>)`` with
``GRPOConfig(use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
per_device_train_batch_size=16, gradient_accumulation_steps=1, num_generations=8, max_completion_length=64 (medium: 128),
temperature=1.0, top_p=1.0, top_k=0, beta=0.04, epsilon=0.2, num_iterations=1, loss_type="grpo",
scale_rewards="group", learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0,
max_grad_norm=1.0, optim="adamw_torch", max_steps=STEPS, logging_strategy="no", save_strategy="no",
report_to=[], log_completions=False, disable_dropout=True, dataloader_num_workers=0, seed=0)``. The model is
passed as the saved folder's path because TRL re-loads the reference model from ``config._name_or_path``. The
processor's chat template is the folder's R1 template taught to render TRL's typed content blocks; the
benchmark checks that both sides then feed the model the same prompt ids.

Run (the first run builds the model and data under --work, ~1 min)::

    .venv/bin/python benchmarks/bench_grpo_vs_trl.py [--steps 6] [--threads 2] [--work /tmp/bench_grpo]
    .venv/bin/python benchmarks/bench_grpo_vs_trl.py --only ours,trl      # a subset of the configurations
    .venv/bin/python benchmarks/bench_grpo_vs_trl.py --size medium --steps 3 --threads 1 --only ours,trl

Results and what each optimisation bought: ``benchmarks/README.md`` (section GRPO).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS, G, BETA, LR = 2, 8, 0.04, 1e-6
NEW_TOKENS = {"tiny": 64, "medium": 128}
# --size medium: the zoo parts' configs with these sizes, weights re-initialised (seed 0)
MEDIUM_VISION = dict(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    image_size=224,
    patch_size=16,
)
MEDIUM_LLM = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
)
TEMPLATE = (
    "{question} Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
)
OURS = {
    "ours": [],
    "hf_decode": [],
    "unpacked_decode": [],
    "adamw_per_tensor": [],
    "repeat_prompts": [],
    "naive_forward": ["grpo.shared_prefix=false"],
    "naive_all": ["grpo.shared_prefix=false"],
    "mu2": ["grpo.num_iterations=2"],
    "mu2_old_logps_forward": ["grpo.num_iterations=2"],
}
CONFIGS = [*OURS, "trl"]
# The R1-distill template with one change: a user turn's content may be TRL's list of typed blocks.
VLM_TEMPLATE_USER = (
    "{%- if message['content'] is string %}{{'<｜User｜>' + message['content']}}{%- else %}{{'<｜User｜>'}}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{'<image>'}}{%- else %}"
    "{{part['text']}}{%- endif %}{%- endfor %}{%- endif %}"
)


def prepare(work: Path, size: str) -> None:
    """The model folder (work/model) and synthetic questions (work/synth), built once per --work."""
    done = work / "model" / "size.txt"
    if done.exists() and (work / "synth" / "train" / "rl.jsonl").exists():
        if done.read_text() != size:
            raise SystemExit(
                f"{work} holds the {done.read_text()} model: pass another --work for --size {size}"
            )
        return
    from align.cli import main
    from align.zoo import build_part

    with contextlib.redirect_stdout(io.StringIO()):
        parts = {part: build_part(part, work / "zoo") for part in ("siglip-hf", "qwen2-r1")}
        if size == "medium":
            parts = grow(parts, work / "zoo-medium")
        assert (
            main(["data", "synth", "--out", str(work / "synth"), "--train", "64", "--test", "2", "--force"])
            == 0
        )
        assemble = [
            "assemble",
            str(ROOT / "recipes/tiny/assemble_siglip_qwen2.yaml"),
            f"vision.name_or_path={parts['siglip-hf']}",
            f"llm.name_or_path={parts['qwen2-r1']}",
            f"output_dir={work / 'model'}",
        ]
        assert main(assemble) == 0
    done.write_text(size)


def grow(parts: dict[str, Path], out: Path) -> dict[str, Path]:
    """The zoo parts with the medium sizes: same configs and tokenizer/processor files, new seeded weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    grown = {}
    for part, sizes, model_class in (
        ("siglip-hf", MEDIUM_VISION, AutoModel),
        ("qwen2-r1", MEDIUM_LLM, AutoModelForCausalLM),
    ):
        src, dst = parts[part], out / part
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(
            src, dst, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "zoo-part.json")
        )
        config = AutoConfig.from_pretrained(src)
        for key, value in sizes.items():
            setattr(config, key, value)
        if part == "qwen2-r1":
            config.layer_types = ["full_attention"] * config.num_hidden_layers
            config.max_window_layers = config.num_hidden_layers
        torch.manual_seed(0)
        model_class.from_config(config).save_pretrained(dst)
        if part == "siglip-hf":
            processor = json.loads((dst / "preprocessor_config.json").read_text())
            processor["size"] = {"height": sizes["image_size"], "width": sizes["image_size"]}
            (dst / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        grown[part] = dst
    return grown


def add_architectures(model_dir: Path) -> None:
    """TRL picks the model class from config.json's ``architectures``, which align's saved folders lack."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if not config.get("architectures"):
        print(f"note: {path} has no 'architectures'; writing ['LlavaForConditionalGeneration'] for TRL")
        path.write_text(json.dumps({**config, "architectures": ["LlavaForConditionalGeneration"]}, indent=2))


def mark() -> tuple[float, float]:
    """(wall, this process's CPU) seconds. With 1 thread the CPU time is the work done, whatever else runs."""
    return time.perf_counter(), time.process_time()


def step_costs(ends: list[tuple[float, float]], mu: int) -> dict:
    """Median (wall, CPU) seconds per optimizer step from the step-end marks, first round (warm-up) left out.

    A round samples once and then takes ``mu`` steps, so a step costs the time between round ends / ``mu``.
    """
    rounds = ends[mu - 1 :: mu]
    walls = [(b[0] - a[0]) / mu for a, b in itertools.pairwise(rounds)]
    cpus = [(b[1] - a[1]) / mu for a, b in itertools.pairwise(rounds)]
    return {
        "step_s": walls,
        "median_step_s": statistics.median(walls),
        "median_cpu_s": statistics.median(cpus),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def samples(work: Path) -> list:
    from align.data.config import DataSource
    from align.data.mixing import build_mix

    source = DataSource(
        name="q", path=str(work / "synth/train/rl.jsonl"), format="rl", question_template=TEMPLATE
    )
    return build_mix([source], 0, True)[0]


# ---------------------------------------------------------------- ours


class RepeatedPromptSampler:
    """The stage's sampler fed G copies of every prompt and image, one completion each (no shared prefix)."""

    def __init__(self, model):
        self.model = model

    def generate(self, prompt_ids, pixel_values, images_per_prompt, sampling, generator=None, images=None):
        import dataclasses

        import torch

        from align.grpo.sampler import generate

        g = sampling.num_generations
        groups = torch.split(pixel_values, images_per_prompt)
        return generate(
            self.model,
            [ids for ids in prompt_ids for _ in range(g)],
            torch.cat([group for group in groups for _ in range(g)]),
            [n for n in images_per_prompt for _ in range(g)],
            dataclasses.replace(sampling, num_generations=1),
            generator,
        )


class HFDecodeSampler:
    """The stage's sampler decoding with the model's own HF forward instead of the plain decoder."""

    def __init__(self, model):
        self.model = model

    def generate(self, prompt_ids, pixel_values, images_per_prompt, sampling, generator=None, images=None):
        from align.grpo.sampler import generate

        return generate(
            self.model, prompt_ids, pixel_values, images_per_prompt, sampling, generator, plain_decoder=False
        )


class ForwardOldLogpsSampler:
    """The stage's sampler, but the old log-probs come from a no-grad forward after sampling (TRL's way)."""

    def __init__(self, model):
        self.model = model

    def generate(self, prompt_ids, pixel_values, images_per_prompt, sampling, generator=None, images=None):
        import dataclasses

        import torch

        from align.grpo.logps import Completions, completion_logps
        from align.grpo.sampler import generate

        plain = dataclasses.replace(sampling, return_logps=False)
        rollout = generate(self.model, prompt_ids, pixel_values, images_per_prompt, plain, generator)
        if sampling.return_logps:
            batch = Completions(
                prompt_ids,
                pixel_values,
                images_per_prompt,
                rollout.completion_ids,
                rollout.completion_mask,
                sampling.num_generations,
            )
            with torch.no_grad():  # the fastest forward we have: this measures the extra pass alone
                logps = completion_logps(
                    self.model, batch, temperature=sampling.temperature, shared_prefix=True
                )
            rollout.logps = logps * rollout.completion_mask
        return rollout


def run_ours(work: Path, variant: str, steps: int, new_tokens: int) -> dict:
    import align.stages.grpo as stage
    from align.config import load_any
    from align.engine import init_distributed

    if variant in ("repeat_prompts", "naive_all"):
        stage.SharedPrefixSampler = RepeatedPromptSampler
    elif variant == "hf_decode":
        stage.SharedPrefixSampler = HFDecodeSampler
    elif variant == "mu2_old_logps_forward":
        stage.SharedPrefixSampler = ForwardOldLogpsSampler
    elif variant == "unpacked_decode":
        import align.grpo.decoder

        align.grpo.decoder.PACK_LIMIT_BYTES = 0
    elif variant == "adamw_per_tensor":
        import torch

        adamw = torch.optim.AdamW
        torch.optim.AdamW = lambda *args, fused=None, **kwargs: adamw(*args, fused=False, **kwargs)
    out = work / "runs" / variant
    if out.exists():
        import shutil

        shutil.rmtree(out)
    overrides = [
        f"model={work / 'model'}",
        f"output_dir={out}",
        f"data.sources.0.path={work / 'synth/train/rl.jsonl'}",
        "data.max_length=1024",
        f"run.micro_batch_size={QUESTIONS}",
        f"run.max_steps={steps}",
        "run.precision=fp32",
        "run.tensorboard=false",
        f"grpo.num_generations={G}",
        f"grpo.max_completion_length={new_tokens}",
        "grpo.temperature=1.0",
        f"grpo.beta={BETA}",
        "grpo.loss_type=grpo",
        "grpo.scale_rewards=group",
        "grpo.reward_funcs=[accuracy, format]",
        f"optim.lr={LR}",
        "optim.schedule=constant",
        *OURS[variant],
    ]
    recipe = load_any(str(ROOT / "recipes/tiny/grpo.yaml"), overrides, expect="grpo")
    ends: list[tuple[float, float]] = []
    update = stage.Progress.update

    def marking_update(self, step, row):  # called once per step, after the optimizer step
        ends.append(mark())
        update(self, step, row)

    stage.Progress.update = marking_update
    with contextlib.redirect_stdout(io.StringIO()):
        stage.train(recipe, init_distributed(), resume=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    mu = recipe.grpo.num_iterations
    rounds = [rows[i : i + mu] for i in range(0, len(rows), mu)][1:]  # the first round is warm-up
    phases = {p: statistics.median(r[0][p] for r in rounds) for p in ("time/rollout_s", "time/reference_s")}
    phases["time/rewards_s"] = statistics.median(r[0]["time/rewards_s"] for r in rounds)
    phases["time/update_s"] = statistics.median(x["time/update_s"] for r in rounds for x in r)
    return {
        **step_costs(ends, mu),
        "phases_s": phases,
        "completion_length": statistics.mean(r["completion_length"] for r in rows),
        "prompt_ids": None,
    }


# ---------------------------------------------------------------- TRL


def run_trl(work: Path, steps: int, new_tokens: int) -> dict:
    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.rewards import accuracy_reward, format_reward

    model_dir = work / "model"
    processor = AutoProcessor.from_pretrained(model_dir)
    template = processor.chat_template
    plain_user = "{{'<｜User｜>' + message['content']}}"
    assert template.count(plain_user) == 1, "the R1 template changed: update VLM_TEMPLATE_USER"
    processor.chat_template = template.replace(plain_user, VLM_TEMPLATE_USER)
    processor.tokenizer.chat_template = processor.chat_template

    rows = []
    for s in samples(work):
        (message,) = s.messages
        rows.append(
            {
                "prompt": [{"role": "user", "content": message["content"].replace("<image>", "", 1)}],
                "image": Image.open(s.images[0]).convert("RGB"),
                "solution": s.answer,
            }
        )
    dataset = Dataset.from_list(rows)

    def text(
        completions,
    ) -> list[str]:  # conversational: [{"role": "assistant", "content": ...}] per completion
        return [c[0]["content"] if isinstance(c, list) else c for c in completions]

    def accuracy(completions, solution, **kwargs):
        return accuracy_reward(text(completions), solution=solution)

    def format(completions, **kwargs):
        return format_reward(text(completions))

    ends: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after the optimizer step
            ends.append(mark())

    config = GRPOConfig(
        output_dir=str(work / "runs" / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=QUESTIONS * G,
        gradient_accumulation_steps=1,
        num_generations=G,
        max_completion_length=new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        epsilon=0.2,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        max_steps=steps,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        log_completions=False,
        disable_dropout=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[accuracy, format],
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[StepTimer()],
    )
    assert trainer.model.dtype == torch.float32 and trainer.ref_model is not None
    # where TRL's time goes: generate (prompts repeated G times) and the log-prob passes (reference no-grad
    # forward, policy forward in the loss), wrapped without changing what they do
    spent = {"generate": [], "logps": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[name].append(time.perf_counter() - t0)
            return result

        return wrapper

    trainer.model.generate = timed("generate", trainer.model.generate)
    trainer._get_per_token_logps_and_entropies = timed("logps", trainer._get_per_token_logps_and_entropies)
    # what TRL's _tokenize_prompts feeds generate for the first question
    blocks = [
        {"type": "image", "image": rows[0]["image"]},
        {"type": "text", "text": rows[0]["prompt"][0]["content"]},
    ]
    trl_ids = processor.apply_chat_template(
        conversation=[[{"role": "user", "content": blocks}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"][0]
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    per_step = len(spent["logps"]) // steps  # reference pass + policy pass
    logps = [sum(spent["logps"][i * per_step : (i + 1) * per_step]) for i in range(steps)]
    return {
        **step_costs(ends, 1),
        "phases_s": {
            "time/generate_s": statistics.median(spent["generate"][1:]),
            "time/logps_forwards_s": statistics.median(logps[1:]),
        },
        "completion_length": None,
        "prompt_ids": [int(i) for i in trl_ids],
    }


def our_prompt_ids(work: Path) -> list[int]:
    from align.checkpoint import image_seq_len, load_llava
    from align.data.encode import encode_prompt

    model, processor = load_llava(work / "model")
    return encode_prompt(
        samples(work)[0], processor.tokenizer, model.config.image_token_id, image_seq_len(processor)
    ).input_ids


# ---------------------------------------------------------------- driver


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work)
    new_tokens = NEW_TOKENS[args.size]
    if args.child == "trl":
        result = run_trl(work, args.steps, new_tokens)
    else:
        result = run_ours(work, args.child, args.steps, new_tokens)
    if args.child == "ours":
        result["prompt_ids"] = our_prompt_ids(work)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def launch(config: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--work", args.work, "--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads), "--size", args.size]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"{config} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run; the first is warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every run")
    parser.add_argument(
        "--size", choices=sorted(NEW_TOKENS), default="tiny", help="the model (see the docstring)"
    )
    parser.add_argument("--work", help="model, data and run folders (default /tmp/bench_grpo[_medium])")
    parser.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole set this many times, interleaved (noisy machines)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or ("/tmp/bench_grpo" if args.size == "tiny" else f"/tmp/bench_grpo_{args.size}")
    if args.child:
        child(args)
        return
    prepare(Path(args.work), args.size)
    add_architectures(Path(args.work) / "model")
    chosen = [c for c in CONFIGS if c in args.only.split(",")]
    runs: dict[str, list[dict]] = {c: [] for c in chosen}
    for _ in range(args.repeat):
        for config in chosen:
            runs[config].append(launch(config, args))
            print(f"{config}: step times {[round(t, 3) for t in runs[config][-1]['step_s']]}", flush=True)
    results = {}
    for config, rs in runs.items():  # the median over repeats of each run's median step and phases
        results[config] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in rs),
            "median_cpu_s": statistics.median(r["median_cpu_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "phases_s": {k: statistics.median(r["phases_s"][k] for r in rs) for k in rs[0]["phases_s"]},
            "prompt_ids": rs[0]["prompt_ids"],
        }
    if "ours" in results and "trl" in results:
        assert results["ours"]["prompt_ids"] == results["trl"]["prompt_ids"], (
            "the two sides see different prompts"
        )
    trl = results.get("trl")
    print(
        f"\n{'configuration':<23}{'wall s/step':>12}{'x TRL':>7}{'CPU s/step':>11}{'x TRL':>7}{'peak RSS MB':>12}  phases"
    )
    for config, r in results.items():
        wall = f"{r['median_step_s'] / trl['median_step_s']:.2f}" if trl else "-"
        cpu = f"{r['median_cpu_s'] / trl['median_cpu_s']:.2f}" if trl else "-"
        phases = " ".join(
            f"{k.removeprefix('time/').removesuffix('_s')}={v:.3f}" for k, v in r["phases_s"].items()
        )
        print(
            f"{config:<23}{r['median_step_s']:>12.3f}{wall:>7}{r['median_cpu_s']:>11.3f}{cpu:>7}"
            f"{r['peak_rss_mb']:>12.0f}  {phases}"
        )
    print(
        f"\n{args.steps} steps per run (first round excluded) x {args.repeat} runs, threads {args.threads}, G={G}, "
        f"{QUESTIONS} questions/step, {NEW_TOKENS[args.size]} new tokens, beta {BETA}, fp32 CPU, size {args.size}"
    )


if __name__ == "__main__":
    main()
