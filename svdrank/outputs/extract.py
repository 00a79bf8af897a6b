"""``extract``: a full fine-tune (or an oversized LoRA adapter) as a PEFT adapter at chosen ranks.

The stages meet here: the analysis gives every layer's spectrum (computed now,
or read from ``--analysis`` after checking it belongs to the same inputs),
the rank rules pick each layer's rank, the layers are placed in the runtime
model (PEFT's names, module types, tied weights), and the factors are computed
layer by layer (:mod:`svdrank.analysis.extract`) while the weights file is
written (:mod:`svdrank.outputs.adapter_writer`), atomically with its config.

When the rule decides each layer alone (everything but budgets, ``--ranks``
files and ``--uniform-alpha``) and no analysis is given, the pair is read
once (:mod:`svdrank.outputs.extract_passes`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdrank.analysis.extract import FactorSettings
from svdrank.analysis.file import load_analysis
from svdrank.analysis.pipeline import analyze
from svdrank.errors import UsageError
from svdrank.inputs.adapter import is_adapter
from svdrank.inputs.checkpoint import Checkpoint, describe_input, open_checkpoint
from svdrank.inputs.model import model_config_path
from svdrank.outputs.extract_passes import (
    AdapterOutput,
    extract_in_one_pass,
    extract_in_two_passes,
    per_layer_rule,
)
from svdrank.outputs.extract_plan import StorageSettings
from svdrank.outputs.peft import DEFAULT_ALPHA_RATIO
from svdrank.ranks.rules import PRESETS
from svdrank.spectra.energy import check_target
from svdrank.types import (
    RANK_NOISE_MODES,
    Analysis,
    AnalysisSettings,
    EngineSettings,
    Extraction,
    Progress,
    check_choice,
)

if TYPE_CHECKING:
    from svdrank.analysis.cluster import DaskRunner

DEFAULT_ADAPTER = Path("svdrank-adapter")
"""The adapter directory ``extract`` writes when none is given."""
DEFAULT_MAX_ENERGY = 0.95
"""The analysis pass reaches at least this energy (diff's default), more when asked for."""


def extract(
    base: str | Path,
    tuned: str | Path | None = None,
    output: str | Path = DEFAULT_ADAPTER,
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
    alpha_ratio: float = DEFAULT_ALPHA_RATIO,
    uniform_alpha: bool = False,
    dtype: str | None = None,
    analysis: str | Path | Analysis | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    seed: int = 0,
    oversample: int = 10,
    power_iters: int = 2,
    noise: str = "auto",
    cluster: str | None = None,
    progress: Progress | None = None,
) -> Extraction:
    """Write a PEFT LoRA adapter that reproduces the update from BASE to TUNED at chosen ranks.

    Each module's factors are the best rank-r approximation of its ΔW
    (truncated SVD), split evenly between B and A and scaled so that PEFT's
    ``lora_alpha / r`` reproduces it; the error of the factors as stored is
    measured per layer. Layers at rank 0 are left out.

    Parameters
    ----------
    base, tuned : str or Path
        The checkpoints (files, shard directories or index files). Give a
        PEFT adapter directory as ``base`` alone to resize it (see
        :func:`svdrank.outputs.resize.resize_adapter`).
    output : str or Path
        The adapter directory to write (created; its two files are replaced
        atomically).
    preset, energy, sv_ratio, threshold, budget, budget_ratio
        The rank rule, as in :func:`svdrank.recommend`; default: the balanced preset.
    rank : int, optional
        One rank for every layer (cut to min(m, n)).
    ranks : str or Path, optional
        A rank config from ``svdrank recommend`` (native or ``--format peft``).
    min_rank, max_rank, multiple_of : int
        Clamps, as in :func:`svdrank.recommend`.
    alpha_ratio : float
        Each module's scale lora_alpha / r, > 0 (default 2).
    uniform_alpha : bool
        One ``lora_alpha`` (ratio × the largest rank) for every module, as
        llama.cpp applies it; vLLM then scales modules below the largest rank wrongly.
    dtype : {"bf16", "fp16", "fp32"}, optional
        Storage dtype; default: the tuned checkpoint's (fp32 for F32, F64, F8).
    analysis : str, Path or Analysis, optional
        An analysis of the same pair (checked by its header digests), to skip
        the analysis. Without it, a rule that decides each layer alone reads
        the pair once (each ΔW analysed, ranked and factored in turn); budgets,
        ``ranks`` and ``uniform_alpha`` analyse the whole pair first, then read
        it again for the factors.
    include, exclude : sequence of str
        Glob patterns on module names, as in :func:`svdrank.analyze`.
    seed, oversample, power_iters
        Settings of the randomized SVD.
    noise : {"auto", "off"}
        ``auto``: layers stored on a BF16, F16 or F8 grid are analysed with
        their storage noise floor and ranked on their clean update, never past
        their signal rank (as ``recommend`` ranks them). ``off``: the raw
        spectra and their ranks. With ``analysis``, the ranks are read from it
        this way.
    cluster : str, optional
        Compute the layers on a Dask cluster (``pip install 'svdrank[cluster]'``),
        as :func:`svdrank.analyze` does: a scheduler's address
        (``tcp://host:8786``) or ``local:N``. In one pass each layer is analysed,
        ranked and factored on a worker, which sends back its factors; in two
        passes the analysis and then the factors are computed there. The
        adapter is the one a local run writes, byte for byte. Not for
        resizing an adapter (that is local and cheap).
    progress : callable, optional
        Told after each layer of each pass over the pair (one or two, see
        ``analysis``; in the order they finish on a cluster).

    Returns
    -------
    Extraction

    Raises
    ------
    UsageError
        For contradictory or out-of-range options, an analysis of other
        inputs, no layer left to adapt, or a cluster that cannot be used (see
        :func:`svdrank.analysis.cluster.dask_runner`).
    CheckpointError, PairingError, NumericalError, OutputError
        For unreadable inputs, NaN/Inf in an update or a factor that overflows
        the storage dtype, or an output that cannot be written.

    Examples
    --------
    >>> from svdrank import extract
    >>> result = extract("base", "tuned", "adapter", preset="balanced")  # doctest: +SKIP
    >>> print(f"{result.params} parameters, worst error {result.worst_error:.1%}")  # doctest: +SKIP
    """
    check_choice(noise, RANK_NOISE_MODES, "noise")
    rule_options: dict[str, Any] = {
        "preset": preset,
        "energy": energy,
        "sv_ratio": sv_ratio,
        "threshold": threshold,
        "budget": budget,
        "budget_ratio": budget_ratio,
        "rank": rank,
        "ranks": ranks,
        "min_rank": min_rank,
        "max_rank": max_rank,
        "multiple_of": multiple_of,
        "noise": noise,
    }
    storage = StorageSettings(alpha_ratio, uniform_alpha, dtype)
    if tuned is None:
        if not is_adapter(base):
            raise UsageError(
                f"{base}: give BASE and TUNED checkpoints, or a PEFT adapter directory alone"
            )
        if cluster is not None:
            raise UsageError(
                "--cluster does not apply to resizing an adapter: each module is re-factored "
                "here from its small r×r core, cheaply"
            )
        from svdrank.outputs.resize import resize_adapter

        return resize_adapter(base, Path(output), storage, rule_options, include, exclude)
    checkpoints = (open_checkpoint(base), open_checkpoint(tuned))
    options = AnalysisOptions(include, exclude, seed, _max_energy(preset, energy), noise)
    factoring = FactorSettings(oversample=oversample, power_iters=power_iters, seed=seed)
    write = AdapterOutput(Path(output), base, model_config_path(tuned) or model_config_path(base))
    with _runner(cluster, checkpoints) as runner:
        if analysis is None and per_layer_rule(rule_options, storage):
            settings = AnalysisSettings(
                engine=EngineSettings(max_energy=options.max_energy),
                seed=seed,
                include=tuple(include),
                exclude=tuple(exclude),
                noise=noise,
            )
            return extract_in_one_pass(
                checkpoints, settings, rule_options, storage, factoring, write, progress, runner
            )
        loaded = _analysis(analysis, checkpoints, options, progress, runner)
        return extract_in_two_passes(
            checkpoints, loaded, rule_options, storage, factoring, write, progress, runner
        )


@contextmanager
def _runner(
    cluster: str | None, checkpoints: tuple[Checkpoint, Checkpoint]
) -> Iterator[DaskRunner | None]:
    """Connect to the cluster (checking its workers see the pair), or yield None for a local run."""
    if cluster is None:
        yield None
        return
    from svdrank.analysis.cluster import dask_runner

    files = (*checkpoints[0].files, *checkpoints[1].files)
    with dask_runner(cluster, "cpu", files) as runner:
        yield runner


@dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis pass of ``extract`` is run with when no analysis is given."""

    include: Sequence[str]
    exclude: Sequence[str]
    seed: int
    max_energy: float
    noise: str


def _analysis(
    given: str | Path | Analysis | None,
    checkpoints: tuple[Checkpoint, Checkpoint],
    options: AnalysisOptions,
    progress: Progress | None,
    runner: DaskRunner | None,
) -> Analysis:
    """Analyse the pair (on the runner's cluster), or load the given analysis of the same pair."""
    if given is None:
        return analyze(
            checkpoints[0].path,
            checkpoints[1].path,
            max_energy=options.max_energy,
            seed=options.seed,
            include=options.include,
            exclude=options.exclude,
            noise=options.noise,
            cluster=None if runner is None else runner.address,
            progress=progress,
        )
    if options.include or options.exclude:
        raise UsageError("--include and --exclude apply to the analysis: give them to diff")
    loaded = given if isinstance(given, Analysis) else load_analysis(given)
    check_same_inputs(loaded, *checkpoints, str(given) if not isinstance(given, Analysis) else "")
    return loaded


def check_same_inputs(analysis: Analysis, base: Checkpoint, tuned: Checkpoint, name: str) -> None:
    """Refuse an analysis whose recorded header digests are not those of ``base`` and ``tuned``.

    Raises
    ------
    UsageError
        If the analysis is of an adapter or of other checkpoints.
    """
    where = name or "the analysis"
    for side, checkpoint in (("base", base), ("tuned", tuned)):
        recorded = analysis.inputs.get(side)
        if not isinstance(recorded, dict):
            raise UsageError(f"{where}: not an analysis of a checkpoint pair")
        found = [item["header_sha256"] for item in describe_input(checkpoint)["files"]]
        stored = [item.get("header_sha256") for item in recorded.get("files", [])]
        if found != stored:
            raise UsageError(
                f"{where}: analysed another {side} checkpoint than {checkpoint.path} (the "
                "header SHA-256 differs); run diff again or leave out --analysis"
            )


def _max_energy(preset: str | None, energy: float | None) -> float:
    """Return the energy the analysis pass must reach: the target asked for, at least 0.95."""
    if energy is not None:
        check_target(energy)
        return max(energy, DEFAULT_MAX_ENERGY)
    return max(PRESETS.get(preset or "", 0.0), DEFAULT_MAX_ENERGY)
