"""The distribution engine: the only module in ``align`` that may import torch.distributed, deepspeed, accelerate.

It owns the process group (:func:`init_distributed` -> :class:`Dist`), wrapping a model for one strategy
(``single``, ``ddp``, ``zero2``, ``zero3``) with :func:`setup` -> :class:`Engine`, backward/step with gradient
accumulation, applying per-group learning rates, bf16 autocast, gathering ZeRO-3 parameters for a generation
phase, consolidated state dicts and exact training-state save/resume. It knows nothing about Llava or data.

A stage uses it like this (one explicit loop; the stage owns the LR schedule math)::

    dist = init_distributed()
    engine = setup(model, [ParamGroup("projector", params, lr=1e-3)], dist=dist, strategy="zero3",
                   micro_batch_size=4, grad_accum=2, max_grad_norm=1.0, precision="bf16",
                   deepspeed_config="recipes/deepspeed/zero3.json")
    for step in range(steps):
        engine.set_lrs({"projector": schedule(step)})
        for batch in micro_batches(step):
            with engine.autocast():
                loss = engine.module(**batch).loss
            engine.backward(loss)
            grad_norm = engine.step()          # a float once per `grad_accum` micro-batches, else None
    state = engine.full_state_dict()           # rank 0 only, None elsewhere
    return dist.shutdown(0)

Multi-process runs are started by ``torchrun --nproc_per_node N`` or the ``deepspeed`` launcher; without their
environment variables everything runs in one process. Tests: ``pytest tests/test_engine.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import nn

from align.errors import AlignError

Strategy = Literal["single", "ddp", "zero2", "zero3"]
Precision = Literal["fp32", "bf16"]
STRATEGIES: tuple[str, ...] = ("single", "ddp", "zero2", "zero3")
STATE_META = "engine.json"
# Stands in a ZeRO-3 parameter's ds_active_sub_modules for "a generation block uses it"; module ids are >= 0.
_GENERATION_HOLDER = -1


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, world size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool  # a process group exists (launched by torchrun / deepspeed)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_mean(self, value: float | torch.Tensor) -> Any:
        """Mean over ranks of a float (returns a float) or a tensor (returns a new tensor)."""
        if isinstance(value, torch.Tensor):
            out = value.detach().to(self.device, copy=True)
            if self.distributed:
                tdist.all_reduce(out)
                out /= self.world_size
            return out
        if not self.distributed:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.item() / self.world_size

    def all_sum(self, value: float | Mapping[str, float]) -> Any:
        """Sum over ranks of a number (returns a float) or of each value of a dict (returns a dict), in float64
        and one collective: token counts stay exact."""
        values = dict(value) if isinstance(value, Mapping) else {"": value}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        if self.distributed:
            tdist.all_reduce(t)
        summed = dict(zip(values, t.tolist(), strict=True))
        return summed if isinstance(value, Mapping) else summed[""]

    def log(self, *parts: Any) -> None:
        """``print`` on the main process only: the one place a stage talks to its user."""
        if self.is_main:
            print(*parts, flush=True)

    def all_reduce_max(self, value: float) -> float:
        """Maximum over ranks of a float (``-all_reduce_max(-x)`` is the minimum)."""
        if not self.distributed:
            return float(value)
        t = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t.item()

    def shutdown(self, exit_code: int = 0) -> int:
        """End the process. Single process: returns ``exit_code``. Distributed: never returns.

        torch 2.14 + gloo aborts intermittently in process-group teardown at interpreter exit, so after a
        barrier (skipped on failure: other ranks may be stuck in a collective) the group is destroyed and the
        process leaves with ``os._exit``, which skips atexit handlers: close files before calling this.
        """
        if not self.distributed:
            return exit_code
        if exit_code == 0:
            tdist.barrier()
            tdist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def init_distributed() -> Dist:
    """Join the process group described by the launcher's environment, or run alone without one."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if tdist.is_initialized():
            raise AlignError("a process group exists but RANK/WORLD_SIZE are not set; launch with torchrun")
        return Dist(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"), distributed=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not tdist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")
    return Dist(rank, world, local_rank, device, distributed=True)


@dataclass
class ParamGroup:
    """Parameters optimised with one learning rate and weight decay, addressed by ``name`` in ``set_lrs``."""

    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float = 0.0


def read_deepspeed_config(path: str | Path) -> dict:
    """A DeepSpeed JSON file as a dict; a missing file or bad JSON is an :class:`AlignError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"{path}: DeepSpeed config file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AlignError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def build_deepspeed_config(
    zero: Mapping[str, Any],
    *,
    stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float | None,
    precision: Precision,
    source: str = "deepspeed config",
) -> dict:
    """The full DeepSpeed config: the JSON's ZeRO part plus batch sizes, clipping and precision from the recipe.

    Raw DeepSpeed does not understand HF-style ``"auto"``; engine-owned keys may be absent or ``"auto"``, and a
    concrete value that disagrees with the recipe is an error rather than a silent override.
    """
    cfg = copy.deepcopy(dict(zero))
    owned = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(max_grad_norm or 0.0),
    }
    for key, value in owned.items():
        if cfg.get(key, "auto") not in ("auto", value):
            raise AlignError(
                f"{source}: {key} is {cfg[key]!r} but the recipe gives {value!r} "
                f"(micro_batch_size={micro_batch_size}, grad_accum={grad_accum}, world_size={world_size}, "
                f"max_grad_norm={max_grad_norm}); remove the key, the engine fills it"
            )
        cfg[key] = value
    for key, why in (
        ("optimizer", "AdamW is built from the recipe"),
        ("scheduler", "the stage owns the LR schedule"),
    ):
        if key in cfg:
            raise AlignError(f"{source}: remove '{key}': {why}")
    if cfg.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise AlignError(f"{source}: fp16 is not supported; set precision: bf16 in the recipe instead")
    want_bf16 = precision == "bf16"
    bf16 = dict(cfg.get("bf16", {}))
    if bf16.get("enabled", "auto") not in ("auto", want_bf16):
        raise AlignError(
            f"{source}: bf16.enabled is {bf16['enabled']!r} but the recipe's precision is {precision}"
        )
    cfg["bf16"] = {**bf16, "enabled": want_bf16}
    cfg.pop("fp16", None)
    zero_opt = dict(cfg.get("zero_optimization", {}))
    if zero_opt.get("stage", stage) != stage:
        raise AlignError(
            f"{source}: zero_optimization.stage is {zero_opt['stage']} but the recipe's strategy is zero{stage}"
        )
    cfg["zero_optimization"] = {**zero_opt, "stage": stage}
    # The client optimizer is torch AdamW (or DeepSpeedCPUAdam with offload): no FusedAdam JIT build.
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 2**31 - 1)  # the stage logs; DeepSpeed's periodic print is noise
    return cfg


def _offloads_optimizer(cfg: Mapping[str, Any]) -> bool:
    device = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def _check_groups(model: nn.Module, groups: Sequence[ParamGroup]) -> None:
    owned = {id(p) for p in model.parameters()}
    seen: dict[int, str] = {}
    names = [g.name for g in groups]
    if not groups or len(set(names)) != len(names):
        raise ValueError(f"param groups need distinct names and at least one group, got {names}")
    for g in groups:
        if not g.params:
            raise ValueError(f"param group '{g.name}' has no parameters")
        for p in g.params:
            if id(p) not in owned:
                raise ValueError(f"param group '{g.name}' holds a parameter that is not in the model")
            if not p.requires_grad:
                raise ValueError(f"param group '{g.name}' holds a frozen parameter (requires_grad=False)")
            if id(p) in seen:
                raise ValueError(f"a parameter is in both param groups '{seen[id(p)]}' and '{g.name}'")
            seen[id(p)] = g.name


def setup(
    model: nn.Module,
    groups: Sequence[ParamGroup],
    *,
    dist: Dist,
    strategy: Strategy,
    micro_batch_size: int,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    precision: Precision = "fp32",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    deepspeed_config: str | Path | Mapping[str, Any] | None = None,
) -> Engine:
    """Wrap ``model`` for ``strategy`` with an AdamW over ``groups`` (frozen parameters stay out of groups).

    ``deepspeed_config`` (zero2/zero3 only) is the ZeRO part of the config: a path or an already-read dict.
    """
    if strategy not in STRATEGIES:
        raise AlignError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy != "single" and not dist.distributed:
        raise AlignError(
            f"strategy '{strategy}' needs a process group: launch with torchrun --nproc_per_node N (or deepspeed)"
        )
    if strategy == "single" and dist.world_size > 1:
        raise AlignError(
            f"strategy 'single' launched on {dist.world_size} processes would train {dist.world_size} "
            "independent copies; use ddp, zero2 or zero3"
        )
    if micro_batch_size < 1 or grad_accum < 1:
        raise AlignError(
            f"micro_batch_size and grad_accum must be >= 1, got {micro_batch_size} and {grad_accum}"
        )
    if deepspeed_config is not None and not strategy.startswith("zero"):
        raise AlignError(
            f"a DeepSpeed config was given but the strategy is '{strategy}' (use zero2 or zero3)"
        )
    _check_groups(model, groups)
    torch_groups = [{"params": list(g.params), "lr": g.lr, "weight_decay": g.weight_decay} for g in groups]
    names = [g.name for g in groups]
    if not strategy.startswith("zero"):
        model.to(dist.device)
        # one kernel for all parameters instead of a handful of ops per tensor; on CPU too (the GRPO benchmark's
        # 0.58M trainable parameters, 1 thread: 4 -> 0.85 ms per step)
        fused = dist.device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(torch_groups, betas=betas, eps=eps, fused=fused)
        module: nn.Module = model
        if strategy == "ddp":
            ids = [dist.local_rank] if dist.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return Engine(dist, strategy, precision, grad_accum, model, module, optimizer, names, max_grad_norm)

    import deepspeed

    cfg = _full_config(
        deepspeed_config, strategy, micro_batch_size, grad_accum, dist.world_size, max_grad_norm, precision
    )
    if dist.device.type == "cpu":
        # Only DeepSpeed's inference all-reduce uses this op; marking it incompatible skips a 25-75 s JIT build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if _offloads_optimizer(cfg):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(torch_groups, betas=betas, eps=eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(torch_groups, betas=betas, eps=eps)
    ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, dist_init_required=False)
    return Engine(dist, strategy, precision, grad_accum, model, ds, optimizer, names, max_grad_norm, ds, cfg)


def _full_config(
    deepspeed_config: str | Path | Mapping[str, Any] | None,
    strategy: str,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float | None,
    precision: Precision,
) -> dict:
    if isinstance(deepspeed_config, (str, Path)):
        source, zero = str(deepspeed_config), read_deepspeed_config(deepspeed_config)
    else:
        source, zero = "deepspeed config", dict(deepspeed_config or {})
    return build_deepspeed_config(
        zero,
        stage=int(strategy[-1]),
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        max_grad_norm=max_grad_norm,
        precision=precision,
        source=source,
    )


@contextlib.contextmanager
def partitioned_loading(
    dist: Dist,
    strategy: Strategy,
    deepspeed_config: str | Path | Mapping[str, Any] | None,
    *,
    micro_batch_size: int,
    grad_accum: int = 1,
    max_grad_norm: float | None = 1.0,
    precision: Precision = "fp32",
) -> Iterator[None]:
    """Models loaded inside with HF ``from_pretrained`` come out ZeRO-3 partitioned (no-op for other strategies).

    transformers sees a live ``HfDeepSpeedConfig`` and builds the model inside ``deepspeed.zero.Init``, so each
    tensor is split across the ranks as it is created, then fills the partitions one module at a time from the
    memory-mapped safetensors (rank 0 reads, every rank keeps its 1/N). No rank ever holds the whole model:
    an 8B policy + reference on 8 ranks is ~4 GB of bf16 weights per rank at load instead of 32 GB. Pass the
    values :func:`setup` gets, so the partitioning (and bf16) is the one the engine then trains with.
    Until :func:`setup` the parameters are empty placeholders: read them inside :func:`gathered`.
    """
    if strategy != "zero3":
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init reads the world size from DeepSpeed's communicator: wrap the existing process group first
    deepspeed.init_distributed(dist_backend=tdist.get_backend(), dist_init_required=False)
    cfg = _full_config(
        deepspeed_config, strategy, micro_batch_size, grad_accum, dist.world_size, max_grad_norm, precision
    )
    live = HfDeepSpeedConfig(cfg)  # transformers holds a weak reference: alive for this block only
    try:
        yield
    finally:
        del live


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """ZeRO-3 partitioned ``params`` whole (read-only) inside the block; call on every rank. No-op otherwise."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_numel(param: nn.Parameter) -> int:
    """Elements of ``param`` as the model defines it (a ZeRO-3 partitioned one reports 0 through ``numel``)."""
    return getattr(param, "ds_numel", None) or param.numel()


def full_ndim(param: nn.Parameter) -> int:
    """Dimensions of ``param`` as the model defines it (loaded ZeRO-3 partitioned it is a 1-D placeholder)."""
    return len(getattr(param, "ds_shape", param.shape))


def held_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank stores, elements of the whole model): fewer under ZeRO-3 partitioning.

    ZeRO-3 keeps tensors under ``stage3_param_persistence_threshold`` whole on every rank: they count in full.
    """
    held = sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") and not p.ds_persist else p.numel()
        for p in model.parameters()
    )
    return held, sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def persistent_parameters(model: nn.Module) -> int:
    """Elements of the tensors ZeRO-3 keeps whole on every rank (under ``stage3_param_persistence_threshold``)."""
    return sum(p.ds_numel for p in model.parameters() if getattr(p, "ds_persist", False))


@dataclass(eq=False)
class Engine:
    """A model wrapped for one strategy. Call forward on ``module``; read weights through ``full_state_dict``."""

    dist: Dist
    strategy: Strategy
    precision: Precision
    grad_accum: int
    model: nn.Module  # unwrapped: generation, parameter inspection
    module: nn.Module  # what a training forward is called on: the DDP / DeepSpeed wrapper, or the model
    optimizer: torch.optim.Optimizer  # DeepSpeed steps these very param_groups, so lrs set here apply
    group_names: list[str]
    max_grad_norm: float | None = None
    ds_engine: Any = None  # the DeepSpeedEngine under zero2/zero3 (the same object as ``module``)
    ds_config: dict | None = None  # the config it was built from
    micro_steps: int = 0
    optimizer_steps: int = 0
    _last_stepped_micro: int = field(default=0, init=False, repr=False)
    _frozen_engines: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._sync_ddp_next()

    @property
    def at_boundary(self) -> bool:
        """True when the next ``step()`` updates the weights (all micro-batches of this step are in)."""
        return self.micro_steps % self.grad_accum == 0

    def _sync_ddp_next(self) -> None:
        # DDP's no_sync() would have to wrap forward and backward, which the stage owns; the flag it toggles is
        # read at forward time, so setting it for the coming micro-batch skips all-reduces until the last one.
        if self.strategy == "ddp":
            self.module.require_backward_grad_sync = (self.micro_steps + 1) % self.grad_accum == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Wrap forward passes (training and generation): bf16 autocast when precision is bf16.

        single/ddp keep fp32 weights and compute in bf16; zero2/zero3 hold bf16 weights with fp32 master copies
        in the optimizer, and autocast casts fp32 inputs (e.g. pixel values) to match.
        """
        if self.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, scaled by 1/grad_accum so a step averages its micro-batches."""
        if self.ds_engine is not None:
            self.ds_engine.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps itself
        else:
            (loss / self.grad_accum).backward()
        self.micro_steps += 1
        self._sync_ddp_next()

    def step(self) -> float | None:
        """After every ``backward``: the optimizer step + zero_grad at accumulation boundaries.

        Returns the gradient norm before clipping at a boundary, ``None`` between boundaries.
        """
        if self._last_stepped_micro == self.micro_steps:
            raise RuntimeError("Engine.step() called twice without a backward() in between")
        self._last_stepped_micro = self.micro_steps
        if self.ds_engine is not None:
            boundary = self.ds_engine.is_gradient_accumulation_boundary()
            self.ds_engine.step()  # DeepSpeed counts micro-steps itself and only updates at the boundary
            if not boundary:
                return None
            self.optimizer_steps += 1
            norm = self.ds_engine.get_global_grad_norm()
            return None if norm is None else float(norm)
        if not self.at_boundary:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = float(nn.utils.clip_grad_norm_(params, limit))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return norm

    def optimizer_elements(self) -> int:
        """Trainable elements whose fp32 master copy and Adam states this rank holds: a 1/N share under ZeRO."""
        zero = getattr(self.ds_engine, "optimizer", None)  # DeepSpeed's ZeRO optimizer around ours
        flat = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
        if flat is None:
            flat = getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
        if flat is not None:
            return sum(t.numel() for t in flat)
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])

    def lrs(self) -> dict[str, float]:
        """The learning rate of each group, by name."""
        return {
            name: float(g["lr"])
            for name, g in zip(self.group_names, self.optimizer.param_groups, strict=True)
        }

    def set_lrs(self, lrs: Mapping[str, float]) -> None:
        """Set every group's learning rate by name (the stage computes the schedule)."""
        if set(lrs) != set(self.group_names):
            raise ValueError(f"set_lrs needs exactly the groups {self.group_names}, got {sorted(lrs)}")
        for name, group in zip(self.group_names, self.optimizer.param_groups, strict=True):
            group["lr"] = float(lrs[name])

    def frozen(self, model: nn.Module) -> nn.Module:
        """``model`` frozen (GRPO's reference) and placed like the trained one; forward it as usual.

        Under zero3 its parameters are partitioned across the ranks with the trained model's ZeRO settings (a
        DeepSpeed engine without an optimizer, as TRL does): each sub-module gathers its weights for its own
        forward and frees them after, so between passes a rank holds 1/N of the model instead of a full copy.
        Its forwards are then collective: every rank must run them. Other strategies: moved to the device.
        """
        model.requires_grad_(False).eval()
        if self.strategy != "zero3":
            return model.to(self.dist.device)
        import deepspeed

        assert self.ds_config is not None
        zero = {k: v for k, v in self.ds_config["zero_optimization"].items() if k != "offload_optimizer"}
        cfg = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": zero,
            **{k: self.ds_config[k] for k in ("bf16", "aio") if k in self.ds_config},  # aio: NVMe offload
        }
        ds, *_ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
        ds.eval()
        self._frozen_engines.append(ds)  # its hooks fetch the partitions; keep it alive as long as the model
        return ds.module

    @contextlib.contextmanager
    def gathered_for_generation(self) -> Iterator[nn.Module]:
        """Yield the unwrapped model for many no-grad forward passes (a rollout phase); call on every rank.

        ZeRO-3 gathers all parameters once for the whole block instead of once per generated token. The module
        hooks would release them after every sub-module forward; an extra holder in each parameter's
        active-sub-module set keeps them resident until the block ends.
        """
        if self.strategy != "zero3":
            yield self.model
            return
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for p in params:
                p.ds_active_sub_modules.add(_GENERATION_HOLDER)
            try:
                yield self.model
            finally:
                for p in params:
                    p.ds_active_sub_modules.discard(_GENERATION_HOLDER)

    def gathered_parameters_in_chunks(
        self, select: Callable[[str, nn.Parameter], bool] | None = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The unwrapped model's parameters, one module at a time: ``[(name, full tensor), ...]``; every rank.

        For pushing weights into another engine (vLLM) after an optimizer step. A chunk is the parameters one
        module owns directly (a linear layer's weight and bias), named as in ``model.named_parameters()``;
        modules none of whose parameters ``select`` keeps are skipped (under ZeRO-3: not even gathered).
        Under ZeRO-3 each chunk is gathered with ``GatheredParameters`` while it is yielded and released
        before the next, so no rank ever holds more than one module whole beyond its shard; the tensors are
        views valid only until the next chunk: copy what must outlive it. Other strategies yield the live
        parameters (detached).
        """
        zero3 = self.strategy == "zero3"
        if zero3:
            import deepspeed
        for prefix, mod in self.model.named_modules():
            named = [
                (f"{prefix}.{n}" if prefix else n, p)
                for n, p in mod.named_parameters(recurse=False)
                if select is None or select(f"{prefix}.{n}" if prefix else n, p)
            ]
            if not named:
                continue
            if not zero3:
                yield [(n, p.detach()) for n, p in named]
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                yield [(n, p.detach()) for n, p in named]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on CPU on rank 0 (``None`` on other ranks); call on every rank.

        Tensors keep the dtype the module trains in (bf16 under zero2/zero3 bf16, else fp32). ZeRO-3 gathers one
        module's parameters at a time, so a GPU never holds more than one module whole beyond its shard.
        """
        entries = self.model.state_dict(keep_vars=True)
        copies: dict[int, torch.Tensor] = {}
        if self.strategy == "zero3":
            import deepspeed

            for mod in self.model.modules():
                params = list(mod.parameters(recurse=False))
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    if self.dist.is_main:
                        copies.update({id(p): p.detach().to("cpu", copy=True) for p in params})
        if not self.dist.is_main:
            return None
        return {
            k: copies[id(v)] if id(v) in copies else v.detach().to("cpu", copy=True)
            for k, v in entries.items()
        }

    def save_state(self, directory: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Save weights of trainable parameters + optimizer + counters for an exact resume; call on every rank.

        Atomic: written to ``<directory>.tmp`` and renamed, so a crash never leaves a half state at ``directory``.
        single/ddp: rank 0 writes (state is replicated). zero2/zero3: every rank writes its own partition (a
        shared filesystem is assumed for multi-node runs). ``extra`` (JSON-able) comes back from ``load_state``.
        """
        if not self.at_boundary:
            raise RuntimeError(
                f"save_state in the middle of an accumulation ({self.micro_steps} micro-steps)"
            )
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(
                str(tmp / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True
            )
        elif self.dist.is_main:
            trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            torch.save(trainable, tmp / "trainable.pt")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        self.dist.barrier()
        if self.dist.is_main:
            meta = {
                "strategy": self.strategy,
                "world_size": self.dist.world_size,
                "precision": self.precision,
                "grad_accum": self.grad_accum,
                "micro_steps": self.micro_steps,
                "optimizer_steps": self.optimizer_steps,
                "lrs": self.lrs(),
                "extra": dict(extra or {}),
            }
            (tmp / STATE_META).write_text(json.dumps(meta, indent=2) + "\n")
            old = directory.with_name(directory.name + ".old")
            if directory.exists():
                shutil.rmtree(old, ignore_errors=True)
                directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return directory

    def load_state(self, directory: str | Path) -> dict[str, Any]:
        """Restore what ``save_state`` wrote (on every rank, right after ``setup``); returns its ``extra``."""
        directory = Path(directory)
        meta_path = directory / STATE_META
        if not meta_path.is_file():
            raise AlignError(f"{directory}: not a training state (no {STATE_META}; an interrupted save?)")
        meta = json.loads(meta_path.read_text())
        here = (self.strategy, self.dist.world_size, self.precision)
        saved = (meta["strategy"], meta["world_size"], meta["precision"])
        sharded = self.ds_engine is not None or meta["strategy"].startswith("zero")
        if sharded and here != saved:
            raise AlignError(
                f"{meta_path}: saved with strategy {saved[0]} on {saved[1]} ranks in {saved[2]}; this run is "
                f"{here[0]} on {here[1]} ranks in {here[2]}; ZeRO states resume only on the same setup"
            )
        if meta["grad_accum"] != self.grad_accum:
            raise AlignError(
                f"{meta_path}: saved with grad_accum={meta['grad_accum']}, this run has {self.grad_accum}"
            )
        if self.ds_engine is not None:
            path, _ = self.ds_engine.load_checkpoint(
                str(directory / "deepspeed"),
                tag="state",
                load_module_strict=False,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise AlignError(f"{directory / 'deepspeed'}: DeepSpeed could not load the state")
        else:
            trainable = torch.load(directory / "trainable.pt", map_location=self.dist.device)
            wanted = {n for n, p in self.model.named_parameters() if p.requires_grad}
            if set(trainable) != wanted:
                diff = sorted(set(trainable) ^ wanted)
                raise AlignError(f"{directory}: trainable parameters differ from this model's: {diff[:5]}")
            self.model.load_state_dict(trainable, strict=False)
            self.optimizer.load_state_dict(
                torch.load(directory / "optimizer.pt", map_location=self.dist.device)
            )
        self.micro_steps = self._last_stepped_micro = meta["micro_steps"]
        self.optimizer_steps = meta["optimizer_steps"]
        self.set_lrs(meta["lrs"])
        self._sync_ddp_next()
        return meta["extra"]
