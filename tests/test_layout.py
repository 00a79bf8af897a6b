"""The package's layout: every module imports only from its own stage or stages to its left."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "svdrank"
STAGES = ("base", "inputs", "spectra", "analysis", "ranks", "outputs", "cli")
"""Left to right: a module may import from its own stage and the stages before it."""
BASE_MODULES = {"svdrank", "svdrank.types", "svdrank.errors", "svdrank.files", "svdrank._version"}
CLI_MODULES = {"svdrank.cli", "svdrank.cli_options", "svdrank.__main__"}
LAZY_REEXPORTS = {"svdrank"}
"""svdrank/__init__.py names its stages in strings and imports them on first use."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _stage(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    if module in CLI_MODULES:
        return "cli"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in STAGES:
        return parts[1]
    raise AssertionError(f"{module} belongs to no stage; add it to the layout of this test")


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".")
    if MODULES[importer].name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _svdrank_imports(module: str) -> set[str]:
    """Every svdrank module ``module`` imports, at module level or inside functions."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                # `from svdrank.outputs import formats` imports the module svdrank.outputs.formats.
                found.add(submodule if submodule in MODULES else source)
    return {name for name in found if name == "svdrank" or name.startswith("svdrank.")}


def _third_party_imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops - set(sys.stdlib_module_names) - {"svdrank", "__future__"}


def test_every_module_of_the_package_is_in_a_stage():
    assert len(MODULES) > 20
    assert {_stage(module) for module in MODULES} == set(STAGES)


def test_no_module_imports_from_a_stage_to_its_right():
    offending = []
    for module in MODULES:
        if module in LAZY_REEXPORTS:
            continue
        own = STAGES.index(_stage(module))
        for imported in sorted(_svdrank_imports(module)):
            if imported not in MODULES:
                offending.append((module, f"{imported} (no such module)"))
            elif STAGES.index(_stage(imported)) > own:
                offending.append((module, imported))

    assert not offending, "imports reaching to a later stage:\n" + "\n".join(
        f"  {module} imports {imported}" for module, imported in offending
    )


def test_the_layout_check_sees_function_level_and_relative_imports(tmp_path):
    # The CLI imports the pipeline inside `diff` (SciPy only when decomposing).
    assert "svdrank.analysis.pipeline" in _svdrank_imports("svdrank.cli")
    assert "svdrank.cli_options" in _svdrank_imports("svdrank.cli")
    node = ast.parse("from ..errors import UsageError").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("svdrank.ranks.rules", node) == "svdrank.errors"


def test_value_types_import_nothing_third_party_but_numpy():
    assert _third_party_imports("svdrank.types") == {"numpy"}
    assert _svdrank_imports("svdrank.types") <= BASE_MODULES
