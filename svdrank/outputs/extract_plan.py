"""What an extracted adapter holds: each layer's rank and the runtime module it adapts.

Ranks come from a rank rule (as ``recommend`` picks them), one uniform rank, or
a rank config file. Each layer with a rank is placed by the name and class of
the module ``transformers`` builds (:class:`~svdrank.types.Target`); without a
``config.json`` the checkpoint's names stand and every matrix is taken for an
``nn.Linear`` (embeddings for an ``nn.Embedding``). Modules PEFT cannot adapt
from a plain LoRA file are left out, each with its reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svdrank.analysis.extract import ADAPTER_DTYPES, FactorQuality, default_dtype
from svdrank.errors import CheckpointError, SvdrankWarning, UsageError
from svdrank.files import read_json_object
from svdrank.inputs.checkpoint import DTYPES, Checkpoint
from svdrank.inputs.pairing import Pairing
from svdrank.inputs.tying import tied_modules
from svdrank.outputs.adapter_writer import EMBEDDING, LINEAR, AdapterModule, alpha_of
from svdrank.outputs.configs import read_allocation
from svdrank.outputs.peft import CONV1D, DEFAULT_ALPHA_RATIO, mapped
from svdrank.ranks import rules
from svdrank.types import (
    Analysis,
    ExtractedLayer,
    Extraction,
    LayerResult,
    LeftOut,
    check_choice,
)

ADAPTABLE_TYPES = frozenset({LINEAR, CONV1D, EMBEDDING})
"""Module types whose update a LoRA adapter file carries as (A, B)."""
SHOWN = 3
"""How many module names a message lists."""


@dataclass(frozen=True)
class Placed:
    """A layer with a rank, placed: the name PEFT adapts and the module's type."""

    result: LayerResult
    target: str
    module_type: str
    rank: int


@dataclass(frozen=True)
class StorageSettings:
    """How the factors are scaled and stored: alpha ratio, uniform alpha, ``--dtype`` choice."""

    alpha_ratio: float = DEFAULT_ALPHA_RATIO
    uniform_alpha: bool = False
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha_ratio) and self.alpha_ratio > 0):
            raise UsageError(f"--alpha-ratio must be a finite number > 0, got {self.alpha_ratio}")
        if self.dtype is not None:
            check_choice(self.dtype, tuple(ADAPTER_DTYPES), "--dtype")

    def safetensors_dtype(self, stored: Sequence[str]) -> str:
        """Return the storage dtype: the one asked for, else the one most ``stored`` map to."""
        return ADAPTER_DTYPES[self.dtype or default_dtype(stored)]


def ranks_by_module(
    analysis: Analysis,
    *,
    preset: str | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    threshold: float | None = None,
    budget: int | str | None = None,
    budget_ratio: float | None = None,
    rank: int | None = None,
    ranks: str | Path | None = None,
    min_rank: int = 0,
    max_rank: int | None = None,
    multiple_of: int = 1,
    noise: str = "auto",
) -> tuple[dict[str, int], str]:
    """Give every analysed layer its rank under one rule; the balanced preset by default.

    ``noise`` is as in :func:`svdrank.recommend`: ``auto`` ranks layers with a
    noise floor on their clean update, ``off`` on the raw spectrum.

    Returns
    -------
    dict
        Module → rank (0 for a layer whose update is exactly zero).
    str
        The rule in words.

    Raises
    ------
    UsageError
        For more than one rule, clamps with ``rank`` or ``ranks``, or a value out of range.
    """
    rule_given = [
        value is not None for value in (preset, energy, sv_ratio, threshold, budget, budget_ratio)
    ]
    fixed = [value is not None for value in (rank, ranks)]
    if sum(fixed) + any(rule_given) > 1:
        raise UsageError(
            "give one of --rank, --ranks, or a rule (--preset, --energy, --sv-ratio, "
            "--threshold, --budget, --budget-ratio)"
        )
    if any(fixed) and (min_rank, max_rank, multiple_of) != (0, None, 1):
        raise UsageError("--min-rank, --max-rank and --multiple-of apply to rank rules only")
    if ranks is not None:
        return _file_ranks(analysis, Path(ranks)), f"ranks of {ranks}"
    if rank is not None:
        plan = rules.plan(analysis, rules.uniform_rule(rank), noise=noise)
    else:
        plan = rules.recommend(
            analysis,
            preset=preset if any(rule_given) else rules.DEFAULT_PRESET,
            energy=energy,
            sv_ratio=sv_ratio,
            threshold=threshold,
            budget=budget,
            budget_ratio=budget_ratio,
            min_rank=min_rank,
            max_rank=max_rank,
            multiple_of=multiple_of,
            noise=noise,
        )[0]
    chosen = {
        item.layer.module: item.rank if item.layer.spectrum.total_energy > 0 else 0
        for item in plan.layers
    }
    return chosen, plan.rule.label


def _file_ranks(analysis: Analysis, path: Path) -> dict[str, int]:
    """Read a rank config's ranks for the analysed layers (by checkpoint or runtime name).

    Warns
    -----
    SvdrankWarning
        When the config names modules the analysis does not have.
    """
    allocation = read_allocation(path, analysis)
    given = {item.module: item.rank for item in allocation.modules}
    chosen, used = {}, set()
    for layer in analysis.layers:
        names = [layer.module] + ([layer.target.name] if layer.target else [])
        name = next((name for name in names if name in given), None)
        chosen[layer.module] = given[name] if name is not None else 0
        used.add(name)
    unknown = [name for name in given if name not in used and given[name] > 0]
    if unknown:
        warnings.warn(
            f"{path}: {len(unknown)} modules with a rank are not in the analysis "
            f"({', '.join(unknown[:SHOWN])}{', …' if len(unknown) > SHOWN else ''}); "
            "they are left out",
            SvdrankWarning,
            stacklevel=2,
        )
    return chosen


def placed_modules(
    analysis: Analysis, ranks: dict[str, int], config: Path | None
) -> tuple[list[Placed], tuple[LeftOut, ...]]:
    """Place every layer with a rank in the runtime model, or leave it out with the reason.

    Left out: layers the runtime model has no module for; fused expert
    parameters (PEFT reaches them through ``target_parameters``, which this
    adapter writer does not support); conv kernels; a second layer landing in
    the same module; and the tied side of a tied pair (``lm_head`` sharing the
    input embedding's matrix): merging both would add the update twice.

    Warns
    -----
    SvdrankWarning
        When there is no runtime mapping (no ``config.json`` or no transformers):
        a GPT-2-style ``Conv1D`` cannot be told from ``nn.Linear`` then.
    """
    placed: list[Placed] = []
    left_out: list[LeftOut] = []
    runtime = mapped(analysis.model)
    if not runtime:
        warnings.warn(
            "no config.json beside the checkpoints (or no transformers): module names are "
            "the checkpoint's and every matrix is written for nn.Linear (out, in); a "
            "GPT-2-style Conv1D layer would load transposed",
            SvdrankWarning,
            stacklevel=2,
        )
    seen: set[str] = set()
    for layer in analysis.layers:
        rank = ranks.get(layer.module, 0)
        if rank == 0:
            continue
        target, module_type, reason = _place(layer, runtime, seen)
        if reason:
            left_out.append(LeftOut(layer.module, reason))
        else:
            seen.add(target)
            placed.append(Placed(layer, target, module_type, rank))
    tied = tied_modules(config) if runtime and config is not None else {}
    kept, untied = _untie(placed, tied)
    return kept, (*left_out, *untied)


def _place(layer: LayerResult, runtime: bool, seen: set[str]) -> tuple[str, str, str]:
    """Return (PEFT name, module type, reason to leave out: empty when placed)."""
    if not runtime:
        return layer.module, EMBEDDING if layer.role == "embedding" else LINEAR, ""
    target = layer.target
    if target is None:
        return "", "", "no counterpart in the model transformers builds"
    if target.is_parameter:
        return (
            "",
            "",
            (
                "a fused expert parameter: PEFT reaches it through target_parameters, which "
                "extraction does not write yet"
            ),
        )
    if target.module_type not in ADAPTABLE_TYPES:
        return "", "", "not a Linear, Conv1D or Embedding module"
    if target.name in seen:
        return "", "", "lands in a module another layer adapts"
    return target.name, target.module_type, ""


def _untie(placed: list[Placed], tied: dict[str, str]) -> tuple[list[Placed], list[LeftOut]]:
    """Keep one module of every tied group (the one the others share), leave the others out.

    Warns
    -----
    SvdrankWarning
        When tied modules were stored with different updates: only the kept one's goes in.
    """
    names = {item.target: item for item in placed}
    kept, left_out = [], []
    for item in placed:
        source = tied.get(item.target)
        if source is None:
            kept.append(item)
            continue
        keeper = names.get(source) or next(
            (names[name] for name, shared in tied.items() if shared == source and name in names),
            item,
        )
        if keeper is item:
            kept.append(item)
            continue
        left_out.append(
            LeftOut(item.result.module, "tied to a module the adapter holds: merged through it")
        )
        if not np.isclose(item.result.delta_norm, keeper.result.delta_norm, rtol=1e-5):
            warnings.warn(
                f"{item.result.module} and {keeper.result.module} are tied in the model but "
                "their stored updates differ; the adapter carries "
                f"{keeper.result.module}'s",
                SvdrankWarning,
                stacklevel=3,
            )
    return kept, left_out


def changed_vectors(base: Checkpoint, tuned: Checkpoint, pairing: Pairing) -> list[str]:
    """List the biases, norms and other non-matrix tensors whose values changed.

    A LoRA adapter carries none of them, so their updates are lost; they are
    small (one row), so comparing them reads little.
    """
    changed = []
    for skipped in pairing.skipped:
        if skipped.reason != "not-2d":
            continue
        key = skipped.name.removeprefix(pairing.base_prefix)
        tuned_name = f"{pairing.tuned_prefix}{key}"
        if tuned_name in tuned.tensors and not np.array_equal(
            base.read(skipped.name), tuned.read(tuned_name)
        ):
            changed.append(skipped.name)
    return changed


def base_model_name(base: str | Path, config: Path | None) -> str | None:
    """Return ``base_model_name_or_path``: the config's ``_name_or_path``, else the base folder."""
    if config is None:
        return None
    record = read_json_object(config, "model config", CheckpointError)
    stored = record.get("_name_or_path")
    if isinstance(stored, str) and stored:
        return stored
    folder = Path(base) if Path(base).is_dir() else Path(base).parent
    return str(folder.resolve())


def say_left_out(left_out: Sequence[LeftOut]) -> list[str]:
    """Word what was left out, grouped by reason, one line per reason."""
    by_reason: dict[str, list[str]] = {}
    for item in left_out:
        by_reason.setdefault(item.reason, []).append(item.module)
    return [
        f"{len(modules)} modules left out ({', '.join(modules[:SHOWN])}"
        f"{', …' if len(modules) > SHOWN else ''}): {reason}"
        for reason, modules in by_reason.items()
    ]


def adapter_modules(placed: Sequence[Placed], storage: StorageSettings) -> list[AdapterModule]:
    """Return the adapter's modules: PEFT name, type, shape, rank and alpha."""
    top = max((item.rank for item in placed), default=0)
    if top == 0:
        raise UsageError("no layer to adapt: every rank is 0 or belongs to a module left out")
    return [
        AdapterModule(
            item.target,
            item.module_type,
            item.result.shape,
            item.rank,
            alpha_of(item.rank, top, storage.alpha_ratio, storage.uniform_alpha),
        )
        for item in placed
    ]


def extraction(
    directory: Path,
    config: dict[str, Any],
    placed: Sequence[Placed],
    modules: Sequence[AdapterModule],
    qualities: Sequence[FactorQuality],
    left_out: Sequence[LeftOut],
    rule: str,
    dtype: str,
) -> Extraction:
    """Assemble what was written into an Extraction."""
    layers = tuple(
        ExtractedLayer(
            module=item.result.module,
            target=module.name,
            module_type=module.module_type,
            shape=module.shape,
            rank=module.rank,
            alpha=module.alpha,
            dtype=dtype,
            energy=quality.energy,
            error=quality.error,
            optimal=quality.optimal,
            method=quality.method,
            delta_norm=item.result.delta_norm,
            underflows=quality.underflows,
        )
        for item, module, quality in zip(placed, modules, qualities, strict=True)
    )
    _warn_underflows(layers)
    return Extraction(directory, config, layers, tuple(left_out), rule, DTYPES[dtype].itemsize)


def _warn_underflows(layers: Sequence[ExtractedLayer]) -> None:
    """Warn when factor entries fell below the storage dtype's normal range."""
    hit = [layer for layer in layers if layer.underflows]
    if hit:
        warnings.warn(
            f"{sum(layer.underflows for layer in hit)} factor entries of {len(hit)} modules "
            f"({hit[0].module}, …) fall below {hit[0].dtype}'s normal range and lose "
            "precision (the error column includes it); --dtype bf16 or fp32 keeps them",
            SvdrankWarning,
            stacklevel=3,
        )
