"""Adapters analysed: the exact spectrum of each PEFT LoRA module's update s·B·A.

With B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, so
σ(s·B·A) = s·σ(R_B·R_Aᵀ): the values come from the r×r core without forming
the m×n product. Cost O((m+n)·r²); exact to working precision. This answers
"how much of my r=64 adapter is real?", kohya's resize_lora.py question, with
the same analysis file the checkpoint diff writes.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy.linalg

from svdrank.errors import NumericalError, PairingError
from svdrank.inputs.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    LoraModule,
    adapter_directory,
    lora_factors,
    lora_modules,
    read_adapter_config,
)
from svdrank.inputs.checkpoint import Checkpoint, describe_input, open_checkpoint
from svdrank.inputs.names import ModuleName, name_modules, role_of, selected
from svdrank.spectra.kernels import check_finite, exact_values
from svdrank.types import Analysis, AnalysisSettings, LayerResult, Skipped, Spectrum


def lora_values(b: np.ndarray, a: np.ndarray, scale: float) -> np.ndarray:
    """Singular values of scale·B·A from the r×r core R_B·R_Aᵀ (no m×n product)."""
    r_b = _thin_r(b)
    r_a = _thin_r(a.T)
    return np.asarray(exact_values(r_b @ r_a.T), dtype=np.float64) * abs(scale)


def _thin_r(factor: np.ndarray) -> np.ndarray:
    """Return the R of a thin QR (min(rows, cols) rows); SciPy's mode="r" pads it with zeros."""
    r = scipy.linalg.qr(factor, mode="r", check_finite=False)[0]
    return r[: min(factor.shape)]


def analyze_adapter(path: str | Path, settings: AnalysisSettings | None = None) -> Analysis:
    """Analyse a PEFT LoRA adapter: one complete spectrum per adapted module.

    Parameters
    ----------
    path : str or Path
        The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
        or its config file.
    settings : AnalysisSettings, optional
        Its metric and include/exclude globs apply; the engine settings do not
        (every spectrum is exact). Default: ``AnalysisSettings()``.

    Returns
    -------
    Analysis
        Layers carry ‖ΔW‖_F of s·B·A and no base norm (there is no base).

    Raises
    ------
    CheckpointError
        For a missing or malformed config or weights file.
    PairingError
        When the include/exclude globs leave no module.
    """
    settings = settings or AnalysisSettings()
    directory = adapter_directory(path)
    config = read_adapter_config(directory)
    weights = open_checkpoint(directory / WEIGHTS_NAME)
    chosen, skipped = [], []
    found = lora_modules(weights)
    names = name_modules([lora.module for lora in found])
    for lora in found:
        if selected(lora.module, settings.include, settings.exclude, names[lora.module]):
            chosen.append(lora)
        else:
            skipped.append(Skipped(lora.module, "excluded"))
    if not chosen:
        raise PairingError(f"{directory}: no adapter module matches --include/--exclude")
    return Analysis(
        inputs={"adapter": describe_input(weights), "config": str(directory / CONFIG_NAME)},
        settings=settings,
        layers=tuple(_adapter_layer(weights, lora, config, names[lora.module]) for lora in chosen),
        skipped=tuple(skipped),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _adapter_layer(
    weights: Checkpoint, lora: LoraModule, config: AdapterConfig, name: ModuleName
) -> LayerResult:
    """Compute one module's spectrum from its LoRA factors."""
    started = time.perf_counter()
    b, a = lora_factors(weights, lora)
    check_finite(a, lora.a)
    check_finite(b, lora.b)
    values = lora_values(b, a, config.scale(lora.module, a.shape[0]))
    with np.errstate(over="ignore"):
        energy = float(np.sum(np.square(values)))
    if not math.isfinite(energy):
        raise NumericalError(
            f"{lora.module}: s·B·A overflows (scale {config.scale(lora.module, a.shape[0]):.3g} "
            "from lora_alpha / r); check lora_alpha in adapter_config.json"
        )
    return LayerResult(
        module=lora.module,
        name=lora.module,
        kind=name.kind,
        block=name.block,
        role=role_of(lora.module.rsplit(".", 1)[-1], 2),
        shape=(b.shape[0], a.shape[1]),
        dtype=weights.tensors[lora.a].dtype,
        delta_norm=math.sqrt(energy),
        base_norm=None,
        spectrum=Spectrum(values, energy, True, "lora"),
        seconds=time.perf_counter() - started,
        stack=name.stack,
        expert=name.expert,
    )
