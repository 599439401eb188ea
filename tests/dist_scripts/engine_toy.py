"""Train a toy model through ``align.engine`` and write what happened, for ``tests/test_engine.py``.

Each case trains STEPS optimizer steps of GLOBAL_BATCH samples (so any world size x micro batch x accumulation
sees the same global batches) and rank 0 writes ``<out>/<name>.json`` (per-step losses, grad norms, lrs,
fraction of ranks whose micro-batch had images, a generation probe) and ``<out>/<name>.pt`` (consolidated
weights). ``train`` cases also save a training state after SAVE_AT steps into ``<out>/state-<name>``;
``resume=<other>`` cases load ``state-<other>`` into a differently initialised model and train the rest.

    torchrun --nproc_per_node 2 tests/dist_scripts/engine_toy.py --out DIR ddp_m2=ddp,2,1,fp32 ...
    python tests/dist_scripts/engine_toy.py --out DIR single_m4=single,4,1,fp32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from align.engine import Dist, Engine, ParamGroup, init_distributed, setup

STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 4
VOCAB, DIM, IMG, SEQ = 32, 16, 8, 5
BASE_LRS = {"projector": 3e-2, "llm": 1e-2}


def has_image(i: int) -> bool:
    """Sample i carries an image when i % 4 == 0: with 2 ranks some micro-batches have images, others none."""
    return i % 4 == 0


class Toy(nn.Module):
    """A frozen 'vision' encoder -> trainable projector -> embedding + head, shaped like a tiny Llava."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(0)  # the frozen encoder is "pretrained": the same on every rank and run
        self.encoder = nn.Linear(IMG, DIM).requires_grad_(False)
        torch.manual_seed(seed)
        self.projector = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)
        self.register_buffer("scale", torch.tensor(1.5))

    def logits(
        self, tokens: torch.Tensor, images: torch.Tensor | None, image_rows: torch.Tensor
    ) -> torch.Tensor:
        h = self.embed(tokens).mean(1)
        if images is None:
            # A text-only micro-batch still runs the image branch (zero-weighted) so every rank executes the same
            # modules: ZeRO-3 gathers per module and DDP expects every parameter to get a gradient.
            dummy = torch.zeros(1, IMG, device=tokens.device)
            h = h + 0.0 * self.projector(self.encoder(dummy)).sum()
        else:
            h = h.index_add(0, image_rows, self.projector(self.encoder(images)).to(h.dtype))
        return self.head(h * self.scale)

    def forward(self, tokens, targets, images, image_rows):
        return F.cross_entropy(self.logits(tokens, images, image_rows).float(), targets)


def batch(indices: list[int], device: torch.device) -> dict:
    tokens, targets, images, rows = [], [], [], []
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed(1000 + i)
        tokens.append(torch.randint(0, VOCAB, (SEQ,), generator=g))
        targets.append(int(torch.randint(0, VOCAB, (1,), generator=g)))
        if has_image(i):
            images.append(torch.randn(IMG, generator=g))
            rows.append(row)
    return {
        "tokens": torch.stack(tokens).to(device),
        "targets": torch.tensor(targets, device=device),
        "images": torch.stack(images).to(device) if images else None,
        "image_rows": torch.tensor(rows, dtype=torch.long, device=device),
    }


def build(dist: Dist, strategy: str, micro: int, accum: int, precision: str, seed: int) -> Engine:
    model = Toy(seed)
    groups = [
        ParamGroup("projector", list(model.projector.parameters()), lr=BASE_LRS["projector"]),
        ParamGroup(
            "llm", [*model.embed.parameters(), *model.head.parameters()], lr=BASE_LRS["llm"], weight_decay=0.1
        ),
    ]
    return setup(
        model,
        groups,
        dist=dist,
        strategy=strategy,
        micro_batch_size=micro,
        grad_accum=accum,
        max_grad_norm=0.5,
        precision=precision,
        deepspeed_config=zero_config(strategy),
    )


def zero_config(strategy: str) -> dict | None:
    if strategy == "zero2":
        return {"zero_optimization": {"stage": 2}}
    if strategy == "zero3":
        # Threshold 0: even these tiny parameters are partitioned (by default DeepSpeed keeps small ones whole).
        return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    return None


def probe(engine: Engine) -> tuple[list, bool]:
    """Several forwards in one generation block, like sampling tokens; True if ZeRO-3 kept params gathered."""
    inputs = batch([0, 1, 2], engine.dist.device)
    inputs.pop("targets")
    outs, resident = [], True
    with engine.gathered_for_generation() as model, torch.no_grad(), engine.autocast():
        for _ in range(3):
            outs.append(model.logits(**inputs).float().cpu())
            resident &= all(p.numel() == getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    assert all(torch.equal(outs[0], o) for o in outs), "repeated probe forwards disagree"
    return outs[0].tolist(), resident


def run_case(dist: Dist, out: Path, name: str, spec: str) -> None:
    strategy, micro, accum, precision, *mode = spec.split(",")
    micro, accum = int(micro), int(accum)
    world = dist.world_size
    assert world * micro * accum == GLOBAL_BATCH, f"{name}: {world}x{micro}x{accum} != {GLOBAL_BATCH}"
    resume = mode[0].split("=", 1)[1] if mode else None
    # Ranks initialise trainable weights differently on purpose: the engine must start all from rank 0's, and a
    # resumed run from the saved state whatever its own initialisation.
    seed = (777 if resume else 1) + 1000 * dist.rank
    engine = build(dist, strategy, micro, accum, precision, seed=seed)
    start, record = 0, {"losses": [], "grad_norms": [], "lrs": [], "image_fraction": []}
    if resume:
        start = engine.load_state(out / f"state-{resume}")["next_step"]
        record["resumed_lrs"] = engine.lrs()
    for step in range(start, STEPS):
        engine.set_lrs({k: v * (1 - 0.2 * step) for k, v in BASE_LRS.items()})
        total, norm = 0.0, None
        for a in range(accum):
            first = GLOBAL_BATCH * step + a * world * micro + dist.rank * micro
            inputs = batch(list(range(first, first + micro)), dist.device)
            record["image_fraction"].append(dist.all_reduce_mean(float(inputs["images"] is not None)))
            with engine.autocast():
                loss = engine.module(**inputs)
            engine.backward(loss)
            norm = engine.step()
            assert (norm is None) == (a < accum - 1), f"{name}: step() returned {norm} at micro-batch {a}"
            total += loss.item()
        record["losses"].append(dist.all_reduce_mean(total / accum))
        record["grad_norms"].append(norm)
        record["lrs"].append(engine.lrs())
        if not resume and step + 1 == SAVE_AT:
            engine.save_state(out / f"state-{name}", extra={"next_step": step + 1})
    record["optimizer_steps"] = engine.optimizer_steps
    record["probe"], record["probe_resident"] = probe(engine)
    if strategy == "zero3":
        record["released_after_probe"] = all(p.numel() == 0 for p in engine.model.parameters())
    state = engine.full_state_dict()
    if not dist.is_main:
        assert state is None, f"{name}: full_state_dict() returned weights on rank {dist.rank}"
        return
    torch.save({k: v.float() for k, v in state.items()}, out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps(record))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("cases", nargs="+", help="name=strategy,micro,accum,precision[,resume=<name>]")
    args = parser.parse_args()
    dist = init_distributed()
    code = 0
    try:
        for case in args.cases:
            name, spec = case.split("=", 1)
            run_case(dist, args.out, name, spec)
    except Exception:
        traceback.print_exc()
        code = 1
    return dist.shutdown(code)


if __name__ == "__main__":
    sys.exit(main())
