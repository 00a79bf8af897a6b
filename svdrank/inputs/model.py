"""The model a checkpoint belongs to: its ``config.json`` and the names ``transformers`` gives it.

``transformers`` ≥ 5 renames some checkpoints' tensors when it loads them
(ViT's ``encoder.layer.0.attention.attention.query`` becomes
``layers.0.attention.q_proj``; Mixtral's ``block_sparse_moe.experts.3.w1``
becomes part of the fused parameter ``mlp.experts.gate_up_proj``). A PEFT
config keyed by checkpoint names then misses those modules without a word.
This module builds the model from its config on the ``meta`` device (no
weights, no memory), renames every checkpoint tensor with transformers' own
conversion rules (the ones ``from_pretrained`` applies) and says which module
or parameter of the runtime model each layer's update lands in.

``transformers`` and ``torch`` are optional (``svdrank[hf]``); without them
the checkpoint's own names stand and :func:`read_model_info` still reads the
config.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from svdrank.errors import CheckpointError, SvdrankWarning, UsageError
from svdrank.files import is_regular_file, read_json_object
from svdrank.inputs.names import natural_key
from svdrank.types import PARAMETER, ModelInfo, Target

CONFIG_NAME = "config.json"
"""The Hugging Face model config next to a checkpoint's weights."""
HF_EXTRA = "pip install 'svdrank[hf]'"
"""How to install what mapping names to the runtime model needs."""
MODULE_WEIGHTS = frozenset({"weight"})
"""The parameter of a module that LoRA adapts through ``target_modules``; any other name
(a fused expert tensor such as ``gate_up_proj``) is reached through ``target_parameters``."""


def model_config_path(checkpoint: str | Path) -> Path | None:
    """Find the ``config.json`` of a checkpoint: in its directory, or beside its file.

    Parameters
    ----------
    checkpoint : str or Path
        What the user named: a ``.safetensors`` file, a shard directory or an index file.

    Returns
    -------
    Path or None
        The config, when it is a regular file there.
    """
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    config = folder / CONFIG_NAME
    return config if is_regular_file(config) else None


def read_model_info(config: Path, transformers_version: str | None = None) -> ModelInfo:
    """Read the model type and architecture of a ``config.json`` (no transformers needed).

    Raises
    ------
    CheckpointError
        If the file is not a JSON object.
    """
    record = read_json_object(config, "model config", CheckpointError)
    architectures = record.get("architectures")
    architecture = (
        architectures[0]
        if isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
        else ""
    )
    model_type = record.get("model_type")
    return ModelInfo(
        config=str(config),
        model_type=model_type if isinstance(model_type, str) else "",
        architecture=architecture,
        transformers=transformers_version,
    )


def transformers_version() -> str | None:
    """Return the installed transformers version, when it and torch can be imported; else None."""
    try:
        importlib.import_module("torch")
        module = importlib.import_module("transformers")
    except ImportError:
        return None
    return str(module.__version__)


def build_meta_model(config: Path) -> Any:
    """Build the model ``transformers`` makes from a ``config.json``, on the meta device.

    The class is the config's first ``architectures`` entry (what
    ``from_pretrained`` of the Auto classes picks), else ``AutoModel``. Nothing is
    downloaded (``local_files_only``) and no custom code runs
    (``trust_remote_code`` stays off). Parameters live on ``meta``: no memory,
    no initialisation.

    Raises
    ------
    UsageError
        If transformers is not installed or cannot build the model.
    """
    try:
        torch = importlib.import_module("torch")
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise UsageError(
            f"mapping names to the model needs transformers and torch: {HF_EXTRA}"
        ) from None
    try:
        model_config = transformers.AutoConfig.from_pretrained(
            str(config.parent), local_files_only=True
        )
        architectures = getattr(model_config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model_class is not None:
                return model_class(model_config)
            return transformers.AutoModel.from_config(model_config)
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        detail = " ".join(str(exc).split())[:300]
        raise UsageError(
            f"{config}: transformers {transformers.__version__} cannot build this model "
            f"({type(exc).__name__}: {detail})"
        ) from None


def runtime_names(model: Any, tensor_names: Iterable[str]) -> dict[str, str]:
    """Rename checkpoint tensors as ``from_pretrained`` does, and keep those the model has.

    Applies the model's weight conversions (transformers'
    ``get_model_conversion_mapping`` and ``rename_source_key``: renamings first,
    then at most one converter, then the base-model prefix added or removed) to
    every name, in the natural order the loader uses (some renamings are
    guarded by an earlier key). transformers < 5 renames nothing at load, so the
    names only gain or lose the base-model prefix.

    Returns
    -------
    dict
        Checkpoint tensor name → runtime parameter name, for the names that
        match a parameter of ``model``.
    """
    parameters = dict(model.state_dict())
    renamings, converters = _conversions(model)
    prefix = getattr(model, "base_model_prefix", "") or None
    found = {}
    for name in sorted(tensor_names, key=natural_key):
        renamed = _rename(name, renamings, converters, prefix, parameters)
        if renamed in parameters:
            found[name] = renamed
    return found


def _conversions(model: Any) -> tuple[list[Any], list[Any]]:
    """Return the model's weight renamings and converters (both empty before transformers 5)."""
    try:
        mapping = importlib.import_module("transformers.conversion_mapping")
        loading = importlib.import_module("transformers.core_model_loading")
    except ImportError:
        return [], []
    transforms = mapping.get_model_conversion_mapping(model)
    renamings = [item for item in transforms if isinstance(item, loading.WeightRenaming)]
    converters = [item for item in transforms if isinstance(item, loading.WeightConverter)]
    return renamings, converters


def _rename(
    name: str,
    renamings: list[Any],
    converters: list[Any],
    prefix: str | None,
    parameters: dict[str, Any],
) -> str:
    """One checkpoint name as the runtime model knows it (or unchanged when nothing applies)."""
    if renamings or converters:
        loading = importlib.import_module("transformers.core_model_loading")
        renamed, _ = loading.rename_source_key(name, renamings, converters, prefix, parameters)
        return str(renamed)
    if prefix and name not in parameters:
        if f"{prefix}.{name}" in parameters:
            return f"{prefix}.{name}"
        if name.startswith(f"{prefix}.") and name.removeprefix(f"{prefix}.") in parameters:
            return name.removeprefix(f"{prefix}.")
    return name


def target_of(model: Any, parameter: str) -> Target:
    """Return the module PEFT adapts for one runtime parameter, or the parameter itself.

    A module's ``weight`` is reached through the module when PEFT's LoRA has a
    layer for its class (``Linear``, ``Embedding``, ``Conv1d/2d/3d`` and
    transformers' ``Conv1D``, subclasses included; the type recorded is that
    base class); any other parameter (a fused 3-D expert tensor, the weight of
    a custom router module) only through ``target_parameters``.
    """
    owner, _, leaf = parameter.rpartition(".")
    if leaf in MODULE_WEIGHTS and owner:
        module = model.get_submodule(owner)
        for supported in _lora_module_classes():
            if isinstance(module, supported):
                return Target(owner, supported.__name__)
    return Target(parameter, PARAMETER)


def _lora_module_classes() -> tuple[type, ...]:
    """Return the module classes PEFT's LoRA adapts by module (transformers' Conv1D first)."""
    torch = importlib.import_module("torch")
    pytorch_utils = importlib.import_module("transformers.pytorch_utils")
    nn = torch.nn
    return (pytorch_utils.Conv1D, nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def runtime_targets(
    config: Path, tensor_names: Iterable[str]
) -> tuple[ModelInfo, dict[str, Target]]:
    """Map checkpoint tensors to where their updates land in the model transformers builds.

    Parameters
    ----------
    config : Path
        The checkpoint's ``config.json``.
    tensor_names : iterable of str
        Every tensor name of the checkpoint (the loader's renamings may be
        guarded by other keys, so pass them all, not only the layers').

    Returns
    -------
    ModelInfo
        With the transformers version that did the mapping; None there when
        transformers is not installed (and the dict is then empty).
    dict
        Checkpoint tensor name → :class:`~svdrank.types.Target`, for every
        tensor the runtime model has.

    Warns
    -----
    SvdrankWarning
        When transformers is missing or cannot build the model: the
        checkpoint's own names stand.
    """
    version = transformers_version()
    if version is None:
        warnings.warn(
            f"{config} names a Hugging Face model, but transformers is not installed: module "
            "names stay the checkpoint's, and transformers ≥ 5 renames some architectures' "
            f"modules at load (ViT, Mixtral and other MoE models…); {HF_EXTRA} to map them",
            SvdrankWarning,
            stacklevel=2,
        )
        return read_model_info(config), {}
    info = read_model_info(config, version)
    try:
        model = build_meta_model(config)
    except UsageError as exc:
        warnings.warn(f"{exc}; module names stay the checkpoint's", SvdrankWarning, stacklevel=2)
        return read_model_info(config), {}
    names = runtime_names(model, tensor_names)
    return info, {name: target_of(model, renamed) for name, renamed in names.items()}


def adapted_ranks(config: Path, lora_kwargs: dict[str, Any]) -> dict[str, int]:
    """Apply a PEFT LoRA config to the model built from ``config`` and read the ranks it gives.

    The real consumer decides: ``peft.get_peft_model`` on the meta-device model
    (:func:`build_meta_model`), so name matching, ``rank_pattern`` and
    ``target_parameters`` follow the installed PEFT exactly.

    Parameters
    ----------
    config : Path
        The model's ``config.json``.
    lora_kwargs : dict
        ``LoraConfig`` keyword arguments (keys LoraConfig does not have, such as
        an ``adapter_config.json``'s ``peft_type``, are ignored).

    Returns
    -------
    dict
        Runtime name → rank PEFT built: the module name for a module, or
        ``<module>.<parameter>`` for a wrapped parameter. Empty when PEFT finds
        no target at all.

    Raises
    ------
    UsageError
        If transformers, torch or peft is missing, the model cannot be built,
        or PEFT refuses the config for another reason than finding no target.
    """
    model = build_meta_model(config)
    try:
        peft = importlib.import_module("peft")
    except ImportError:
        raise UsageError(f"applying a PEFT config needs peft: {HF_EXTRA}") from None
    known = set(peft.LoraConfig.__dataclass_fields__)
    lora_config = peft.LoraConfig(**{k: v for k, v in lora_kwargs.items() if k in known})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(model, lora_config)
    except ValueError as exc:
        if "not found in the base model" in str(exc):
            return {}
        raise UsageError(f"PEFT refuses this config: {' '.join(str(exc).split())[:300]}") from None
    return {
        _adapted_name(name, module): int(module.r["default"])
        for name, module in wrapped.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def _adapted_name(name: str, module: Any) -> str:
    """Return the runtime name of a LoRA layer: its module, or its module and wrapped parameter."""
    name = name.removeprefix("base_model.model.")
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    parameter = getattr(module, "parameter_name", None)
    return f"{name}.{parameter}" if parameter else name
