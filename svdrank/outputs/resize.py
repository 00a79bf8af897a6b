"""Resizing a PEFT LoRA adapter to the ranks a rule picks from its own exact spectra.

The adapter's analysis (:func:`svdrank.analysis.adapter.analyze_adapter`) gives
each module's complete spectrum from its r×r core; the rank rules pick the new
ranks; :func:`svdrank.analysis.resize.refactor_module` re-factors every module
from the same core, honouring ``rank_pattern``, ``alpha_pattern`` and
``use_rslora`` of the input. The output keeps the input's module names, its
``fan_in_fan_out``, ``task_type`` and base model, and is written like an
extraction (balanced factors, α_i = ratio·r_i).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from svdrank.analysis.adapter import analyze_adapter
from svdrank.analysis.extract import Factored
from svdrank.analysis.resize import refactor_module
from svdrank.errors import CheckpointError
from svdrank.files import read_json_object
from svdrank.inputs.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LoraModule,
    adapter_directory,
    lora_factors,
    lora_modules,
    read_adapter_config,
)
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.outputs.adapter_writer import (
    EMBEDDING,
    LINEAR,
    adapter_config,
    write_adapter,
)
from svdrank.outputs.extract_plan import (
    Placed,
    StorageSettings,
    adapter_modules,
    extraction,
    ranks_by_module,
)
from svdrank.types import AnalysisSettings, Extraction


def resize_adapter(
    adapter: str | Path,
    output: Path,
    storage: StorageSettings,
    rule_options: dict[str, Any],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Extraction:
    """Write ``adapter`` re-factored at the ranks ``rule_options`` pick (see :func:`extract`).

    Raises
    ------
    UsageError
        For rule options that contradict, or no module left with a rank.
    CheckpointError
        For an unreadable adapter.
    """
    directory = adapter_directory(adapter)
    analysis = analyze_adapter(
        directory, AnalysisSettings(include=tuple(include), exclude=tuple(exclude))
    )
    chosen, rule = ranks_by_module(analysis, **rule_options)
    config = read_adapter_config(directory)
    weights = open_checkpoint(directory / WEIGHTS_NAME)
    found = {lora.module: lora for lora in lora_modules(weights)}
    placed = [
        Placed(layer, layer.module, EMBEDDING if found[layer.module].embedding else LINEAR, rank)
        for layer in analysis.layers
        if (rank := min(chosen.get(layer.module, 0), layer.spectrum.k)) > 0
    ]
    dtype = storage.safetensors_dtype(
        [weights.tensors[found[i.result.module].a].dtype for i in placed]
    )
    modules = adapter_modules(placed, storage)
    record = read_json_object(directory / CONFIG_NAME, "adapter config", CheckpointError)
    written = adapter_config(
        modules,
        storage.alpha_ratio,
        storage.uniform_alpha,
        record.get("base_model_name_or_path"),
        record.get("task_type"),
    )
    written["fan_in_fan_out"] = bool(record.get("fan_in_fan_out", False))

    def factored() -> Iterator[Factored]:
        for module in modules:
            lora: LoraModule = found[module.name]
            b, a = lora_factors(weights, lora)
            yield refactor_module(
                b,
                a,
                config.scale(lora.module, a.shape[0]),
                module.rank,
                module.scale,
                dtype,
                lora.module,
            )

    qualities = write_adapter(output, written, modules, factored(), dtype)
    return extraction(output, written, placed, modules, qualities, (), rule, dtype)
