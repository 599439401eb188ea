"""GRPO building blocks, shared by the ``grpo`` stage.

* :mod:`align.grpo.loss` owns the arithmetic of a GRPO step: combining rewards, group-relative advantages,
  masking truncated completions and the clipped-surrogate + KL loss, with TRL's option names and math.
* the rollout sampler (shared-prefix KV cache) lives in its own module and documents itself.

The package ``__init__`` imports nothing so that importing one part never pulls in another.
"""
