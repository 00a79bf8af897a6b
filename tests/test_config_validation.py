"""Files that parse as JSON but are wrong: one checked load per format, one line, exit 2 (#14).

Every bad analysis file, rank config, PEFT config and adapter config is refused by the
real commands that read it, with one ``svdrank: error:`` line naming the file and the
field, and nothing written. Fuzzing each field with random JSON never raises outside
the SvdrankError family, and whatever loads recommends ranks without NaN or Infinity.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from svdrank.analysis.file import load_analysis
from svdrank.cli import app
from svdrank.errors import SvdrankError
from svdrank.inputs.adapter import read_adapter_config
from svdrank.outputs import formats
from svdrank.outputs.configs import read_allocation
from svdrank.ranks.checks import check_allocation
from tests.conftest import SAMPLES, assert_one_line_error

BASE = SAMPLES / "base.safetensors"
TUNED = SAMPLES / "tuned.safetensors"
ADAPTER = SAMPLES / "adapter"
HUGE = "@1e400"
"""A value written as the JSON number 1e400, which Python's json reads as inf."""
DELETE = object()
"""A mutation that removes the field."""


def _dumps(record: dict[str, Any]) -> str:
    """Write a record as JSON, the HUGE marker as the number 1e400."""
    return json.dumps(record).replace(f'"{HUGE}"', "1e400")


def _mutated(record: dict[str, Any], path: tuple, value: Any) -> dict[str, Any]:
    """Return a deep copy of ``record`` with the field at ``path`` set to ``value`` (or removed)."""
    changed = copy.deepcopy(record)
    *parents, last = path
    target = changed
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return changed


def _snapshot(directory: Path) -> list[tuple[str, bytes]]:
    """Every file under ``directory`` with its bytes."""
    return sorted(
        (str(path.relative_to(directory)), path.read_bytes())
        for path in directory.rglob("*")
        if path.is_file()
    )


class Records(dict):
    """Valid records by format, with a short repr for Hypothesis's failure reports."""

    def __repr__(self) -> str:
        return f"Records({', '.join(self)})"


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A real analysis of the sample pair with its native and PEFT rank configs, as records."""
    folder = tmp_path_factory.mktemp("valid")
    runner = CliRunner()
    analysis, ranks, peft = folder / "a.json", folder / "ranks.json", folder / "peft.json"
    assert runner.invoke(app, ["diff", str(BASE), str(TUNED), "-o", str(analysis)]).exit_code == 0
    for output, kind in ((ranks, "json"), (peft, "peft")):
        args = ["recommend", str(analysis), "--format", kind, "-o", str(output)]
        assert runner.invoke(app, args).exit_code == 0
    paths = {"analysis": analysis, "ranks": ranks, "peft": peft}
    return Records({name: json.loads(path.read_text()) for name, path in paths.items()})


# --- analysis files --------------------------------------------------------------------------

LAYER = 3
"""A layer of the sample analysis with a complete, non-zero spectrum of 128 values."""

BAD_ANALYSES = {
    "string-singular-value": (("layers", LAYER, "singular_values", 2), "1.0", "singular_values[2]"),
    "negative-singular-value": (("layers", LAYER, "singular_values", 7), -1.0, "values[7]"),
    "infinite-singular-value": (("layers", LAYER, "singular_values", 0), HUGE, "values[0]"),
    "bool-singular-value": (("layers", LAYER, "singular_values", 4), True, "singular_values[4]"),
    "rising-singular-values": (("layers", LAYER, "singular_values", 5), 1e3, "singular_values[5]"),
    "singular-values-not-a-list": (("layers", LAYER, "singular_values"), {}, "singular_values"),
    "negative-total-energy": (("layers", LAYER, "total_energy"), -1.0, "total_energy"),
    "huge-total-energy": (("layers", LAYER, "total_energy"), 10**400, "total_energy"),
    "negative-delta-norm": (("layers", LAYER, "delta_norm"), -2.0, "delta_norm"),
    "delta-norm-not-energy-root": (("layers", LAYER, "delta_norm"), 1e3, "delta_norm"),
    "negative-base-norm": (("layers", LAYER, "base_norm"), -1.0, "base_norm"),
    "string-base-norm": (("layers", LAYER, "base_norm"), "12", "base_norm"),
    "huge-shape": (("layers", LAYER, "shape", 0), HUGE, "shape"),
    "zero-shape": (("layers", LAYER, "shape", 1), 0, "shape"),
    "float-shape": (("layers", LAYER, "shape", 1), 128.0, "shape"),
    "three-dimensional-shape": (("layers", LAYER, "shape"), [128, 128, 1], "shape"),
    "shape-below-value-count": (("layers", LAYER, "shape"), [4, 128], "at most 4"),
    "empty-spectrum-with-energy": (("layers", LAYER, "singular_values"), [], "singular_values"),
    "energy-below-sum-of-squares": (("layers", LAYER, "total_energy"), 1e-3, "exceeds"),
    "complete-spectrum-short-of-energy": (("layers", LAYER, "total_energy"), 1e3, "complete"),
    "complete-not-bool": (("layers", LAYER, "complete"), "yes", "complete"),
    "negative-block": (("layers", LAYER, "block"), -1, "block"),
    "bool-block": (("layers", LAYER, "block"), True, "block"),
    "fractional-expert": (("layers", LAYER, "expert"), 1.5, "expert"),
    "module-missing": (("layers", LAYER, "module"), DELETE, "module: missing"),
    "module-not-text": (("layers", LAYER, "module"), 7, "module"),
    "engine-not-text": (("layers", LAYER, "engine"), None, "engine"),
    "duplicate-module": (("layers", LAYER + 1, "module"), "model.layers.0.mlp.up_proj", "twice"),
    "layer-not-object": (("layers", LAYER), [], f"layers[{LAYER}]"),
    "no-layers": (("layers",), [], "has no layers"),
    "layers-not-a-list": (("layers",), {}, "layers"),
    "settings-not-object": (("settings",), [], "settings"),
    "max-energy-out-of-range": (("settings", "max_energy"), 2.0, "settings.max_energy"),
    "max-energy-text": (("settings", "max_energy"), "0.9", "settings.max_energy"),
    "unknown-engine": (("settings", "engine"), "warp", "settings.engine"),
    "negative-oversample": (("settings", "oversample"), -1, "settings.oversample"),
    "negative-seed": (("settings", "seed"), -1, "settings.seed"),
    "include-not-a-list": (("settings", "include"), "q_proj", "settings.include"),
    "unknown-metric": (("settings", "metric"), "spectral", "settings.metric"),
    "unknown-skip-reason": (("skipped", 0, "reason"), "lost", "skipped[0].reason"),
    "skipped-not-a-list": (("skipped",), None, "skipped"),
    "inputs-not-object": (("inputs",), "base", "inputs"),
}


@pytest.fixture
def written(tmp_path):
    """Write a record into ``tmp_path`` and return its path."""

    def write(name: str, record: dict[str, Any]) -> Path:
        path = tmp_path / name
        path.write_text(_dumps(record))
        return path

    return write


@pytest.mark.parametrize(("path", "value", "field"), BAD_ANALYSES.values(), ids=BAD_ANALYSES)
def test_bad_analysis_is_one_line_naming_the_field_and_writes_nothing(
    tmp_path, valid, written, run_cli, path, value, field
):
    analysis = written("a.json", _mutated(valid["analysis"], path, value))
    config = written("ranks.json", valid["ranks"])
    before = _snapshot(tmp_path)

    commands = [
        ("recommend", analysis, "--format", "json", "-o", tmp_path / "out.json"),
        ("plot", analysis, "-o", tmp_path / "plots"),
        ("check", config, "--max-rank", "8", "--analysis", analysis),
    ]
    for command in commands:
        assert_one_line_error(run_cli(*command), str(analysis), field)
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "plots").exists()


def test_bad_singular_value_message_names_layer_module_and_value(valid, written, run_cli):
    record = _mutated(valid["analysis"], ("layers", LAYER, "singular_values", 7), -1.0)
    module = record["layers"][LAYER]["module"]

    result = run_cli("recommend", written("a.json", record), "--format", "json")

    assert_one_line_error(result, f"layers[{LAYER}] ({module}).singular_values[7]", "-1.0")


@pytest.mark.parametrize("field", ["delta_norm", "total_energy"])
def test_nan_energy_is_refused_before_it_reaches_the_output(valid, tmp_path, run_cli, field):
    path = tmp_path / "a.json"
    record = _mutated(valid["analysis"], ("layers", LAYER, field), "@NaN")
    path.write_text(json.dumps(record).replace('"@NaN"', "NaN"))

    assert_one_line_error(run_cli("recommend", path, "--format", "json"), str(path), "NaN")


def test_zero_update_with_no_values_loads(valid, written):
    zero = [layer for layer in valid["analysis"]["layers"] if layer["total_energy"] == 0.0]

    assert zero and zero[0]["singular_values"] == [] and zero[0]["engine"] == "zero"
    assert load_analysis(written("a.json", valid["analysis"])).layers


def test_adapter_analysis_with_fewer_values_than_the_shape_loads(tmp_path, run_cli):
    path = tmp_path / "adapter.json"
    assert run_cli("diff", ADAPTER, "-o", path).exit_code == 0

    layer = load_analysis(path).layers[0]

    assert layer.spectrum.complete and layer.spectrum.k == 16 < min(layer.shape)


# --- rank configs and PEFT configs -----------------------------------------------------------

MODULE = "model.layers.0.self_attn.q_proj"

BAD_RANK_CONFIGS = {
    "modules-a-list": (("modules",), [], "modules"),
    "modules-missing": (("modules",), DELETE, "modules"),
    "fractional-rank": (("modules", MODULE, "rank"), 2.5, "rank"),
    "negative-rank": (("modules", MODULE, "rank"), -1, "rank"),
    "bool-rank": (("modules", MODULE, "rank"), True, "rank"),
    "text-rank": (("modules", MODULE, "rank"), "8", "rank"),
    "huge-rank": (("modules", MODULE, "rank"), HUGE, "rank"),
    "zero-shape": (("modules", MODULE, "shape"), [0, 128], "shape"),
    "huge-shape": (("modules", MODULE, "shape"), [HUGE, 128], "shape"),
    "shape-missing": (("modules", MODULE, "shape"), DELETE, "shape"),
    "module-not-object": (("modules", MODULE), 8, MODULE),
}

BAD_PEFT_CONFIGS = {
    "zero-r": (("r",), 0, "r:"),
    "fractional-r": (("r",), 2.5, "r:"),
    "text-r": (("r",), "8", "r:"),
    "negative-alpha": (("lora_alpha",), -1, "lora_alpha"),
    "huge-alpha": (("lora_alpha",), HUGE, "lora_alpha"),
    "text-alpha": (("lora_alpha",), "16", "lora_alpha"),
    "invalid-target-regex": (("target_modules",), "model.(q_proj", "target_modules"),
    "empty-target-list": (("target_modules",), [], "target_modules"),
    "number-targets": (("target_modules",), [1, 2], "target_modules"),
    "null-targets": (("target_modules",), None, "target_modules"),
    "rank-pattern-a-list": (("rank_pattern",), [["q_proj", 8]], "rank_pattern"),
    "invalid-rank-pattern-key": (("rank_pattern",), {"q_proj[": 8}, "rank_pattern"),
    "fractional-rank-pattern": (("rank_pattern",), {"q_proj": 2.5}, "rank_pattern['q_proj']"),
    "negative-rank-pattern": (("rank_pattern",), {"q_proj": -4}, "rank_pattern['q_proj']"),
    "zero-rank-pattern": (("rank_pattern",), {"q_proj": 0}, "rank_pattern['q_proj']"),
    "text-alpha-pattern": (("alpha_pattern",), {"q_proj": "x"}, "alpha_pattern['q_proj']"),
    "nonpositive-alpha-pattern": (("alpha_pattern",), {"q_proj": 0}, "alpha_pattern['q_proj']"),
    "late-flag-alpha-key": (("alpha_pattern",), {"(?i)q_proj": 8}, "alpha_pattern"),
    "text-use-rslora": (("use_rslora",), "false", "use_rslora"),
}


@pytest.mark.parametrize("with_analysis", [False, True], ids=["alone", "with-analysis"])
@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [("ranks", *case) for case in BAD_RANK_CONFIGS.values()]
    + [("peft", *case) for case in BAD_PEFT_CONFIGS.values()],
    ids=[*BAD_RANK_CONFIGS, *BAD_PEFT_CONFIGS],
)
def test_bad_rank_config_is_one_line_naming_the_field(
    tmp_path, valid, written, run_cli, with_analysis, kind, path, value, field
):
    config = written("config.json", _mutated(valid[kind], path, value))
    extra = ("--analysis", written("a.json", valid["analysis"])) if with_analysis else ()
    before = _snapshot(tmp_path)

    result = run_cli("check", config, "--max-rank", "8", *extra)

    assert_one_line_error(result, str(config), field)
    assert _snapshot(tmp_path) == before


def test_valid_rank_configs_pass_the_check(valid, written, run_cli):
    analysis = written("a.json", valid["analysis"])
    for kind in ("ranks", "peft"):
        config = written(f"{kind}.json", valid[kind])
        result = run_cli("check", config, "--max-rank", "128", "--analysis", analysis)
        assert result.exit_code == 0, result.stderr


# --- adapter configs -------------------------------------------------------------------------

BAD_ADAPTER_CONFIGS = {
    "fractional-r": (("r",), 2.5, "r:"),
    "zero-r": (("r",), 0, "r:"),
    "r-missing": (("r",), DELETE, "r: missing"),
    "negative-alpha": (("lora_alpha",), -32, "lora_alpha"),
    "huge-alpha": (("lora_alpha",), HUGE, "lora_alpha"),
    "text-alpha": (("lora_alpha",), "32", "lora_alpha"),
    "text-use-rslora": (("use_rslora",), "false", "use_rslora"),
    "rank-pattern-a-list": (("rank_pattern",), ["q_proj"], "rank_pattern"),
    "invalid-rank-pattern-key": (("rank_pattern",), {"(q_proj": 8}, "rank_pattern"),
    "fractional-rank-pattern": (("rank_pattern",), {"q_proj": 2.5}, "rank_pattern['q_proj']"),
    "text-alpha-pattern": (("alpha_pattern",), {"v_proj": "x"}, "alpha_pattern['v_proj']"),
    "late-flag-alpha-key": (("alpha_pattern",), {"(?i)v_proj": 8}, "alpha_pattern"),
}


@pytest.fixture
def adapter_copy(tmp_path):
    """A copy of the sample adapter whose config each test rewrites."""
    directory = tmp_path / "adapter"
    shutil.copytree(ADAPTER, directory)
    return directory


@pytest.mark.parametrize(
    ("path", "value", "field"), BAD_ADAPTER_CONFIGS.values(), ids=BAD_ADAPTER_CONFIGS
)
def test_bad_adapter_config_is_one_line_naming_file_and_field(
    tmp_path, adapter_copy, run_cli, path, value, field
):
    config = adapter_copy / "adapter_config.json"
    config.write_text(_dumps(_mutated(json.loads(config.read_text()), path, value)))
    before = _snapshot(tmp_path)

    for command in [
        ("diff", adapter_copy, "-o", tmp_path / "out.json"),
        ("check", adapter_copy, "--max-rank", "8"),
    ]:
        assert_one_line_error(run_cli(*command), str(config), field)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["[16]", "{ r: 16", "NaN"])
def test_unreadable_adapter_config_is_one_line(adapter_copy, run_cli, content):
    config = adapter_copy / "adapter_config.json"
    config.write_text(content)

    assert_one_line_error(run_cli("diff", adapter_copy, "-o", "unused.json"), str(config))


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_finite_but_huge_alpha_is_a_one_line_error(tmp_path, adapter_copy, run_cli):
    config = adapter_copy / "adapter_config.json"
    config.write_text(_dumps(_mutated(json.loads(config.read_text()), ("lora_alpha",), 1e300)))

    assert_one_line_error(run_cli("diff", adapter_copy, "-o", tmp_path / "out.json"), "lora_alpha")


# --- fuzzing: random JSON in every field -----------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([10**400, -0.0, 5e-324, 1e308, 2**40, 2**40 + 1, "", "(", "q_proj"])
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
VALUES = JSON_VALUES | st.just(DELETE)


def _paths(record: dict[str, Any], prefix: tuple = ()) -> list[tuple]:
    """Every field path of a record, lists sampled at their first, fourth and last item."""
    if isinstance(record, dict):
        items = list(record.items())
    else:
        chosen = sorted({0, 3, len(record) - 1} & set(range(len(record))))
        items = [(index, record[index]) for index in chosen]
    paths = []
    for key, value in items:
        paths.append((*prefix, key))
        if isinstance(value, dict | list):
            paths.extend(_paths(value, (*prefix, key)))
    return paths


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory):
    """One folder whose files each example overwrites (Hypothesis reuses the fixture)."""
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def loaded(valid, fuzz_folder):
    """The valid analysis, loaded once."""
    path = fuzz_folder / "valid.json"
    path.write_text(json.dumps(valid["analysis"]))
    return load_analysis(path)


STATELESS_FIXTURES = [HealthCheck.function_scoped_fixture]
"""run_cli is a fresh CliRunner closure with no state, so examples may share it."""


def _recommended_json_is_strict(run_cli, path: Path) -> None:
    """Recommend from a loaded analysis: exit 0 with strict JSON, or a one-line refusal."""
    for kind in ("json", "peft"):
        result = run_cli("recommend", path, "--format", kind)
        assert result.exit_code in (0, 2), result.stderr
        if result.exit_code == 0:
            json.dumps(json.loads(result.stdout), allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=STATELESS_FIXTURES)
@given(data=st.data(), value=VALUES)
def test_fuzzed_analysis_loads_or_is_refused_and_never_leaks_nan(
    valid, fuzz_folder, run_cli, data, value
):
    path = data.draw(st.sampled_from(_paths(valid["analysis"])), label="field")
    analysis = fuzz_folder / "a.json"
    analysis.write_text(_dumps(_mutated(valid["analysis"], path, value)))

    try:
        load_analysis(analysis)
    except SvdrankError:
        return
    _recommended_json_is_strict(run_cli, analysis)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), value=VALUES, kind=st.sampled_from(["ranks", "peft"]))
def test_fuzzed_rank_config_reads_or_is_refused(valid, fuzz_folder, loaded, data, value, kind):
    path = data.draw(st.sampled_from(_paths(valid[kind])), label="field")
    config = fuzz_folder / "config.json"
    config.write_text(_dumps(_mutated(valid[kind], path, value)))

    try:
        allocation = read_allocation(config, loaded)
        report = check_allocation(allocation, max_rank=8, min_energy=0.5, analysis=loaded)
    except SvdrankError:
        return
    json.dumps(formats.report_record(report), allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), value=VALUES)
def test_fuzzed_adapter_config_reads_or_is_refused(fuzz_folder, data, value):
    record = json.loads((ADAPTER / "adapter_config.json").read_text())
    path = data.draw(st.sampled_from(_paths(record)), label="field")
    directory = fuzz_folder / "adapter"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(_dumps(_mutated(record, path, value)))

    try:
        config = read_adapter_config(directory)
    except SvdrankError:
        return
    assert config.r >= 1 and config.lora_alpha > 0
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.v_proj"):
        assert math.isfinite(config.scale(module, config.r))
