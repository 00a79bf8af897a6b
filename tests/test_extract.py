"""``svdrank extract`` end to end: the adapter the real PEFT loads, merged against NumPy's SVD.

Tiny models are built from their configs with transformers; every matrix gets a
known low-rank update plus noise (attention rank 1, MLP rank 5, embeddings and
lm_head rank 2). The references are NumPy's SVD of ΔW taken from the stored
tensors, and the real ``PeftModel.from_pretrained`` + ``merge_and_unload``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from svdrank.errors import SvdrankWarning
from tests.conftest import assert_one_line_error, write_checkpoint
from tests.test_naming import tiny_gpt2, tiny_llama

PLANTED = {"self_attn": [1.0], "mlp": [1.0, 0.9, 0.8, 0.7, 0.6], "": [1.0, 0.5]}
"""Planted singular values by where the module sits (relative); the rest is noise."""
NOISE = 0.01
"""Gaussian noise added to each update, as a share of its norm."""
UPDATE = 0.2
"""Each planted update's norm as a share of its weight's."""
DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16}


def _llama(tie: bool = False) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return tiny_llama(tie)


def _gpt2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return tiny_gpt2()


@dataclass(frozen=True)
class Pair:
    """Base and tuned Hugging Face folders, the model class, and ΔW per tensor (float64)."""

    base: Path
    tuned: Path
    model_class: type
    deltas: dict[str, np.ndarray]


def _planted(rng: np.random.Generator, name: str, weight: np.ndarray) -> np.ndarray:
    """A low-rank update with the planted values of the module's place, plus noise."""
    shares = next(values for key, values in PLANTED.items() if key in name)
    rank = len(shares)
    u, _ = np.linalg.qr(rng.standard_normal((weight.shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((weight.shape[1], rank)))
    update = (u * np.asarray(shares)) @ v.T
    update += (
        NOISE * np.linalg.norm(update) * rng.standard_normal(weight.shape) / np.sqrt(weight.size)
    )
    return update * UPDATE * np.linalg.norm(weight) / np.linalg.norm(update)


def make_pair(
    folder: Path,
    model: transformers.PreTrainedModel,
    dtype: str = "F32",
    shards: int = 1,
    extra: dict[str, str] | None = None,
) -> Pair:
    """Save ``model`` as base and tuned folders in ``dtype`` with planted updates.

    ``extra`` maps a tensor name to another whose values it copies on both sides
    (a checkpoint that stores a tied lm_head).
    """
    model.save_pretrained(folder / "saved")
    saved = {
        k: v.astype(np.float64)
        for k, v in load_file(folder / "saved" / "model.safetensors").items()
    }
    for name, source in (extra or {}).items():
        saved[name] = saved[source]
    rng = np.random.default_rng(20250101)
    tuned = {
        name: value + _planted(rng, name, value) if value.ndim == 2 else value
        for name, value in saved.items()
        if name not in (extra or {})
    }
    for name, source in (extra or {}).items():
        tuned[name] = tuned[source]
    stored = {
        side: {name: value.astype(DTYPES[dtype]) for name, value in tensors.items()}
        for side, tensors in (("base", saved), ("tuned", tuned))
    }
    for side, tensors in stored.items():
        (folder / side).mkdir()
        shutil.copy(folder / "saved" / "config.json", folder / side / "config.json")
        _write_shards(folder / side, tensors, shards)
    deltas = {
        name: stored["tuned"][name].astype(np.float64) - stored["base"][name].astype(np.float64)
        for name in saved
        if saved[name].ndim == 2
    }
    return Pair(folder / "base", folder / "tuned", type(model), deltas)


def _write_shards(folder: Path, tensors: dict[str, np.ndarray], shards: int) -> None:
    """Write one model.safetensors, or ``shards`` files with an index."""
    if shards == 1:
        write_checkpoint(folder / "model.safetensors", tensors)
        return
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index::shards]
        write_checkpoint(folder / file, {name: tensors[name] for name in part})
        weight_map |= dict.fromkeys(part, file)
    index_record = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_record))


def _extract(run_cli, pair: Pair, output: Path, *options: str) -> dict:
    result = run_cli("extract", pair.base, pair.tuned, "-o", output, "--format", "json", *options)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _load(model_class: type, base: Path, adapter: Path):
    """Return (PEFT model, its base) loaded in float32 by the real PEFT."""
    model = model_class.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, adapter)


def _lora_parameters(model) -> dict[str, torch.Tensor]:
    """Every LoRA tensor of the PEFT model, named as PEFT saves them (adapter name dropped)."""
    return {
        name.replace(".default", ""): value
        for name, value in model.named_parameters()
        if "lora_" in name
    }


def assert_every_tensor_loaded(model, adapter: Path) -> None:
    """No tensor of the file was ignored and no adapted module was left without weights."""
    stored = load_file(adapter / "adapter_model.safetensors")
    loaded = _lora_parameters(model)
    assert set(stored) == set(loaded)
    for name, value in stored.items():
        expected = torch.from_numpy(value.astype(np.float32))
        assert torch.equal(loaded[name].detach().float(), expected), name


def _truncated(delta: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-r approximation by NumPy's SVD."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _merged_deltas(pair: Pair, adapter: Path) -> dict[str, np.ndarray]:
    """merge_and_unload() − base, per checkpoint tensor name (in the checkpoint's orientation)."""
    merged = _load(pair.model_class, pair.base, adapter).merge_and_unload()
    base = dict(pair.model_class.from_pretrained(pair.base, dtype=torch.float32).state_dict())
    after = dict(merged.state_dict())
    return {
        name: after[name].double().numpy() - base[name].double().numpy()
        for name in pair.deltas
        if name in after
    }


def _logits(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(tokens).logits.double().numpy()


TOKENS = torch.arange(16).reshape(1, 16) % 64


@pytest.fixture(scope="module", params=["F32", "BF16"])
def llama_pair(request, tmp_path_factory) -> Pair:
    return make_pair(tmp_path_factory.mktemp(f"llama-{request.param}"), _llama(), request.param)


def test_llama_adapter_merges_to_the_truncated_svd_of_every_update(run_cli, llama_pair, tmp_path):
    record = _extract(run_cli, llama_pair, tmp_path / "adapter", "--preset", "balanced")
    ranks = {item["module"]: item["rank"] for item in record["modules"]}
    # Balanced keeps 90 % of the planted values: 1 for attention, 5 for the MLP, 2 otherwise.
    for module, rank in ranks.items():
        place = next(key for key in PLANTED if key in module)
        assert rank == len(PLANTED[place]), module
    assert set(ranks) == {name.removesuffix(".weight") for name in llama_pair.deltas}
    model = _load(llama_pair.model_class, llama_pair.base, tmp_path / "adapter")
    assert_every_tensor_loaded(model, tmp_path / "adapter")
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            assert module.r["default"] == ranks[name.removeprefix("base_model.model.")], name
            assert module.scaling["default"] == 2.0, name
    bf16 = "BF16" in llama_pair.base.parent.name
    merged = _merged_deltas(llama_pair, tmp_path / "adapter")
    reported = {item["module"]: item for item in record["modules"]}
    for name, delta in llama_pair.deltas.items():
        item = reported[name.removesuffix(".weight")]
        reference = _truncated(delta, item["rank"])
        # F32 factors: float32 rounding; BF16 factors: 2⁻⁹ per entry of each factor.
        tolerance = 1e-2 if bf16 else 1e-5
        assert np.linalg.norm(merged[name] - reference) <= tolerance * np.linalg.norm(delta), name
        achieved = np.linalg.norm(delta - merged[name]) / np.linalg.norm(delta)
        optimal = np.linalg.norm(delta - reference) / np.linalg.norm(delta)
        np.testing.assert_allclose(item["error"], achieved, rtol=1e-3, err_msg=name)
        np.testing.assert_allclose(item["optimal_error"], optimal, rtol=1e-4, err_msg=name)
        # Within 1 % of Eckart-Young, plus BF16's rounding of the factors (2⁻⁹ per entry).
        assert item["error"] <= 1.01 * optimal + (2**-7 if bf16 else 0.0), name
    assert record["dtype"] == ("BF16" if bf16 else "F32")


def test_recommended_ranks_beat_a_uniform_rank_with_as_many_parameters(
    run_cli, llama_pair, tmp_path
):
    record = _extract(run_cli, llama_pair, tmp_path / "planned", "--preset", "balanced")
    widths = sum(sum(item["shape"]) for item in record["modules"])
    uniform = -(-record["totals"]["params"] // widths)  # the smallest r with at least as many
    other = _extract(run_cli, llama_pair, tmp_path / "uniform", "--rank", str(uniform))
    assert other["totals"]["params"] >= record["totals"]["params"]
    tuned = _logits(
        llama_pair.model_class.from_pretrained(llama_pair.tuned, dtype=torch.float32), TOKENS
    )
    distances = {
        adapter: np.linalg.norm(
            _logits(
                _load(
                    llama_pair.model_class, llama_pair.base, tmp_path / adapter
                ).merge_and_unload(),
                TOKENS,
            )
            - tuned
        )
        for adapter in ("planned", "uniform")
    }
    assert distances["planned"] < 0.5 * distances["uniform"], distances


def test_sharded_inputs_give_the_same_adapter(run_cli, tmp_path):
    single = make_pair(tmp_path / "single", _llama())
    sharded = make_pair(tmp_path / "sharded", _llama(), shards=3)
    _extract(run_cli, single, tmp_path / "a", "--rank", "2")
    _extract(run_cli, sharded, tmp_path / "b", "--rank", "2")
    first = load_file(tmp_path / "a" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_gpt2_conv1d_and_tied_embedding_load_in_their_orientation(run_cli, tmp_path):
    # GPT-2 stores Conv1D weights as (in, out), c_proj is square (32×32), and lm_head is
    # wte itself: the adapter must hold wte's update once, in lora_embedding_A/B.
    pair = make_pair(tmp_path, _gpt2())
    record = _extract(run_cli, pair, tmp_path / "adapter", "--rank", "2")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    types = {item["module"]: item["type"] for item in record["modules"]}
    assert types["transformer.h.0.attn.c_proj"] == "Conv1D"
    assert types["transformer.wte"] == "Embedding"
    model = _load(pair.model_class, pair.base, tmp_path / "adapter")
    assert_every_tensor_loaded(model, tmp_path / "adapter")
    merged = _merged_deltas(pair, tmp_path / "adapter")
    for name, delta in pair.deltas.items():
        reference = _truncated(delta, 2)
        assert np.linalg.norm(merged[name] - reference) <= 1e-5 * np.linalg.norm(delta), name


@pytest.mark.filterwarnings("ignore:Model with `tie_word_embeddings=True`")
def test_tied_lm_head_stored_twice_is_adapted_once(run_cli, tmp_path):
    pair = make_pair(
        tmp_path, _llama(tie=True), extra={"lm_head.weight": "model.embed_tokens.weight"}
    )
    result = run_cli(
        "extract",
        pair.base,
        pair.tuned,
        "-o",
        tmp_path / "adapter",
        "--rank",
        "2",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert "lm_head" not in {item["module"] for item in record["modules"]}
    assert record["left_out"] == [
        {"module": "lm_head", "reason": "tied to a module the adapter holds: merged through it"}
    ]
    assert "lm_head" in result.stderr
    merged = _merged_deltas(pair, tmp_path / "adapter")
    delta = pair.deltas["model.embed_tokens.weight"]
    # Merged once: W + ΔW_2, not W + 2·ΔW_2 (the shared tensor is both sides).
    reference = _truncated(delta, 2)
    assert np.linalg.norm(merged["model.embed_tokens.weight"] - reference) <= 1e-5 * np.linalg.norm(
        delta
    )


def test_uniform_alpha_keeps_the_merge_exact_with_one_lora_alpha(run_cli, tmp_path):
    pair = make_pair(tmp_path, _llama())
    _extract(run_cli, pair, tmp_path / "adapter", "--preset", "balanced", "--uniform-alpha")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["alpha_pattern"] == {} and config["lora_alpha"] == 2 * config["r"] == 10
    assert set(config["rank_pattern"].values()) == {1, 2}
    merged = _merged_deltas(pair, tmp_path / "adapter")
    ranks = {name: len(next(v for k, v in PLANTED.items() if k in name)) for name in pair.deltas}
    for name, delta in pair.deltas.items():
        reference = _truncated(delta, ranks[name])
        assert np.linalg.norm(merged[name] - reference) <= 1e-5 * np.linalg.norm(delta), name


def test_resized_adapter_merges_to_the_truncation_of_the_adapter_update(run_cli, tmp_path):
    pair = make_pair(tmp_path, _llama())
    _extract(run_cli, pair, tmp_path / "wide", "--rank", "8", "--alpha-ratio", "0.5")
    result = run_cli(
        "extract",
        tmp_path / "wide",
        "-o",
        tmp_path / "small",
        "--preset",
        "balanced",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    wide = _merged_deltas(pair, tmp_path / "wide")
    small = _merged_deltas(pair, tmp_path / "small")
    model = _load(pair.model_class, pair.base, tmp_path / "small")
    assert_every_tensor_loaded(model, tmp_path / "small")
    for item in record["modules"]:
        name = f"{item['module']}.weight"
        reference = _truncated(wide[name], item["rank"])
        assert np.linalg.norm(small[name] - reference) <= 1e-5 * np.linalg.norm(wide[name]), name
        place = next(key for key in PLANTED if key in name)
        assert item["rank"] == len(PLANTED[place]), name


def test_analysis_file_of_the_same_pair_is_reused(run_cli, tmp_path):
    pair = make_pair(tmp_path, _llama())
    assert run_cli("diff", pair.base, pair.tuned, "-o", tmp_path / "a.json", "-q").exit_code == 0
    first = _extract(run_cli, pair, tmp_path / "x", "--preset", "balanced")
    second = _extract(run_cli, pair, tmp_path / "y", "--analysis", tmp_path / "a.json")
    assert first["modules"] == [
        {
            **item,
        }
        for item in second["modules"]
    ]


def test_analysis_file_of_another_pair_is_one_line_error(run_cli, tmp_path):
    pair = make_pair(tmp_path / "one", _llama())
    other = make_pair(tmp_path / "two", _llama(tie=True))
    assert run_cli("diff", other.base, other.tuned, "-o", tmp_path / "a.json", "-q").exit_code == 0
    result = run_cli(
        "extract", pair.base, pair.tuned, "-o", tmp_path / "out", "--analysis", tmp_path / "a.json"
    )
    assert_one_line_error(result, "a.json", "header SHA-256")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--rank", "2", "--preset", "balanced"), "give one of"),
        (("--rank", "0"), "uniform rank must be ≥ 1"),
        (("--rank", "2", "--max-rank", "4"), "apply to rank rules only"),
        (("--alpha-ratio", "-1"), "--alpha-ratio"),
        (("--energy", "1.5"), "(0, 1]"),
    ],
)
def test_bad_options_are_one_line_errors_and_write_nothing(run_cli, tmp_path, options, fragment):
    pair = make_pair(tmp_path, _llama())
    result = run_cli("extract", pair.base, pair.tuned, "-o", tmp_path / "out", *options)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_identical_checkpoints_have_nothing_to_extract(run_cli, tmp_path):
    pair = make_pair(tmp_path, _llama())
    result = run_cli("extract", pair.base, pair.base, "-o", tmp_path / "out")
    assert_one_line_error(result, "no layer to adapt")
    assert not (tmp_path / "out").exists()


def test_changed_biases_are_reported(run_cli, tmp_path):
    pair = make_pair(tmp_path, _gpt2())
    tensors = load_file(pair.tuned / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.bias"] += 1.0
    write_checkpoint(pair.tuned / "model.safetensors", tensors)
    result = run_cli(
        "extract", pair.base, pair.tuned, "-o", tmp_path / "out", "--rank", "1", "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    assert (
        "1 bias, norm or other non-matrix tensors changed (transformer.h.0.attn.c_attn.bias)"
        in result.stderr
    )


def test_library_extract_matches_the_command_line(tmp_path):
    from svdrank import extract

    pair = make_pair(tmp_path, _llama())
    with pytest.warns(SvdrankWarning, match="fall below F16's normal range"):
        result = extract(pair.base, pair.tuned, tmp_path / "adapter", energy=0.9, dtype="fp16")
    assert {layer.dtype for layer in result.layers} == {"F16"}
    assert result.worst_error <= 1.01 * max(layer.optimal for layer in result.layers) + 1e-3
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {value.dtype for value in stored.values()} == {np.dtype(np.float16)}
