"""PEFT LoRA adapters as input: the config, and the factors B and A of each module.

A LoRA module adds ΔW = s·B·A with A (r×n), B (m×r) and s = α/r (α/√r with
rsLoRA). This module reads them; :mod:`svdrank.analysis.adapter` turns them
into spectra.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from svdrank.errors import CheckpointError
from svdrank.inputs.checkpoint import Checkpoint
from svdrank.inputs.names import natural_key, pattern_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WRAPPER_PREFIX = "base_model.model."
# PEFT saves linear LoRA as lora_A/lora_B and embedding LoRA as lora_embedding_A/B,
# the adapter name dropped from saved files (kept in some hand-written ones).
_LORA_TENSOR = re.compile(
    r"^(?P<module>.+)\.lora_(?P<embedding>embedding_)?(?P<side>[AB])(?:\.[\w-]+)?(?:\.weight)?$"
)


@dataclass(frozen=True)
class AdapterConfig:
    """What svdrank needs of ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def alpha_of(self, module: str) -> float:
        """lora_alpha of one module, by PEFT's pattern rule (first matching key wins)."""
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale(self, module: str, rank: int) -> float:
        """Return the LoRA scale of a module: s = α/r, or α/√r with rsLoRA."""
        alpha = self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory or its adapter_config.json."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_NAME).is_file()) or path.name == CONFIG_NAME


def adapter_directory(path: str | Path) -> Path:
    """Return the adapter directory, given it or its config file."""
    path = Path(path)
    return path.parent if path.name == CONFIG_NAME else path


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Parse adapter_config.json.

    Raises
    ------
    CheckpointError
        If the file is missing, not JSON, or not a LoRA config.
    """
    path = directory / CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return AdapterConfig(
            r=int(record["r"]),
            lora_alpha=float(record.get("lora_alpha", record["r"])),
            use_rslora=bool(record.get("use_rslora", False)),
            rank_pattern=dict(record.get("rank_pattern") or {}),
            alpha_pattern=dict(record.get("alpha_pattern") or {}),
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable adapter config ({exc})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a LoRA adapter config (bad or missing {exc})") from exc


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name (without PEFT's wrapper prefix) and A, B tensor names."""

    module: str
    a: str
    b: str
    embedding: bool


def lora_modules(weights: Checkpoint) -> list[LoraModule]:
    """Pair every lora_A with its lora_B.

    Raises
    ------
    CheckpointError
        If a module has only one of A and B, or none is found.
    """
    sides: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    for name in weights.tensors:
        match = _LORA_TENSOR.match(name)
        if match:
            module = match["module"].removeprefix(WRAPPER_PREFIX)
            sides.setdefault(module, {})[match["side"]] = name
            embedding[module] = bool(match["embedding"])
    incomplete = [module for module, found in sides.items() if len(found) != 2]
    if incomplete:
        raise CheckpointError(f"{weights.path}: module {incomplete[0]} has lora_A or lora_B only")
    if not sides:
        raise CheckpointError(f"{weights.path}: no lora_A/lora_B tensors in this adapter")
    return [
        LoraModule(module, sides[module]["A"], sides[module]["B"], embedding[module])
        for module in sorted(sides, key=natural_key)
    ]


def lora_factors(weights: Checkpoint, lora: LoraModule) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) as the (m×r, r×n) factors of ΔW = B·A.

    PEFT stores embedding LoRA transposed relative to linear LoRA
    (lora_embedding_A is r×num_embeddings, lora_embedding_B is dim×r, and the
    update of the (num_embeddings×dim) weight is (B·A)ᵀ); the factors are
    returned in the weight's own orientation.
    """
    a, b = weights.read(lora.a), weights.read(lora.b)
    if lora.embedding:
        a, b = b.T, a.T
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"{weights.path}: {lora.module}: lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)} do not multiply"
        )
    return b, a
