"""The options of the command line, declared once and shared between commands.

Every choice comes from the library's tables, so the command line cannot offer
what the library refuses (or miss what it accepts). Each alias is an
``Annotated`` type with its help text; commands use them as parameter types.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from svdrank.outputs.formats import IMAGE_FORMATS, RANK_FORMATS
from svdrank.ranks.budget import OBJECTIVES
from svdrank.ranks.rules import PRESETS, SIGNAL_PRESET
from svdrank.types import (
    ADAPTER_DTYPES,
    DEVICES,
    ENGINES,
    LANCZOS_SOLVERS,
    METRICS,
    NOISE_MODES,
    NORMALIZERS,
    RANK_NOISE_MODES,
)


def _choices(name: str, values: tuple[str, ...] | list[str]) -> Any:
    """Make a str Enum of the library's choices, for Typer."""
    return Enum(name, [(value, value) for value in values], type=str)


Engine = _choices("Engine", ENGINES)
Device = _choices("Device", DEVICES)
Metric = _choices("Metric", METRICS)
Normalizer = _choices("Normalizer", NORMALIZERS)
LanczosSolver = _choices("LanczosSolver", LANCZOS_SOLVERS)
Preset = _choices("Preset", [*PRESETS, SIGNAL_PRESET])
Noise = _choices("Noise", RANK_NOISE_MODES)
AnalysisNoise = _choices("AnalysisNoise", NOISE_MODES)
Objective = _choices("Objective", OBJECTIVES)
TableOrJson = _choices("TableOrJson", ("table", "json"))
RankFormat = _choices("RankFormat", RANK_FORMATS)
ImageFormat = _choices("ImageFormat", IMAGE_FORMATS)
CheckFormat = _choices("CheckFormat", ("text", "json"))

AnalysisArgument = Annotated[Path, typer.Argument(help="Analysis file written by `svdrank diff`.")]
IncludeOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Only modules matching this glob on the name, or FIELD=GLOB on a field of "
        "their place: kind=mlp.*, stack=vision_model, block=1?, expert=3 (repeatable).",
        metavar="GLOB",
        show_default=False,
    ),
]
ExcludeOption = Annotated[
    list[str] | None,
    typer.Option(
        help="Leave out modules matching this glob (or FIELD=GLOB, as --include; repeatable).",
        metavar="GLOB",
        show_default=False,
    ),
]
EnergyOption = Annotated[
    float | None,
    typer.Option(help="Energy share each layer keeps, in (0, 1].", show_default=False),
]
PresetOption = Annotated[
    Preset | None,
    typer.Option(
        help="conservative 0.95, balanced 0.90, aggressive 0.85 energy; signal: the signal "
        "rank above storage noise; default: every energy preset the analysis can answer, "
        "side by side.",
        show_default=False,
    ),
]
NoiseOption = Annotated[
    Noise,
    typer.Option(
        help="auto: layers stored in BF16/F16/F8 are ranked on their clean update (storage "
        "rounding noise removed) and never past their signal rank; off: raw-spectrum ranks "
        "(an analysis that stopped at the noise threshold may need `diff --noise off`).",
    ),
]
ExtractNoise = Annotated[
    Noise,
    typer.Option(
        help="auto: layers stored in BF16/F16/F8 get ranks from their clean update (storage "
        "rounding noise removed), never past their signal rank; off: ranks from the raw "
        "spectra, analysed without a noise floor.",
    ),
]
DiffNoise = Annotated[
    AnalysisNoise,
    typer.Option(
        help="auto: model the rounding noise of BF16/F16/F8 inputs per layer (threshold τ, "
        "signal rank; truncated engines stop at τ), τ from cheap bounds where they decide "
        "every preset's rank; full: estimate τ for every such layer (exact signal ranks, "
        "slower); off: raw spectra only.",
    ),
]

InspectCheckpoint = Annotated[
    Path,
    typer.Argument(
        help="A .safetensors file, a directory of shards, or a *.safetensors.index.json.",
        show_default=False,
    ),
]
InspectOutputFormat = Annotated[
    TableOrJson | None,
    typer.Option(
        "--format",
        help="table or json; default: table on a terminal, json when stdout is piped.",
        show_default=False,
    ),
]
DiffBase = Annotated[
    Path,
    typer.Argument(
        help="Base checkpoint (file, shard directory or index), or a PEFT adapter directory.",
        show_default=False,
    ),
]
DiffTuned = Annotated[
    Path | None,
    typer.Argument(
        help="Tuned checkpoint; leave out when BASE is a PEFT adapter.", show_default=False
    ),
]
DiffEngine = Annotated[
    Engine, typer.Option(help="How singular values are computed; auto picks per layer.")
]
DiffMetric = Annotated[
    Metric,
    typer.Option(help="fro: Σσ² share (LoRA error); nuclear: Σσ share (needs exact SVD)."),
]
DiffMaxEnergy = Annotated[
    float,
    typer.Option(
        help="Truncated engines compute values until they hold this energy share, in "
        "(0, 1]; recommend can answer targets up to it."
    ),
]
DiffNormalizer = Annotated[
    Normalizer, typer.Option(help="Randomized engine: power-iteration normaliser.")
]
DiffOversample = Annotated[int, typer.Option(help="Randomized engine: extra sketch columns (≥ 0).")]
DiffPowerIters = Annotated[int, typer.Option(help="Randomized engine: power iterations (≥ 0).")]
DiffKrylov = Annotated[
    bool,
    typer.Option(
        "--krylov",
        help="Randomized engine: keep every power iterate (block Krylov): more accurate "
        "values for the same passes; use with --power-iters 3.",
    ),
]
DiffLanczosSolver = Annotated[LanczosSolver, typer.Option(help="Lanczos engine: SciPy's solver.")]
DiffSeed = Annotated[int, typer.Option(help="Seed of the random sketches (≥ 0).")]
DiffIncludeConv = Annotated[
    bool, typer.Option(help="Analyse 4-D conv kernels as (out, in·kh·kw) matrices.")
]
DiffWorkers = Annotated[int, typer.Option(help="Layers decomposed at the same time (≥ 1).")]
DiffDevice = Annotated[
    Device,
    typer.Option(
        help="Where the spectra are computed: cpu: NumPy and SciPy's LAPACK; cuda: torch on "
        "the CUDA GPU (pip install 'svdrank[gpu]'); auto: cuda when torch sees one, else "
        "cpu; torch-cpu: the cuda code on the CPU (for testing). Same ranks on every device.",
    ),
]
CLUSTER_HELP = (
    "Compute the layers on a Dask cluster (pip install 'svdrank[cluster]'): a "
    "scheduler's address (tcp://host:8786), whose workers read the checkpoints at the same "
    "paths; or local:N, N worker processes on this machine started for the run. One layer "
    "per worker thread"
)
DiffCluster = Annotated[
    str | None,
    typer.Option(
        help=f"{CLUSTER_HELP}; --workers does not apply. Same analysis as a local run.",
        metavar="ADDRESS",
        show_default=False,
    ),
]
ExtractCluster = Annotated[
    str | None,
    typer.Option(
        help=f"{CLUSTER_HELP}: each worker reads, analyses and factors its layers and sends "
        "back only their factors. Same adapter as a local run. Not for resizing an adapter "
        "(that is local and cheap).",
        metavar="ADDRESS",
        show_default=False,
    ),
]
DiffOutput = Annotated[
    Path, typer.Option("--output", "-o", help="Where to write the analysis file.")
]
DiffOutputFormat = Annotated[
    TableOrJson | None,
    typer.Option(
        "--format",
        help="table or json (the analysis record) on stdout; default: table on a terminal.",
        show_default=False,
    ),
]
DiffPlotDir = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also write the figures of `svdrank plot` into this folder.",
        metavar="DIR",
        show_default=False,
    ),
]
DiffQuiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")]
DiffResume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue an interrupted run: keep the layers logged in OUTPUT.resume (each "
        "finished layer is appended there) if it is of the same inputs and settings, compute "
        "the rest. Without it, a run replaces that log. It is removed once OUTPUT is written.",
    ),
]
RecommendSvRatio = Annotated[
    float | None,
    typer.Option(help="Keep the σ ≥ σ₁/R, R ≥ 1 (kohya's sv_ratio).", show_default=False),
]
RecommendThreshold = Annotated[
    float | None,
    typer.Option(help="Keep the σ ≥ T, T > 0 (absolute threshold).", show_default=False),
]
RecommendBudget = Annotated[
    str | None,
    typer.Option(
        help="Keep the most energy within N LoRA parameters (20M, 1.5e6, 300k).",
        metavar="N",
        show_default=False,
    ),
]
RecommendBudgetRatio = Annotated[
    float | None,
    typer.Option(
        help="A budget as this share of the analysed layers' parameters, in (0, 1].",
        show_default=False,
    ),
]
RecommendObjective = Annotated[
    Objective | None,
    typer.Option(
        help="With a budget: maximise the energy kept overall (default), or the sum of "
        "per-layer energy fractions (relative).",
        show_default=False,
    ),
]
RecommendMetric = Annotated[
    Metric | None,
    typer.Option(help="fro or nuclear; default: the analysis's metric.", show_default=False),
]
RecommendMinRank = Annotated[
    int, typer.Option(help="Lowest rank for a layer with a non-zero update (≥ 0).")
]
RecommendMaxRank = Annotated[
    int | None, typer.Option(help="Highest rank for any layer (≥ 1).", show_default=False)
]
RecommendMultipleOf = Annotated[int, typer.Option(help="Round ranks up to a multiple of N.")]
RecommendAlphaRatio = Annotated[
    float | None,
    typer.Option(
        help="With --format peft: lora_alpha = ratio·r for every module (> 0; default 2).",
        show_default=False,
    ),
]
RecommendAllowUnmatched = Annotated[
    bool,
    typer.Option(
        "--allow-unmatched",
        help="With --format peft: when the analysis mapped the checkpoint to the model "
        "transformers builds (a config.json beside it), leave out modules that model does not "
        "have instead of refusing.",
    ),
]
RecommendOutputFormat = Annotated[
    RankFormat | None,
    typer.Option(
        "--format",
        help="table, json (svdrank.ranks/2), peft (LoraConfig kwargs), csv or markdown; "
        "default: table on a terminal, json when piped or by -o's suffix.",
        show_default=False,
    ),
]
RecommendOutput = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Write to this file instead of stdout.", show_default=False
    ),
]
PlotOutput = Annotated[
    Path, typer.Option("--output", "-o", help="Folder for the figures (created if missing).")
]
PlotImageFormat = Annotated[ImageFormat, typer.Option("--format", help="png, svg or pdf.")]
PlotReport = Annotated[
    bool, typer.Option("--html", help="Also write report.html: one self-contained file.")
]
CheckTarget = Annotated[
    Path,
    typer.Argument(
        help="A rank config (svdrank JSON or PEFT LoraConfig JSON), or a PEFT adapter "
        "directory or its adapter_config.json.",
        show_default=False,
    ),
]
CheckMaxParams = Annotated[
    str | None,
    typer.Option(
        help="Fail when the LoRA parameters Σ r·(m+n) exceed N (20M, 1.5e6, 300k).",
        metavar="N",
        show_default=False,
    ),
]
CheckMaxRank = Annotated[
    int | None,
    typer.Option(
        help="Fail when any module's rank exceeds R (≥ 0).", metavar="R", show_default=False
    ),
]
CheckMinEnergy = Annotated[
    float | None,
    typer.Option(
        help="Fail when a module's rank keeps less than E of its update's energy, E in "
        "(0, 1] (needs --analysis).",
        metavar="E",
        show_default=False,
    ),
]
CheckAnalysis = Annotated[
    Path | None,
    typer.Option(
        help="Analysis file from `svdrank diff`: energies for --min-energy, and layer "
        "shapes for PEFT configs that have none.",
        show_default=False,
    ),
]
CheckModel = Annotated[
    Path | None,
    typer.Option(
        help="A Hugging Face model directory (its config.json is enough): build the model "
        "transformers makes from it on the meta device, apply the config with PEFT and report "
        "every module of the config that does not get its rank. Needs svdrank[hf].",
        show_default=False,
    ),
]
CheckOutputFormat = Annotated[
    CheckFormat, typer.Option("--format", help="text (one line per violation) or json.")
]

AdapterDtype = _choices("AdapterDtype", list(ADAPTER_DTYPES))
ExtractBase = Annotated[
    Path,
    typer.Argument(
        help="Base checkpoint (file, shard directory or index), or a PEFT adapter directory "
        "to resize.",
        show_default=False,
    ),
]
ExtractTuned = Annotated[
    Path | None,
    typer.Argument(
        help="Tuned checkpoint (a full fine-tune); leave out to resize the adapter BASE.",
        show_default=False,
    ),
]
ExtractOutput = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="The adapter directory to write (adapter_config.json + "
        "adapter_model.safetensors, replaced atomically)."
    ),
]
ExtractPreset = Annotated[
    Preset | None,
    typer.Option(
        help="conservative 0.95, balanced 0.90, aggressive 0.85; default: balanced when no "
        "other rule is given.",
        show_default=False,
    ),
]
ExtractRank = Annotated[
    int | None,
    typer.Option(help="One rank for every module (≥ 1).", metavar="R", show_default=False),
]
ExtractRanks = Annotated[
    Path | None,
    typer.Option(
        help="A rank config from `svdrank recommend` (svdrank JSON or --format peft).",
        metavar="FILE",
        show_default=False,
    ),
]
ExtractAlphaRatio = Annotated[
    float, typer.Option(help="Every module's scale lora_alpha / r (> 0).")
]
ExtractUniformAlpha = Annotated[
    bool,
    typer.Option(
        "--uniform-alpha",
        help="One lora_alpha (ratio × the largest rank) for all modules, no alpha_pattern: "
        "what llama.cpp's converter applies; vLLM then mis-scales modules of lower rank.",
    ),
]
ExtractDtype = Annotated[
    AdapterDtype | None,
    typer.Option(
        help="Storage dtype of the factors; default: the tuned checkpoint's (fp32 for F32, "
        "F64 and F8).",
        show_default=False,
    ),
]
ExtractAnalysis = Annotated[
    Path | None,
    typer.Option(
        help="Analysis file of the same pair from `svdrank diff` (checked by the header "
        "digests): skips the analysis pass.",
        show_default=False,
    ),
]
ExtractOutputFormat = Annotated[
    TableOrJson | None,
    typer.Option(
        "--format",
        help="table or json (svdrank.extraction/1) on stdout; default: table on a terminal.",
        show_default=False,
    ),
]
