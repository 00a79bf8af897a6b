"""Matching base and tuned names, classifying tensors and explaining what is skipped."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from svdrank.errors import PairingError
from svdrank.inputs.checkpoint import open_checkpoint
from svdrank.inputs.names import name_modules
from svdrank.inputs.pairing import find_prefixes, pair_checkpoints
from tests.conftest import SAMPLES, write_checkpoint

Q = "model.layers.1.self_attn.q_proj.weight"
Q11 = "model.layers.11.self_attn.q_proj.weight"


def _pair(tmp_path, base: dict, tuned: dict, **options):
    base_ckpt = open_checkpoint(write_checkpoint(tmp_path / "base.safetensors", base))
    tuned_ckpt = open_checkpoint(write_checkpoint(tmp_path / "tuned.safetensors", tuned))
    return pair_checkpoints(base_ckpt, tuned_ckpt, **options)


def _m(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


@pytest.mark.parametrize(
    ("base_prefix", "tuned_prefix"),
    [("", "model."), ("model.", ""), ("", "base_model.model."), ("", "")],
)
def test_one_consistent_prefix_difference_is_tolerated(tmp_path, base_prefix, tuned_prefix):
    names = ["layers.0.q_proj.weight", "layers.0.v_proj.weight", "layers.1.q_proj.weight"]
    base = {base_prefix + name: _m(8, 4) for name in names}
    tuned = {tuned_prefix + name: _m(8, 4) for name in names}

    pairing = _pair(tmp_path, base, tuned)

    assert [layer.name for layer in pairing.layers] == [base_prefix + name for name in names]
    assert [layer.tuned.name for layer in pairing.layers] == [tuned_prefix + n for n in names]
    assert pairing.skipped == ()


def test_find_prefixes_prefers_no_prefix_on_a_tie():
    assert find_prefixes(["a.w", "b.w"], ["a.w", "b.w"]) == ("", "")


def test_every_skip_reason_is_reported(tmp_path):
    base = {
        Q: _m(8, 8),
        "model.norm.weight": _m(8),
        "model.position_ids": np.zeros((1, 8), np.int64),
        "lm_head.weight": _m(10, 8),
        "model.only_base.weight": _m(4, 4),
        "model.conv.weight": _m(4, 3, 2, 2),
        "model.layers.1.mlp.up_proj.weight": _m(16, 8),
    }
    tuned = {
        Q: _m(8, 8),
        "model.norm.weight": _m(8),
        "model.position_ids": np.zeros((1, 8), np.int64),
        "lm_head.weight": _m(12, 8),
        "model.only_tuned.weight": _m(4, 4),
        "model.conv.weight": _m(4, 3, 2, 2),
        "model.layers.1.mlp.up_proj.weight": _m(16, 8),
    }

    pairing = _pair(tmp_path, base, tuned, exclude=["*.mlp.*"])

    assert [layer.name for layer in pairing.layers] == [Q]
    reasons = {item.name: item.reason for item in pairing.skipped}
    assert reasons == {
        "model.norm.weight": "not-2d",
        "model.position_ids": "not-floating",
        "lm_head.weight": "shape-mismatch",
        "model.only_base.weight": "only-in-base",
        "model.only_tuned.weight": "only-in-tuned",
        "model.conv.weight": "conv",
        "model.layers.1.mlp.up_proj.weight": "excluded",
    }
    mismatch = next(item for item in pairing.skipped if item.reason == "shape-mismatch")
    assert "base [10, 8], tuned [12, 8]" in mismatch.explanation


def test_conv_kernels_are_reshaped_with_include_conv(tmp_path):
    tensors = {"unet.conv_in.weight": _m(4, 3, 2, 5)}

    pairing = _pair(tmp_path, tensors, tensors, include_conv=True)

    (layer,) = pairing.layers
    assert (layer.shape, layer.role) == ((4, 30), "conv")


def test_layer_vocabulary_module_kind_block_and_role(tmp_path):
    tensors = {
        Q11: _m(8, 8),
        "model.embed_tokens.weight": _m(32, 8, dtype=ml_dtypes.bfloat16),
        "lm_head.weight": _m(32, 8),
    }

    layers = {layer.name: layer for layer in _pair(tmp_path, tensors, tensors).layers}

    q = layers[Q11]
    assert (q.module, q.kind, q.block, q.role) == (
        "model.layers.11.self_attn.q_proj",
        "self_attn.q_proj",
        11,
        "linear",
    )
    assert layers["model.embed_tokens.weight"].role == "embedding"
    assert layers["lm_head.weight"].role == "lm_head"
    assert layers["lm_head.weight"].block is None


def test_include_patterns_keep_only_matching_modules(tmp_path):
    tensors = {Q: _m(8, 8), Q11: _m(8, 8), "model.layers.1.mlp.up_proj.weight": _m(8, 8)}

    pairing = _pair(tmp_path, tensors, tensors, include=["*.layers.1.*"])

    assert [layer.name for layer in pairing.layers] == ["model.layers.1.mlp.up_proj.weight", Q]


def test_no_layers_in_common_is_a_pairing_error(tmp_path):
    with pytest.raises(PairingError, match=r"no layers in common.*1 only-in-base"):
        _pair(tmp_path, {"a.weight": _m(4, 4)}, {"b.weight": _m(5, 5), "c.weight": _m(5, 5)})


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("model.layers.3.mlp.up_proj", 3),
        ("h.17.attn.c_attn", 17),
        ("lm_head", None),
        ("layers.0.proj", 0),
        ("model.mm_projector.0", None),
    ],
)
def test_block_is_the_first_integer_component(name, block):
    assert name_modules([name])[name].block == block


def test_sample_pair_has_the_layers_and_skips_it_was_built_with():
    pairing = pair_checkpoints(
        open_checkpoint(SAMPLES / "base.safetensors"), open_checkpoint(SAMPLES / "tuned-sharded")
    )

    assert len(pairing.layers) == 4 * 7 + 1
    reasons = {item.name: item.reason for item in pairing.skipped}
    assert reasons["lm_head.weight"] == "shape-mismatch"
    assert reasons["model.position_ids"] == "not-floating"
    assert sum(reason == "not-2d" for reason in reasons.values()) == 9
