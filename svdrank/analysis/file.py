"""The analysis file (schema ``svdrank.analysis/1``): the JSON record, saving and loading.

``svdrank diff`` writes it once; ``recommend``, ``plot`` and ``check`` read it,
so no later command touches the checkpoints again.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from svdrank.errors import AnalysisFileError
from svdrank.files import dumps, read_json_object, write_atomically
from svdrank.types import (
    Analysis,
    AnalysisSettings,
    EngineSettings,
    LayerResult,
    Skipped,
    Spectrum,
)

ANALYSIS_SCHEMA = "svdrank.analysis/1"
DEFAULT_ANALYSIS = Path("svdrank-analysis.json")


def analysis_record(analysis: Analysis) -> dict[str, Any]:
    """Convert an analysis to the JSON object of schema ``svdrank.analysis/1``.

    Parameters
    ----------
    analysis : Analysis

    Returns
    -------
    dict
        ``schema``, ``svdrank_version``, ``created``, ``inputs``, the flat
        ``settings`` (see :func:`settings_record`), one record per layer with
        its singular values, and the ``skipped`` tensors with their reasons.
    """
    return {
        "schema": ANALYSIS_SCHEMA,
        "svdrank_version": analysis.version,
        "created": analysis.created,
        "inputs": analysis.inputs,
        "settings": settings_record(analysis.settings),
        "layers": [_layer_record(layer) for layer in analysis.layers],
        "skipped": [
            {"name": item.name, "reason": item.reason, "detail": item.detail}
            for item in analysis.skipped
        ],
    }


def settings_record(settings: AnalysisSettings) -> dict[str, Any]:
    """Flatten settings into one JSON object: the engine's fields, then the analysis's own."""
    record = asdict(settings)
    return {**record.pop("engine"), **record}


def settings_from_record(stored: dict[str, Any]) -> AnalysisSettings:
    """Rebuild settings from their flat record (the inverse of :func:`settings_record`).

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
    UsageError
        If a stored choice is not one this version knows.
    """
    engine_fields = {item.name for item in fields(EngineSettings)}
    own_fields = {item.name for item in fields(AnalysisSettings)} - {"engine"}
    engine = EngineSettings(**{key: stored[key] for key in engine_fields if key in stored})
    own = {key: stored[key] for key in own_fields if key in stored}
    for key in ("include", "exclude"):
        if key in own:
            own[key] = tuple(own[key])
    return AnalysisSettings(engine=engine, **own)


def _layer_record(layer: LayerResult) -> dict[str, Any]:
    """One layer of the analysis file."""
    return {
        "module": layer.module,
        "name": layer.name,
        "kind": layer.kind,
        "block": layer.block,
        "role": layer.role,
        "shape": list(layer.shape),
        "dtype": layer.dtype,
        "delta_norm": layer.delta_norm,
        "base_norm": layer.base_norm,
        "total_energy": layer.spectrum.total_energy,
        "singular_values": layer.spectrum.values.tolist(),
        "complete": layer.spectrum.complete,
        "engine": layer.spectrum.engine,
        "seconds": round(layer.seconds, 4),
    }


def save_analysis(analysis: Analysis, path: str | Path = DEFAULT_ANALYSIS) -> Path:
    """Write the analysis file atomically (temporary file, then rename).

    Parameters
    ----------
    analysis : Analysis
    path : str or Path
        Default: ``svdrank-analysis.json`` in the working directory.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    UsageError
        If the folder does not exist or is not writable, or the path is a folder.
    """
    path = Path(path)
    write_atomically(path, dumps(analysis_record(analysis), indent=None))
    return path


def load_analysis(path: str | Path = DEFAULT_ANALYSIS) -> Analysis:
    """Read an analysis file written by ``svdrank diff``.

    Parameters
    ----------
    path : str or Path
        Default: ``svdrank-analysis.json`` in the working directory.

    Returns
    -------
    Analysis

    Raises
    ------
    AnalysisFileError
        If the file is missing, not JSON, of another schema, or incomplete.
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisFileError(
            f"{path}: no analysis file here; run `svdrank diff BASE TUNED` first"
        )
    record = read_json_object(path, "analysis file", AnalysisFileError)
    schema = record.get("schema")
    if schema != ANALYSIS_SCHEMA:
        raise AnalysisFileError(
            f"{path}: schema {schema!r} is not {ANALYSIS_SCHEMA!r}; re-run `svdrank diff` "
            "with this version of svdrank"
        )
    try:
        return _analysis_from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise AnalysisFileError(f"{path}: corrupt analysis file (bad or missing {exc})") from exc


def _analysis_from_record(record: dict[str, Any]) -> Analysis:
    """Rebuild the dataclasses from a validated-schema record."""
    settings = settings_from_record(record["settings"])
    layers = tuple(_layer_from_record(layer) for layer in record["layers"])
    skipped = tuple(
        Skipped(item["name"], item["reason"], item.get("detail", "")) for item in record["skipped"]
    )
    return Analysis(
        inputs=record["inputs"],
        settings=settings,
        layers=layers,
        skipped=skipped,
        created=record.get("created", ""),
        version=record.get("svdrank_version", ""),
    )


def _layer_from_record(layer: dict[str, Any]) -> LayerResult:
    """One LayerResult from its record."""
    spectrum = Spectrum(
        values=np.asarray(layer["singular_values"], dtype=np.float64),
        total_energy=float(layer["total_energy"]),
        complete=bool(layer["complete"]),
        engine=str(layer["engine"]),
    )
    m, n = (int(dim) for dim in layer["shape"])
    return LayerResult(
        module=str(layer["module"]),
        name=str(layer["name"]),
        kind=str(layer["kind"]),
        block=None if layer["block"] is None else int(layer["block"]),
        role=str(layer["role"]),
        shape=(m, n),
        dtype=str(layer["dtype"]),
        delta_norm=float(layer["delta_norm"]),
        base_norm=None if layer["base_norm"] is None else float(layer["base_norm"]),
        spectrum=spectrum,
        seconds=float(layer.get("seconds", 0.0)),
    )
