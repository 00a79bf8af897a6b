"""The least an exact method pays for a slowly decaying layer: every values-only eigensolver.

When σᵢ falls like i^-½ (full fine-tunes), the ranks at 85 to 95 % energy need
most of the spectrum, so an exact analysis of such a layer is the floor's work
(read both tensors, form ΔW, one SYRK for the smaller Gram matrix G) plus one
values-only eigensolve of G. This suite times, for every layer shape of the
pipeline models, that floor and each values-only symmetric eigensolver LAPACK
offers here on the same G:

- ``syevr``, ``syevd``, ``syev``, ``syevx`` (SciPy's wrappers, float32);
- ``sytrd + sterf``: the tridiagonal reduction with its optimal workspace,
  then the root-free QR iteration, the two halves the drivers above run;
- ``syev 2-stage``, ``syevd 2-stage``: dense → band → tridiagonal, called
  through LAPACKE in SciPy's own OpenBLAS when it exports them.

Per shape, 1 + (fastest eigensolve) / (floor) is the least (a)/(b) any exact
method can reach on that layer here; per model, the same over one block's
layers. ``svdrank diff`` uses syevr (``svdrank.spectra.nogil``).
"""

from __future__ import annotations

import ctypes
import glob
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from benchmarks.common import (
    REPEATS,
    machine,
    markdown_table,
    median_seconds,
    write_decaying_pair,
    write_results,
)
from benchmarks.pipeline import MODELS, Model, layer_floor
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.pairing import pair_checkpoints
from svdrank.spectra import nogil

SLOW_DECAY = 0.5
COLUMN_MAJOR = 102  # LAPACK_COL_MAJOR


def block_shapes(model: Model) -> dict[str, tuple[int, int]]:
    """One block's distinct layer shapes, each with how many layers of a block have it."""
    hidden, mlp_width, kv = model.hidden, model.mlp, model.kv
    counts: dict[tuple[int, int], list[str]] = {}
    for kind, shape in (
        ("q_proj", (hidden, hidden)),
        ("k_proj", (kv, hidden)),
        ("v_proj", (kv, hidden)),
        ("o_proj", (hidden, hidden)),
        ("gate_proj", (mlp_width, hidden)),
        ("up_proj", (mlp_width, hidden)),
        ("down_proj", (hidden, mlp_width)),
    ):
        counts.setdefault(shape, []).append(kind)
    return {"/".join(kinds): shape for shape, kinds in counts.items()}


def floor_and_gram(base: Path, tuned: Path) -> np.ndarray:
    """The pipeline floor for the one layer of the pair; returns its Gram matrix (lower)."""
    (layer,) = pair_checkpoints(open_checkpoint(base), open_checkpoint(tuned)).layers
    return layer_floor(layer)


def _openblas_lapacke(name: str) -> Callable | None:
    """A LAPACKE routine of SciPy's bundled OpenBLAS (symbols carry a ``scipy_`` prefix)."""
    libs = Path(scipy.__file__).parent.parent / "scipy.libs"
    for path in glob.glob(str(libs / "libscipy_openblas*.so")):
        function = getattr(ctypes.CDLL(path), f"scipy_LAPACKE_{name}", None)
        if function is not None:
            function.restype = ctypes.c_int
            return function
    return None


def two_stage(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """LAPACKE_s{name}_2stage(layout, 'N', 'L', n, a, lda, w) as a values-only solver."""
    function = _openblas_lapacke(f"s{name}_2stage")
    if function is None:
        return None

    def solve(gram: np.ndarray) -> np.ndarray:
        matrix = np.array(gram, dtype=np.float32, order="F")
        n = matrix.shape[0]
        values = np.empty(n, dtype=np.float32)
        pointer = ctypes.c_void_p
        status = function(
            COLUMN_MAJOR, ctypes.c_char(b"N"), ctypes.c_char(b"L"), n,
            matrix.ctypes.data_as(pointer), n, values.ctypes.data_as(pointer),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"{name}_2stage failed with info {status}")
        return values

    return solve


def tridiagonal_then_sterf(gram: np.ndarray) -> np.ndarray:
    """ssytrd with its optimal workspace, then ssterf on the tridiagonal matrix."""
    lwork = int(lapack.ssytrd_lwork(gram.shape[0], lower=1)[0])
    _, diagonal, off_diagonal, _, info = lapack.ssytrd(gram, lower=1, lwork=lwork)
    if info != 0:
        raise RuntimeError(f"ssytrd failed with info {info}")
    return scipy.linalg.eigvalsh_tridiagonal(diagonal, off_diagonal, lapack_driver="sterf")


def eigensolvers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every values-only eigensolver available here, by name, each with its optimal workspace.

    SciPy's wrappers default to the minimal workspace, with which the
    tridiagonal reduction runs with narrower blocks; the workspace queries
    give the sizes LAPACK prefers. ``syevr`` is the call `diff` makes.
    """
    n_of = lambda g: g.shape[0]  # noqa: E731
    solvers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "syevr": lambda g: nogil.eigenvalues_lower(np.array(g, order="F")),
        "syevd": lambda g: lapack.ssyevd(
            g, compute_v=0, lower=1, **_workspace(lapack.ssyevd_lwork(n_of(g), compute_v=0))
        )[0],
        "syev": lambda g: lapack.ssyev(
            g, compute_v=0, lower=1, lwork=int(lapack.ssyev_lwork(n_of(g))[0])
        )[0],
        "syevx": lambda g: lapack.ssyevx(
            g, compute_v=0, lower=1, lwork=int(lapack.ssyevx_lwork(n_of(g))[0])
        )[0],
        "sytrd + sterf": tridiagonal_then_sterf,
    }
    for name in ("syev", "syevd"):
        solver = two_stage(name)
        if solver is not None:
            solvers[f"{name} 2-stage"] = solver
    return solvers


def _workspace(query: tuple) -> dict[str, int]:
    """lwork and liwork from a ``*_lwork`` query that returns (work, iwork, info)."""
    work, iwork, info = query
    if info != 0:
        raise RuntimeError(f"workspace query failed with info {info}")
    return {"lwork": int(work), "liwork": int(iwork)}


def measure_shape(shape: tuple[int, int], scratch: Path) -> dict:
    """Floor seconds and each eigensolver's seconds on one slowly decaying layer."""
    base, tuned = write_decaying_pair(
        scratch, {"layer.weight": shape}, {"layer.weight": SLOW_DECAY}, 0.1, seed=sum(shape)
    )
    floor, gram = median_seconds(lambda: floor_and_gram(base, tuned), REPEATS)
    reference = np.linalg.eigvalsh(np.tril(gram) + np.tril(gram, -1).T)
    seconds = {}
    for name, solve in eigensolvers().items():
        seconds[name], values = median_seconds(lambda solve=solve: solve(gram), REPEATS)
        error = np.max(np.abs(np.sort(values) - reference)) / reference[-1]
        if error > 1e-4:  # float32 rounding is ~1e-6 of λ₁; anything more is a wrong call
            raise RuntimeError(f"{name} disagrees with eigvalsh on {shape}: {error:.1e}")
    return {"shape": list(shape), "floor_seconds": floor, "eigensolver_seconds": seconds}


def least_ratio(row: dict) -> float:
    """1 + the fastest eigensolve over the floor: the least (a)/(b) of an exact method."""
    return 1.0 + min(row["eigensolver_seconds"].values()) / row["floor_seconds"]


def block_ratio(rows: list[dict]) -> float:
    """The same bound over one block: every layer's floor plus its fastest eigensolve."""
    floor = sum(row["floor_seconds"] * row["layers_per_block"] for row in rows)
    solve = sum(min(row["eigensolver_seconds"].values()) * row["layers_per_block"] for row in rows)
    return 1.0 + solve / floor


def markdown(record: dict) -> str:
    """The results table, from the saved record."""
    env, rows = record["machine"], record["shapes"]
    names = list(dict.fromkeys(name for row in rows for name in row["eigensolver_seconds"]))
    table = []
    for row in rows:
        times = row["eigensolver_seconds"]
        table.append(
            [row["model"], row["kinds"], "×".join(map(str, row["shape"]))]
            + [f"{row['floor_seconds']:.3f} s"]
            + [f"{times[name]:.3f} s" if name in times else "-" for name in names]
            + [f"**{least_ratio(row):.2f}**"]
        )
    text = "# Values-only eigensolvers against the floor, on slowly decaying layers\n\n"
    text += f"Machine: {env['cores']} cores; numpy {env['numpy']}, scipy {env['scipy']}. "
    text += f"Medians of {record['repeats']}. ΔW = G·diag(i^-½) (BF16 pair), float32 Gram "
    text += "matrix of the smaller side. Floor = read both tensors + form ΔW + one SYRK. "
    text += "Least (a)/(b) = 1 + fastest eigensolve / floor: what an exact analysis of "
    text += "such a layer costs against the floor at best.\n\n"
    text += markdown_table(["model", "layers", "shape", "floor", *names, "least (a)/(b)"], table)
    text += "\nOver one block (every layer its floor plus its fastest eigensolve):\n\n"
    for model, ratio in record["block_ratios"].items():
        text += f"- {model}: least (a)/(b) = **{ratio:.2f}**\n"
    return text


def main() -> None:
    """Measure every layer shape of the pipeline models; write results/eigensolvers.*."""
    rows, block_ratios = [], {}
    for model in MODELS:
        model_rows = []
        for kinds, shape in block_shapes(model).items():
            print(f"eigensolvers: {model.name}, {shape} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
                row = measure_shape(shape, Path(scratch))
            row |= {"model": model.name, "kinds": kinds, "layers_per_block": kinds.count("/") + 1}
            model_rows.append(row)
        block_ratios[model.name] = block_ratio(model_rows)
        rows += model_rows
    record = {"machine": machine(), "repeats": REPEATS, "shapes": rows}
    record["block_ratios"] = block_ratios
    write_results("eigensolvers", record, markdown)


if __name__ == "__main__":
    main()
