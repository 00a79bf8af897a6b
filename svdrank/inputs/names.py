r"""Module names: what a tensor name says about its layer, and every rule that matches names.

One home for name matching, because PEFT, the globs of ``--include`` and the
names of a config each match differently and the differences matter:

- :func:`selected`: ``--include`` / ``--exclude`` globs, matched against the whole module name.
- :func:`peft_targeted`: PEFT's ``target_modules`` (a list of names matched
  whole or as a dotted suffix; a string is a regex matched against the whole name).
- :func:`pattern_key`: PEFT's ``rank_pattern`` / ``alpha_pattern`` keys
  (``re.match(rf"(.*\.)?({key})$", name)``; the first key that matches wins).
- :func:`same_module`: two names of one module, up to a wrapper prefix
  (``base_model.model.``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

EMBEDDING_KINDS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embeddings", "embed_in")
LM_HEAD_KINDS = ("lm_head", "embed_out")
_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
_DIGITS = re.compile(r"(\d+)")


def module_of(name: str) -> str:
    """Return the module name: the tensor name without a trailing ``.weight``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def kind_of(module: str) -> str:
    """Return the last dotted component of a module name (``q_proj``)."""
    return module.rsplit(".", 1)[-1]


def block_of(name: str) -> int | None:
    """Return the first integer component of a dotted name, or None."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.11``."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(name))


def role_of(kind: str, ndim: int) -> str:
    """Classify a layer as linear, embedding, lm_head or conv."""
    if ndim == 4:
        return "conv"
    if kind in LM_HEAD_KINDS:
        return "lm_head"
    if kind in EMBEDDING_KINDS or "embed" in kind:
        return "embedding"
    return "linear"


def selected(module: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether a module passes the include and exclude glob patterns."""
    if include and not any(fnmatch.fnmatchcase(module, pattern) for pattern in include):
        return False
    return not any(fnmatch.fnmatchcase(module, pattern) for pattern in exclude)


def peft_targeted(targets: str | Iterable[str], module: str) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module``.

    A string is a regular expression matched against the whole name; a list
    names modules matched whole or as a dotted suffix (``q_proj`` selects
    ``model.layers.0.self_attn.q_proj``).
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == target or module.endswith("." + target) for target in targets)


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    r"""Return the first key of ``patterns`` that PEFT would match to ``module``.

    PEFT tests each key ``K`` of ``rank_pattern`` and ``alpha_pattern`` with
    ``re.match(rf"(.*\.)?({K})$", module)``; the first key that matches wins.

    Parameters
    ----------
    patterns : dict
        A PEFT ``rank_pattern`` or ``alpha_pattern``.
    module : str
        A full module name.

    Returns
    -------
    str or None
        The matching key, or None when no key matches.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def same_module(first: str, second: str) -> bool:
    """Whether two names denote one module, up to a dotted prefix on either side."""
    return first == second or first.endswith("." + second) or second.endswith("." + first)
