"""The analysis file (schema ``svdrank.analysis/3``): the JSON record, saving and loading.

``svdrank diff`` writes it once; ``recommend``, ``plot`` and ``check`` read it,
so no later command touches the checkpoints again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from svdrank.analysis.record import FieldError, analysis_from_record
from svdrank.errors import AnalysisFileError
from svdrank.files import dumps, read_json_object, write_files_atomically
from svdrank.types import Analysis, AnalysisSettings, LayerResult

ANALYSIS_SCHEMA = "svdrank.analysis/3"
READABLE_SCHEMAS = ("svdrank.analysis/1", "svdrank.analysis/2", ANALYSIS_SCHEMA)
"""Version 3 adds each layer's storage ``noise`` and the ``noise`` setting; ranks read from
it count the clean update, so its ranks mean something else than version 2's. Version 2
files read with noise ``off`` (raw spectra, the ranks they always gave). Version 1 files
lack ``stack`` and ``expert`` (read as one stack, no experts) and store the last name
component as ``kind``. Files from before ``model`` and each layer's ``target`` were added
read them as null (the checkpoint's names)."""
_NOISE_SCHEMAS = (ANALYSIS_SCHEMA,)
"""The schemas whose settings default to noise ``auto``."""
DEFAULT_ANALYSIS = Path("svdrank-analysis.json")


def analysis_record(analysis: Analysis) -> dict[str, Any]:
    """Convert an analysis to the JSON object of schema ``svdrank.analysis/3``.

    Parameters
    ----------
    analysis : Analysis

    Returns
    -------
    dict
        ``schema``, ``svdrank_version``, ``created``, ``inputs``, the
        ``model`` of its ``config.json`` (or null), the flat ``settings`` (see
        :func:`settings_record`), one record per layer with its singular values,
        runtime ``target`` and storage ``noise`` (null where it does not
        apply), and the ``skipped`` tensors with their reasons.
    """
    return {
        "schema": ANALYSIS_SCHEMA,
        "svdrank_version": analysis.version,
        "created": analysis.created,
        "inputs": analysis.inputs,
        "model": None if analysis.model is None else asdict(analysis.model),
        "settings": settings_record(analysis.settings),
        "layers": [layer_record(layer) for layer in analysis.layers],
        "skipped": [
            {"name": item.name, "reason": item.reason, "detail": item.detail}
            for item in analysis.skipped
        ],
    }


def settings_record(settings: AnalysisSettings) -> dict[str, Any]:
    """Flatten settings into one JSON object: the engine's fields, then the analysis's own."""
    record = asdict(settings)
    return {**record.pop("engine"), **record}


def layer_record(layer: LayerResult) -> dict[str, Any]:
    """Convert one layer's result to its record in the analysis file (and the results log).

    Parameters
    ----------
    layer : LayerResult

    Returns
    -------
    dict
        Its names and place, shape, dtype, norms, singular values, engine,
        seconds, runtime ``target`` and storage ``noise`` (null where they do
        not apply); :func:`svdrank.analysis.record.layer_from_record` reads it back.
    """
    return {
        "module": layer.module,
        "name": layer.name,
        "kind": layer.kind,
        "stack": layer.stack,
        "block": layer.block,
        "expert": layer.expert,
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
        "target": (
            None
            if layer.target is None
            else {"name": layer.target.name, "type": layer.target.module_type}
        ),
        "noise": None if layer.noise is None else asdict(layer.noise),
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
    write_files_atomically({path: analysis_writer(analysis)})
    return path


def analysis_writer(analysis: Analysis) -> Callable[[BinaryIO], object]:
    """Return the function that writes an analysis file's bytes to a stream (compact JSON)."""
    content = dumps(analysis_record(analysis), indent=None).encode("utf-8")
    return lambda stream: stream.write(content)


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
        If the file is missing, not JSON, of another schema, has no layers, or a
        field is missing, of the wrong type, out of range or inconsistent with
        another (a singular value below 0, more values than the shape allows,
        Σσ² above ‖ΔW‖_F²); the message names the field (``layers[3]
        (model.layers.0.q_proj).singular_values[7]``).
    """
    path = Path(path)
    if not path.exists():
        raise AnalysisFileError(
            f"{path}: no analysis file here; run `svdrank diff BASE TUNED` first"
        )
    record = read_json_object(path, "analysis file", AnalysisFileError)
    schema = record.get("schema")
    if schema not in READABLE_SCHEMAS:
        raise AnalysisFileError(
            f"{path}: schema {schema!r:.60} is not {ANALYSIS_SCHEMA!r}; re-run `svdrank diff` "
            "with this version of svdrank"
        )
    try:
        return analysis_from_record(record, "auto" if schema in _NOISE_SCHEMAS else "off")
    except FieldError as exc:
        raise AnalysisFileError(
            f"{path}: corrupt analysis file: {exc}; re-run `svdrank diff`"
        ) from None
