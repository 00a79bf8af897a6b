"""The ``svdrank`` command line: parse options, call the library, render. It decides nothing.

The choices of every option come from the library's tables (engines, metrics,
presets, …), so the command line cannot drift from what the library accepts.
The engines (SciPy) and the figures (matplotlib) are imported only by the
commands that use them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console

# Typer carries its own copy of click (typer._click): its exceptions are not click's.
from typer._click.core import Context
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer._click.exceptions import UsageError as ParserError
from typer.core import TyperGroup

from svdrank import cli_options as options
from svdrank._version import __version__
from svdrank.analysis.file import (
    DEFAULT_ANALYSIS,
    analysis_record,
    analysis_writer,
    load_analysis,
)
from svdrank.errors import SvdrankError, SvdrankWarning, UsageError
from svdrank.files import (
    check_writable,
    dumps,
    output_directory,
    write_atomically,
    write_files_atomically,
)
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.model import adapted_ranks, model_config_path
from svdrank.outputs import formats, tables
from svdrank.outputs.configs import lora_kwargs, read_allocation
from svdrank.outputs.peft import PeftTargets, peft_targets
from svdrank.ranks import rules
from svdrank.ranks.budget import parse_count
from svdrank.ranks.checks import check_allocation
from svdrank.types import Analysis, PlanSet, RankPlan

err_console = Console(stderr=True)
INTERNAL_ERROR = 3
"""Exit code of a bug: an exception outside the SvdrankError family (not bad input)."""


def say(message: str) -> None:
    """One message line on stderr, never wrapped (CI logs and grep see it whole)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def report_error(message: str) -> None:
    """Print one ``svdrank: error:`` line on stderr, control characters escaped."""
    say(f"svdrank: error: {printable(message)}")


def printable(text: str) -> str:
    """Escape what a terminal would not show as one line (newlines, escapes, other controls)."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Print svdrank's own warnings as one ``svdrank: warning:`` line; others as Python does."""
    if issubclass(category, SvdrankWarning):
        say(f"svdrank: warning: {printable(str(message))}")
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


class _Group(TyperGroup):
    """One line and exit 2 for bad usage or input (parser errors too); Ctrl-C → 130."""

    def invoke(self, ctx: Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = show_warning
                return super().invoke(ctx)
        except SvdrankError as exc:
            report_error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            say("svdrank: interrupted; nothing was written")
            raise typer.Exit(130) from None
        except (ClickException, typer.Exit):
            raise
        except Exception as exc:
            if os.environ.get("SVDRANK_DEBUG") == "1":
                raise
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            say(
                f"svdrank: internal error: {detail} — please report it; "
                "SVDRANK_DEBUG=1 shows the traceback"
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )
        except NoArgsIsHelpError as exc:
            sys.stdout.write(exc.format_message() + "\n")
            result = 2
        except ParserError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "svdrank"
            message = exc.format_message().replace("Value error, ", "")
            report_error(f"{message} (see `{command} --help`)")
            result = 2
        except ClickException as exc:
            report_error(exc.format_message())
            result = exc.exit_code
        except typer.Abort:
            say("svdrank: interrupted; nothing was written")
            result = 130
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="How much rank does each layer's fine-tuning update really need?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


DEFAULT_PLOTS = Path("svdrank-plots")


def _value(choice: Enum | None) -> Any:
    """Return the library value of an optional Enum choice."""
    return None if choice is None else choice.value


def _wants_json(requested: str | None) -> bool:
    """JSON when asked for, or when stdout is not a terminal and nothing was asked."""
    return not sys.stdout.isatty() if requested is None else requested == "json"


def _stdout() -> Console:
    """Make the console for tables on stdout, wide enough not to wrap names when piped."""
    return Console(width=None if sys.stdout.isatty() else 160)


def _show_version(value: bool) -> None:
    """Print the version and stop."""
    if value:
        sys.stdout.write(f"svdrank {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Tell how much rank each layer's fine-tuning update really needs."""


@app.command()
def inspect(
    checkpoint: options.InspectCheckpoint,
    output_format: options.InspectOutputFormat = None,
) -> None:
    """List what a checkpoint holds: every tensor's name, shape, dtype and size, with totals."""
    opened = open_checkpoint(checkpoint)
    if _wants_json(_value(output_format)):
        sys.stdout.write(dumps(formats.inspect_record(opened)))
    else:
        tables.print_tables(_stdout(), tables.inspect_tables(opened))


@app.command()
def diff(
    base: options.DiffBase,
    tuned: options.DiffTuned = None,
    engine: options.DiffEngine = options.Engine["auto"],
    metric: options.DiffMetric = options.Metric["fro"],
    max_energy: options.DiffMaxEnergy = 0.95,
    normalizer: options.DiffNormalizer = options.Normalizer["lu"],
    oversample: options.DiffOversample = 10,
    power_iters: options.DiffPowerIters = 2,
    krylov: options.DiffKrylov = False,
    lanczos_solver: options.DiffLanczosSolver = options.LanczosSolver["arpack"],
    seed: options.DiffSeed = 0,
    include: options.IncludeOption = None,
    exclude: options.ExcludeOption = None,
    include_conv: options.DiffIncludeConv = False,
    noise: options.DiffNoise = options.AnalysisNoise["auto"],
    workers: options.DiffWorkers = 1,
    device: options.DiffDevice = options.Device["cpu"],
    cluster: options.DiffCluster = None,
    output: options.DiffOutput = DEFAULT_ANALYSIS,
    output_format: options.DiffOutputFormat = None,
    plot_dir: options.DiffPlotDir = None,
    quiet: options.DiffQuiet = False,
    resume: options.DiffResume = False,
) -> None:
    """Decompose every layer's update ΔW = tuned − base, print the table, save the analysis.

    Each finished layer is appended to OUTPUT.resume as it arrives: after Ctrl-C or a
    crash, the same command with --resume computes only the layers missing there.

    Given a PEFT LoRA adapter directory alone, analyse each module's update s·B·A instead
    (exactly, from the r×r core): how much of the adapter's rank is really used. Only
    --metric, --include and --exclude apply to an adapter.
    """
    from svdrank.analysis import pipeline
    from svdrank.analysis.resume import remove_results_log, results_log_path

    check_writable(output)
    log = results_log_path(output)
    with _keeping_log(log), tables.layer_progress(
        err_console, err_console.is_terminal and not quiet
    ) as progress:
        analysis = pipeline.analyze(
            base,
            tuned,
            engine=_value(engine),
            metric=_value(metric),
            max_energy=max_energy,
            oversample=oversample,
            power_iters=power_iters,
            normalizer=_value(normalizer),
            lanczos_solver=_value(lanczos_solver),
            krylov=krylov,
            seed=seed,
            include=include or (),
            exclude=exclude or (),
            include_conv=include_conv,
            noise=_value(noise),
            workers=workers,
            device=_value(device),
            cluster=cluster,
            progress=progress,
            results_log=log,
            resume=resume,
        )
    plans = rules.plan_set(analysis)
    with _naming_log(log):
        figures = _save(analysis, plans, output, plot_dir)
    remove_results_log(log)
    if _wants_json(_value(output_format)):
        sys.stdout.write(dumps(analysis_record(analysis)))
    else:
        tables.print_tables(_stdout(), tables.diff_tables(analysis, plans))
    if not quiet:
        say(
            f"wrote {output} ({len(analysis.layers)} layers, {len(analysis.skipped)} skipped)"
            + (f" and {len(figures)} figures in {plot_dir}" if figures else "")
        )


@contextmanager
def _keeping_log(log: Path) -> Iterator[None]:
    """On Ctrl-C, say where the finished layers are kept (when they are) and exit 130."""
    try:
        yield
    except KeyboardInterrupt:
        if not log.exists():
            raise
        say(
            f"svdrank: interrupted; the finished layers are kept in {printable(str(log))}: "
            "the same command with --resume computes the rest"
        )
        raise typer.Exit(130) from None


@contextmanager
def _naming_log(log: Path) -> Iterator[None]:
    """When the analysis cannot be saved, add where its layers are kept to the error."""
    try:
        yield
    except SvdrankError as exc:
        if not log.exists():
            raise
        raise type(exc)(
            f"{exc}; the finished layers are kept in {log}: the same command with --resume "
            "writes the analysis without computing them again"
        ) from None


def _save(analysis: Analysis, plans: PlanSet, output: Path, plot_dir: Path | None) -> list[Path]:
    """Write the analysis file and, with ``--plot``, the figures: all of them or none."""
    writers = {output: analysis_writer(analysis)}
    if plot_dir is None:
        write_files_atomically(writers)
        return []
    from svdrank.outputs.plots import plot_writers

    figures = plot_writers(analysis, plans, plot_dir)
    with output_directory(plot_dir):
        write_files_atomically({**writers, **figures})
    return list(figures)


def _plot(analysis: Analysis, plans: PlanSet, directory: Path, **settings: Any) -> list[Path]:
    """Write the figures (matplotlib is imported here only: it takes half a second)."""
    from svdrank.outputs.plots import plot_analysis

    return plot_analysis(analysis, plans, directory, **settings)


@app.command()
def recommend(
    analysis: options.AnalysisArgument = DEFAULT_ANALYSIS,
    energy: options.EnergyOption = None,
    preset: options.PresetOption = None,
    sv_ratio: options.RecommendSvRatio = None,
    threshold: options.RecommendThreshold = None,
    budget: options.RecommendBudget = None,
    budget_ratio: options.RecommendBudgetRatio = None,
    objective: options.RecommendObjective = None,
    metric: options.RecommendMetric = None,
    min_rank: options.RecommendMinRank = 0,
    max_rank: options.RecommendMaxRank = None,
    multiple_of: options.RecommendMultipleOf = 1,
    noise: options.NoiseOption = options.Noise["auto"],
    alpha_ratio: options.RecommendAlphaRatio = None,
    allow_unmatched: options.RecommendAllowUnmatched = False,
    output_format: options.RecommendOutputFormat = None,
    output: options.RecommendOutput = None,
) -> None:
    """Recommend per-layer LoRA ranks from an analysis file (no checkpoints are read)."""
    if output is not None:
        check_writable(output)
    chosen = formats.rank_format(_value(output_format), output, _wants_json(None))
    for given, flag in (
        (alpha_ratio is not None, "--alpha-ratio"),
        (allow_unmatched, "--allow-unmatched"),
    ):
        if given and chosen != "peft":
            raise UsageError(f"{flag} applies to --format peft only")
    loaded = load_analysis(analysis)
    plans = rules.recommend(
        loaded,
        energy=energy,
        preset=_value(preset),
        sv_ratio=sv_ratio,
        threshold=threshold,
        budget=budget,
        budget_ratio=budget_ratio,
        objective=_value(objective),
        metric=_value(metric),
        min_rank=min_rank,
        max_rank=max_rank,
        multiple_of=multiple_of,
        noise=_value(noise),
    )
    if chosen == "table":
        tables.print_tables(_stdout(), [tables.plans_table(plans, loaded)])
        return
    text = _rank_text(
        loaded, plans, chosen, alpha_ratio, str(analysis), allow_unmatched, _value(noise)
    )
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)
        say(f"wrote {output} ({chosen})")


def _rank_text(
    analysis: Analysis,
    plans: list[RankPlan],
    chosen: str,
    alpha_ratio: float | None,
    source: str,
    allow_unmatched: bool,
    noise: str,
) -> str:
    """Render plans in a machine format; JSON formats take one plan (the default rule's)."""
    if chosen in ("csv", "markdown"):
        return formats.plans_table_text(plans, chosen)
    plan = rules.one_plan(analysis, plans, noise)
    text = formats.config_text(plan, chosen, alpha_ratio, source, analysis.model, allow_unmatched)
    if chosen == "peft":
        _say_left_out(peft_targets(plan, analysis.model))
    if len(plans) > 1:
        say(f"svdrank: no rule given: writing the {plan.rule.label} plan ({plan.rule.value:.2f})")
    return text


def _say_left_out(found: PeftTargets) -> None:
    """Tell which modules with a rank the PEFT config leaves out, and why."""
    if found.untargetable:
        say(
            f"svdrank: {len(found.untargetable)} fused expert matrices "
            f"({found.untargetable[0]}, …) have ranks that a PEFT config cannot target per "
            "expert without the model's config.json; they are left out"
        )
    if found.unmatched:
        say(
            f"svdrank: warning: {len(found.unmatched)} modules ({found.unmatched[0]}, …) have "
            "no counterpart in the model transformers builds; they are left out"
        )


@app.command()
def plot(
    analysis: options.AnalysisArgument = DEFAULT_ANALYSIS,
    output: options.PlotOutput = DEFAULT_PLOTS,
    image_format: options.PlotImageFormat = options.ImageFormat["png"],
    preset: options.PresetOption = None,
    energy: options.EnergyOption = None,
    include: options.IncludeOption = None,
    noise: options.NoiseOption = options.Noise["auto"],
    report: options.PlotReport = False,
) -> None:
    """Energy curves, singular-value decay, rank heat maps and a budget chart; prints the paths.

    Curves are marked with the balanced preset's ranks (or the one plan asked for).
    """
    loaded = rules.select_layers(load_analysis(analysis), include or ())
    asked = rules.rules(loaded, energy=energy, preset=_value(preset), noise=_value(noise))
    plans = rules.plan_set(loaded, asked, _value(noise))
    paths = _plot(loaded, plans, output, image_format=_value(image_format), report=report)
    sys.stdout.write("".join(f"{path}\n" for path in paths))


@app.command()
def check(
    target: options.CheckTarget,
    max_params: options.CheckMaxParams = None,
    max_rank: options.CheckMaxRank = None,
    min_energy: options.CheckMinEnergy = None,
    analysis: options.CheckAnalysis = None,
    model: options.CheckModel = None,
    noise: options.NoiseOption = options.Noise["auto"],
    output_format: options.CheckOutputFormat = options.CheckFormat["text"],
) -> None:
    """CI gate: exit 0 when every limit holds, 1 when any is broken, 2 on bad input."""
    loaded = load_analysis(analysis) if analysis is not None else None
    report = check_allocation(
        read_allocation(target, loaded),
        max_params=parse_count(max_params, "--max-params") if max_params is not None else None,
        max_rank=max_rank,
        min_energy=min_energy,
        analysis=loaded,
        adapted=None if model is None else _adapted_ranks(target, model),
        noise=_value(noise),
    )
    if _value(output_format) == "json":
        sys.stdout.write(dumps(formats.report_record(report)))
    else:
        sys.stdout.write(formats.report_text(report))
    if not report.passed:
        raise typer.Exit(1)


def _adapted_ranks(target: Path, model: Path) -> dict[str, int]:
    """Apply the PEFT config ``target`` to the model of ``model``'s config.json with PEFT."""
    config = model_config_path(model)
    if config is None:
        raise UsageError(
            f"{model}: no config.json there; --model takes a Hugging Face model folder"
        )
    return adapted_ranks(config, lora_kwargs(target))


@app.command()
def extract(
    base: options.ExtractBase,
    tuned: options.ExtractTuned = None,
    output: options.ExtractOutput = Path("svdrank-adapter"),
    preset: options.ExtractPreset = None,
    energy: options.EnergyOption = None,
    sv_ratio: options.RecommendSvRatio = None,
    threshold: options.RecommendThreshold = None,
    budget: options.RecommendBudget = None,
    budget_ratio: options.RecommendBudgetRatio = None,
    rank: options.ExtractRank = None,
    ranks: options.ExtractRanks = None,
    min_rank: options.RecommendMinRank = 0,
    max_rank: options.RecommendMaxRank = None,
    multiple_of: options.RecommendMultipleOf = 1,
    alpha_ratio: options.ExtractAlphaRatio = 2.0,
    uniform_alpha: options.ExtractUniformAlpha = False,
    dtype: options.ExtractDtype = None,
    analysis: options.ExtractAnalysis = None,
    include: options.IncludeOption = None,
    exclude: options.ExcludeOption = None,
    seed: options.DiffSeed = 0,
    oversample: options.DiffOversample = 10,
    power_iters: options.DiffPowerIters = 2,
    noise: options.ExtractNoise = options.Noise["auto"],
    cluster: options.ExtractCluster = None,
    output_format: options.ExtractOutputFormat = None,
    quiet: options.DiffQuiet = False,
) -> None:
    """Write a PEFT LoRA adapter of TUNED − BASE at recommended ranks, with each module's error.

    Rules that decide each layer alone read the pair once; --budget, --budget-ratio, --ranks
    and --uniform-alpha analyse the whole pair first, then read it again for the factors.
    With --cluster, the layers are read, analysed and factored on a Dask cluster's workers.

    Given a PEFT LoRA adapter directory alone, re-factor it at the ranks asked for instead
    (from each module's exact r×r core).
    """
    from svdrank.outputs import extract as extraction
    from svdrank.outputs.extract_plan import say_left_out
    from svdrank.outputs.extraction_report import (
        extraction_record,
        extraction_summary,
        extraction_table,
    )

    with tables.layer_progress(err_console, err_console.is_terminal and not quiet) as progress:
        result = extraction.extract(
            base,
            tuned,
            output,
            preset=_value(preset),
            energy=energy,
            sv_ratio=sv_ratio,
            threshold=threshold,
            budget=budget,
            budget_ratio=budget_ratio,
            rank=rank,
            ranks=ranks,
            min_rank=min_rank,
            max_rank=max_rank,
            multiple_of=multiple_of,
            alpha_ratio=alpha_ratio,
            uniform_alpha=uniform_alpha,
            dtype=_value(dtype),
            analysis=analysis,
            include=include or (),
            exclude=exclude or (),
            seed=seed,
            oversample=oversample,
            power_iters=power_iters,
            noise=_value(noise),
            cluster=cluster,
            progress=progress,
        )
    for line in say_left_out(result.left_out):
        say(f"svdrank: {line}")
    if _wants_json(_value(output_format)):
        sys.stdout.write(dumps(extraction_record(result)))
    else:
        tables.print_tables(_stdout(), [extraction_table(result)])
    if not quiet:
        say(extraction_summary(result))


def main() -> None:
    """Entry point of the ``svdrank`` console script."""
    app()
