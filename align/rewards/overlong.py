"""DAPO's soft overlong punishment (Eq. 13 of the DAPO paper), TRL's ``get_soft_overlong_punishment``.

With ``L = max_completion_len``, ``c = soft_punish_cache`` and ``n`` the completion's length in tokens
(end-of-turn token included, as the sampler counts it)::

    R(n) = 0                   if n <= L - c
           ((L - c) - n) / c   if L - c < n <= L
           -1                  if n > L

so a completion is not rewarded for being short, only punished, linearly, for running into the last ``c``
tokens of the budget (a truncated completion, ``n == L``, gets -1). ``c = 0`` leaves only the -1 beyond ``L``.
The GRPO stage passes the token ids of every completion as the ``completion_ids`` column (TRL's name) and
``max_completion_len`` defaults to ``grpo.max_completion_length``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def soft_overlong(length: int, max_completion_len: int, soft_punish_cache: int) -> float:
    """``R(length)`` above: 0 up to ``max_completion_len - soft_punish_cache``, then down to -1 at the limit."""
    start = max_completion_len - soft_punish_cache
    if length <= start:
        return 0.0
    if length <= max_completion_len:
        return (start - length) / soft_punish_cache
    return -1.0


def soft_overlong_problem(params: Mapping[str, Any]) -> str | None:
    """What is wrong with :func:`soft_overlong_reward`'s bound parameters, or ``None``."""
    cache, limit = params.get("soft_punish_cache"), params.get("max_completion_len")
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (cache, limit))
    if whole and 0 <= cache <= limit:
        return None
    return (
        f"needs soft_punish_cache, a whole number of tokens in [0, max_completion_len ({limit})] over which the "
        f"penalty falls from 0 to -1; got {dict(params)}"
    )


def soft_overlong_reward(
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    max_completion_len: int,
    soft_punish_cache: int,
    **columns: Any,
) -> list[float | None]:
    """:func:`soft_overlong` of each completion's token count (the ``completion_ids`` column)."""
    if completion_ids is None or len(completion_ids) != len(completions):
        from align.rewards import RewardSetupError  # the package imports this module before defining it

        got = "no" if completion_ids is None else f"{len(completion_ids)} values for {len(completions)}"
        raise RewardSetupError(
            f"reward 'soft_overlong' needs a 'completion_ids' column (token ids per completion): {got}"
        )
    return [soft_overlong(len(ids), max_completion_len, soft_punish_cache) for ids in completion_ids]
