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
from dataclasses import dataclass
from typing import Any

EMBEDDING_KINDS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embeddings", "embed_in")
LM_HEAD_KINDS = ("lm_head", "embed_out")
_DIGITS = re.compile(r"(\d+)")
_SLICE = re.compile(r"\[\d+\]$")


def module_of(name: str) -> str:
    """Return the module name: the tensor name without a trailing ``.weight``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


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


PLACE_FIELDS = ("stack", "block", "expert", "kind")
"""The fields of a module's place that an include/exclude pattern can name: ``kind=mlp.*``."""


def selected(
    module: str,
    include: Sequence[str],
    exclude: Sequence[str],
    place: ModuleName | None = None,
) -> bool:
    """Whether a module passes the include and exclude patterns.

    A pattern is an ``fnmatch`` glob on the full module name, or
    ``FIELD=GLOB`` on one field of its place (``kind=self_attn.*``,
    ``stack=vision_model``, ``block=1?``, ``expert=3``; a field that is None
    reads as empty).

    Examples
    --------
    >>> place = ModuleName("encoder", 1, None, "layer.SelfAttention.q")
    >>> selected("encoder.block.1.layer.0.SelfAttention.q", ["kind=*Attention.q"], [], place)
    True
    >>> selected("encoder.block.1.layer.0.SelfAttention.q", [], ["stack=encoder"], place)
    False
    """
    if include and not any(_matches(module, pattern, place) for pattern in include):
        return False
    return not any(_matches(module, pattern, place) for pattern in exclude)


def _matches(module: str, pattern: str, place: ModuleName | None) -> bool:
    """Match one pattern: a glob on the name, or FIELD=GLOB on a field of the place."""
    field, equals, glob = pattern.partition("=")
    if equals and field in PLACE_FIELDS:
        value = None if place is None else getattr(place, field)
        return fnmatch.fnmatchcase("" if value is None else str(value), glob)
    return fnmatch.fnmatchcase(module, pattern)


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


@dataclass(frozen=True)
class ModuleName:
    """Where a module sits: its stack, block, expert and kind (see DESIGN.md, Vocabulary)."""

    stack: str
    block: int | None
    expert: int | None
    kind: str


def name_modules(modules: Sequence[str]) -> dict[str, ModuleName]:
    """Derive stack, block, expert and kind of every module from the structure of the names.

    The block is a module's first integer component, and the components before
    it name its stack (``model.layers``, ``encoder.block``). With one stack in
    the model the stack is empty; with several, each is shortened to what
    tells them apart (``encoder``/``decoder``, ``text_model``/``vision_model``).
    After the block, an integer that takes several values among modules of the
    same block and shape of name is kept: as the expert index when the
    component before it names experts (``experts.3``), else in the kind
    (``resnets.1.conv1``). An integer with one value per block (T5's
    ``layer.1``) is a fixed path step and is left out of the kind, so the same
    module type has one kind in every stack, unless it ends the name
    (``ff.net.2``, an entry of a ``Sequential``). A module outside every block
    has its whole name as kind.

    Parameters
    ----------
    modules : sequence of str
        Every module name of a model (or as many as are analysed).

    Returns
    -------
    dict of str to ModuleName

    Examples
    --------
    >>> names = name_modules(["encoder.block.0.layer.1.DenseReluDense.wi",
    ...                       "decoder.block.0.layer.2.DenseReluDense.wi"])
    >>> names["decoder.block.0.layer.2.DenseReluDense.wi"]
    ModuleName(stack='decoder', block=0, expert=None, kind='layer.DenseReluDense.wi')
    """
    parts = {module: module.split(".") for module in modules}
    blocks = {module: _first_integer(tokens) for module, tokens in parts.items()}
    stacks = _stack_names({".".join(parts[m][:b]) for m, b in blocks.items() if b is not None})
    varying = _varying_positions(parts, blocks)
    named = {}
    for module, tokens in parts.items():
        position = blocks[module]
        if position is None:
            named[module] = ModuleName("", None, None, module)
            continue
        stack = stacks[".".join(tokens[:position])]
        expert, kind = _inner(tokens[position + 1 :], varying[module])
        named[module] = ModuleName(stack, int(tokens[position]), expert, kind)
    return named


def _first_integer(tokens: list[str]) -> int | None:
    """Return the position of the first all-digit component that is not the last, or None.

    A number that ends the name is an entry of a ``Sequential`` (``mm_projector.0``),
    not a block.
    """
    return next((i for i, token in enumerate(tokens[:-1]) if token.isdigit()), None)


def _stack_names(prefixes: set[str]) -> dict[str, str]:
    """Shorten the stack prefixes to what tells them apart; empty when there is one."""
    if len(prefixes) <= 1:
        return dict.fromkeys(prefixes, "")
    split = {prefix: prefix.split(".") for prefix in prefixes}
    lead = _common_length([tokens for tokens in split.values()])
    trail = _common_length([tokens[::-1] for tokens in split.values()])
    short = {
        prefix: ".".join(tokens[lead : len(tokens) - trail]) for prefix, tokens in split.items()
    }
    if all(short.values()) and len(set(short.values())) == len(short):
        return short
    return {prefix: prefix for prefix in prefixes}


def _common_length(sequences: list[list[str]]) -> int:
    """Return how many leading tokens all sequences share (never all of the shortest)."""
    shortest = min(len(tokens) for tokens in sequences)
    count = 0
    while count < shortest - 1 and len({tokens[count] for tokens in sequences}) == 1:
        count += 1
    return count


def _varying_positions(
    parts: dict[str, list[str]], blocks: dict[str, int | None]
) -> dict[str, set[int]]:
    """For each module, the integer positions after its block that vary within the block."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for module, tokens in parts.items():
        position = blocks[module]
        if position is not None:
            shape = tuple("#" if t.isdigit() else t for t in tokens[position + 1 :])
            groups.setdefault((*tokens[: position + 1], "|", *shape), []).append(module)
    varying: dict[str, set[int]] = {module: set() for module in parts}
    for members in groups.values():
        start = blocks[members[0]]
        assert start is not None
        rest = [parts[m][start + 1 :] for m in members]
        spots = {
            i
            for i, token in enumerate(rest[0])
            if token.isdigit() and len({tokens[i] for tokens in rest}) > 1
        }
        for module in members:
            varying[module] = spots
    return varying


def _inner(rest: list[str], varying: set[int]) -> tuple[int | None, str]:
    """Split the path after the block into the expert index and the kind."""
    expert = None
    kind = []
    for i, token in enumerate(rest):
        if not token.isdigit():
            kind.append(token)
        elif i in varying and expert is None and i > 0 and "expert" in rest[i - 1].lower():
            expert = int(token)
        elif i in varying or i == len(rest) - 1:
            kind.append(token)
    return expert, ".".join(kind)


def short_kinds(kinds: Iterable[str]) -> dict[str, str]:
    """Give every kind its shortest dotted suffix that no other kind ends with.

    A kind that is itself a suffix of another (``output.dense`` beside
    ``attention.output.dense``) keeps its whole path.

    Examples
    --------
    >>> short_kinds(["self_attn.q_proj", "attention.output.dense", "output.dense"])
    {'self_attn.q_proj': 'q_proj', 'attention.output.dense': 'attention.output.dense', \
'output.dense': 'output.dense'}
    """
    unique = list(dict.fromkeys(kinds))
    short = {}
    for kind in unique:
        tokens = kind.split(".")
        others = [other for other in unique if other != kind]
        short[kind] = kind
        for length in range(1, len(tokens) + 1):
            if tokens[-length].isdigit():
                continue
            suffix = ".".join(tokens[-length:])
            if not any(other == suffix or other.endswith("." + suffix) for other in others):
                short[kind] = suffix
                break
    return short


def expert_slice(module: str, part: int) -> str:
    """Name one expert's matrix of a fused expert tensor: ``<module>[<part>]``."""
    return f"{module}[{part}]"


def is_expert_slice(module: str) -> bool:
    """Tell whether a module name is one expert's matrix of a fused tensor."""
    return _SLICE.search(module) is not None


KIND_ORDER = (
    "embed_tokens",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "c_attn",
    "c_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "fc1",
    "fc2",
    "lm_head",
)
"""Where the kinds a reader knows go: attention before MLP, in the model's own order."""


def kinds_in_order(labels: Iterable[str]) -> list[str]:
    """Order panel labels as a Llama reader expects (q, k, v, o, gate, up, down), others after.

    Labels sort by stack first (as met), then by their last name component's
    place in KIND_ORDER.
    """
    found = list(dict.fromkeys(labels))
    stacks = list(dict.fromkeys(label.rpartition(": ")[0] for label in found))

    def place(label: str) -> tuple[int, int, int]:
        stack, _, kind = label.rpartition(": ")
        last = kind.rsplit(".", 1)[-1]
        known = KIND_ORDER.index(last) if last in KIND_ORDER else len(KIND_ORDER)
        return stacks.index(stack), known, found.index(label)

    return sorted(found, key=place)
