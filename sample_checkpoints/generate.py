"""Write the deterministic sample checkpoints that the README and the tests use.

Run from the repository root: ``python sample_checkpoints/generate.py``. It
rewrites every file in this folder (see README.md here for what each one is).
The base and tuned models are a small Llama-shaped network whose per-kind
updates have known, different spectra; files are written by the safetensors
library itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
SEED = 20261123
BLOCKS = 4
HIDDEN = 128
MLP = 352
VOCAB = 512
EXTENDED_VOCAB = 520
BASE_SCALE = 0.05
UPDATE_SCALE = 0.01
ZERO_UPDATE = "model.layers.2.self_attn.v_proj.weight"
ADAPTER_RANK = 16
ADAPTER_TRUE_RANK = 4
ADAPTER_ALPHA = 32
WEAK_DIRECTIONS = 0.2
ENCODER_SEED = 20261124
ENCODER_BLOCKS = 4
ENCODER_HIDDEN = 64
ENCODER_MLP = 128
ENCODER_VOCAB = 128
ENCODER_SPECTRA = {
    "attention.self.query": lambda i: np.where(i <= 2, 1.0, 0.0),
    "attention.self.key": lambda i: np.where(i <= 4, 1.0, 0.0),
    "attention.self.value": lambda i: i**-1.0,
    "attention.output.dense": lambda i: np.exp(-i / 4.0),
    "intermediate.dense": lambda i: np.where(i <= 8, 1.0, 0.0) + 0.02,
    "output.dense": lambda i: i**-2.0,
}
"""The planted spectrum of each kind of the BERT-shaped encoder sample."""


def spectrum(kind: str, size: int, block: int) -> np.ndarray:
    """The singular values planted in one kind's update (before BF16 rounding)."""
    i = np.arange(1, size + 1, dtype=np.float64)
    shapes = {
        "q_proj": np.where(i <= 2 + 2 * block, 1.0, 0.0),  # exactly low rank: 2, 4, 6, 8
        "k_proj": np.where(i <= 8, 1.0, 0.0) + 0.02,  # low rank 8 plus a noise floor
        "v_proj": i**-1.0,  # power law, alpha = 1
        "o_proj": np.exp(-i / 6.0),  # exponential decay
        "gate_proj": i**-0.5,  # power law, alpha = 0.5 (slow, like full fine-tuning)
        "up_proj": np.where(i <= 16, 1.0, 0.0) + 0.05,  # low rank 16 plus noise
        "down_proj": i**-2.0,  # power law, alpha = 2 (fast)
        "embed_tokens": np.where(i <= 4, 1.0, 0.0),
    }
    return shapes[kind]


def planted(rng: np.random.Generator, shape: tuple[int, int], sigma: np.ndarray) -> np.ndarray:
    """A matrix with singular values ``sigma`` and random orthonormal singular vectors."""
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, sigma.size)))
    v, _ = np.linalg.qr(rng.standard_normal((n, sigma.size)))
    update = (u * sigma) @ v.T
    return update * (UPDATE_SCALE * np.sqrt(m * n) / np.linalg.norm(update))


def matrices() -> dict[str, tuple[int, int]]:
    """Every 2-D weight of the model with its (out, in) shape."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for block in range(BLOCKS):
        attn = f"model.layers.{block}.self_attn"
        mlp = f"model.layers.{block}.mlp"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{attn}.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{mlp}.gate_proj.weight"] = (MLP, HIDDEN)
        shapes[f"{mlp}.up_proj.weight"] = (MLP, HIDDEN)
        shapes[f"{mlp}.down_proj.weight"] = (HIDDEN, MLP)
    return shapes


def models(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The base and tuned tensors in float64, before rounding to the stored dtype."""
    base, tuned = {}, {}
    for name, shape in matrices().items():
        kind = name.split(".")[-2]
        block = int(name.split(".")[2]) if ".layers." in name else 0
        weight = rng.standard_normal(shape) * BASE_SCALE
        base[name] = weight
        update = (
            0.0 if name == ZERO_UPDATE else planted(rng, shape, spectrum(kind, min(shape), block))
        )
        tuned[name] = weight + update
    for block in range(BLOCKS):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{block}.{norm}.weight"
            base[name] = np.ones(HIDDEN)
            tuned[name] = np.ones(HIDDEN) + rng.standard_normal(HIDDEN) * 0.01
    base["model.norm.weight"] = np.ones(HIDDEN)
    tuned["model.norm.weight"] = np.ones(HIDDEN)
    base["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN)) * BASE_SCALE
    tuned["lm_head.weight"] = rng.standard_normal((EXTENDED_VOCAB, HIDDEN)) * BASE_SCALE
    return base, tuned


def as_stored(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Round to BF16 and add the integer buffer real checkpoints carry."""
    stored = {name: value.astype(ml_dtypes.bfloat16) for name, value in tensors.items()}
    stored["model.position_ids"] = np.arange(64, dtype=np.int64)[None, :]
    return stored


def write_sharded(tensors: dict[str, np.ndarray], directory: Path, shards: int = 2) -> None:
    """Split tensors over shard files and write a Hugging Face style index."""
    directory.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(value.nbytes for value in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_adapter(rng: np.random.Generator, directory: Path) -> None:
    """A PEFT LoRA adapter of rank 16 on q_proj and v_proj: 4 strong directions, 12 weak."""
    directory.mkdir()
    tensors = {}
    for block in range(BLOCKS):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{block}.self_attn.{proj}"
            a = rng.standard_normal((ADAPTER_RANK, HIDDEN)) * 0.01
            b = rng.standard_normal((HIDDEN, ADAPTER_RANK)) * 0.01
            a[ADAPTER_TRUE_RANK:] *= WEAK_DIRECTIONS
            b[:, ADAPTER_TRUE_RANK:] *= WEAK_DIRECTIONS
            tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = b.astype(np.float32)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "sample_checkpoints/base.safetensors",
        "r": ADAPTER_RANK,
        "lora_alpha": ADAPTER_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encoder_shapes() -> dict[str, tuple[int, int]]:
    """Every 2-D weight of the BERT-shaped encoder with its (out, in) shape."""
    shapes = {"embeddings.word_embeddings.weight": (ENCODER_VOCAB, ENCODER_HIDDEN)}
    square = (ENCODER_HIDDEN, ENCODER_HIDDEN)
    for block in range(ENCODER_BLOCKS):
        for kind in ENCODER_SPECTRA:
            shape = {
                "intermediate.dense": (ENCODER_MLP, ENCODER_HIDDEN),
                "output.dense": (ENCODER_HIDDEN, ENCODER_MLP),
            }.get(kind, square)
            shapes[f"encoder.layer.{block}.{kind}.weight"] = shape
    shapes["pooler.dense.weight"] = square
    return shapes


def write_encoder() -> None:
    """A BERT-shaped encoder pair in F32 whose six kinds end in only three names."""
    rng = np.random.default_rng(ENCODER_SEED)
    base, tuned = {}, {}
    for name, shape in encoder_shapes().items():
        kind = name.split(".", 3)[-1].removesuffix(".weight")
        weight = rng.standard_normal(shape) * BASE_SCALE
        base[name] = weight.astype(np.float32)
        if kind in ENCODER_SPECTRA:
            i = np.arange(1, min(shape) + 1, dtype=np.float64)
            weight = weight + planted(rng, shape, ENCODER_SPECTRA[kind](i))
        tuned[name] = weight.astype(np.float32)
    save_file(base, HERE / "encoder-base.safetensors", metadata={"format": "pt"})
    save_file(tuned, HERE / "encoder-tuned.safetensors", metadata={"format": "pt"})


def main() -> None:
    """Rewrite every sample file."""
    rng = np.random.default_rng(SEED)
    base, tuned = models(rng)
    for stale in ("tuned-sharded", "adapter"):
        shutil.rmtree(HERE / stale, ignore_errors=True)
    save_file(as_stored(base), HERE / "base.safetensors", metadata={"format": "pt"})
    save_file(as_stored(tuned), HERE / "tuned.safetensors", metadata={"format": "pt"})
    write_sharded(as_stored(tuned), HERE / "tuned-sharded")
    write_adapter(rng, HERE / "adapter")
    write_encoder()


if __name__ == "__main__":
    main()
