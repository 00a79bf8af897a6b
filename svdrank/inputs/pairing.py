"""Match base and tuned tensors by name and decide which pairs are layers.

A layer is a 2-D floating tensor present in both checkpoints with the same
shape (4-D conv kernels too, reshaped, when asked). Every other tensor is
listed as skipped with its reason, so a user can see why a name is missing
from the analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from svdrank.errors import PairingError
from svdrank.inputs.checkpoint import Checkpoint
from svdrank.inputs.names import (
    ModuleName,
    expert_slice,
    module_of,
    name_modules,
    natural_key,
    role_of,
    selected,
)
from svdrank.types import Layer, Skipped, TensorInfo

PREFIX_DEPTH = 3


@dataclass(frozen=True)
class Pairing:
    """The layers to analyse, the tensors skipped, and the prefixes stripped to match names."""

    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]
    base_prefix: str
    tuned_prefix: str


def pair_checkpoints(
    base: Checkpoint,
    tuned: Checkpoint,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    include_conv: bool = False,
) -> Pairing:
    """Match the two checkpoints' tensors and split them into layers and skipped tensors.

    Names may differ by one consistent prefix (``model.`` against none,
    ``base_model.model.``); the prefix that matches the most names is stripped.
    Layers keep the base checkpoint's names.

    Parameters
    ----------
    base, tuned : Checkpoint
        The checkpoints before and after fine-tuning.
    include, exclude : sequence of str
        Glob patterns on module names: a layer must match one ``include``
        pattern (when any are given) and no ``exclude`` pattern.
    include_conv : bool
        Analyse 4-D conv kernels reshaped to (out, in·kh·kw).

    Returns
    -------
    Pairing

    Raises
    ------
    PairingError
        If no layer is common to both checkpoints.
    """
    base_prefix, tuned_prefix = find_prefixes(list(base.tensors), list(tuned.tensors))
    base_keys = {_strip(name, base_prefix): info for name, info in base.tensors.items()}
    tuned_keys = {_strip(name, tuned_prefix): info for name, info in tuned.tensors.items()}
    names = name_modules([module_of(name) for name in base.tensors])
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    for key, info in base_keys.items():
        place = names[module_of(info.name)]
        outcome = _classify(info, tuned_keys.get(key), include, exclude, include_conv, place)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
        else:
            layers += _layers(info, tuned_keys[key], outcome, place)
    skipped += [
        Skipped(info.name, "only-in-tuned")
        for key, info in tuned_keys.items()
        if key not in base_keys
    ]
    if not layers:
        raise PairingError(_no_layers_message(base, tuned, skipped))
    layers.sort(key=lambda layer: natural_key(layer.module))
    skipped.sort(key=lambda item: natural_key(item.name))
    return Pairing(tuple(layers), tuple(skipped), base_prefix, tuned_prefix)


def _classify(
    base: TensorInfo,
    tuned: TensorInfo | None,
    include: Sequence[str],
    exclude: Sequence[str],
    include_conv: bool,
    place: ModuleName,
) -> Skipped | list[tuple[str, tuple[int, int], int | None]]:
    """Decide whether a base tensor and its tuned partner make layers: (module, shape, part)."""
    if tuned is None:
        return Skipped(base.name, "only-in-base")
    if not (base.floating and tuned.floating):
        return Skipped(base.name, "not-floating", f"{base.dtype}/{tuned.dtype}")
    if base.shape != tuned.shape:
        shapes = f"base {list(base.shape)}, tuned {list(tuned.shape)}"
        return Skipped(base.name, "shape-mismatch", shapes)
    if len(base.shape) == 4 and not include_conv:
        return Skipped(base.name, "conv", str(list(base.shape)))
    if 0 in base.shape:
        return Skipped(base.name, "not-2d", str(list(base.shape)))
    if len(base.shape) not in (2, 4) and not _fused_experts(base):
        return Skipped(base.name, "not-2d", str(list(base.shape)))
    module = module_of(base.name)
    if not selected(module, include, exclude, place):
        return Skipped(base.name, "excluded")
    if _fused_experts(base):
        return [
            (expert_slice(module, part), (base.shape[1], base.shape[2]), part)
            for part in range(base.shape[0])
        ]
    out, *rest = base.shape
    return [(module, (out, rest[0] * (rest[1] * rest[2] if len(rest) == 3 else 1)), None)]


def _fused_experts(info: TensorInfo) -> bool:
    """Tell whether a tensor stores one matrix per expert: 3-D, under a name that says experts."""
    return len(info.shape) == 3 and "expert" in info.name.lower()


def _layers(
    base: TensorInfo,
    tuned: TensorInfo,
    matrices: list[tuple[str, tuple[int, int], int | None]],
    name: ModuleName,
) -> list[Layer]:
    """Make the layers of one tensor pair: one, or one per expert of a fused tensor."""
    return [
        Layer(
            name=base.name,
            module=module,
            kind=name.kind,
            block=name.block,
            shape=shape,
            role=role_of(module_of(base.name).rsplit(".", 1)[-1], len(base.shape)),
            base=base,
            tuned=tuned,
            stack=name.stack,
            expert=name.expert if part is None else part,
            part=part,
        )
        for module, shape, part in matrices
    ]


def find_prefixes(base_names: Sequence[str], tuned_names: Sequence[str]) -> tuple[str, str]:
    """Find the (base, tuned) prefixes whose removal makes the most names match.

    At most one side gets a prefix: the difference must be one consistent
    prefix such as ``model.`` or ``base_model.model.``. Ties go to no prefix.

    Parameters
    ----------
    base_names, tuned_names : sequence of str
        The tensor names of the two checkpoints.

    Returns
    -------
    tuple of (str, str)
        The prefix to strip from base names and from tuned names; at least one
        is ``""``.
    """
    best = ("", "")
    best_matches = _matches(base_names, tuned_names, "", "")
    for side, names in (("base", base_names), ("tuned", tuned_names)):
        for prefix in sorted(_candidate_prefixes(names)):
            prefixes = (prefix, "") if side == "base" else ("", prefix)
            matches = _matches(base_names, tuned_names, *prefixes)
            if matches > best_matches:
                best, best_matches = prefixes, matches
    return best


def _candidate_prefixes(names: Sequence[str]) -> set[str]:
    """Dotted prefixes of up to PREFIX_DEPTH components that occur in the names."""
    found = set()
    for name in names:
        parts = name.split(".")
        for depth in range(1, min(PREFIX_DEPTH, len(parts) - 1) + 1):
            found.add(".".join(parts[:depth]) + ".")
    return found


def _matches(base_names: Sequence[str], tuned_names: Sequence[str], pb: str, pt: str) -> int:
    """How many names are equal after stripping the given prefixes."""
    return len({_strip(n, pb) for n in base_names} & {_strip(n, pt) for n in tuned_names})


def _strip(name: str, prefix: str) -> str:
    """Remove a prefix when the name has it."""
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _no_layers_message(base: Checkpoint, tuned: Checkpoint, skipped: list[Skipped]) -> str:
    """Explain in one line why no layer was found."""
    counts: dict[str, int] = {}
    for item in skipped:
        counts[item.reason] = counts.get(item.reason, 0) + 1
    summary = ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items()))
    return (
        f"no layers in common between {base.path} and {tuned.path} "
        f"(2-D floating tensors with the same name and shape); skipped: {summary or 'nothing'}"
    )
