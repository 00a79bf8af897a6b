"""Reading the configs ``check`` judges into an Allocation (module → rank, shape when known).

A target is a native rank config (``svdrank.ranks/1`` or ``/2``), a PEFT
config (the kwargs of ``LoraConfig``, e.g. from ``recommend --format peft``,
or an ``adapter_config.json``), or a PEFT adapter directory, whose
``adapter_model.safetensors`` gives the real ranks and shapes from its header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from svdrank.analysis.record import MAX_DIMENSION
from svdrank.errors import AnalysisFileError, CheckpointError, UsageError
from svdrank.files import read_json_object
from svdrank.inputs.adapter import (
    CONFIG_NAME as ADAPTER_CONFIG,
)
from svdrank.inputs.adapter import (
    WEIGHTS_NAME,
    adapter_directory,
    is_adapter,
    lora_config,
    lora_modules,
    lora_parameters,
    lora_targets,
    read_adapter_config,
)
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.names import pattern_key, peft_targeted
from svdrank.outputs.formats import RANKS_SCHEMA, RANKS_SCHEMAS
from svdrank.types import Allocation, Analysis, ModuleRank


def read_allocation(path: str | Path, analysis: Analysis | None = None) -> Allocation:
    """Read a rank config, PEFT config or adapter into an Allocation.

    ``analysis`` supplies shapes (and expands short PEFT target names such as
    ``q_proj``) where the target itself has none.

    Raises
    ------
    CheckpointError
        If an adapter's weights or ``adapter_config.json`` cannot be read or
        hold a field of the wrong type or out of range.
    AnalysisFileError
        If the file is missing, not JSON, neither kind of config, or a field is
        missing, of the wrong type or out of range (the message names it): a
        native config's ``modules`` must map names to a whole-number ``rank`` ≥ 0
        and a ``shape`` of two whole numbers ≥ 1; a PEFT config's fields follow
        :func:`svdrank.inputs.adapter.lora_config` and
        :func:`svdrank.inputs.adapter.lora_targets`.
    """
    path = Path(path)
    if is_adapter(path) and (adapter_directory(path) / WEIGHTS_NAME).is_file():
        return _adapter_allocation(adapter_directory(path))
    record = read_json_object(path, "rank config", AnalysisFileError)
    if record.get("schema") in RANKS_SCHEMAS:
        return _native_allocation(path, record)
    if "r" in record and "target_modules" in record:
        return _peft_allocation(path, record, analysis)
    raise AnalysisFileError(
        f"{path}: neither a svdrank rank config ({RANKS_SCHEMA}) nor a PEFT LoRA config "
        "(with 'r' and 'target_modules')"
    )


def lora_kwargs(path: str | Path) -> dict[str, Any]:
    """Read the ``LoraConfig`` keyword arguments of a PEFT config or adapter, for ``check --model``.

    Raises
    ------
    UsageError
        If the target is a native rank config: PEFT applies PEFT configs only
        (``recommend --format peft`` writes one).
    AnalysisFileError, CheckpointError
        If the file cannot be read as a JSON object.
    """
    path = Path(path)
    if is_adapter(path):
        return read_json_object(
            adapter_directory(path) / ADAPTER_CONFIG, "adapter config", CheckpointError
        )
    record = read_json_object(path, "rank config", AnalysisFileError)
    if record.get("schema") in RANKS_SCHEMAS:
        raise UsageError(
            f"{path}: --model applies a PEFT config to the model; write one with "
            "`svdrank recommend --format peft`"
        )
    return record


def _native_allocation(path: Path, record: dict[str, Any]) -> Allocation:
    """Modules, ranks and shapes of a svdrank.ranks/1 or /2 file, each checked."""
    stored = record.get("modules")
    if not isinstance(stored, dict):
        raise AnalysisFileError(
            f"{path}: modules: must be an object of module → rank and shape, got {stored!r:.60}"
        )
    modules = (_module_rank(path, name, item) for name, item in stored.items())
    return Allocation(str(path), "ranks", tuple(item for item in modules if item.rank > 0))


def _module_rank(path: Path, name: str, stored: Any) -> ModuleRank:
    """Check one module's entry of a native rank config: a rank ≥ 0 and a shape."""
    where = f"{path}: modules[{name!r:.80}]"
    if not isinstance(stored, dict):
        raise AnalysisFileError(
            f"{where}: must be an object with rank and shape, got {stored!r:.60}"
        )
    rank, shape = stored.get("rank"), stored.get("shape")
    if not (type(rank) is int and 0 <= rank <= MAX_DIMENSION):
        raise AnalysisFileError(f"{where}.rank: must be a whole number ≥ 0, got {rank!r:.60}")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(type(dim) is int and 1 <= dim <= MAX_DIMENSION for dim in shape)
    ):
        raise AnalysisFileError(
            f"{where}.shape: must be two whole numbers from 1 to 2**40, got {shape!r:.60}"
        )
    return ModuleRank(name, rank, (shape[0], shape[1]))


def _peft_allocation(path: Path, record: dict[str, Any], analysis: Analysis | None) -> Allocation:
    """Modules and ranks of a PEFT config; shapes from the analysis when given."""
    config = lora_config(record, path, AnalysisFileError)
    default, patterns = config.r, config.rank_pattern
    targets = lora_targets(record, path, AnalysisFileError)
    layers = {layer.module: layer for layer in analysis.layers} if analysis else {}
    names = (
        [name for name in layers if peft_targeted(targets, name)]
        if layers
        else _literal_targets(path, targets)
    )
    names += [
        name for name in lora_parameters(record, path, AnalysisFileError) if name not in names
    ]
    modules = []
    for name in names:
        key = pattern_key(patterns, name)
        layer = layers.get(name)
        rank = patterns[key] if key is not None else default
        modules.append(ModuleRank(name, rank, layer.shape if layer else None))
    return Allocation(str(path), "peft-config", tuple(modules))


def _literal_targets(path: Path, targets: Any) -> list[str]:
    """Without an analysis, the target list itself names the modules."""
    if not isinstance(targets, list):
        raise UsageError(f"{path}: target_modules is a pattern; give --analysis to expand it")
    return [str(target) for target in targets]


def _adapter_allocation(directory: Path) -> Allocation:
    """Real ranks and shapes of a trained adapter from its weights' header; its config checked."""
    read_adapter_config(directory)
    weights = open_checkpoint(directory / WEIGHTS_NAME)
    modules = []
    for lora in lora_modules(weights):
        a, b = weights.tensors[lora.a].shape, weights.tensors[lora.b].shape
        rank, shape = (a[0], (b[0], a[1])) if not lora.embedding else (b[1], (a[1], b[0]))
        modules.append(ModuleRank(lora.module, int(rank), (int(shape[0]), int(shape[1]))))
    return Allocation(str(directory), "adapter", tuple(modules))
