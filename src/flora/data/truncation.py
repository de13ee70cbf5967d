"""Truncation that keeps the answer: when prompt and response exceed ``max_length``, the context
is cut first (its start kept), then the instruction, so that at least ``min_response`` response
tokens stay; the response itself is cut at its end. Pure: the tokenizer comes in as two
functions, so the search is tested without one."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

__all__ = ["Fitted", "fit_prompt"]


class Fitted(NamedTuple):
    instruction: str
    context: str
    shortened: str  # "" (as it was), "context" or "instruction" (the context is then empty)


def fit_prompt(
    instruction: str,
    context: str,
    *,
    prompt_length: Callable[[str, str], int],
    head: Callable[[str, int], str],
    size: Callable[[str], int],
    budget: int,
) -> Fitted | None:
    """The instruction and context whose prompt is at most ``budget`` tokens, cutting as little
    as possible: the longest start of the context, else an empty context and the longest start
    of the instruction. ``prompt_length(instruction, context)`` is the rendered prompt's length,
    ``head(text, n)`` the text of the first ``n`` tokens of ``text`` and ``size(text)`` its
    token count. None when even an empty instruction and context do not fit."""
    if prompt_length(instruction, context) <= budget:
        return Fitted(instruction, context, "")
    if context:

        def fits(k: int) -> bool:
            return prompt_length(instruction, head(context, k)) <= budget

        n = _longest(fits, size(context))
        if n is not None:
            return Fitted(instruction, head(context, n), "context")
    n = _longest(lambda k: prompt_length(head(instruction, k), "") <= budget, size(instruction))
    if n is None:
        return None
    return Fitted(head(instruction, n), "", "instruction")


def _longest(fits: Callable[[int], bool], upper: int) -> int | None:
    """The largest k in [0, upper) with ``fits(k)`` (binary search: the prompt grows with k),
    or None when not even k = 0 fits."""
    if not fits(0):
        return None
    low, high = 0, upper - 1  # fits(low) holds; upper itself is known not to fit
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low
