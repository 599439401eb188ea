"""What one GRPO round works on: a micro-batch of questions, its rollouts, rewards and reference log-probs.

The stage (``align/stages/grpo.py``) owns the loop; this module owns the per-batch record and the pure helpers
around it: reward columns, reference log-probs (a frozen copy, or the LoRA policy with adapters disabled),
group/batch reward statistics, DAPO's dynamic sampling (which question groups carry a signal, splitting batches
into groups and packing the chosen ones into micro-batches again) and the per-step rollout metrics. ``dist``
arguments are the engine's ``Dist`` (its reductions); nothing here imports a distributed library.
Tests: ``.venv/bin/pytest -q tests/test_grpo_stage.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from align.grpo.logps import Completions, completion_logps
from align.grpo.sampler import Rollout
from align.lora import is_lora
from align.model import llava_of


def skip_pooling_head(llava: nn.Module) -> bool:
    """Switch off SigLIP's attention-pooling head for this run; True if there was one.

    Llava never reads the tower's pooled output (it replaces ``pooler_output`` with the projected features), so
    the head is a wasted forward per image; it is also an ``nn.MultiheadAttention`` that reads
    ``out_proj.weight`` without calling ``out_proj``, a weight ZeRO-3 then never gathers. Its weights stay in the
    model and in the saved folder, unchanged.
    """
    tower = llava.model.vision_tower
    inner = getattr(tower, "vision_model", tower)
    if not getattr(inner, "use_head", False):
        return False
    inner.use_head = False
    return True


def reward_columns(samples, sizes, g: int, rollout: Rollout) -> dict[str, list]:
    """Dataset columns for the reward functions, one value per completion (question-major); ``completion_ids``
    (TRL's name) holds each completion's token ids, end-of-turn token included, padding left out."""
    rep = lambda values: [v for v in values for _ in range(g)]  # noqa: E731
    # VLM-R1's per-row accuracy method, passed only where the data has it (custom rewards see TRL's columns)
    methods = [s.meta.get("accu_reward_method") for s in samples]
    return {
        **({"accu_reward_method": rep(methods)} if any(m is not None for m in methods) else {}),
        "solution": rep([s.gold for s in samples]),
        "box": rep([s.meta.get("box") for s in samples]),
        "image_size": rep([sz[0] if sz else None for sz in sizes]),
        "family": rep([s.meta.get("family") for s in samples]),
        "completion_ids": [
            ids[:n].tolist() for ids, n in zip(rollout.completion_ids, rollout.lengths.tolist(), strict=True)
        ],
    }


def reward_names(specs: list[str]) -> list[str]:
    """Metric names of the reward functions: the function's name (TRL's way), the full spec if two share one."""
    short = [spec.rpartition(":")[2] for spec in specs]
    return [s if short.count(s) == 1 else spec for s, spec in zip(short, specs, strict=True)]


@dataclass
class RolloutBatch:
    """One micro-batch of questions and what the round learns about it, filled in as the round goes."""

    samples: list
    prompt_ids: list[list[int]]
    pixels: torch.Tensor | None
    images_per_prompt: list[int]
    sizes: list[list[tuple[int, int]]]
    rollout: object = None
    texts: list[str] = field(default_factory=list)
    scores: list[list[float | None]] = field(default_factory=list)
    per_func: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def completions(self) -> Completions:
        """The prompts and their sampled completions, as the log-prob forwards take them."""
        r = self.rollout
        g = r.completion_ids.shape[0] // len(self.prompt_ids)
        return Completions(
            self.prompt_ids, self.pixels, self.images_per_prompt, r.completion_ids, r.completion_mask, g
        )


def reference_logps(
    reference: nn.Module | None, model: nn.Module, b: RolloutBatch, temperature: float, shared_prefix: bool
) -> torch.Tensor:
    """Log-probs of ``b``'s completions under the reference: the frozen copy ``reference``, or with LoRA
    (``reference=None``) the policy ``model`` itself with its adapters disabled (under ZeRO-3: call it while the
    engine holds the weights gathered, as the stage does in its rollout phase)."""
    with torch.no_grad():
        if reference is not None:
            return completion_logps(
                reference, b.completions(), temperature=temperature, shared_prefix=shared_prefix
            )
        if not is_lora(model):
            raise ValueError("reference_logps: without a reference model the policy must carry LoRA adapters")
        with model.disable_adapter():
            batch = b.completions()
            return completion_logps(
                llava_of(model), batch, temperature=temperature, shared_prefix=shared_prefix
            )


def global_std(dist, rewards: torch.Tensor) -> float:
    finite = rewards[~rewards.isnan()]
    counted = dist.all_sum({"n": finite.numel(), "sum": float(finite.sum())})
    n = counted["n"]
    mean = counted["sum"] / max(n, 1)
    return (dist.all_sum(float(((finite - mean) ** 2).sum())) / max(n - 1, 1)) ** 0.5


def group_std(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """Sample std of each group of ``g`` rewards, NaNs (unscorable completions) left out; 0 below 2 values."""
    grouped = rewards.view(-1, g)
    count = (~grouped.isnan()).sum(1)
    centred = grouped - grouped.nanmean(1, keepdim=True)
    var = (centred**2).nansum(1) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.sqrt(), torch.zeros_like(var))


def has_signal(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """``[groups]`` bool: True where a group's rewards vary, i.e. where some advantage is not 0 (a group with
    fewer than 2 scored completions has none: its advantages are all 0, see :func:`group_std`)."""
    std = group_std(rewards, g)
    return ~torch.isclose(std, torch.zeros_like(std))


def fill_groups(varied: list, flat: list, need: int) -> tuple[list, int]:
    """DAPO's dynamic sampling on one rank: the ``need`` groups an update trains on, and how many of ``flat``
    (zero-variance groups) were dropped.

    Groups with signal (``varied``, in sampling order) come first; only when the round limit left fewer than
    ``need`` of them are zero-variance ones used to fill the micro-batches (they add 0 to the policy gradient).
    Surplus groups with signal are not kept for later: every step draws its own questions (exact resume).
    """
    if len(varied) + len(flat) < need:
        raise ValueError(f"{len(varied)} + {len(flat)} groups sampled for {need} places")
    fill = flat[: max(0, need - len(varied))]
    return varied[:need] + fill, len(flat) - len(fill)


def split_groups(b: RolloutBatch, g: int) -> list[RolloutBatch]:
    """``b`` as one batch per question (its ``g`` completions and everything scored on them); advantages are
    left out (they are computed on the batch that trains)."""
    r, pieces, image_at = b.rollout, [], 0
    for q, n_images in enumerate(b.images_per_prompt):
        rows = slice(q * g, (q + 1) * g)
        pixels = None if b.pixels is None or n_images == 0 else b.pixels[image_at : image_at + n_images]
        image_at += n_images
        rollout = Rollout(
            r.completion_ids[rows],
            r.completion_mask[rows],
            r.lengths[rows],
            r.is_truncated[rows],
            None if r.logps is None else r.logps[rows],
        )
        piece = RolloutBatch([b.samples[q]], [b.prompt_ids[q]], pixels, [n_images], [b.sizes[q]], rollout)
        piece.texts, piece.scores = b.texts[rows], b.scores[rows]
        piece.per_func, piece.rewards, piece.mask = b.per_func[rows], b.rewards[rows], b.mask[rows]
        piece.ref_logps = None if b.ref_logps is None else b.ref_logps[rows]
        pieces.append(piece)
    return pieces


def merge_groups(pieces: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """One micro-batch of the questions in ``pieces`` (from :func:`split_groups`, possibly of different
    rounds), completions right-padded to the widest piece: padding is masked, so log-probs are unchanged."""
    width = max(p.rollout.completion_ids.shape[1] for p in pieces)

    def cat(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
        return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

    rollouts = [p.rollout for p in pieces]
    images = [p.pixels for p in pieces if p.pixels is not None]
    b = RolloutBatch(
        [s for p in pieces for s in p.samples],
        [ids for p in pieces for ids in p.prompt_ids],
        torch.cat(images) if images else None,
        [n for p in pieces for n in p.images_per_prompt],
        [sz for p in pieces for sz in p.sizes],
        Rollout(
            cat([r.completion_ids for r in rollouts], pad_token_id),
            cat([r.completion_mask for r in rollouts], 0),
            torch.cat([r.lengths for r in rollouts]),
            torch.cat([r.is_truncated for r in rollouts]),
            None if rollouts[0].logps is None else cat([r.logps for r in rollouts], 0.0),
        ),
    )
    b.texts = [t for p in pieces for t in p.texts]
    b.scores = [row for p in pieces for row in p.scores]
    b.per_func = torch.cat([p.per_func for p in pieces])
    b.rewards = torch.cat([p.rewards for p in pieces])
    b.mask = cat([p.mask for p in pieces], 0)
    b.ref_logps = None if pieces[0].ref_logps is None else cat([p.ref_logps for p in pieces], 0.0)
    return b


def rollout_metrics(
    dist, batches: list[RolloutBatch], names: list[str], errors: dict, zero_std: list, g: int
) -> dict:
    """Reward per function, zero-variance groups and completion lengths over all ranks.

    ``reward_std`` is TRL's: the mean over groups of the std within a group (what the advantages divide by);
    ``reward_std/<name>`` is a function's std over the whole batch.
    """
    per_func = torch.cat([b.per_func for b in batches])
    lengths = torch.cat([b.rollout.lengths for b in batches]).float()
    truncated = torch.cat([b.rollout.is_truncated for b in batches]).float()
    rewards = torch.cat([b.rewards for b in batches])
    mean = lambda t: float(t[~t.isnan()].mean()) if (~t.isnan()).any() else 0.0  # noqa: E731
    row = {}
    for j, name in enumerate(names):
        row[f"reward/{name}"] = float(dist.all_reduce_mean(mean(per_func[:, j])))
        row[f"reward_std/{name}"] = global_std(dist, per_func[:, j])
        row[f"reward_errors/{name}"] = dist.all_sum(errors[name])
    row.update(
        {
            "reward": float(dist.all_reduce_mean(mean(rewards))),
            "reward_std": float(dist.all_reduce_mean(float(group_std(rewards, g).mean()))),
            "frac_reward_zero_std": float(dist.all_reduce_mean(sum(zero_std) / len(zero_std))),
            "completion_length": float(dist.all_reduce_mean(float(lengths.mean()))),
            "completion_length_max": float(lengths.max()),  # this rank's (rank 0 logs)
            "truncated_share": float(dist.all_reduce_mean(float(truncated.mean()))),
            "completion_tokens": dist.all_sum(float(lengths.sum())),
        }
    )
    return row
