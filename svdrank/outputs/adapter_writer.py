"""A PEFT LoRA adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

The weights file is written as the factors are computed, one module at a time,
so the adapter never sits whole in memory: every tensor's shape is known from
the ranks before the first layer is factored, so the safetensors header comes
first and each module's bytes follow in header order.

PEFT's orientation: ``lora_A.weight`` is (r, in) and ``lora_B.weight`` (out, r)
of an ``nn.Linear`` whose weight is (out, in), and the update is s·B·A. A
GPT-2-style ``Conv1D`` stores its weight as (in, out) and an ``nn.Embedding``
as (num_embeddings, dim); PEFT adds (s·B·A)ᵀ to both (``lora_embedding_A`` is
(r, num_embeddings), ``lora_embedding_B`` (dim, r)). A square ``Conv1D``
written in ``Linear`` orientation would load without a word and add ΔWᵀ.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from svdrank.analysis.extract import Factored, FactorQuality
from svdrank.files import dumps, output_directory, write_files_atomically
from svdrank.inputs.adapter import CONFIG_NAME, WEIGHTS_NAME, WRAPPER_PREFIX
from svdrank.inputs.checkpoint import DTYPES
from svdrank.outputs.peft import CONV1D

EMBEDDING = "Embedding"
"""The module type whose factors PEFT names lora_embedding_A/B."""
LINEAR = "Linear"
TRANSPOSED_TYPES = frozenset({CONV1D, EMBEDDING})
"""Module types whose stored weight is the transpose of PEFT's B·A."""
HEADER_ALIGNMENT = 8
"""safetensors pads its JSON header with spaces to a multiple of 8 bytes."""
TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
"""Architecture name suffix → PEFT task type."""


@dataclass(frozen=True)
class AdapterModule:
    """One module of the adapter: PEFT's name for it, its type, ΔW's shape, rank and alpha."""

    name: str
    module_type: str
    shape: tuple[int, int]
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        """PEFT's scale of this module, lora_alpha / r."""
        return self.alpha / self.rank

    def tensors(self) -> list[tuple[str, tuple[int, int]]]:
        """Return the names and shapes of (A, B) in PEFT's file."""
        rows, columns = self.shape
        prefix = f"{WRAPPER_PREFIX}{self.name}"
        if self.module_type == EMBEDDING:
            return [
                (f"{prefix}.lora_embedding_A", (self.rank, rows)),
                (f"{prefix}.lora_embedding_B", (columns, self.rank)),
            ]
        if self.module_type == CONV1D:
            return [
                (f"{prefix}.lora_A.weight", (self.rank, rows)),
                (f"{prefix}.lora_B.weight", (columns, self.rank)),
            ]
        return [
            (f"{prefix}.lora_A.weight", (self.rank, columns)),
            (f"{prefix}.lora_B.weight", (rows, self.rank)),
        ]

    def stored(self, b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (A, B) as PEFT stores them, from ΔW ≈ s·b·a in the checkpoint's orientation."""
        if self.module_type in TRANSPOSED_TYPES:
            return b.T, a.T
        return a, b


def alpha_of(rank: int, max_rank: int, alpha_ratio: float, uniform_alpha: bool) -> float:
    """Return a module's lora_alpha: ratio·r_i, or ratio·max r for every module (uniform)."""
    return _number(alpha_ratio * (max_rank if uniform_alpha else rank))


def adapter_config(
    modules: Iterable[AdapterModule],
    alpha_ratio: float,
    uniform_alpha: bool,
    base_model: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """Return the ``adapter_config.json`` record of an extracted adapter.

    ``r`` is the largest rank, so a loader that reads ranks from the tensors'
    shapes and keeps one scale (vLLM) accepts every module; ``lora_alpha`` is
    ``alpha_ratio·r``. By default each module's alpha is ``alpha_ratio·r_i``
    (in ``alpha_pattern`` where r_i differs from r), so PEFT's α_i/r_i and
    vLLM's α/r are the same ``alpha_ratio`` everywhere; with ``uniform_alpha``
    there is no ``alpha_pattern`` and the scale is α/r_i, as llama.cpp's
    converter applies it. ``fan_in_fan_out`` appears when a ``Conv1D`` is
    adapted; nothing goes to ``modules_to_save``.

    Parameters
    ----------
    modules : iterable of AdapterModule
    alpha_ratio : float
    uniform_alpha : bool
    base_model : str or None
        ``base_model_name_or_path``.
    task_type : str or None
        PEFT's task type (``CAUSAL_LM``…), when known.

    Returns
    -------
    dict
    """
    modules = list(modules)
    top = max(module.rank for module in modules)
    different = [module for module in modules if module.rank != top]
    record: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": alpha_of(top, top, alpha_ratio, uniform_alpha),
        "target_modules": [module.name for module in modules],
        "rank_pattern": {module.name: module.rank for module in different},
        "alpha_pattern": {} if uniform_alpha else {m.name: m.alpha for m in different},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "fan_in_fan_out": any(module.module_type == CONV1D for module in modules),
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return record


def task_type_of(architecture: str) -> str | None:
    """Return PEFT's task type for a transformers architecture name, when the suffix tells it."""
    for suffix, task in TASK_TYPES.items():
        if architecture.endswith(suffix):
            return task
    return None


def safetensors_header(modules: Iterable[AdapterModule], dtype: str, itemsize: int) -> bytes:
    """Return the length prefix and JSON header of the weights file, tensors in write order."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for module in modules:
        for name, shape in module.tensors():
            size = shape[0] * shape[1] * itemsize
            entries[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(header)) + header


def write_weights(
    stream: BinaryIO,
    modules: list[AdapterModule],
    factors: Iterator[tuple[np.ndarray, np.ndarray]],
    dtype: str,
    itemsize: int,
) -> None:
    """Write the weights file: the header, then each module's A and B as they are computed.

    Raises
    ------
    ValueError
        If a factor's shape or byte size is not what the header promised (a bug).
    """
    stream.write(safetensors_header(modules, dtype, itemsize))
    for module, (b, a) in zip(modules, factors, strict=True):
        for (name, shape), tensor in zip(module.tensors(), module.stored(b, a), strict=True):
            if tensor.shape != shape or tensor.itemsize != itemsize:
                raise ValueError(f"{name}: factor {tensor.shape} is not the {shape} announced")
            stream.write(np.ascontiguousarray(tensor).tobytes())


def _number(value: float) -> float | int:
    """Return an int when the value is whole (JSON shows 16, not 16.0)."""
    return int(value) if float(value).is_integer() else value


def write_adapter(
    directory: Path,
    config: dict[str, Any],
    modules: list[AdapterModule],
    factored: Iterable[Factored],
    dtype: str,
) -> list[FactorQuality]:
    """Write the adapter directory: both files appear complete, or neither does.

    The weights are written as ``factored`` yields them (the factoring runs
    inside the write), into temporary files renamed into place at the end; a
    folder created here is removed again on failure.

    Parameters
    ----------
    directory : Path
    config : dict
        The ``adapter_config.json`` record.
    modules : list of AdapterModule
        In the order ``factored`` yields their factors.
    factored : iterable of Factored
    dtype : str
        The safetensors dtype of the factors.

    Returns
    -------
    list of FactorQuality
        One per module, in order.

    Raises
    ------
    UsageError, OutputError
        If the directory cannot be created or written.
    """
    itemsize = DTYPES[dtype].itemsize
    qualities: list[FactorQuality] = []

    def factors() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for item in factored:
            qualities.append(item.quality)
            yield item.b, item.a

    writers: dict[Path, Callable[[BinaryIO], object]] = {
        directory / CONFIG_NAME: lambda stream: stream.write(dumps(config).encode("utf-8")),
        directory / WEIGHTS_NAME: lambda stream: write_weights(
            stream, modules, factors(), dtype, itemsize
        ),
    }
    with output_directory(directory):
        write_files_atomically(writers)
    return qualities
