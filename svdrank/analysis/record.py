"""Reading an analysis record back: every field checked before the dataclasses are built.

Types, ranges, finiteness and consistency (Σσ² ≤ ‖ΔW‖_F² within rounding; the
shape bounds the number of values; no module twice) are checked field by field,
and the first problem is one :class:`FieldError` whose message names the field
(``layers[3] (model.layers.0.q_proj).singular_values[7]``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from typing import Any, TypeVar

import numpy as np

from svdrank.errors import AnalysisFileError, UsageError
from svdrank.types import (
    NOISE_ESTIMATES,
    SKIP_REASONS,
    Analysis,
    AnalysisSettings,
    EngineSettings,
    LayerNoise,
    LayerResult,
    ModelInfo,
    Skipped,
    Spectrum,
    Target,
)

MAX_DIMENSION = 2**40
"""The largest matrix dimension (or index) a file may state, far above any model's."""

_ORDER_SLACK = 1e-6
"""A singular value may exceed the one before it by this share (the engines' rounding)."""
_ENERGY_SLACK = 1e-4
"""Σσ² may exceed ‖ΔW‖_F² by this share (singular values of float32 work, float64 sums)."""
_COMPLETE_SLACK = 1e-3
"""A complete spectrum's Σσ² is ‖ΔW‖_F² within this share (a Gram eigenvalue loses ε·σ₁²)."""

_Kind = tuple[tuple[type, ...], str]
_OBJECT: _Kind = ((dict,), "an object")
_LIST: _Kind = ((list,), "a list")
_TEXT: _Kind = ((str,), "a string")
_OPTIONAL_TEXT: _Kind = ((str, type(None)), "a string or null")
_FLAG: _Kind = ((bool,), "true or false")
_NUMBER: _Kind = ((int, float), "a number")
_OPTIONAL_NUMBER: _Kind = ((int, float, type(None)), "a number or null")
_INDEX: _Kind = ((int, type(None)), "a whole number or null")
_SETTING_TYPES: dict[type, _Kind] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number ≥ 0"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
}
"""The JSON types a setting may have, by the type of its default (bool is never a number)."""
_REQUIRED = object()
_Settings = TypeVar("_Settings", EngineSettings, AnalysisSettings)


class FieldError(AnalysisFileError):
    """One field of an analysis record is wrong; the message names it (the loader adds the file)."""


def settings_from_record(stored: Any) -> AnalysisSettings:
    """Rebuild settings from their flat record (the inverse of :func:`settings_record`).

    Each stored field must have the type of its default (a list of strings for
    ``include`` and ``exclude``, a whole number ≥ 0 for an integer) and pass the
    range checks of :class:`EngineSettings` and :class:`AnalysisSettings`.

    Parameters
    ----------
    stored : dict
        The ``settings`` object of an analysis file. Fields an older file lacks
        (``lanczos_solver``, ``complete``) take their defaults; unknown fields
        are ignored.

    Returns
    -------
    AnalysisSettings

    Raises
    ------
    AnalysisFileError
        If ``stored`` is not an object, or a field has the wrong type or is out
        of range; the message names ``settings.<field>``.
    """
    if not isinstance(stored, dict):
        raise FieldError(f"settings: must be an object, got {stored!r:.60}")
    engine = _settings_of(EngineSettings, stored)
    return _settings_of(AnalysisSettings, stored, engine=engine)


def _settings_of(cls: type[_Settings], stored: dict[str, Any], **given: Any) -> _Settings:
    """Build ``cls`` from the stored fields it has, each typed and range-checked on its own."""
    defaults, values = cls(), {}
    for item in fields(cls):
        if item.name in stored and item.name not in given:
            value = _setting(item.name, stored[item.name], getattr(defaults, item.name))
            try:
                cls(**given, **{item.name: value})
            except UsageError as exc:
                raise FieldError(f"settings.{item.name}: {exc}") from None
            values[item.name] = value
    return cls(**given, **values)


def _setting(name: str, value: Any, default: Any) -> Any:
    """Check a stored setting has its default's type; a tuple is stored as a list of strings."""
    if isinstance(default, tuple):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise FieldError(f"settings.{name}: must be a list of strings, got {value!r:.60}")
    types, words = _SETTING_TYPES[type(default)]
    if type(value) not in types or (type(default) is int and value < 0):
        raise FieldError(f"settings.{name}: must be {words}, got {value!r:.60}")
    return value


def analysis_from_record(record: dict[str, Any], noise_default: str = "auto") -> Analysis:
    """Check every field of a record of a readable schema and build the dataclasses.

    ``noise_default`` is the noise mode of a file whose settings do not state
    one: ``off`` for the schemas from before the noise model.
    """
    inputs = _get(record, "inputs", "", _OBJECT)
    stored_settings = _get(record, "settings", "", _OBJECT)
    settings = settings_from_record({"noise": noise_default, **stored_settings})
    stored = _get(record, "layers", "", _LIST)
    if not stored:
        raise FieldError("layers: empty; the analysis has no layers")
    layers = tuple(layer_from_record(layer, index) for index, layer in enumerate(stored))
    _check_unique(layers)
    skipped = tuple(
        _skipped_from_record(item, index)
        for index, item in enumerate(_get(record, "skipped", "", _LIST))
    )
    return Analysis(
        inputs=inputs,
        settings=settings,
        layers=layers,
        skipped=skipped,
        created=_get(record, "created", "", _TEXT, ""),
        version=_get(record, "svdrank_version", "", _TEXT, ""),
        model=_model(record.get("model")),
    )


def _model(stored: Any) -> ModelInfo | None:
    """Check the ``model`` record (null, or the fields of ModelInfo) and build it."""
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise FieldError(f"model: must be an object or null, got {stored!r:.60}")
    return ModelInfo(
        config=_get(stored, "config", "model", _TEXT),
        model_type=_get(stored, "model_type", "model", _TEXT),
        architecture=_get(stored, "architecture", "model", _TEXT),
        transformers=_get(stored, "transformers", "model", _OPTIONAL_TEXT),
    )


def _target(stored: Any, where: str) -> Target | None:
    """Check a layer's ``target`` record (null, or a name and a type) and build it."""
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise FieldError(f"{where}.target: must be an object or null, got {stored!r:.60}")
    return Target(
        _get(stored, "name", f"{where}.target", _TEXT),
        _get(stored, "type", f"{where}.target", _TEXT),
    )


def layer_from_record(stored: Any, index: int) -> LayerResult:
    """Check one layer's record (see :func:`~svdrank.analysis.file.layer_record`) and build it.

    Parameters
    ----------
    stored : dict
        The layer's record.
    index : int
        Its position in the analysis, for messages (``layers[3] (…).shape``).

    Returns
    -------
    LayerResult

    Raises
    ------
    AnalysisFileError
        A :class:`FieldError` naming the first field that is missing, of the
        wrong type, out of range or inconsistent with another.
    """
    where = f"layers[{index}]"
    if not isinstance(stored, dict):
        raise FieldError(f"{where}: must be an object, got {stored!r:.60}")
    module = _get(stored, "module", where, _TEXT)
    where = f"{where} ({module if module.isprintable() else repr(module):.80})"
    shape = _shape(_get(stored, "shape", where, _LIST), f"{where}.shape")
    spectrum = _spectrum(stored, shape, where)
    delta_norm = _norm(stored, "delta_norm", where, _NUMBER)
    if abs(delta_norm - math.sqrt(spectrum.total_energy)) > _COMPLETE_SLACK * delta_norm:
        raise FieldError(
            f"{where}.delta_norm: {delta_norm:.6g} is not √total_energy "
            f"({math.sqrt(spectrum.total_energy):.6g})"
        )
    return LayerResult(
        module=module,
        name=_get(stored, "name", where, _TEXT),
        kind=_get(stored, "kind", where, _TEXT),
        block=_index(stored, "block", where),
        role=_get(stored, "role", where, _TEXT),
        shape=shape,
        dtype=_get(stored, "dtype", where, _TEXT),
        delta_norm=delta_norm,
        base_norm=_norm(stored, "base_norm", where, _OPTIONAL_NUMBER),
        spectrum=spectrum,
        seconds=_norm(stored, "seconds", where, _NUMBER, 0.0),
        stack=_get(stored, "stack", where, _TEXT, ""),
        expert=_index(stored, "expert", where, None),
        target=_target(stored.get("target"), where),
        noise=_noise(stored.get("noise"), spectrum, f"{where}.noise"),
    )


_NOISE_TEXT = ("grid", "base_grid")
_NOISE_NUMBERS = ("noise_energy", "threshold")
_NOISE_OPTIONAL = ("threshold_low", "profile_bound", "max_entry", "sim_edge", "flip_edge", "edge")


def _noise(stored: Any, spectrum: Spectrum, where: str) -> LayerNoise | None:
    """Check a layer's ``noise`` record (null, or the fields of LayerNoise) and build it.

    The signal rank must be the count of stored values above the threshold,
    so a file cannot state a rank its own spectrum contradicts.
    """
    if stored is None:
        return None
    if not isinstance(stored, dict):
        raise FieldError(f"{where}: must be an object or null, got {stored!r:.60}")
    text = {key: _get(stored, key, where, _TEXT) for key in _NOISE_TEXT}
    numbers = {key: _norm(stored, key, where, _NUMBER) for key in _NOISE_NUMBERS}
    optional = {key: _norm(stored, key, where, _OPTIONAL_NUMBER, None) for key in _NOISE_OPTIONAL}
    estimate = _get(stored, "estimate", where, _TEXT)
    if estimate not in NOISE_ESTIMATES:
        raise FieldError(
            f"{where}.estimate: must be one of {', '.join(NOISE_ESTIMATES)}, got {estimate!r:.60}"
        )
    roundings = _get(stored, "roundings", where, _INDEX)
    if roundings not in (1, 2):
        raise FieldError(f"{where}.roundings: must be 1 or 2, got {roundings!r:.60}")
    unchanged = _norm(stored, "unchanged", where, _NUMBER)
    if unchanged > 1.0:
        raise FieldError(f"{where}.unchanged: a share, must be ≤ 1, got {unchanged!r:.60}")
    rank = _get(stored, "signal_rank", where, _INDEX)
    counted = int(np.count_nonzero(spectrum.values > numbers["threshold"]))
    if rank != counted:
        raise FieldError(
            f"{where}.signal_rank: {rank!r:.60} is not the {counted} singular values above "
            f"the threshold {numbers['threshold']:.6g}"
        )
    return LayerNoise(
        **text,
        roundings=roundings,
        **numbers,
        signal_rank=rank,
        signal_rank_exact=_get(stored, "signal_rank_exact", where, _FLAG),
        unchanged=unchanged,
        estimate=estimate,
        **optional,
    )


def _spectrum(stored: dict[str, Any], shape: tuple[int, int], where: str) -> Spectrum:
    """Check a layer's singular values against its shape and energy; build its Spectrum."""
    total = _norm(stored, "total_energy", where, _NUMBER)
    values = _singular_values(_get(stored, "singular_values", where, _LIST), where)
    complete = _get(stored, "complete", where, _FLAG)
    engine = _get(stored, "engine", where, _TEXT)
    where = f"{where}.singular_values"
    if values.size > min(shape):
        raise FieldError(
            f"{where}: {values.size} values, but a {shape[0]}×{shape[1]} matrix has at most "
            f"{min(shape)}"
        )
    if values.size == 0 and total > 0.0:
        raise FieldError(f"{where}: empty, but total_energy is {total:.6g} (not a zero update)")
    with np.errstate(over="ignore"):
        held = float(np.sum(np.square(values)))
    if held > total * (1.0 + _ENERGY_SLACK) + 1e-30:
        raise FieldError(f"{where}: Σσ² = {held:.6g} exceeds total_energy {total:.6g}")
    if complete and abs(held - total) > _COMPLETE_SLACK * total:
        raise FieldError(
            f"{where}: complete, but Σσ² = {held:.6g} differs from total_energy {total:.6g}"
        )
    return Spectrum(values, total, complete, engine)


def _singular_values(stored: list[Any], where: str) -> np.ndarray:
    """Check the stored values are finite numbers ≥ 0 in non-increasing order; as float64."""
    where = f"{where}.singular_values"
    if not set(map(type, stored)) <= {float, int}:
        index = next(i for i, value in enumerate(stored) if type(value) not in (float, int))
        raise FieldError(f"{where}[{index}]: must be a number, got {stored[index]!r:.60}")
    try:
        values = np.array(stored, dtype=np.float64)
    except OverflowError:
        values = np.array([_as_float(value) for value in stored], dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(values) & (values >= 0.0)))
    if bad.size:
        index = int(bad[0])
        raise FieldError(f"{where}[{index}]: must be ≥ 0 and finite, got {stored[index]!r:.60}")
    rising = np.flatnonzero(values[1:] > values[:-1] * (1.0 + _ORDER_SLACK))
    if rising.size:
        index = int(rising[0]) + 1
        raise FieldError(
            f"{where}[{index}]: {values[index]:.6g} exceeds the value before it "
            f"({values[index - 1]:.6g}); singular values never increase"
        )
    return values


def _skipped_from_record(stored: Any, index: int) -> Skipped:
    """Check one skipped tensor's record and build its Skipped."""
    where = f"skipped[{index}]"
    if not isinstance(stored, dict):
        raise FieldError(f"{where}: must be an object, got {stored!r:.60}")
    reason = _get(stored, "reason", where, _TEXT)
    if reason not in SKIP_REASONS:
        raise FieldError(
            f"{where}.reason: must be one of {', '.join(SKIP_REASONS)}, got {reason!r:.60}"
        )
    return Skipped(
        _get(stored, "name", where, _TEXT), reason, _get(stored, "detail", where, _TEXT, "")
    )


def _check_unique(layers: tuple[LayerResult, ...]) -> None:
    """Refuse two layers of one module: rank configs and checks key on the module."""
    seen: set[str] = set()
    for index, layer in enumerate(layers):
        if layer.module in seen:
            raise FieldError(f"layers[{index}].module: {layer.module!r:.80} appears twice")
        seen.add(layer.module)


def _get(
    stored: dict[str, Any], key: str, where: str, kind: _Kind, default: Any = _REQUIRED
) -> Any:
    """Return ``stored[key]`` when its type is one of ``kind``'s (bool is never a number)."""
    name = f"{where}.{key}" if where else key
    if key not in stored:
        if default is _REQUIRED:
            raise FieldError(f"{name}: missing")
        return default
    value = stored[key]
    types, words = kind
    if type(value) not in types:
        raise FieldError(f"{name}: must be {words}, got {value!r:.60}")
    return value


def _norm(
    stored: dict[str, Any], key: str, where: str, kind: _Kind, default: Any = _REQUIRED
) -> Any:
    """Return a norm, energy or time as a float: a finite number ≥ 0 (or null where allowed)."""
    value = _get(stored, key, where, kind, default)
    if value is None:
        return None
    number = _as_float(value)
    if not (math.isfinite(number) and number >= 0.0):
        raise FieldError(f"{where}.{key}: must be ≥ 0 and finite, got {value!r:.60}")
    return number


def _index(stored: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> Any:
    """Return a block or expert index: a whole number ≥ 0, or null."""
    value = _get(stored, key, where, _INDEX, default)
    if value is not None and not 0 <= value <= MAX_DIMENSION:
        raise FieldError(f"{where}.{key}: must be ≥ 0, got {value!r:.60}")
    return value


def _shape(stored: list[Any], where: str) -> tuple[int, int]:
    """Check a stored shape is two whole numbers from 1 to MAX_DIMENSION."""
    if len(stored) != 2 or not all(
        type(dim) is int and 1 <= dim <= MAX_DIMENSION for dim in stored
    ):
        raise FieldError(f"{where}: must be two whole numbers from 1 to 2**40, got {stored!r:.60}")
    return stored[0], stored[1]


def _as_float(value: float) -> float:
    """Convert a JSON number to float; an integer too large for a float becomes inf."""
    return float(value) if abs(value) <= sys.float_info.max else math.inf
