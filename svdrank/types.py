"""Every value that travels between the stages, as small frozen dataclasses.

This module imports NumPy only, so reading an analysis file, recommending
ranks, checking a config or plotting never loads SciPy or the LAPACK routines
of the engines. The tables of choices (engines, metrics, normalisers, skip
reasons) live here too: the library validates against them and the command
line builds its choices from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from svdrank._version import __version__
from svdrank.errors import UsageError

ENGINES = ("auto", "exact", "gram", "randomized", "lanczos")
"""Spectrum engines (DESIGN.md, Engines)."""
NORMALIZERS = ("lu", "qr", "none")
"""Power-iteration normalisers of the randomized engine."""
LANCZOS_SOLVERS = ("arpack", "propack")
"""SciPy's truncated SVD solvers behind the lanczos engine."""
DEVICES = ("cpu", "cuda", "auto", "torch-cpu")
"""Where ``diff`` computes the spectra: ``cpu`` NumPy and SciPy's LAPACK (the default),
``cuda`` torch on a CUDA GPU, ``auto`` cuda when torch sees one (else cpu), ``torch-cpu``
the cuda code on torch's CPU device (how the tests check it). A run option, not a setting:
the spectra mean the same on every device."""
METRICS = ("fro", "nuclear")
"""Energy metrics: Σσ² shares (fro) or Σσ shares (nuclear)."""
NOISE_MODES = ("auto", "full", "off")
"""How ``diff`` treats storage noise: ``auto`` models the rounding of BF16/F16/F8 inputs
(τ from cheap bounds where they decide the ranks, else estimated), ``full`` estimates τ for
every such layer (exact signal ranks), ``off`` computes raw spectra only."""
RANK_NOISE_MODES = ("auto", "off")
"""How ranks read an analysis: ``auto`` counts the clean update of layers with a noise
floor, ``off`` reads the raw spectrum."""
FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})
"""Safetensors dtypes that hold floating-point values: only those can be weights."""

SKIP_REASONS: dict[str, str] = {
    "not-2d": "not a matrix (bias, norm or other non-2-D tensor)",
    "not-floating": "integer or bool tensor (a buffer, never a weight)",
    "shape-mismatch": "shapes differ between base and tuned",
    "only-in-base": "only in the base checkpoint",
    "only-in-tuned": "only in the tuned checkpoint",
    "conv": "4-D conv kernel (analyse with --include-conv)",
    "excluded": "left out by --include/--exclude",
}
"""Why a tensor is not analysed: reason code → words."""


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Raise a one-line UsageError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class Spectrum:
    """The singular values computed for one layer's update.

    Parameters
    ----------
    values : ndarray of float64, shape (k,)
        σ₁ ≥ σ₂ ≥ … ≥ σ_k ≥ 0, all of them when ``complete``, else the top k.
    total_energy : float
        ‖ΔW‖_F², a float64 sum of squares of the entries (within 2⁻²⁴ relative).
    complete : bool
        Whether ``values`` is the whole spectrum (k = min(m, n)).
    engine : str
        The engine that produced the values.
    noise_limited : bool
        The values are the clean signal directions of a layer above its
        storage noise (see :meth:`LayerResult.clean`): ranks stop at k,
        because what lies beyond is not resolved by the file.
    """

    values: np.ndarray
    total_energy: float
    complete: bool
    engine: str
    noise_limited: bool = False

    @property
    def k(self) -> int:
        """How many singular values were computed."""
        return int(self.values.size)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it; no data is read.

    ``start`` is the absolute byte offset of the tensor's data in ``file``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: Path
    start: int

    @property
    def floating(self) -> bool:
        """Whether the tensor holds floating-point values (only those can be weights)."""
        return self.dtype in FLOATING_DTYPES

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layer:
    """One weight matrix present in both checkpoints with the same shape.

    ``shape`` is the matrix shape analysed: a conv kernel (out, in, kh, kw) is
    analysed as (out, in·kh·kw). ``role`` is ``linear``, ``embedding``,
    ``lm_head`` or ``conv``. ``stack``, ``block``, ``expert`` and ``kind``
    place the module in the model (see :func:`svdrank.inputs.names.name_modules`).
    ``part`` is the expert's index along the first axis of a fused 3-D expert
    tensor ``[experts, out, in]``; None for a stored matrix.
    """

    name: str
    module: str
    kind: str
    block: int | None
    shape: tuple[int, int]
    role: str
    base: TensorInfo
    tuned: TensorInfo
    stack: str = ""
    expert: int | None = None
    part: int | None = None
    target: Target | None = None


@dataclass(frozen=True)
class Target:
    """Where a layer's update lands in the model ``transformers`` builds from its config.

    ``name`` is the runtime module (``layers.0.attention.q_proj``) or, for a
    weight that is not a module's ``weight`` (a fused 3-D expert tensor),
    the runtime parameter (``model.layers.0.mlp.experts.gate_up_proj``).
    ``module_type`` is the module's class name (``Linear``, ``Conv1D``,
    ``Embedding``…) or ``parameter``.
    """

    name: str
    module_type: str

    @property
    def is_parameter(self) -> bool:
        """Whether PEFT reaches it through ``target_parameters`` rather than ``target_modules``."""
        return self.module_type == PARAMETER


PARAMETER = "parameter"
"""Target.module_type of a weight PEFT can reach only as a parameter."""


@dataclass(frozen=True)
class ModelInfo:
    """The Hugging Face model a checkpoint belongs to, from its ``config.json``.

    ``transformers`` is the version that mapped the checkpoint's names to the
    runtime model's (None when it was not installed: the names are then the
    checkpoint's own).
    """

    config: str
    model_type: str
    architecture: str
    transformers: str | None


@dataclass(frozen=True)
class Skipped:
    """A tensor that is not analysed, with the reason code (a key of SKIP_REASONS)."""

    name: str
    reason: str
    detail: str = ""

    @property
    def explanation(self) -> str:
        """The reason in words, with the detail when there is one."""
        text = SKIP_REASONS[self.reason]
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True)
class EngineSettings:
    """How a spectrum is computed; the defaults suit fine-tuning updates.

    Parameters
    ----------
    engine : {"auto", "exact", "gram", "randomized", "lanczos"}
    max_energy : float
        Truncated engines compute values until they hold this share of ‖ΔW‖_F².
    oversample, power_iters : int
        Extra sketch columns and power iterations of the randomized engine.
    normalizer : {"lu", "qr", "none"}
        How the randomized engine normalises its power iterates.
    lanczos_solver : {"arpack", "propack"}
        SciPy's solver behind the lanczos engine.
    krylov : bool
        Keep every power iterate (block Krylov) in the randomized engine.
    complete : bool
        Ask for the whole spectrum (the ``nuclear`` metric needs it); routes
        every layer to the exact engine.
    """

    engine: str = "auto"
    max_energy: float = 0.95
    oversample: int = 10
    power_iters: int = 2
    normalizer: str = "lu"
    lanczos_solver: str = "arpack"
    krylov: bool = False
    complete: bool = False

    def __post_init__(self) -> None:
        check_choice(self.engine, ENGINES, "engine")
        check_choice(self.normalizer, NORMALIZERS, "normalizer")
        check_choice(self.lanczos_solver, LANCZOS_SOLVERS, "Lanczos solver")
        if not 0.0 < self.max_energy <= 1.0:
            raise UsageError(f"--max-energy must be in (0, 1], got {self.max_energy}")
        if self.oversample < 0 or self.power_iters < 0:
            raise UsageError("--oversample and --power-iters must be ≥ 0")


@dataclass(frozen=True)
class AnalysisSettings:
    """How the spectra were computed; stored in the analysis file.

    Everything that decides the numbers is here; how the run was carried out
    (the number of workers) is not, because it does not change them.
    """

    engine: EngineSettings = field(default_factory=EngineSettings)
    metric: str = "fro"
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_conv: bool = False
    noise: str = "auto"

    def __post_init__(self) -> None:
        check_choice(self.metric, METRICS, "metric")
        check_choice(self.noise, NOISE_MODES, "noise mode")
        if self.metric == "nuclear" and not self.engine.complete:
            object.__setattr__(self, "engine", replace(self.engine, complete=True))


NOISY_SHARE = 0.10
"""A layer is flagged ``noisy`` when more than this share of ‖ΔW‖_F² lies below τ."""
SUB_ULP_SHARE = 0.50
"""A layer is flagged ``sub-ulp`` when more than this share of its entries did not change."""
ROUNDING_GRIDS = frozenset({"BF16", "F16", "F8_E4M3", "F8_E5M2"})
"""Storage grids whose rounding is modelled as noise; F32 and F64 rounding is negligible."""


NOISE_ESTIMATES = ("bound", "draws")
"""How a layer's threshold τ was set: the high end of its bracket from the stored values'
squares, or the full estimate from simulated and sign-flip draws."""


@dataclass(frozen=True)
class LayerNoise:
    """A layer's storage rounding noise and the signal rank that stands above it.

    Attributes
    ----------
    grid, base_grid : str
        The grids the tuned and base values lie on: their dtypes, except F32
        words holding BF16 values (``BF16``).
    roundings : int
        How many of the two are on a rounding grid (see :data:`ROUNDING_GRIDS`).
    noise_energy : float
        Σ v_ij, the modelled ‖N‖_F² of the rounding noise (an upper bound
        when ``estimate`` is ``bound``).
    threshold : float
        τ: singular values above it are signal.
    signal_rank : int
        r_s = #{σᵢ > τ} (a lower bound when not ``signal_rank_exact``).
    signal_rank_exact : bool
        False when the spectrum stopped before a value fell to τ, or τ's
        bracket held values whose side of τ did not change any preset's rank.
    unchanged : float
        The share of entries with ΔW = 0 (stored tuned and base equal).
    estimate : {"bound", "draws"}
        How τ was set (see :data:`NOISE_ESTIMATES`).
    threshold_low : float or None
        ``bound``: the low end of τ's bracket.
    profile_bound, max_entry, sim_edge, flip_edge, edge : float or None
        ``draws``: the estimates of ‖N‖₂ (see
        :class:`svdrank.spectra.noise.NoiseFloor`) and the one τ stands on.
    """

    grid: str
    base_grid: str
    roundings: int
    noise_energy: float
    threshold: float
    signal_rank: int
    signal_rank_exact: bool
    unchanged: float
    estimate: str
    threshold_low: float | None = None
    profile_bound: float | None = None
    max_entry: float | None = None
    sim_edge: float | None = None
    flip_edge: float | None = None
    edge: float | None = None

    def __post_init__(self) -> None:
        check_choice(self.estimate, NOISE_ESTIMATES, "noise estimate")


@dataclass(frozen=True)
class LayerResult:
    """What the analysis keeps of one layer: identity, norms and its spectrum.

    Attributes
    ----------
    module : str
        The dotted module name PEFT and the tables use (no ``.weight``).
    name : str
        The tensor name in the base checkpoint.
    kind, block, role
        The module's kind (its path inside its block), block index (None
        outside every block) and role (linear, embedding, lm_head, conv).
    stack, expert
        Which stack of blocks (empty when the model has one) and which
        expert of a mixture-of-experts block (None outside experts).
    shape : tuple of int
        (m, n) of the matrix analysed.
    dtype : str
        The base tensor's safetensors dtype.
    delta_norm : float
        ‖ΔW‖_F.
    base_norm : float or None
        ‖W_base‖_F; None for adapters, which have no base.
    spectrum : Spectrum
    seconds : float
        Time spent decomposing (not stored with the numbers' identity).
    target : Target or None
        The module or parameter of the runtime model the update applies to;
        None when the model was not built (no ``config.json`` or no
        ``transformers``) or has no counterpart.
    noise : LayerNoise or None
        The storage noise floor; None where it does not apply (F32/F64
        inputs, adapters, ``--noise off``).
    """

    module: str
    name: str
    kind: str
    block: int | None
    role: str
    shape: tuple[int, int]
    dtype: str
    delta_norm: float
    base_norm: float | None
    spectrum: Spectrum
    seconds: float = 0.0
    stack: str = ""
    expert: int | None = None
    target: Target | None = None
    noise: LayerNoise | None = None

    @property
    def full_params(self) -> int:
        """m·n, the parameters full fine-tuning trains in this layer."""
        return self.shape[0] * self.shape[1]

    @property
    def relative_change(self) -> float | None:
        """‖ΔW‖_F / ‖W_base‖_F; None without a base (adapters), inf for a zero base."""
        if self.base_norm is None:
            return None
        return self.delta_norm / self.base_norm if self.base_norm else math.inf


@dataclass(frozen=True)
class Analysis:
    """The result of ``svdrank diff``: inputs, settings, one LayerResult per layer, skips.

    Attributes
    ----------
    inputs : dict
        What was read: for a checkpoint pair ``{"base": …, "tuned": …}``, for
        an adapter ``{"adapter": …, "config": path}``; each input with its
        path, byte sizes and the SHA-256 of every file header.
    settings : AnalysisSettings
    layers : tuple of LayerResult
        In natural name order (``layers.2`` before ``layers.11``).
    skipped : tuple of Skipped
        Every tensor not analysed, with its reason.
    created : str
        ISO 8601 time of the analysis (UTC).
    version : str
        The svdrank version that computed it.
    model : ModelInfo or None
        The Hugging Face model of the checkpoint, when it has a ``config.json``.
    """

    inputs: dict[str, Any]
    settings: AnalysisSettings
    layers: tuple[LayerResult, ...]
    skipped: tuple[Skipped, ...]
    created: str = ""
    version: str = __version__
    model: ModelInfo | None = None

    @property
    def max_target(self) -> float:
        """The highest energy target every layer's spectrum can answer.

        1.0 when every spectrum is complete (or noise-limited: its ranks stop at
        the signal rank whatever the target); else the least share of ‖ΔW‖_F²
        that a truncated spectrum holds (at least the ``max_energy`` its engine
        was asked for, often more).
        """
        reached = [
            float(np.cumsum(np.square(layer.spectrum.values, dtype=np.float64))[-1])
            / layer.spectrum.total_energy
            for layer in self.layers
            if not (layer.spectrum.complete or layer.spectrum.noise_limited)
            and layer.spectrum.total_energy > 0
        ]
        return min([1.0, *reached])


@dataclass(frozen=True)
class ProgressUpdate:
    """What a progress callback hears after each layer."""

    layer: LayerResult
    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int


Progress = Callable[[ProgressUpdate], None]


RULES = ("energy", "sv_ratio", "threshold", "uniform", "budget", "signal")
"""How a rank plan picks ranks: an energy target, a σ ratio, an absolute σ threshold, one
rank for every layer, a parameter budget, or the signal rank above storage noise."""


@dataclass(frozen=True)
class RankRule:
    """How ranks are chosen: ``method`` (one of RULES) with its ``value``, and a label.

    ``value`` is an energy share for ``energy``, the ratio R of σ ≥ σ₁/R for
    ``sv_ratio``, the σ threshold for ``threshold`` and the parameter count for
    ``budget``; the rank itself for ``uniform``. ``preset`` names the preset an energy
    rule came from; ``objective`` what a budget maximises.
    """

    method: str
    value: float
    label: str
    preset: str | None = None
    objective: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.method, RULES, "rank rule")


@dataclass(frozen=True)
class Constraints:
    """Clamps applied after a rule picks a raw rank.

    ``min_rank`` applies to every layer with a non-zero update (a zero update
    needs no adapter and stays at 0); ``multiple_of`` rounds up; ``max_rank``
    caps; no rank exceeds min(m, n).
    """

    min_rank: int = 0
    max_rank: int | None = None
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if self.min_rank < 0:
            raise UsageError(f"--min-rank must be ≥ 0, got {self.min_rank}")
        if self.multiple_of < 1:
            raise UsageError(f"--multiple-of must be ≥ 1, got {self.multiple_of}")
        if self.max_rank is not None and self.max_rank < max(self.min_rank, 1):
            raise UsageError(
                f"--max-rank must be ≥ 1 and ≥ --min-rank {self.min_rank}, got {self.max_rank}"
            )

    def apply(self, rank: int, layer: LayerResult) -> int:
        """Clamp the rank a rule gave a layer.

        Parameters
        ----------
        rank : int
            The rule's rank for ``layer``.
        layer : LayerResult

        Returns
        -------
        int
            0 for an update that is exactly zero; else ``rank`` raised to
            ``min_rank``, rounded up to a multiple of ``multiple_of``, cut to
            ``max_rank`` and to min(m, n).
        """
        if layer.spectrum.total_energy == 0.0:
            return 0
        rank = max(rank, self.min_rank)
        if rank > 0:
            rank = math.ceil(rank / self.multiple_of) * self.multiple_of
        if self.max_rank is not None:
            rank = min(rank, self.max_rank)
        return min(rank, min(layer.shape))


@dataclass(frozen=True)
class LayerRank:
    """One layer's recommended rank, what it keeps (E(rank) in the plan's metric) and costs.

    With storage noise on, ``layer`` carries the clean spectrum the rank was read
    from (see :func:`svdrank.spectra.signal.clean_spectrum`), ``energy`` is a share
    of the clean update, and ``raw_rank`` is what the same rule gives on the raw
    spectrum: None where that spectrum cannot answer it (it stopped at τ) or
    the rule has no raw reading (budgets, the signal preset).
    """

    layer: LayerResult
    rank: int
    energy: float
    raw_rank: int | None = None

    @property
    def params(self) -> int:
        """LoRA parameters of this rank: r·(m+n)."""
        return self.rank * sum(self.layer.shape)


@dataclass(frozen=True)
class RankPlan:
    """Ranks for every layer under one rule, metric and set of constraints.

    Attributes
    ----------
    rule : RankRule
    metric : {"fro", "nuclear"}
        The energy metric of every ``energy`` figure in the plan.
    constraints : Constraints
    layers : tuple of LayerRank
        In the analysis's layer order.
    """

    rule: RankRule
    metric: str
    constraints: Constraints
    layers: tuple[LayerRank, ...]

    @property
    def params(self) -> int:
        """Total LoRA parameters."""
        return sum(item.params for item in self.layers)

    @property
    def full_params(self) -> int:
        """Parameters full fine-tuning trains in the same layers."""
        return sum(item.layer.full_params for item in self.layers)

    @property
    def energy(self) -> float:
        """Share of the whole update kept, in the plan's metric.

        ``fro``: Σ E_i·‖ΔW_i‖_F² / Σ‖ΔW_i‖_F²; ``nuclear``: Σ E_i·‖ΔW_i‖_* / Σ‖ΔW_i‖_*
        (E_i in the same metric), so the total and the per-layer figures are
        in the same units. 1.0 when every update is zero.
        """
        weights = [_metric_weight(item.layer.spectrum, self.metric) for item in self.layers]
        total = math.fsum(weights)
        if total == 0.0:
            return 1.0
        kept = math.fsum(
            item.energy * weight for item, weight in zip(self.layers, weights, strict=True)
        )
        return kept / total


@dataclass(frozen=True)
class PlanSet:
    """The plans an output shows: the chosen ones, the one curves mark, and uniform ranks.

    Attributes
    ----------
    chosen : tuple of RankPlan
        The plans asked for (by default every preset the analysis can answer).
    marked : RankPlan
        The plan whose ranks energy curves mark (one of ``chosen``).
    uniform : tuple of RankPlan
        Plans at the habitual uniform ranks (r = 8, 16, 64) for comparison.
    """

    chosen: tuple[RankPlan, ...]
    marked: RankPlan
    uniform: tuple[RankPlan, ...]


def _metric_weight(spectrum: Spectrum, metric: str) -> float:
    """‖ΔW‖_F² for fro, ‖ΔW‖_* = Σσ for nuclear (complete spectra only)."""
    if metric == "nuclear":
        return float(np.sum(spectrum.values, dtype=np.float64))
    return spectrum.total_energy


@dataclass(frozen=True)
class ModuleRank:
    """One module's LoRA rank, and its (out, in) shape when the config tells it."""

    module: str
    rank: int
    shape: tuple[int, int] | None

    @property
    def params(self) -> int | None:
        """r·(m+n), or None without a shape."""
        return None if self.shape is None else self.rank * sum(self.shape)


@dataclass(frozen=True)
class Allocation:
    """The ranks a rank config or adapter gives, and which format it was read from.

    ``source_format`` is ``ranks`` (svdrank's own), ``peft-config`` or ``adapter``.
    """

    source: str
    source_format: str
    modules: tuple[ModuleRank, ...]

    @property
    def params(self) -> int | None:
        """Total LoRA parameters, or None when a shape is unknown."""
        counts = [item.params for item in self.modules]
        return None if any(count is None for count in counts) else sum(filter(None, counts))

    @property
    def max_rank(self) -> int:
        """The largest rank of any module."""
        return max((item.rank for item in self.modules), default=0)


@dataclass(frozen=True)
class Violation:
    """One broken limit: which module (or the total), which limit, the value and the bound."""

    module: str
    limit: str
    value: float
    bound: float


@dataclass(frozen=True)
class CheckReport:
    """The outcome of a check: the allocation judged, the limits and what broke them."""

    allocation: Allocation
    limits: dict[str, float | None]
    violations: tuple[Violation, ...]

    @property
    def passed(self) -> bool:
        """Whether every limit holds."""
        return not self.violations


@dataclass(frozen=True)
class ExtractedLayer:
    """One module of an extracted LoRA adapter: its rank and how well s·B·A reproduces ΔW.

    Attributes
    ----------
    module : str
        The analysed module (checkpoint name, or the adapter's module when resizing).
    target : str
        The name the adapter gives it: the runtime module when the model was mapped.
    module_type : str
        ``Linear``, ``Conv1D`` or ``Embedding``: decides how the factors are stored.
    shape : tuple of int
        (m, n) of ΔW as the checkpoint stores it.
    rank : int
    alpha : float
        The module's ``lora_alpha``; the loader's scale is alpha / rank.
    dtype : str
        The safetensors dtype the factors are stored in.
    energy : float
        Share of ‖ΔW‖_F² that the rank-r approximation keeps, Σ_{i≤r} σᵢ² / ‖ΔW‖_F².
    error : float
        ‖ΔW − s·B·A‖_F / ‖ΔW‖_F, measured with the factors as stored (after the cast).
    optimal : float
        √(1 − E(r)) from the best singular values known: the least relative error any
        rank-r adapter can have (Eckart-Young).
    method : str
        How the singular vectors were computed: ``exact``, ``randomized`` or ``core``.
    delta_norm : float
        ‖ΔW‖_F.
    underflows : int
        Factor entries that fall below the storage dtype's normal range.
    """

    module: str
    target: str
    module_type: str
    shape: tuple[int, int]
    rank: int
    alpha: float
    dtype: str
    energy: float
    error: float
    optimal: float
    method: str
    delta_norm: float
    underflows: int = 0

    @property
    def params(self) -> int:
        """LoRA parameters r·(m+n)."""
        return self.rank * sum(self.shape)

    @property
    def full_params(self) -> int:
        """m·n, the entries of the full update."""
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class LeftOut:
    """A module with a rank that an extracted adapter does not hold, and why (in words)."""

    module: str
    reason: str


@dataclass(frozen=True)
class Extraction:
    """What ``svdrank extract`` wrote: the adapter directory, its config and every module.

    Attributes
    ----------
    directory : Path
        The PEFT adapter directory.
    config : dict
        The ``adapter_config.json`` record.
    layers : tuple of ExtractedLayer
        In the adapter's order.
    left_out : tuple of LeftOut
        Modules with a rank that the adapter does not hold, with the reason.
    rule : str
        The rule that chose the ranks, in words.
    itemsize : int
        Bytes per stored entry.
    """

    directory: Path
    config: dict[str, Any]
    layers: tuple[ExtractedLayer, ...]
    left_out: tuple[LeftOut, ...]
    rule: str
    itemsize: int

    @property
    def params(self) -> int:
        """Total LoRA parameters."""
        return sum(layer.params for layer in self.layers)

    @property
    def full_params(self) -> int:
        """Entries of the full updates of the same modules."""
        return sum(layer.full_params for layer in self.layers)

    @property
    def energy(self) -> float:
        """Share of Σ‖ΔW_i‖_F² the adapter keeps over all its modules (1.0 without any)."""
        weights = [layer.delta_norm**2 for layer in self.layers]
        total = math.fsum(weights)
        if total == 0.0:
            return 1.0
        kept = math.fsum(w * item.energy for w, item in zip(weights, self.layers, strict=True))
        return kept / total

    @property
    def worst_error(self) -> float:
        """The largest relative error of any module."""
        return max((layer.error for layer in self.layers), default=0.0)


ADAPTER_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
"""``extract --dtype`` choices → the safetensors dtype an adapter's factors are stored in."""
