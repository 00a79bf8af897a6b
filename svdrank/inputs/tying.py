"""Tied weights: modules of the runtime model that share one tensor (input embedding and lm_head).

A model with ``tie_word_embeddings`` uses the input embedding's matrix as its
output projection. Adapting both sides of such a pair would add the update
twice when the adapter is merged, so extraction adapts one side only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from svdrank.inputs.model import build_meta_model, transformers_version


def tied_modules(config: Path) -> dict[str, str]:
    """Map each tied module of the model built from ``config`` to the module it shares with.

    Parameters
    ----------
    config : Path
        The model's ``config.json``.

    Returns
    -------
    dict
        Runtime module name → runtime module name of the weight it is tied to
        (``lm_head`` → ``model.embed_tokens``). Empty when nothing is tied or
        transformers is not installed.

    Raises
    ------
    UsageError
        If transformers cannot build the model.
    """
    if transformers_version() is None:
        return {}
    model = build_meta_model(config)
    tied = _tied_keys(model)
    return {
        _module_of(parameter): _module_of(source)
        for parameter, source in tied.items()
        if parameter.endswith(".weight") and source.endswith(".weight")
    }


def _tied_keys(model: Any) -> dict[str, str]:
    """Return the tied parameter → source mapping transformers keeps (≥ 5), else the embeddings'."""
    mapping = getattr(model, "all_tied_weights_keys", None)
    if isinstance(mapping, dict):
        return {str(key): str(value) for key, value in mapping.items()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return {}
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(outputs)]}.weight": f"{names[id(inputs)]}.weight"}


def _module_of(parameter: str) -> str:
    """Return the module that owns a parameter (``lm_head.weight`` → ``lm_head``)."""
    return parameter.rpartition(".")[0]
