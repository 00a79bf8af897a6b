"""The ``svdrank`` command line: parse options, call the library, render. No numerics here."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from svdrank import __version__, formats, render
from svdrank.adapter import analyze_adapter, is_adapter
from svdrank.analysis import analyze
from svdrank.analysis_file import DEFAULT_ANALYSIS, analysis_record, load_analysis, save_analysis
from svdrank.checkpoint import open_checkpoint
from svdrank.checks import check_allocation, read_allocation, report_record, report_text
from svdrank.errors import SvdrankError, UsageError
from svdrank.files import check_writable, write_atomically
from svdrank.policy import DEFAULT_PRESET, PRESETS, RankPlan, parse_count
from svdrank.policy import recommend as recommend_ranks

err_console = Console(stderr=True)


def say(message: str) -> None:
    """One message line on stderr, never wrapped (CI logs and grep see it whole)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def report_error(message: str) -> None:
    """Print one ``svdrank: error:`` line on stderr."""
    say(f"svdrank: error: {message}")


class _Group(TyperGroup):
    """Turns the SvdrankError family into one line and exit 2, Ctrl-C into exit 130."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except SvdrankError as exc:
            report_error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            say("svdrank: interrupted; nothing was written")
            raise typer.Exit(130) from None


app = typer.Typer(
    cls=_Group,
    help="How much rank does each layer's fine-tuning update really need?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class TableOrJson(str, Enum):
    """Output formats of commands that print a table or JSON."""

    table = "table"
    json = "json"


def _plot_analysis():
    """svdrank.plots.plot_analysis, imported on use: matplotlib alone takes half a second to
    import, which every other command would pay for nothing."""
    from svdrank.plots import plot_analysis

    return plot_analysis


def _wants_json(requested: Enum | None) -> bool:
    """JSON when asked for, or when stdout is not a terminal and nothing was asked."""
    if requested is None:
        return not sys.stdout.isatty()
    return requested.value == "json"


def _stdout() -> Console:
    """The console for tables on stdout; wide enough not to wrap names when piped."""
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
    """How much rank does each layer's fine-tuning update really need?"""


@app.command()
def inspect(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A .safetensors file, a directory of shards, or a *.safetensors.index.json.",
            show_default=False,
        ),
    ],
    output_format: Annotated[
        TableOrJson | None,
        typer.Option(
            "--format",
            help="table or json; default: table on a terminal, json when stdout is piped.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """List what a checkpoint holds: every tensor's name, shape, dtype and size, with totals."""
    opened = open_checkpoint(checkpoint)
    if _wants_json(output_format):
        sys.stdout.write(formats.dumps(formats.inspect_record(opened)))
    else:
        render.print_tables(_stdout(), render.inspect_tables(opened))


class Engine(str, Enum):
    """Spectrum engines (see DESIGN.md, Engines)."""

    auto = "auto"
    exact = "exact"
    gram = "gram"
    randomized = "randomized"
    lanczos = "lanczos"


class Metric(str, Enum):
    """Energy metrics."""

    fro = "fro"
    nuclear = "nuclear"


class Normalizer(str, Enum):
    """Power-iteration normalisers of the randomized engine."""

    lu = "lu"
    qr = "qr"
    none = "none"


class Preset(str, Enum):
    """Named energy targets."""

    conservative = "conservative"
    balanced = "balanced"
    aggressive = "aggressive"


class Objective(str, Enum):
    """What a budget allocation maximises."""

    energy = "energy"
    relative = "relative"


class RankFormat(str, Enum):
    """Output formats of ``recommend``."""

    table = "table"
    json = "json"
    peft = "peft"
    csv = "csv"
    markdown = "markdown"


DEFAULT_PLOTS = Path("svdrank-plots")
SUFFIX_FORMATS = {".json": RankFormat.json, ".csv": RankFormat.csv, ".md": RankFormat.markdown}


@app.command()
def diff(
    base: Annotated[
        Path,
        typer.Argument(
            help="Base checkpoint (file, shard directory or index), or a PEFT adapter directory.",
            show_default=False,
        ),
    ],
    tuned: Annotated[
        Path | None,
        typer.Argument(
            help="Tuned checkpoint; leave out when BASE is a PEFT adapter.", show_default=False
        ),
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option(help="How singular values are computed; auto picks per layer."),
    ] = Engine.auto,
    metric: Annotated[
        Metric,
        typer.Option(help="fro: Σσ² share (LoRA error); nuclear: Σσ share (needs exact SVD)."),
    ] = Metric.fro,
    max_energy: Annotated[
        float,
        typer.Option(help="Truncated engines compute values until they hold this energy share."),
    ] = 0.95,
    normalizer: Annotated[
        Normalizer, typer.Option(help="Randomized engine: power-iteration normaliser.")
    ] = Normalizer.lu,
    oversample: Annotated[int, typer.Option(help="Randomized engine: extra sketch columns.")] = 10,
    power_iters: Annotated[int, typer.Option(help="Randomized engine: power iterations.")] = 2,
    krylov: Annotated[
        bool,
        typer.Option(
            "--krylov",
            help="Randomized engine: keep every power iterate (block Krylov): more accurate "
            "values for the same passes; use with --power-iters 3.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random sketches.")] = 0,
    include: Annotated[
        list[str] | None,
        typer.Option(
            help="Analyse only modules matching this glob (repeatable).",
            metavar="GLOB",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Leave out modules matching this glob (repeatable).",
            metavar="GLOB",
            show_default=False,
        ),
    ] = None,
    include_conv: Annotated[
        bool, typer.Option(help="Analyse 4-D conv kernels as (out, in·kh·kw) matrices.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Layers decomposed at the same time.")] = 1,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the analysis file.")
    ] = DEFAULT_ANALYSIS,
    output_format: Annotated[
        TableOrJson | None,
        typer.Option(
            "--format",
            help="table or json (the analysis record) on stdout; default: table on a terminal.",
            show_default=False,
        ),
    ] = None,
    plot_dir: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write the figures of `svdrank plot` into this folder.",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or messages.")
    ] = False,
) -> None:
    """Decompose every layer's update ΔW = tuned − base, print the table, save the analysis.

    Given a PEFT LoRA adapter directory alone, analyse each module's update s·B·A instead
    (exactly, from the r×r core): how much of the adapter's rank is really used.
    """
    check_writable(output)
    if tuned is None:
        if not is_adapter(base):
            raise UsageError(
                f"{base}: give BASE and TUNED checkpoints, or a PEFT adapter directory alone"
            )
        analysis = analyze_adapter(base)
    else:
        with render.layer_progress(err_console, err_console.is_terminal and not quiet) as progress:
            analysis = analyze(
                base,
                tuned,
                engine=engine.value,
                metric=metric.value,
                max_energy=max_energy,
                oversample=oversample,
                power_iters=power_iters,
                normalizer=normalizer.value,
                krylov=krylov,
                seed=seed,
                include=include or (),
                exclude=exclude or (),
                include_conv=include_conv,
                workers=workers,
                progress=progress,
            )
    save_analysis(analysis, output)
    figures = _plot_analysis()(analysis, plot_dir) if plot_dir is not None else []
    if _wants_json(output_format):
        sys.stdout.write(formats.dumps(analysis_record(analysis)))
    else:
        render.print_tables(_stdout(), render.diff_tables(analysis))
    if not quiet:
        say(
            f"wrote {output} ({len(analysis.layers)} layers, {len(analysis.skipped)} skipped)"
            + (f" and {len(figures)} figures in {plot_dir}" if figures else "")
        )


@app.command()
def recommend(
    analysis: Annotated[
        Path, typer.Argument(help="Analysis file written by `svdrank diff`.")
    ] = DEFAULT_ANALYSIS,
    energy: Annotated[
        float | None,
        typer.Option(help="Energy share each layer keeps, in (0, 1].", show_default=False),
    ] = None,
    preset: Annotated[
        Preset | None,
        typer.Option(
            help="conservative 0.95, balanced 0.90, aggressive 0.85. "
            "No --energy/--preset/--sv-ratio/--threshold: the three presets side by side.",
            show_default=False,
        ),
    ] = None,
    sv_ratio: Annotated[
        float | None,
        typer.Option(help="Keep the σ ≥ σ₁/R (kohya's sv_ratio).", show_default=False),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(help="Keep the σ ≥ T (absolute threshold).", show_default=False),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Keep the most energy within N LoRA parameters (20M, 1.5e6, 300k).",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    budget_ratio: Annotated[
        float | None,
        typer.Option(
            help="A budget as this share of the analysed layers' parameters (0.01 = 1 %).",
            show_default=False,
        ),
    ] = None,
    objective: Annotated[
        Objective,
        typer.Option(
            help="What a budget maximises: energy kept overall, or the sum of per-layer "
            "energy fractions (relative)."
        ),
    ] = Objective.energy,
    metric: Annotated[
        Metric | None,
        typer.Option(help="fro or nuclear; default: the analysis's metric.", show_default=False),
    ] = None,
    min_rank: Annotated[
        int, typer.Option(help="Lowest rank for a layer with a non-zero update.")
    ] = 0,
    max_rank: Annotated[
        int | None, typer.Option(help="Highest rank for any layer.", show_default=False)
    ] = None,
    multiple_of: Annotated[int, typer.Option(help="Round ranks up to a multiple of N.")] = 1,
    alpha_ratio: Annotated[
        float, typer.Option(help="PEFT output: lora_alpha = ratio·r for every module.")
    ] = formats.DEFAULT_ALPHA_RATIO,
    output_format: Annotated[
        RankFormat | None,
        typer.Option(
            "--format",
            help="table, json (svdrank.ranks/1), peft (LoraConfig kwargs), csv or markdown; "
            "default: table on a terminal, json when piped or by -o's suffix.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write to this file instead of stdout.", show_default=False
        ),
    ] = None,
) -> None:
    """Recommend per-layer LoRA ranks from an analysis file (no checkpoints are read)."""
    if output is not None:
        check_writable(output)
    plans = recommend_ranks(
        analysis,
        energy=energy,
        preset=preset.value if preset else None,
        sv_ratio=sv_ratio,
        threshold=threshold,
        budget=budget,
        budget_ratio=budget_ratio,
        objective=objective.value,
        metric=metric.value if metric else None,
        min_rank=min_rank,
        max_rank=max_rank,
        multiple_of=multiple_of,
    )
    chosen = _rank_format(output_format, output)
    if chosen is RankFormat.table:
        render.print_tables(_stdout(), [render.plans_table(plans)])
        return
    text = _rank_text(plans, chosen, alpha_ratio, str(analysis))
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(output, text)
        say(f"wrote {output} ({chosen.value})")


def _rank_format(requested: RankFormat | None, output: Path | None) -> RankFormat:
    """The format asked for, else by -o's suffix, else table on a terminal and json piped."""
    if requested is not None:
        if requested is RankFormat.table and output is not None:
            raise UsageError(
                "--format table prints to the terminal; choose json, peft, csv or markdown with -o"
            )
        return requested
    if output is not None:
        return SUFFIX_FORMATS.get(output.suffix.lower(), RankFormat.json)
    return RankFormat.json if _wants_json(None) else RankFormat.table


def _rank_text(plans: list[RankPlan], chosen: RankFormat, alpha_ratio: float, source: str) -> str:
    """Render plans in a machine format; JSON formats take one plan (balanced by default)."""
    if chosen is RankFormat.csv:
        return formats.plans_csv(plans)
    if chosen is RankFormat.markdown:
        return formats.plans_markdown(plans)
    if len(plans) > 1:
        say(
            f"svdrank: no --energy or --preset given: writing the {DEFAULT_PRESET} preset "
            f"({PRESETS[DEFAULT_PRESET]:.2f})"
        )
        plans = [next(p for p in plans if p.mode.label == DEFAULT_PRESET)]
    if chosen is RankFormat.peft:
        return formats.dumps(formats.peft_record(plans[0], alpha_ratio))
    return formats.dumps(formats.ranks_record(plans[0], source))


class ImageFormat(str, Enum):
    """Figure file formats."""

    png = "png"
    svg = "svg"
    pdf = "pdf"


@app.command()
def plot(
    analysis: Annotated[
        Path, typer.Argument(help="Analysis file written by `svdrank diff`.")
    ] = DEFAULT_ANALYSIS,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for the figures (created if missing).")
    ] = DEFAULT_PLOTS,
    image_format: Annotated[
        ImageFormat, typer.Option("--format", help="png, svg or pdf.")
    ] = ImageFormat.png,
    preset: Annotated[
        Preset | None,
        typer.Option(
            help="Mark and map this preset's ranks; default: heat maps of all three presets, "
            "curves marked with balanced.",
            show_default=False,
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="Mark and map the ranks of this energy target.", show_default=False),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            help="Plot only modules matching this glob (repeatable).",
            metavar="GLOB",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        bool, typer.Option("--html", help="Also write report.html: one self-contained file.")
    ] = False,
) -> None:
    """Energy curves, singular-value decay, rank heat maps and a budget chart; prints the paths."""
    paths = _plot_analysis()(
        load_analysis(analysis),
        output,
        image_format.value,
        energy=energy,
        preset=preset.value if preset else None,
        include=include or (),
        report=report,
    )
    sys.stdout.write("".join(f"{path}\n" for path in paths))


class CheckFormat(str, Enum):
    """Output formats of ``check``."""

    text = "text"
    json = "json"


@app.command()
def check(
    target: Annotated[
        Path,
        typer.Argument(
            help="A rank config (svdrank JSON or PEFT LoraConfig JSON), or a PEFT adapter "
            "directory or its adapter_config.json.",
            show_default=False,
        ),
    ],
    max_params: Annotated[
        str | None,
        typer.Option(
            help="Fail when the LoRA parameters Σ r·(m+n) exceed N (20M, 1.5e6, 300k).",
            metavar="N",
            show_default=False,
        ),
    ] = None,
    max_rank: Annotated[
        int | None,
        typer.Option(
            help="Fail when any module's rank exceeds R.", metavar="R", show_default=False
        ),
    ] = None,
    min_energy: Annotated[
        float | None,
        typer.Option(
            help="Fail when a module's rank keeps less than E of its update's energy "
            "(needs --analysis).",
            metavar="E",
            show_default=False,
        ),
    ] = None,
    analysis: Annotated[
        Path | None,
        typer.Option(
            help="Analysis file from `svdrank diff`: energies for --min-energy, and layer "
            "shapes for PEFT configs that have none.",
            show_default=False,
        ),
    ] = None,
    output_format: Annotated[
        CheckFormat,
        typer.Option("--format", help="text (one line per violation) or json."),
    ] = CheckFormat.text,
) -> None:
    """CI gate: exit 0 when every limit holds, 1 when any is broken, 2 on bad input."""
    loaded = load_analysis(analysis) if analysis is not None else None
    report = check_allocation(
        read_allocation(target, loaded),
        max_params=parse_count(max_params, "--max-params") if max_params is not None else None,
        max_rank=max_rank,
        min_energy=min_energy,
        analysis=loaded,
    )
    if output_format is CheckFormat.json:
        sys.stdout.write(formats.dumps(report_record(report)))
    else:
        sys.stdout.write(report_text(report))
    if not report.passed:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``svdrank`` console script."""
    app()
