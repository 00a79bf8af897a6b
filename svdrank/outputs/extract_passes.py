"""The two ways ``extract`` goes through a checkpoint pair: one pass, or analysis then factors.

When the rank rule decides each layer alone (presets, energy targets, σ
ratios, thresholds, one rank) and no analysis is given, the pair is read
once: each layer is analysed, ranked and factored from one ΔW
(:mod:`svdrank.analysis.extract_pass`). Budgets share parameters among all
layers, a PEFT rank config's short target names expand against the whole
analysis, and a uniform alpha scales every module by the largest rank: those
need every spectrum first, so the whole analysis comes first and a second
pass forms each ΔW again for its factors. Both write the same adapter.

Given a runner (``extract --cluster``), the same passes run as tasks on a
Dask cluster (:mod:`svdrank.analysis.extract_cluster`), and give the same
adapter again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdrank.analysis.extract import Factored, FactorJob, FactorSettings, factor_layers
from svdrank.analysis.extract_cluster import factors_on, passes_on
from svdrank.analysis.extract_pass import FactorSpool, LayerPass, PassSteps, analyze_and_factor
from svdrank.analysis.pipeline import place_in_model
from svdrank.errors import SvdrankWarning
from svdrank.inputs.checkpoint import Checkpoint, describe_input
from svdrank.inputs.model import model_config_path
from svdrank.inputs.pairing import Pairing, pair_checkpoints
from svdrank.outputs.adapter_writer import (
    AdapterModule,
    adapter_config,
    alpha_of,
    task_type_of,
    write_adapter,
)
from svdrank.outputs.extract_plan import (
    SHOWN,
    Placed,
    StorageSettings,
    adapter_modules,
    base_model_name,
    changed_vectors,
    extraction,
    placed_modules,
    ranks_by_module,
)
from svdrank.types import (
    Analysis,
    AnalysisSettings,
    Extraction,
    Layer,
    LayerResult,
    LeftOut,
    ModelInfo,
    Progress,
)

if TYPE_CHECKING:
    from svdrank.analysis.cluster import DaskRunner

SIDES = ("base", "tuned")
WHOLE_ANALYSIS_RULES = ("budget", "budget_ratio", "ranks")
"""Rank options whose ranks depend on every layer's spectrum (see :func:`per_layer_rule`)."""


@dataclass(frozen=True)
class AdapterOutput:
    """Where the adapter goes, the base it names, and the model config that places its modules."""

    directory: Path
    base: str | Path
    model_config: Path | None

    def __call__(
        self,
        analysis: Analysis,
        placed: list[Placed],
        left_out: tuple[LeftOut, ...],
        modules: list[AdapterModule],
        storage: StorageSettings,
        factored: Iterable[Factored],
        rule: str,
        dtype: str,
    ) -> Extraction:
        """Write the adapter directory from the factors as they come; describe what was written."""
        config = adapter_config(
            modules,
            storage.alpha_ratio,
            storage.uniform_alpha,
            base_model_name(self.base, model_config_path(self.base)),
            task_type_of(analysis.model.architecture) if analysis.model else None,
        )
        qualities = write_adapter(self.directory, config, modules, factored, dtype)
        return extraction(self.directory, config, placed, modules, qualities, left_out, rule, dtype)


def per_layer_rule(rule_options: dict[str, Any], storage: StorageSettings) -> bool:
    """Whether every layer's rank and scale follow from that layer alone (one pass suffices)."""
    whole = any(rule_options[name] is not None for name in WHOLE_ANALYSIS_RULES)
    return not (whole or storage.uniform_alpha)


def extract_in_one_pass(
    checkpoints: tuple[Checkpoint, Checkpoint],
    settings: AnalysisSettings,
    rule_options: dict[str, Any],
    storage: StorageSettings,
    factoring: FactorSettings,
    write: AdapterOutput,
    progress: Progress | None,
    runner: DaskRunner | None = None,
) -> Extraction:
    """Analyse, rank and factor each layer from one reading of its ΔW, then write the adapter.

    The analysis is the one :func:`svdrank.analyze` gives with ``settings``;
    each layer's rank is the rule's on that layer alone; the factors wait in
    a temporary file until every rank is known. With a ``runner``, each
    layer's pass is a task on its cluster, the same pass with the same seeds.
    """
    pairing = pair_checkpoints(*checkpoints, settings.include, settings.exclude, False)
    factor_settings = _factor_settings(checkpoints, pairing, storage, factoring)
    model, layers = place_in_model(pairing.layers, checkpoints[1], checkpoints[0])
    steps = PassSteps(
        settings,
        partial(rank_alone, settings, model, rule_options),
        partial(scale_alone, storage.alpha_ratio),
        factor_settings,
    )
    chosen, results = {}, {}
    with FactorSpool(factor_settings.dtype) as spool:
        for index, (result, rank, factored) in _passes(layers, steps, progress, runner):
            results[index] = result
            chosen[result.module] = rank
            if factored is not None:
                spool.add(result.module, factored)
        inputs = {side: describe_input(item) for side, item in zip(SIDES, checkpoints, strict=True)}
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        ordered = tuple(results[index] for index in range(len(layers)))
        loaded = Analysis(inputs, settings, ordered, pairing.skipped, created, model=model)
        placed, left_out = placed_modules(loaded, chosen, write.model_config)
        modules = adapter_modules(placed, storage)
        stored = (spool.read(item.result.module) for item in placed)
        rule = ranks_by_module(_alone(settings, model, ordered[0]), **rule_options)[1]
        dtype = factor_settings.dtype
        return write(loaded, placed, left_out, modules, storage, stored, rule, dtype)


def _passes(
    layers: Sequence[Layer],
    steps: PassSteps,
    progress: Progress | None,
    runner: DaskRunner | None,
) -> Iterator[tuple[int, LayerPass]]:
    """Yield each layer's pass with its index: in order here, as they finish on a cluster."""
    if runner is not None:
        return passes_on(runner, layers, steps, progress)
    passes = analyze_and_factor(
        layers, steps.settings, steps.rank_of, steps.scale_of, steps.factor_settings, progress
    )
    return enumerate(passes)


def rank_alone(
    settings: AnalysisSettings,
    model: ModelInfo | None,
    rule_options: dict[str, Any],
    result: LayerResult,
) -> int:
    """Return a layer's rank under a rule that ranks each layer alone (picklable as a partial)."""
    chosen, _ = ranks_by_module(_alone(settings, model, result), **rule_options)
    return chosen[result.module]


def scale_alone(alpha_ratio: float, rank: int) -> float:
    """Return the LoRA scale s of a module of rank r with its own alpha (alpha_ratio·r)."""
    return alpha_of(rank, rank, alpha_ratio, uniform_alpha=False) / rank


def _alone(settings: AnalysisSettings, model: ModelInfo | None, result: LayerResult) -> Analysis:
    """Make an analysis of one layer, for the rank rules."""
    return Analysis(inputs={}, settings=settings, layers=(result,), skipped=(), model=model)


def extract_in_two_passes(
    checkpoints: tuple[Checkpoint, Checkpoint],
    analysis: Analysis,
    rule_options: dict[str, Any],
    storage: StorageSettings,
    factoring: FactorSettings,
    write: AdapterOutput,
    progress: Progress | None,
    runner: DaskRunner | None = None,
) -> Extraction:
    """Rank every layer from the whole analysis, then form each ΔW again for its factors.

    With a ``runner``, each layer's factors are a task on its cluster.
    """
    chosen, rule = ranks_by_module(analysis, **rule_options)
    selection = analysis.settings
    pairing = pair_checkpoints(
        *checkpoints, selection.include, selection.exclude, selection.include_conv
    )
    factor_settings = _factor_settings(checkpoints, pairing, storage, factoring)
    placed, left_out = placed_modules(analysis, chosen, write.model_config)
    layers = {layer.module: layer for layer in pairing.layers}
    indices = {result.module: index for index, result in enumerate(analysis.layers)}
    modules = adapter_modules(placed, storage)
    jobs = [
        FactorJob(
            layers[item.result.module],
            item.result,
            item.rank,
            module.scale,
            indices[item.result.module],
        )
        for item, module in zip(placed, modules, strict=True)
    ]
    dtype = factor_settings.dtype
    with _factors(jobs, factor_settings, progress, runner) as factored:
        return write(analysis, placed, left_out, modules, storage, factored, rule, dtype)


@contextmanager
def _factors(
    jobs: Sequence[FactorJob],
    settings: FactorSettings,
    progress: Progress | None,
    runner: DaskRunner | None,
) -> Iterator[Iterable[Factored]]:
    """Yield the jobs' factors in order: computed as the writer asks, or first on a cluster."""
    if runner is None:
        yield factor_layers(jobs, settings, progress)
        return
    with factors_on(runner, jobs, settings, progress) as factored:
        yield factored


def _factor_settings(
    checkpoints: tuple[Checkpoint, Checkpoint],
    pairing: Pairing,
    storage: StorageSettings,
    factoring: FactorSettings,
) -> FactorSettings:
    """Warn about changed biases and norms; return the factor settings with the storage dtype.

    The default dtype is the one most paired layers map to, known before any
    layer is read, so one pass and two agree.
    """
    _warn_changed(changed_vectors(*checkpoints, pairing))
    dtype = storage.safetensors_dtype([layer.tuned.dtype for layer in pairing.layers])
    return replace(factoring, dtype=dtype)


def _warn_changed(names: Sequence[str]) -> None:
    """Warn that biases and norms changed: a LoRA adapter cannot carry their updates."""
    if names:
        shown = ", ".join(names[:SHOWN]) + (", …" if len(names) > SHOWN else "")
        warnings.warn(
            f"{len(names)} bias, norm or other non-matrix tensors changed ({shown}); a LoRA "
            "adapter carries no update of them, so they are not in the adapter",
            SvdrankWarning,
            stacklevel=5,
        )
