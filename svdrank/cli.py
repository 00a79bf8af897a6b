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
from svdrank.checkpoint import open_checkpoint
from svdrank.errors import SvdrankError

err_console = Console(stderr=True)


def report_error(message: str) -> None:
    """Print one ``svdrank: error:`` line on stderr."""
    err_console.print(f"svdrank: error: {message}", markup=False, highlight=False, soft_wrap=True)


class _Group(TyperGroup):
    """Turns the SvdrankError family into one line and exit 2, Ctrl-C into exit 130."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except SvdrankError as exc:
            report_error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("svdrank: interrupted; nothing was written", highlight=False)
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


def main() -> None:
    """Entry point of the ``svdrank`` console script."""
    app()
