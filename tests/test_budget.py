"""Budget allocation against brute force, and agreement with the presets."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svdrank.errors import UsageError
from svdrank.ranks.budget import parse_count, plan_budget
from svdrank.ranks.rules import plan, preset_rule
from svdrank.types import Analysis, Constraints
from tests.conftest import SAMPLES, assert_one_line_error
from tests.spectra import synthetic_analysis


def _brute_force(analysis: Analysis, budget: int, relative: bool = False) -> float:
    """The best objective over every rank combination that fits the budget."""
    best = 0.0
    choices = [range(layer.spectrum.k + 1) for layer in analysis.layers]
    for ranks in itertools.product(*choices):
        cost = sum(r * sum(layer.shape) for r, layer in zip(ranks, analysis.layers, strict=True))
        if cost > budget:
            continue
        best = max(best, _objective(analysis, ranks, relative))
    return best


def _objective(analysis: Analysis, ranks, relative: bool) -> float:
    total = 0.0
    for rank, layer in zip(ranks, analysis.layers, strict=True):
        kept = float(np.sum(layer.spectrum.values[:rank] ** 2))
        total += kept / layer.spectrum.total_energy if relative else kept
    return total


spectra = st.lists(
    st.lists(st.floats(0.01, 10.0), min_size=1, max_size=4).map(np.array), min_size=1, max_size=3
)


@settings(max_examples=200, deadline=None)
@given(spectra, st.integers(0, 200), st.booleans())
def test_equal_widths_greedy_equals_brute_force_optimum(values, budget, relative):
    analysis = synthetic_analysis(values, [(4, 6)] * len(values))  # every rank costs 10

    result = plan_budget(analysis, budget, "relative" if relative else "energy")

    ranks = [item.rank for item in result.layers]
    assert result.params <= budget
    assert _objective(analysis, ranks, relative) == pytest.approx(
        _brute_force(analysis, budget, relative), abs=1e-9
    )


@settings(max_examples=200, deadline=None)
@given(spectra, st.integers(0, 300), st.data())
def test_mixed_widths_are_within_one_step_of_the_optimum(values, budget, data):
    # min(m, n) >= 4: a layer cannot have more singular values than its smaller side.
    shapes = [data.draw(st.sampled_from([(4, 6), (8, 9), (4, 4)])) for _ in values]
    analysis = synthetic_analysis(values, shapes)

    result = plan_budget(analysis, budget)

    ranks = [item.rank for item in result.layers]
    one_step = max(float(np.max(layer.spectrum.values**2)) for layer in analysis.layers)
    assert result.params <= budget
    assert _objective(analysis, ranks, False) >= _brute_force(analysis, budget) - one_step - 1e-9


def test_greedy_can_miss_the_knapsack_optimum_by_one_step_with_mixed_widths():
    # One rank of A costs 6 and keeps 6.6; each rank of B costs 5 and keeps 5.
    # Budget 10: greedy buys A (best ratio), then nothing fits: 6.6, not 10.
    analysis = synthetic_analysis(
        [np.array([6.6**0.5]), np.array([5**0.5, 5**0.5])], [(3, 3), (2, 3)]
    )

    result = plan_budget(analysis, 10)

    assert [item.rank for item in result.layers] == [1, 0]
    assert _brute_force(analysis, 10) == pytest.approx(10.0)


def test_budget_equal_to_a_preset_cost_keeps_at_least_its_energy():
    rng = np.random.default_rng(0)
    shapes = [(64, 64), (128, 64), (64, 128), (96, 32)] * 3
    values = [np.sort(rng.pareto(1.5, size=min(shape)))[::-1] + 1e-3 for shape in shapes]
    analysis = synthetic_analysis(values, shapes)
    for name in ("conservative", "balanced", "aggressive"):
        preset = plan(analysis, preset_rule(name))

        budgeted = plan_budget(analysis, preset.params)

        assert budgeted.params <= preset.params
        assert budgeted.energy >= preset.energy - 1e-12


def test_constraints_are_respected():
    rng = np.random.default_rng(1)
    shapes = [(40, 40), (40, 40), (60, 20)]
    analysis = synthetic_analysis([np.sort(rng.random(min(s)))[::-1] for s in shapes], shapes)

    result = plan_budget(analysis, 3000, constraints=Constraints(4, 24, 4))

    for item in result.layers:
        assert 4 <= item.rank <= 24 and item.rank % 4 == 0
    assert result.params <= 3000


def test_min_rank_above_the_budget_is_a_usage_error():
    analysis = synthetic_analysis([np.ones(4)] * 2, [(4, 6)] * 2)

    with pytest.raises(UsageError, match="alone costs 80"):
        plan_budget(analysis, 50, constraints=Constraints(min_rank=4))


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("20M", 20_000_000),
        ("1.5e6", 1_500_000),
        ("300k", 300_000),
        ("4096", 4096),
        ("2B", 2_000_000_000),
        ("1_000", 1000),
        (12.0, 12),
    ],
)
def test_parse_count(text, count):
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "1.5X", "nan"])
def test_parse_count_rejects_non_counts(text):
    with pytest.raises(UsageError):
        parse_count(text)


def test_cli_budget_fits_and_beats_the_preset_of_the_same_cost(tmp_path, run_cli):
    out = tmp_path / "a.json"
    run_cli("diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", out)
    balanced = json.loads(run_cli("recommend", out, "--preset", "balanced").stdout)["totals"]

    result = run_cli("recommend", out, "--budget", str(balanced["params"]), "--format", "json")

    record = json.loads(result.stdout)
    assert record["rule"] == "budget" and record["budget"] == balanced["params"]
    assert record["totals"]["params"] <= balanced["params"]
    assert record["totals"]["energy"] >= balanced["energy"]


def test_cli_budget_ratio_and_relative_objective(tmp_path, run_cli):
    out = tmp_path / "a.json"
    run_cli("diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", out)

    result = run_cli("recommend", out, "--budget-ratio", "0.05", "--objective", "relative")

    record = json.loads(result.stdout)
    assert record["totals"]["params"] <= 0.05 * record["totals"]["full_params"]
    assert record["budget"] == int(0.05 * record["totals"]["full_params"])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--budget", "20M", "--energy", "0.9"), "give only one of"),
        (("--budget", "lots"), "is not a count"),
        (("--budget-ratio", "2"), "--budget-ratio must be in (0, 1]"),
        (("--budget", "100", "--min-rank", "8"), "alone costs"),
    ],
)
def test_cli_bad_budgets_are_one_line_errors(tmp_path, run_cli, args, words):
    out = tmp_path / "a.json"
    run_cli("diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", out)

    assert_one_line_error(run_cli("recommend", out, *args), words)
