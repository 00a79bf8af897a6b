"""The storage-noise floor's cost, and what stopping at τ saves, in `svdrank diff`.

Two measurements, each against `svdrank diff --noise off` in the same run
(runs interleaved, page cache warm, medians of ``REPEATS``):

- **cost** on the pipeline benchmark's BF16 pairs (TinyLlama shapes, 4
  blocks; updates at 10 % of ‖W‖ decaying fast, mixed or slow): the bounds
  pass in the reader, the bracket decisions and whatever full estimates of τ
  the layers need. Target: ≤ 15 % over ``--noise off``.
- **saving** on noisy pairs: a rank-8 update at 0.1 % of ‖W‖ merged into BF16
  (the README's example, at 7B shapes), where raw spectra need every value
  and the noise-aware run stops once the values fall to τ.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from benchmarks.common import REPEATS, machine, markdown_table, write_results
from benchmarks.pipeline import MODELS, REGIMES, run_diff, warm_page_cache, write_pair

NOISY_SHAPES = {"q_proj.weight": (4096, 4096), "up_proj.weight": (11008, 4096)}
"""The noisy pair: one attention and one MLP matrix of Llama-2-7B's shapes."""


def write_noisy_pair(directory: Path, rank: int = 8, relative: float = 1e-3) -> tuple[Path, Path]:
    """Write a BF16 pair whose update is rank ``rank`` at ``relative`` of ‖W‖ per layer."""
    rng = np.random.default_rng(0)
    base, tuned = {}, {}
    for name, shape in NOISY_SHAPES.items():
        weight = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        wide = weight.astype(np.float32)
        left = rng.standard_normal((shape[0], rank), dtype=np.float32)
        update = left @ rng.standard_normal((rank, shape[1]), dtype=np.float32)
        update *= relative * np.linalg.norm(wide) / np.linalg.norm(update)
        base[name], tuned[name] = weight, (wide + update).astype(ml_dtypes.bfloat16)
    save_file(base, directory / "base.safetensors")
    save_file(tuned, directory / "tuned.safetensors")
    return directory / "base.safetensors", directory / "tuned.safetensors"


def paired_runs(base: Path, tuned: Path, directory: Path) -> dict:
    """Interleaved `diff --noise off` and `--noise auto` runs: medians, RSS, what each did."""
    warm_page_cache(base, tuned)
    outputs = {mode: directory / f"{mode}.json" for mode in ("off", "auto")}
    runs: dict[str, list[tuple[float, int]]] = {"off": [], "auto": []}
    for _ in range(REPEATS):
        for mode, output in outputs.items():
            runs[mode].append(run_diff(base, tuned, output, "--noise", mode))
    result = {}
    for mode, output in outputs.items():
        layers = json.loads(output.read_text())["layers"]
        estimates = [layer["noise"]["estimate"] for layer in layers if layer["noise"]]
        result[mode] = {
            "seconds": statistics.median(seconds for seconds, _ in runs[mode]),
            "peak_rss_bytes": max(rss for _, rss in runs[mode]),
            "values_computed": sum(len(layer["singular_values"]) for layer in layers),
            "bound_layers": estimates.count("bound"),
            "draws_layers": estimates.count("draws"),
            "signal_ranks": [layer["noise"]["signal_rank"] for layer in layers if layer["noise"]],
        }
    result["ratio"] = result["auto"]["seconds"] / result["off"]["seconds"]
    return result


def main() -> None:
    """Measure the cost on the pipeline pairs and the saving on the noisy pair."""
    rows = []
    model = MODELS[0]
    for name, regime in REGIMES.items():
        print(f"noise: {model.name}, {name} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
            base, tuned = write_pair(Path(scratch), model, regime, seed=len(name))
            rows.append(
                {"pair": f"{model.name}, {name}", **paired_runs(base, tuned, Path(scratch))}
            )
    print("noise: rank-8 update at 0.1 % in BF16 ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="svdrank-bench-") as scratch:
        base, tuned = write_noisy_pair(Path(scratch))
        rows.append(
            {
                "pair": "rank 8 at 0.1 % (4096², 11008×4096)",
                **paired_runs(base, tuned, Path(scratch)),
            }
        )
    write_results("noise", {"machine": machine(), "repeats": REPEATS, "pairs": rows}, markdown)


def markdown(record: dict) -> str:
    """The README-linked table, from the saved record."""
    env = record["machine"]
    text = "# The storage-noise floor in `svdrank diff`: cost and saving\n\n"
    text += f"Machine: {env['cores']} cores; numpy {env['numpy']}, scipy {env['scipy']}. "
    text += f"Medians of {record['repeats']} interleaved runs of each mode, page cache warm.\n\n"
    table = [
        [
            row["pair"],
            f"{row['off']['seconds']:.2f} s",
            f"{row['auto']['seconds']:.2f} s",
            f"{row['ratio']:.2f}",
            f"{row['auto']['bound_layers']} / {row['auto']['draws_layers']}",
            f"{row['off']['values_computed']} → {row['auto']['values_computed']}",
            f"{row['off']['peak_rss_bytes'] / 1e6:.0f} → "
            f"{row['auto']['peak_rss_bytes'] / 1e6:.0f} MB",
        ]
        for row in record["pairs"]
    ]
    text += markdown_table(
        [
            "pair",
            "--noise off",
            "--noise auto",
            "auto/off",
            "τ from bounds / draws",
            "values computed",
            "peak RSS",
        ],
        table,
    )
    return text


if __name__ == "__main__":
    main()
