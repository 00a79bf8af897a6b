"""Every engine against scipy.linalg.svdvals and scikit-learn's randomized_svd, same run.

Cases: power-law spectra like fine-tuning updates (σᵢ = 1/i over 1024
directions plus a noise floor) at 1024², 4096², 4096×11008 and 11008×4096,
and a flat Gaussian 4096². For each: median time of every svdrank engine and
of the references, the ranks each gives at 95/90/85 % energy, and for the
randomized comparison the worst relative error of the top-k values.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from sklearn.utils.extmath import randomized_svd

from benchmarks.common import (
    REPEATS,
    machine,
    markdown_table,
    median_seconds,
    planted_power_law,
    ranks_from,
    write_results,
)
from svdrank.spectra.energy import rank_at
from svdrank.spectra.engines import EngineSettings, decompose
from svdrank.spectra.kernels import randomized_values, total_energy

CASES = {
    "power-law 1024x1024": ((1024, 1024), "power"),
    "power-law 4096x4096": ((4096, 4096), "power"),
    "power-law 4096x11008": ((4096, 11008), "power"),
    "power-law 11008x4096": ((11008, 4096), "power"),
    "gaussian 4096x4096": ((4096, 4096), "flat"),
}
ENGINES = ("auto", "randomized", "lanczos", "gram", "exact")


def make_case(shape: tuple[int, int], kind: str, seed: int) -> np.ndarray:
    """The benchmark matrix of one case (float32)."""
    if kind == "flat":
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return planted_power_law(shape, alpha=1.0, components=1024, noise=0.5, seed=seed)


def run_case(name: str, shape: tuple[int, int], kind: str) -> dict:
    """Time every engine and both references on one matrix."""
    matrix = make_case(shape, kind, seed=len(name))
    total = total_energy(matrix)
    reference_time, sigma = median_seconds(
        lambda: scipy.linalg.svdvals(matrix, check_finite=False), REPEATS
    )
    row = {
        "case": name,
        "shape": list(shape),
        "scipy_svdvals": {"seconds": reference_time, "ranks": ranks_from(sigma, total)},
        "engines": {},
    }
    for engine in ENGINES:
        settings = EngineSettings(engine=engine)
        seconds, spectrum = median_seconds(
            lambda s=settings: decompose(matrix, s, np.random.default_rng(0)), REPEATS
        )
        row["engines"][engine] = {
            "seconds": seconds,
            "ranks": [rank_at(spectrum, target) for target in (0.95, 0.90, 0.85)],
            "used": spectrum.engine,
            "k": spectrum.k,
            "speedup_vs_svdvals": reference_time / seconds,
        }
    randomized = row["engines"]["randomized"]
    if randomized["used"] == "randomized":
        row["randomized_vs_sklearn"] = compare_with_sklearn(matrix, sigma, total, randomized["k"])
    return row


PAIRINGS = {
    # label: (svdrank power_iters, krylov, scikit-learn n_iter)
    "same algorithm, q=2": (2, False, 2),
    "block Krylov q=3 vs sklearn default": (3, True, "auto"),
}


def compare_with_sklearn(matrix: np.ndarray, sigma: np.ndarray, total: float, k: int) -> dict:
    """Fixed-k randomized values against scikit-learn at the same k, oversampling and LU.

    Two pairings: the same algorithm and iterations (subspace iteration, q=2),
    and svdrank's block Krylov (q=3) against scikit-learn's default
    (``n_iter="auto"``: 7 iterations for this k), compared at their accuracy.
    """

    def accuracy(values: np.ndarray) -> float:
        return float(np.max(np.abs(values[:k] - sigma[:k]) / sigma[:k]))

    result = {"k": k}
    for label, (power_iters, krylov, n_iter) in PAIRINGS.items():
        ours_time, ours = median_seconds(
            lambda q=power_iters, b=krylov: randomized_values(
                matrix, k, 10, q, "lu", np.random.default_rng(0), krylov=b
            ),
            REPEATS,
        )
        theirs_time, (_, theirs, _) = median_seconds(
            lambda n=n_iter: randomized_svd(
                matrix,
                k,
                n_oversamples=10,
                n_iter=n,
                power_iteration_normalizer="LU",
                random_state=0,
            ),
            REPEATS,
        )
        result[label] = {
            "svdrank": {
                "seconds": ours_time,
                "max_rel_error": accuracy(ours),
                "ranks": ranks_from(ours, total),
            },
            "sklearn": {
                "seconds": theirs_time,
                "max_rel_error": accuracy(theirs),
                "ranks": ranks_from(theirs, total),
            },
            "speedup_of_svdrank": theirs_time / ours_time,
        }
    return result


def markdown(record: dict) -> str:
    """The README-linked summary table, from the saved record."""
    rows, env = record["cases"], record["machine"]
    header = ["case", "scipy svdvals", *ENGINES, "ranks 95/90/85 (svdvals → auto)"]
    table = []
    for row in rows:
        cells = [row["case"], f"{row['scipy_svdvals']['seconds']:.2f} s"]
        for engine in ENGINES:
            result = row["engines"][engine]
            used = "" if result["used"] == engine else f" →{result['used']}"
            cells.append(f"{result['seconds']:.3f} s ({result['speedup_vs_svdvals']:.1f}x){used}")
        cells.append(f"{row['scipy_svdvals']['ranks']} → {row['engines']['auto']['ranks']}")
        table.append(cells)
    sklearn_rows = []
    for row in rows:
        comparison = row.get("randomized_vs_sklearn")
        for label in PAIRINGS if comparison else ():
            pair = comparison[label]
            ours, theirs = pair["svdrank"], pair["sklearn"]
            sklearn_rows.append(
                [
                    row["case"],
                    comparison["k"],
                    label,
                    f"{theirs['seconds']:.3f} s",
                    f"{ours['seconds']:.3f} s",
                    f"{pair['speedup_of_svdrank']:.2f}x",
                    f"{theirs['max_rel_error']:.1e} / {ours['max_rel_error']:.1e}",
                    f"{theirs['ranks']} / {ours['ranks']}",
                ]
            )
    text = "# Engine benchmark\n\n"
    text += f"Machine: {env['cores']} cores, {env['cpu']}; numpy {env['numpy']}, scipy "
    text += f"{env['scipy']}. Medians of {record['repeats']} runs; "
    text += "speed-up against svdvals in brackets; "
    text += "'→gram' marks an engine that handed over to a complete one.\n\n"
    text += markdown_table(header, table)
    text += "\n## Randomized against scikit-learn (same k, oversampling 10, LU)\n\n"
    text += markdown_table(
        [
            "case",
            "k",
            "pairing",
            "scikit-learn",
            "svdrank",
            "speed-up",
            "max rel. error of top k (sklearn / svdrank)",
            "ranks 95/90/85 (sklearn / svdrank)",
        ],
        sklearn_rows,
    )
    return text


def main() -> None:
    """Run every case and write results/engines.{json,md}."""
    rows = []
    for name, (shape, kind) in CASES.items():
        print(f"engines: {name} ...", flush=True)
        rows.append(run_case(name, shape, kind))
    env = machine()
    write_results("engines", {"machine": env, "repeats": REPEATS, "cases": rows}, markdown)


if __name__ == "__main__":
    main()
