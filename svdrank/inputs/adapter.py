"""PEFT LoRA adapters as input: the config, and the factors B and A of each module.

A LoRA module adds ΔW = s·B·A with A (r×n), B (m×r) and s = α/r (α/√r with
rsLoRA). This module reads them; :mod:`svdrank.analysis.adapter` turns them
into spectra.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from svdrank.errors import CheckpointError, SvdrankError
from svdrank.files import read_json_object
from svdrank.inputs.checkpoint import Checkpoint
from svdrank.inputs.names import natural_key, pattern_key, peft_targeted

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WRAPPER_PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8
"""``lora_alpha`` when a config leaves it out, as ``peft.LoraConfig`` defaults it."""
# PEFT saves linear LoRA as lora_A/lora_B and embedding LoRA as lora_embedding_A/B,
# the adapter name dropped from saved files (kept in some hand-written ones).
_LORA_TENSOR = re.compile(
    r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(?:\.[\w-]+)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class AdapterConfig:
    """What svdrank needs of ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def alpha_of(self, module: str) -> float:
        """lora_alpha of one module, by PEFT's pattern rule (first matching key wins)."""
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale(self, module: str, rank: int) -> float:
        """Return the LoRA scale of a module: s = α/r, or α/√r with rsLoRA."""
        alpha = self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory or its adapter_config.json."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_NAME).is_file()) or path.name == CONFIG_NAME


def adapter_directory(path: str | Path) -> Path:
    """Return the adapter directory, given it or its config file."""
    path = Path(path)
    return path.parent if path.name == CONFIG_NAME else path


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Parse and check adapter_config.json (see :func:`lora_config` for the rules).

    Raises
    ------
    CheckpointError
        If the file is missing, not JSON, or not a valid LoRA config; the
        message names the file and the field.
    """
    path = directory / CONFIG_NAME
    record = read_json_object(path, "adapter config", CheckpointError)
    return lora_config(record, path, CheckpointError)


_Value = TypeVar("_Value", int, float)


class _FieldError(SvdrankError):
    """One field of a LoRA config is wrong; the message names it (the caller adds the file)."""


def lora_config(record: dict[str, Any], path: Path, error: type[SvdrankError]) -> AdapterConfig:
    r"""Check the LoRA fields of a PEFT config (``LoraConfig``'s keyword arguments) and read them.

    ``r`` is a whole number ≥ 1; ``lora_alpha`` (default: ``r``) a finite number
    > 0; ``use_rslora`` true or false; ``rank_pattern`` an object of whole
    numbers ≥ 1 and ``alpha_pattern`` one of finite numbers > 0 (null reads as
    empty), each key a regular expression PEFT can compile in
    ``re.match(rf"(.*\.)?({key})$", module)``.

    Parameters
    ----------
    record : dict
        The decoded JSON object.
    path : Path
        The file it came from, for messages.
    error : type of SvdrankError
        What to raise: CheckpointError for an adapter's config, AnalysisFileError
        for a config ``check`` judges.

    Returns
    -------
    AdapterConfig

    Raises
    ------
    SvdrankError
        An ``error`` naming the file and the field, for a missing ``r`` or a
        field of the wrong type, out of range, or with a key that is not a
        regular expression.
    """
    try:
        return _lora_config(record)
    except _FieldError as exc:
        raise error(f"{path}: {exc}") from None


def lora_targets(record: dict[str, Any], path: Path, error: type[SvdrankError]) -> str | list[str]:
    """Check and return ``target_modules``: a regular expression, or a list of names.

    The list may be empty only when ``target_parameters`` names something.

    Raises
    ------
    SvdrankError
        An ``error`` naming the file and ``target_modules`` when it is missing,
        of another type, an empty list with no ``target_parameters``, or a
        string that is not a regular expression.
    """
    targets = record.get("target_modules")
    if isinstance(targets, str) and _compiles(peft_targeted, targets):
        return targets
    if (
        isinstance(targets, list)
        and (targets or lora_parameters(record, path, error))
        and all(isinstance(name, str) for name in targets)
    ):
        return targets
    raise error(
        f"{path}: target_modules: must be a regular expression or a non-empty list of module "
        f"names, got {targets!r:.60}"
    )


def lora_parameters(record: dict[str, Any], path: Path, error: type[SvdrankError]) -> list[str]:
    """Check and return ``target_parameters`` (PEFT ≥ 0.17): a list of names, none when absent.

    Raises
    ------
    SvdrankError
        An ``error`` naming the file and ``target_parameters`` when it is not a
        list of strings.
    """
    names = record.get("target_parameters")
    if names is None:
        return []
    if isinstance(names, list) and all(isinstance(name, str) for name in names):
        return names
    raise error(f"{path}: target_parameters: must be a list of parameter names, got {names!r:.60}")


def _lora_config(record: dict[str, Any]) -> AdapterConfig:
    """Read the checked LoRA fields of a config."""
    if "r" not in record:
        raise _FieldError("r: missing; not a LoRA config")
    r = _rank(record["r"], "r")
    use_rslora = record.get("use_rslora", False)
    if type(use_rslora) is not bool:
        raise _FieldError(f"use_rslora: must be true or false, got {use_rslora!r:.60}")
    return AdapterConfig(
        r=r,
        lora_alpha=_alpha(record.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha"),
        use_rslora=use_rslora,
        rank_pattern=_patterns(record, "rank_pattern", _rank),
        alpha_pattern=_patterns(record, "alpha_pattern", _alpha),
    )


def _patterns(
    record: dict[str, Any], field: str, check: Callable[[Any, str], _Value]
) -> dict[str, _Value]:
    """Check a pattern field: keys PEFT can compile, values that pass ``check``; null is empty."""
    patterns = record.get(field)
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise _FieldError(f"{field}: must be an object of module patterns, got {patterns!r:.60}")
    for key in patterns:
        if not _compiles(pattern_key, {key: None}):
            raise _FieldError(f"{field}: key {key!r:.60} is not a regular expression")
    return {key: check(value, f"{field}[{key!r:.60}]") for key, value in patterns.items()}


def _rank(value: Any, field: str) -> int:
    """Check a LoRA rank: a whole number ≥ 1 (never a bool or a float)."""
    if type(value) is int and value >= 1:
        return value
    raise _FieldError(f"{field}: must be a whole number ≥ 1, got {value!r:.60}")


def _alpha(value: Any, field: str) -> float:
    """Check a LoRA alpha: a finite number > 0 (an integer too large for a float is not)."""
    if type(value) in (int, float) and 0 < value <= sys.float_info.max:
        return float(value)
    raise _FieldError(f"{field}: must be a finite number > 0, got {value!r:.60}")


def _compiles(match: Callable[[Any, str], object], pattern: Any) -> bool:
    """Whether ``pattern`` compiles as a regular expression, tried by the match PEFT makes."""
    try:
        match(pattern, "")
    except (re.error, OverflowError, RecursionError):
        return False
    return True


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name (without PEFT's wrapper prefix) and A, B tensor names."""

    module: str
    a: str
    b: str
    embedding: bool


def lora_modules(weights: Checkpoint) -> list[LoraModule]:
    """Pair every lora_A with its lora_B.

    Raises
    ------
    CheckpointError
        If a module has only one of A and B, or none is found.
    """
    sides: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    for name in weights.tensors:
        match = _LORA_TENSOR.match(name)
        if match:
            module = match["module"].removeprefix(WRAPPER_PREFIX)
            sides.setdefault(module, {})[match["side"]] = name
            embedding[module] = bool(match["embedding"])
    incomplete = [module for module, found in sides.items() if len(found) != 2]
    if incomplete:
        raise CheckpointError(f"{weights.path}: module {incomplete[0]} has lora_A or lora_B only")
    if not sides:
        raise CheckpointError(f"{weights.path}: no lora_A/lora_B tensors in this adapter")
    return [
        LoraModule(module, sides[module]["A"], sides[module]["B"], embedding[module])
        for module in sorted(sides, key=natural_key)
    ]


def lora_factors(weights: Checkpoint, lora: LoraModule) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) as the (m×r, r×n) factors of ΔW = B·A.

    PEFT stores embedding LoRA transposed relative to linear LoRA
    (lora_embedding_A is r×num_embeddings, lora_embedding_B is dim×r, and the
    update of the (num_embeddings×dim) weight is (B·A)ᵀ); the factors are
    returned in the weight's own orientation.
    """
    a, b = weights.read(lora.a), weights.read(lora.b)
    if lora.embedding:
        a, b = b.T, a.T
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"{weights.path}: {lora.module}: lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)} do not multiply"
        )
    return b, a
