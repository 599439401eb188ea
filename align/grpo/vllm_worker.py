"""The weight-update entry point inside a vLLM worker: ``--worker-extension-cls align.grpo.vllm_worker.WeightSync``.

vLLM mixes this class into each of its workers; its methods are then callable through
``LLM.collective_rpc`` (colocated mode) or, on a server started with ``VLLM_SERVER_DEV_MODE=1``, through
``POST /collective_rpc {"method": "align_update_file", "args": [path]}`` (server mode). It imports only torch
and safetensors, so that a vLLM environment without align's dependencies can load it: put the repository
root on the server's ``PYTHONPATH`` (``align/__init__.py`` and ``align/grpo/__init__.py`` import nothing).

Names are the canonical llava-hf ones (``language_model.model.*``, ``multi_modal_projector.*``,
``vision_tower.vision_model.*``), which vLLM's Llava ``load_weights`` maps onto its fused layers (q/k/v into
``qkv_proj``, gate/up into ``gate_up_proj``); a chunk may hold any subset of the model.

Tests: ``.venv/bin/pytest -q tests/test_vllm_backend.py`` (they start vLLM from ``.venv-vllm``).
"""

from __future__ import annotations

import torch


class WeightSync:
    """Methods vLLM adds to its worker (``self`` is the worker: ``self.model_runner``).

    An update is ``align_update_begin``, any number of ``align_update_file`` / ``align_update_tensors`` chunks,
    then ``align_update_end``: vLLM's in-place layerwise reload (what ``GPUModelRunner.reload_weights``
    does), because a plain ``model.load_weights`` writes into the checkpoint-format tensors, which a backend
    may have repacked into kernel formats after loading (the CPU build does: "Attempted to load weight
    (torch.Size([128, 256])) into parameter (torch.Size([0]))"). A fused layer (``qkv_proj``) is processed once
    all its parts arrived, so an update must send every part of each layer it touches; layers it does not
    touch keep their weights.
    """

    def align_update_begin(self) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def align_update_file(self, path: str) -> int:
        """Load every tensor of the safetensors file ``path`` into the served model; returns how many."""
        from safetensors.torch import load_file

        weights = load_file(path)
        return self.align_update_tensors(list(weights.items()))

    def align_update_tensors(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Load ``[(canonical name, tensor), ...]`` (in-process callers: colocated mode passes tensors)."""
        self.model_runner.get_model().load_weights(named)
        return len(named)

    def align_update_end(self) -> None:
        """Process the reloaded layers. The caller then resets the engine's prefix, multi-modal and encoder
        caches (computed with the old weights) from the engine side, where the scheduler tracks them."""
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
