"""Stack, block, expert and kind of every module, across the model families people tune.

The name lists are written from the real checkpoints of each family; the end-to-end
tests build tiny random models with transformers, plant a known rank-3 update in every
matrix, run the real command line on them and hand its PEFT config to the real PEFT.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from svdrank.inputs.names import ModuleName, module_of, name_modules, short_kinds
from tests.conftest import SAMPLES, write_checkpoint


def _blocks(prefix: str, count: int, paths: tuple[str, ...]) -> list[str]:
    """``<prefix>.<i>.<path>`` for every block i and path."""
    return [f"{prefix}.{i}.{path}" for i in range(count) for path in paths]


def _experts(count: int, paths: tuple[str, ...], stem: str) -> tuple[str, ...]:
    """``<stem>.<e>.<path>`` for every expert e and path (a block's part of the names)."""
    return tuple(f"{stem}.{e}.{path}" for e in range(count) for path in paths)


LLAMA_BLOCK = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)
QWEN2_BLOCK = (
    *LLAMA_BLOCK,
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
)
GPT2_BLOCK = (
    "ln_1",
    "ln_1.bias",
    "attn.c_attn",
    "attn.c_attn.bias",
    "attn.c_proj",
    "attn.c_proj.bias",
    "ln_2",
    "ln_2.bias",
    "mlp.c_fc",
    "mlp.c_fc.bias",
    "mlp.c_proj",
    "mlp.c_proj.bias",
)
BERT_BLOCK = (
    "attention.self.query",
    "attention.self.query.bias",
    "attention.self.key",
    "attention.self.key.bias",
    "attention.self.value",
    "attention.self.value.bias",
    "attention.output.dense",
    "attention.output.dense.bias",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "intermediate.dense.bias",
    "output.dense",
    "output.dense.bias",
    "output.LayerNorm",
)
T5_SELF = (*(f"layer.0.SelfAttention.{p}" for p in "qkvo"), "layer.0.layer_norm")
T5_ENCODER_BLOCK = (
    *T5_SELF,
    "layer.1.DenseReluDense.wi",
    "layer.1.DenseReluDense.wo",
    "layer.1.layer_norm",
)
T5_DECODER_BLOCK = (
    *T5_SELF,
    *(f"layer.1.EncDecAttention.{p}" for p in "qkvo"),
    "layer.1.layer_norm",
    "layer.2.DenseReluDense.wi",
    "layer.2.DenseReluDense.wo",
    "layer.2.layer_norm",
)
T5_POSITIONS = "layer.0.SelfAttention.relative_attention_bias"
MIXTRAL_BLOCK = (
    *LLAMA_BLOCK[:4],
    "block_sparse_moe.gate",
    *_experts(4, ("w1", "w2", "w3"), "block_sparse_moe.experts"),
    "input_layernorm",
    "post_attention_layernorm",
)
QWEN2_MOE_BLOCK = (
    *QWEN2_BLOCK[:4],
    *QWEN2_BLOCK[9:],
    "mlp.gate",
    *_experts(4, ("gate_proj", "up_proj", "down_proj"), "mlp.experts"),
    "mlp.shared_expert.gate_proj",
    "mlp.shared_expert.up_proj",
    "mlp.shared_expert.down_proj",
    "mlp.shared_expert_gate",
    "input_layernorm",
    "post_attention_layernorm",
)
VIT_BLOCK = (
    "layernorm_before",
    "attention.attention.query",
    "attention.attention.key",
    "attention.attention.value",
    "attention.output.dense",
    "layernorm_after",
    "intermediate.dense",
    "output.dense",
)
CLIP_BLOCK = (
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.q_proj",
    "self_attn.out_proj",
    "layer_norm1",
    "mlp.fc1",
    "mlp.fc2",
    "layer_norm2",
)
WHISPER_ENCODER_BLOCK = (
    *(f"self_attn.{p}_proj" for p in ("k", "v", "q", "out")),
    "self_attn_layer_norm",
    "fc1",
    "fc2",
    "final_layer_norm",
)
WHISPER_DECODER_BLOCK = (
    *WHISPER_ENCODER_BLOCK[:5],
    *(f"encoder_attn.{p}_proj" for p in ("k", "v", "q", "out")),
    "encoder_attn_layer_norm",
    *WHISPER_ENCODER_BLOCK[5:],
)
PHI_BLOCK = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.dense",
    "mlp.fc1",
    "mlp.fc2",
    "input_layernorm",
)
FALCON_BLOCK = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
    "input_layernorm",
)
QWEN2_VL_VISION_BLOCK = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _unet_resnet(prefix: str, shortcut: bool) -> list[str]:
    paths = ["norm1", "conv1", "time_emb_proj", "norm2", "conv2"]
    return [f"{prefix}.{path}" for path in paths + ["conv_shortcut"] * shortcut]


def _unet_attention(prefix: str) -> list[str]:
    block = f"{prefix}.transformer_blocks.0"
    attention = [
        f"{block}.attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    return [
        f"{prefix}.norm",
        f"{prefix}.proj_in",
        *attention,
        *(f"{block}.norm{i}" for i in (1, 2, 3)),
        f"{block}.ff.net.0.proj",
        f"{block}.ff.net.2",
        f"{prefix}.proj_out",
    ]


def _unet() -> list[str]:
    """A diffusers UNet2DConditionModel: cross-attention down, plain down, mid, plain up, up."""
    names = ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2"]
    for i in range(2):
        names += _unet_resnet(f"down_blocks.0.resnets.{i}", shortcut=False)
        names += _unet_attention(f"down_blocks.0.attentions.{i}")
    names += ["down_blocks.0.downsamplers.0.conv"]
    for i in range(2):
        names += _unet_resnet(f"down_blocks.1.resnets.{i}", shortcut=i == 0)
    names += _unet_resnet("mid_block.resnets.0", shortcut=False)
    names += _unet_attention("mid_block.attentions.0")
    names += _unet_resnet("mid_block.resnets.1", shortcut=False)
    for i in range(3):
        names += _unet_resnet(f"up_blocks.0.resnets.{i}", shortcut=True)
    names += ["up_blocks.0.upsamplers.0.conv"]
    for i in range(3):
        names += _unet_resnet(f"up_blocks.1.resnets.{i}", shortcut=True)
        names += _unet_attention(f"up_blocks.1.attentions.{i}")
    return [*names, "conv_norm_out", "conv_out"]


MODULES: dict[str, list[str]] = {
    "llama": [
        "model.embed_tokens",
        *_blocks("model.layers", 3, LLAMA_BLOCK),
        "model.norm",
        "lm_head",
    ],
    "qwen2": [
        "model.embed_tokens",
        *_blocks("model.layers", 3, QWEN2_BLOCK),
        "model.norm",
        "lm_head",
    ],
    "gemma": ["model.embed_tokens", *_blocks("model.layers", 3, LLAMA_BLOCK), "model.norm"],
    "gpt2": [
        "transformer.wte",
        "transformer.wpe",
        *_blocks("transformer.h", 3, GPT2_BLOCK),
        "transformer.ln_f",
        "transformer.ln_f.bias",
    ],
    "bert": [
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.token_type_embeddings",
        "embeddings.LayerNorm",
        *_blocks("encoder.layer", 3, BERT_BLOCK),
        "pooler.dense",
        "pooler.dense.bias",
    ],
    "t5": [
        "shared",
        f"encoder.block.0.{T5_POSITIONS}",
        *_blocks("encoder.block", 3, T5_ENCODER_BLOCK),
        "encoder.final_layer_norm",
        f"decoder.block.0.{T5_POSITIONS}",
        *_blocks("decoder.block", 3, T5_DECODER_BLOCK),
        "decoder.final_layer_norm",
        "lm_head",
    ],
    "mixtral": [
        "model.embed_tokens",
        *_blocks("model.layers", 2, MIXTRAL_BLOCK),
        "model.norm",
        "lm_head",
    ],
    "qwen2_moe": [
        "model.embed_tokens",
        *_blocks("model.layers", 2, QWEN2_MOE_BLOCK),
        "model.norm",
        "lm_head",
    ],
    "vit": [
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection",
        *_blocks("encoder.layer", 3, VIT_BLOCK),
        "layernorm",
        "pooler.dense",
    ],
    "clip": [
        "logit_scale",
        "text_model.embeddings.token_embedding",
        "text_model.embeddings.position_embedding",
        *_blocks("text_model.encoder.layers", 3, CLIP_BLOCK),
        "text_model.final_layer_norm",
        "vision_model.embeddings.class_embedding",
        "vision_model.embeddings.patch_embedding",
        "vision_model.embeddings.position_embedding",
        "vision_model.pre_layrnorm",
        *_blocks("vision_model.encoder.layers", 3, CLIP_BLOCK),
        "vision_model.post_layernorm",
        "visual_projection",
        "text_projection",
    ],
    "whisper": [
        "model.encoder.conv1",
        "model.encoder.conv2",
        "model.encoder.embed_positions",
        *_blocks("model.encoder.layers", 3, WHISPER_ENCODER_BLOCK),
        "model.encoder.layer_norm",
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        *_blocks("model.decoder.layers", 3, WHISPER_DECODER_BLOCK),
        "model.decoder.layer_norm",
    ],
    "phi": [
        "model.embed_tokens",
        *_blocks("model.layers", 3, PHI_BLOCK),
        "model.final_layernorm",
        "lm_head",
    ],
    "falcon": [
        "transformer.word_embeddings",
        *_blocks("transformer.h", 3, FALCON_BLOCK),
        "transformer.ln_f",
    ],
    "unet": _unet(),
    # LlavaForConditionalGeneration as save_pretrained writes it (the names of the Hub).
    "llava": [
        "vision_tower.embeddings.class_embedding",
        "vision_tower.embeddings.patch_embedding",
        "vision_tower.embeddings.position_embedding",
        "vision_tower.pre_layrnorm",
        *_blocks("vision_tower.encoder.layers", 3, CLIP_BLOCK),
        "vision_tower.post_layernorm",
        "multi_modal_projector.linear_1",
        "multi_modal_projector.linear_2",
        "language_model.model.embed_tokens",
        *_blocks("language_model.model.layers", 3, LLAMA_BLOCK),
        "language_model.model.norm",
        "language_model.lm_head",
    ],
    # The same model under its runtime module names (transformers ≥ 4.52).
    "llava_runtime": [
        "model.vision_tower.embeddings.patch_embedding",
        *_blocks("model.vision_tower.encoder.layers", 3, CLIP_BLOCK),
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
        "model.language_model.embed_tokens",
        *_blocks("model.language_model.layers", 3, LLAMA_BLOCK),
        "lm_head",
    ],
    # The original LLaVA repository: an nn.Sequential projector (Linear, GELU, Linear).
    "llava_original": [
        "model.embed_tokens",
        *_blocks("model.layers", 3, LLAMA_BLOCK),
        "model.norm",
        "model.mm_projector.0",
        "model.mm_projector.2",
        "lm_head",
    ],
    # Qwen2-VL as save_pretrained writes it: its patch merger is an nn.Sequential too.
    "qwen2_vl": [
        "visual.patch_embed.proj",
        *_blocks("visual.blocks", 3, QWEN2_VL_VISION_BLOCK),
        "visual.merger.ln_q",
        "visual.merger.mlp.0",
        "visual.merger.mlp.2",
        "model.embed_tokens",
        *_blocks("model.layers", 3, LLAMA_BLOCK),
        "model.norm",
        "lm_head",
    ],
}


@pytest.mark.parametrize("family", MODULES)
def test_no_two_modules_share_stack_block_expert_and_kind(family):
    named = name_modules(MODULES[family])
    shared = [place for place, count in Counter(named.values()).items() if count > 1]
    assert shared == []


@pytest.mark.parametrize("family", MODULES)
def test_every_module_has_a_kind(family):
    named = name_modules(MODULES[family])
    assert [module for module, name in named.items() if not name.kind] == []


@pytest.mark.parametrize("family", ["llava_original", "qwen2_vl"])
def test_a_sequential_projector_is_not_a_stack_of_blocks(family):
    # ``mlp.0`` and ``mlp.2`` are two layers of one nn.Sequential, not blocks 0 and 2
    # of a stack: like every module outside the blocks, each keeps its whole name.
    modules = [m for m in MODULES[family] if m.split(".")[-1].isdigit()]
    named = name_modules(MODULES[family])
    assert {m: named[m] for m in modules} == {m: ModuleName("", None, None, m) for m in modules}


def _place(stack: str, block: int | None, kind: str, expert: int | None = None) -> ModuleName:
    return ModuleName(stack, block, expert, kind)


PLACES: dict[str, dict[str, ModuleName]] = {
    "llama": {
        "model.layers.2.self_attn.q_proj": _place("", 2, "self_attn.q_proj"),
        "model.layers.0.mlp.down_proj": _place("", 0, "mlp.down_proj"),
        "model.embed_tokens": _place("", None, "model.embed_tokens"),
        "lm_head": _place("", None, "lm_head"),
    },
    "qwen2": {
        "model.layers.1.self_attn.k_proj": _place("", 1, "self_attn.k_proj"),
        "model.layers.1.self_attn.k_proj.bias": _place("", 1, "self_attn.k_proj.bias"),
    },
    "gemma": {"model.layers.2.mlp.gate_proj": _place("", 2, "mlp.gate_proj")},
    "gpt2": {
        "transformer.h.0.attn.c_attn": _place("", 0, "attn.c_attn"),
        "transformer.h.1.attn.c_proj": _place("", 1, "attn.c_proj"),
        "transformer.h.1.mlp.c_proj": _place("", 1, "mlp.c_proj"),
        "transformer.wte": _place("", None, "transformer.wte"),
    },
    "bert": {
        "encoder.layer.2.attention.self.query": _place("", 2, "attention.self.query"),
        "encoder.layer.0.attention.output.dense": _place("", 0, "attention.output.dense"),
        "encoder.layer.0.output.dense": _place("", 0, "output.dense"),
        "pooler.dense": _place("", None, "pooler.dense"),
    },
    "t5": {
        "encoder.block.1.layer.0.SelfAttention.q": _place("encoder", 1, "layer.SelfAttention.q"),
        "decoder.block.2.layer.1.EncDecAttention.q": _place(
            "decoder", 2, "layer.EncDecAttention.q"
        ),
        "encoder.block.0.layer.1.DenseReluDense.wi": _place(
            "encoder", 0, "layer.DenseReluDense.wi"
        ),
        "decoder.block.0.layer.2.DenseReluDense.wi": _place(
            "decoder", 0, "layer.DenseReluDense.wi"
        ),
        "encoder.block.0.layer.1.layer_norm": _place("encoder", 0, "layer.1.layer_norm"),
        "shared": _place("", None, "shared"),
    },
    "mixtral": {
        **{
            f"model.layers.1.block_sparse_moe.experts.{e}.w1": _place(
                "", 1, "block_sparse_moe.experts.w1", expert=e
            )
            for e in range(4)
        },
        "model.layers.0.block_sparse_moe.experts.3.w2": _place(
            "", 0, "block_sparse_moe.experts.w2", expert=3
        ),
        "model.layers.0.block_sparse_moe.gate": _place("", 0, "block_sparse_moe.gate"),
    },
    "qwen2_moe": {
        "model.layers.1.mlp.experts.2.up_proj": _place("", 1, "mlp.experts.up_proj", expert=2),
        "model.layers.1.mlp.shared_expert.up_proj": _place("", 1, "mlp.shared_expert.up_proj"),
        "model.layers.1.mlp.shared_expert_gate": _place("", 1, "mlp.shared_expert_gate"),
        "model.layers.0.mlp.gate": _place("", 0, "mlp.gate"),
    },
    "vit": {
        "encoder.layer.1.attention.attention.query": _place("", 1, "attention.attention.query"),
        "embeddings.patch_embeddings.projection": _place(
            "", None, "embeddings.patch_embeddings.projection"
        ),
    },
    "clip": {
        "text_model.encoder.layers.1.self_attn.q_proj": _place("text_model", 1, "self_attn.q_proj"),
        "vision_model.encoder.layers.2.mlp.fc1": _place("vision_model", 2, "mlp.fc1"),
        "visual_projection": _place("", None, "visual_projection"),
    },
    "whisper": {
        "model.encoder.layers.0.self_attn.q_proj": _place("encoder", 0, "self_attn.q_proj"),
        "model.decoder.layers.2.encoder_attn.q_proj": _place("decoder", 2, "encoder_attn.q_proj"),
        "model.decoder.layers.1.fc1": _place("decoder", 1, "fc1"),
        "model.encoder.conv1": _place("", None, "model.encoder.conv1"),
    },
    "phi": {
        "model.layers.1.self_attn.dense": _place("", 1, "self_attn.dense"),
        "model.layers.1.mlp.fc1": _place("", 1, "mlp.fc1"),
    },
    "falcon": {
        "transformer.h.2.self_attention.query_key_value": _place(
            "", 2, "self_attention.query_key_value"
        ),
        "transformer.h.0.mlp.dense_h_to_4h": _place("", 0, "mlp.dense_h_to_4h"),
    },
    "unet": {
        "down_blocks.0.resnets.1.conv1": _place("down_blocks", 0, "resnets.1.conv1"),
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": _place(
            "down_blocks", 0, "attentions.1.transformer_blocks.attn1.to_q"
        ),
        "down_blocks.0.downsamplers.0.conv": _place("down_blocks", 0, "downsamplers.conv"),
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0": _place(
            "up_blocks", 1, "attentions.2.transformer_blocks.attn2.to_out.0"
        ),
        "up_blocks.0.resnets.2.conv_shortcut": _place("up_blocks", 0, "resnets.2.conv_shortcut"),
        "mid_block.resnets.1.conv1": _place("mid_block.resnets", 1, "conv1"),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": _place(
            "mid_block.attentions", 0, "transformer_blocks.attn1.to_k"
        ),
        "conv_in": _place("", None, "conv_in"),
    },
    "llava": {
        "vision_tower.encoder.layers.1.self_attn.out_proj": _place(
            "vision_tower.encoder", 1, "self_attn.out_proj"
        ),
        "language_model.model.layers.2.self_attn.o_proj": _place(
            "language_model.model", 2, "self_attn.o_proj"
        ),
        "multi_modal_projector.linear_1": _place("", None, "multi_modal_projector.linear_1"),
    },
    "llava_runtime": {
        "model.vision_tower.encoder.layers.1.mlp.fc2": _place("vision_tower.encoder", 1, "mlp.fc2"),
        "model.language_model.layers.0.mlp.up_proj": _place("language_model", 0, "mlp.up_proj"),
    },
}


@pytest.mark.parametrize(
    ("family", "module"), [(family, module) for family in PLACES for module in PLACES[family]]
)
def test_module_place_is_read_from_its_name(family, module):
    assert name_modules(MODULES[family])[module] == PLACES[family][module]


LABELS: dict[str, dict[str, str]] = {
    "llama": {"self_attn.q_proj": "q_proj", "mlp.down_proj": "down_proj"},
    "gpt2": {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_proj": "mlp.c_proj"},
    "bert": {
        "attention.self.query": "query",
        "attention.output.dense": "attention.output.dense",
        "output.dense": "output.dense",
        "intermediate.dense": "intermediate.dense",
        "pooler.dense": "pooler.dense",
    },
    "t5": {
        "layer.SelfAttention.q": "SelfAttention.q",
        "layer.EncDecAttention.q": "EncDecAttention.q",
        "layer.DenseReluDense.wi": "wi",
    },
    "mixtral": {"block_sparse_moe.experts.w1": "w1", "block_sparse_moe.gate": "gate"},
    "qwen2_moe": {
        "mlp.experts.up_proj": "experts.up_proj",
        "mlp.shared_expert.up_proj": "shared_expert.up_proj",
        "mlp.gate": "gate",
    },
    "vit": {
        "attention.attention.query": "query",
        "attention.output.dense": "attention.output.dense",
    },
    "clip": {"self_attn.out_proj": "out_proj", "mlp.fc1": "fc1"},
    "whisper": {
        "self_attn.q_proj": "self_attn.q_proj",
        "encoder_attn.q_proj": "encoder_attn.q_proj",
        "fc2": "fc2",
    },
    "phi": {"self_attn.dense": "dense", "mlp.fc2": "fc2"},
    "falcon": {"self_attention.dense": "dense", "mlp.dense_4h_to_h": "dense_4h_to_h"},
    "unet": {
        "resnets.1.conv1": "resnets.1.conv1",
        "conv1": "conv1",
        "attentions.0.transformer_blocks.attn1.to_q": "attentions.0.transformer_blocks.attn1.to_q",
        "downsamplers.conv": "downsamplers.conv",
    },
    "llava": {"self_attn.o_proj": "o_proj", "self_attn.out_proj": "out_proj"},
}


@pytest.mark.parametrize(
    ("family", "kind"), [(family, kind) for family in LABELS for kind in LABELS[family]]
)
def test_short_kind_is_the_shortest_suffix_no_other_kind_ends_with(family, kind):
    kinds = [name.kind for name in name_modules(MODULES[family]).values()]
    assert short_kinds(kinds)[kind] == LABELS[family][kind]


def test_short_kinds_are_distinct_within_every_family():
    for family, modules in MODULES.items():
        labels = short_kinds(name.kind for name in name_modules(modules).values())
        assert len(set(labels.values())) == len(labels), family


# End to end: tiny random models with a planted rank-3 update in every matrix.

PLANTED_RANK = 3
PLANTED_SHARES = np.array([1.0, 0.6, 0.3])
RANK_TOLERANCE = 1e-4
"""σ above this share of σ₁ count towards the rank; σ₁..σ₃ must match NumPy within it."""


def tiny_llama(tie: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def _tiny_t5():
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4
    )
    return transformers.T5ForConditionalGeneration(config)


def _tiny_mixtral():
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.MixtralForCausalLM(config)


def _tiny_clip():
    text = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 8,
    }
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.CLIPModel(config)


def _tiny_vit():
    config = transformers.ViTConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": _tiny_bert,
    "t5": _tiny_t5,
    "mixtral": _tiny_mixtral,
    "clip": _tiny_clip,
    "vit": _tiny_vit,
}

# A few layers per family and where the analysis must place them.
E2E_PLACES: dict[str, dict[str, tuple[str, int | None, int | None, str]]] = {
    "llama": {"model.layers.1.self_attn.v_proj": ("", 1, None, "self_attn.v_proj")},
    "gpt2": {
        "transformer.h.1.attn.c_proj": ("", 1, None, "attn.c_proj"),
        "transformer.h.1.mlp.c_proj": ("", 1, None, "mlp.c_proj"),
    },
    "bert": {"encoder.layer.1.output.dense": ("", 1, None, "output.dense")},
    "t5": {
        "decoder.block.1.layer.1.EncDecAttention.q": (
            "decoder",
            1,
            None,
            "layer.EncDecAttention.q",
        ),
        "encoder.block.1.layer.1.DenseReluDense.wo": (
            "encoder",
            1,
            None,
            "layer.DenseReluDense.wo",
        ),
    },
    "mixtral": {
        "model.layers.1.block_sparse_moe.experts.3.w2": ("", 1, 3, "block_sparse_moe.experts.w2"),
        "model.layers.0.block_sparse_moe.gate": ("", 0, None, "block_sparse_moe.gate"),
    },
    "clip": {
        "vision_model.encoder.layers.1.self_attn.q_proj": (
            "vision_model",
            1,
            None,
            "self_attn.q_proj",
        ),
        "text_model.encoder.layers.0.mlp.fc2": ("text_model", 0, None, "mlp.fc2"),
    },
    "vit": {
        "vit.encoder.layer.1.attention.attention.query": (
            "",
            1,
            None,
            "attention.attention.query",
        ),
        "vit.encoder.layer.0.output.dense": ("", 0, None, "output.dense"),
    },
}


@dataclass(frozen=True)
class PlantedPair:
    """A base and tuned checkpoint of one family and the updates planted between them."""

    family: str
    base: Path
    tuned: Path
    deltas: dict[str, np.ndarray]


def _orthonormal(rng: np.random.Generator, rows: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, PLANTED_RANK)))
    return q


def _planted_update(rng: np.random.Generator, weight: np.ndarray) -> np.ndarray:
    """U·diag(s)·Vᵀ of rank 3 with s = [1, 0.6, 0.3]·0.05·‖W‖_F/√3."""
    scale = 0.05 * np.linalg.norm(weight.astype(np.float64)) / np.sqrt(PLANTED_RANK)
    u, v = _orthonormal(rng, weight.shape[0]), _orthonormal(rng, weight.shape[1])
    return (u * (PLANTED_SHARES * scale)) @ v.T


def plant_pair(
    family: str, folder: Path, extra: dict[str, np.ndarray] | None = None
) -> PlantedPair:
    """Save a tiny model of ``family`` as base and tuned Hugging Face folders, with updates.

    Every floating matrix of at least 4×4 gets a planted rank-3 update; ``extra``
    tensors (not part of the model) are added to both sides as they are given.
    """
    BUILDERS[family]().save_pretrained(folder / "saved")
    saved = load_file(folder / "saved" / "model.safetensors")
    base = {name: value.astype(np.float32) for name, value in saved.items()} | (extra or {})
    rng = np.random.default_rng(20240611)
    tuned = dict(base)
    deltas = {}
    for name, weight in base.items():
        if weight.ndim == 2 and min(weight.shape) >= 4 and np.issubdtype(weight.dtype, np.floating):
            tuned[name] = (weight + _planted_update(rng, weight)).astype(np.float32)
            deltas[name] = tuned[name].astype(np.float64) - weight.astype(np.float64)
    for side, tensors in (("base", base), ("tuned", tuned)):
        (folder / side).mkdir()
        shutil.copy(folder / "saved" / "config.json", folder / side / "config.json")
        write_checkpoint(folder / side / "model.safetensors", tensors)
    return PlantedPair(family, folder / "base", folder / "tuned", deltas)


@pytest.fixture(scope="module", params=list(BUILDERS))
def planted(request, tmp_path_factory) -> PlantedPair:
    return plant_pair(request.param, tmp_path_factory.mktemp(request.param))


def _diff(run_cli, pair: PlantedPair, folder: Path) -> dict:
    """Run ``svdrank diff`` on the pair and return the analysis JSON."""
    output = folder / "a.json"
    result = run_cli("diff", pair.base, pair.tuned, "-o", output, "--format", "json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(output.read_text())


def _rank(values: np.ndarray) -> int:
    return int(np.sum(values > RANK_TOLERANCE * values[0]))


def test_every_planted_update_is_a_layer_of_rank_three(run_cli, planted, tmp_path):
    layers = {layer["name"]: layer for layer in _diff(run_cli, planted, tmp_path)["layers"]}
    assert set(planted.deltas) <= set(layers)
    for name, delta in planted.deltas.items():
        found = np.asarray(layers[name]["singular_values"])
        reference = np.linalg.svd(delta, compute_uv=False)
        assert _rank(reference) == PLANTED_RANK, name
        assert _rank(found) == PLANTED_RANK, name
        np.testing.assert_allclose(
            found[:PLANTED_RANK], reference[:PLANTED_RANK], rtol=RANK_TOLERANCE, err_msg=name
        )


def test_no_two_layers_of_the_analysis_share_a_place(run_cli, planted, tmp_path):
    layers = _diff(run_cli, planted, tmp_path)["layers"]
    places = Counter((x["stack"], x["block"], x["expert"], x["kind"]) for x in layers)
    assert [place for place, count in places.items() if count > 1] == []
    by_module = {layer["module"]: layer for layer in layers}
    for module, place in E2E_PLACES[planted.family].items():
        layer = by_module[module]
        assert (layer["stack"], layer["block"], layer["expert"], layer["kind"]) == place


def _updated_parameters(pair: PlantedPair) -> set[str]:
    """Runtime parameters that differ between base and tuned as transformers loads them.

    named_parameters lists a tied weight once (GPT-2's lm_head is its wte).
    """
    architecture = type(BUILDERS[pair.family]())
    base = dict(architecture.from_pretrained(pair.base).named_parameters())
    tuned = dict(architecture.from_pretrained(pair.tuned).named_parameters())
    return {name for name, value in base.items() if not torch.equal(value, tuned[name])}


def _adapted_parameters(model) -> dict[str, int]:
    """Rank PEFT built per adapted runtime parameter (a module's weight, or a wrapped parameter).

    PEFT warns that the full-name rank and alpha patterns of wrapped parameters "did not
    match any targeted module"; they did: the ranks and scalings asserted here are theirs.
    """
    adapted = {}
    for name, module in model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer):
            continue
        name = name.removeprefix("base_model.model.")
        parameter = getattr(module, "parameter_name", None) or "weight"
        while name.endswith(".base_layer"):  # a ParamWrapper nested in another
            name = name.removesuffix(".base_layer")
        adapted[f"{name}.{parameter}"] = module.r["default"]
        assert module.scaling["default"] == 2.0, name  # lora_alpha = 2·r for every rank
        if isinstance(module, peft.tuners.lora.Linear):
            assert module.lora_A["default"].weight.shape[0] == module.r["default"], name
    return adapted


@pytest.mark.parametrize("planted", list(BUILDERS), indirect=True)
def test_peft_config_gives_every_updated_module_of_the_runtime_model_its_rank(
    run_cli, planted, tmp_path
):
    # The reference is transformers itself: from_pretrained loads both checkpoints (renaming
    # ViT's modules, fusing Mixtral's experts) and the parameters that differ are the ones
    # the config must adapt. Balanced keeps 90 % of a planted spectrum ∝ [1, 0.6, 0.3]²:
    # rank 2 (68.97 % at 1, 93.79 % at 2). Mixtral fuses w1 and w3 into gate_up_proj, whose
    # per-expert update then has rank ≤ 2 + 2.
    _diff(run_cli, planted, tmp_path)
    result = run_cli("recommend", tmp_path / "a.json", "--format", "peft", "--preset", "balanced")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)

    model = peft.get_peft_model(BUILDERS[planted.family](), peft.LoraConfig(**record))

    adapted = _adapted_parameters(model)
    assert set(adapted) == _updated_parameters(planted)
    for name, rank in adapted.items():
        assert rank == (4 if name.endswith("gate_up_proj") else 2), name


@pytest.mark.parametrize("planted", ["gpt2"], indirect=True)
def test_gpt2_conv1d_layers_get_lora_factors_of_their_stored_shape(run_cli, planted, tmp_path):
    # GPT-2's Conv1D stores its weight as (in, out). The config names no
    # fan_in_fan_out; PEFT warns and turns it on for Conv1D, so the factors fit.
    _diff(run_cli, planted, tmp_path)
    result = run_cli("recommend", tmp_path / "a.json", "--format", "peft", "--preset", "balanced")
    record = json.loads(result.stdout)
    model = peft.get_peft_model(BUILDERS["gpt2"](), peft.LoraConfig(**record))
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and ".h." in name:
            fan_in, fan_out = module.base_layer.weight.shape
            assert module.lora_A["default"].weight.shape[1] == fan_in, name
            assert module.lora_B["default"].weight.shape[0] == fan_out, name
            assert module.fan_in_fan_out, name


def test_fused_expert_tensor_is_one_layer_per_expert(run_cli, tmp_path):
    rng = np.random.default_rng(7)
    experts, out, inner = 4, 16, 8
    fused, query = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj"
    base = {
        fused: rng.standard_normal((experts, out, inner)).astype(np.float32),
        f"{query}.weight": rng.standard_normal((8, 8)).astype(np.float32),
    }
    update = [
        rng.standard_normal((out, e + 1)) @ rng.standard_normal((e + 1, inner))
        for e in range(experts)
    ]
    tuned = {
        fused: (base[fused] + np.stack(update)).astype(np.float32),
        f"{query}.weight": base[f"{query}.weight"] + np.float32(0.1),
    }
    pair = PlantedPair(
        "fused",
        write_checkpoint(tmp_path / "base.safetensors", base),
        write_checkpoint(tmp_path / "tuned.safetensors", tuned),
        {},
    )

    layers = {layer["module"]: layer for layer in _diff(run_cli, pair, tmp_path)["layers"]}

    assert set(layers) == {f"{fused}[{e}]" for e in range(experts)} | {query}
    for e in range(experts):
        layer = layers[f"{fused}[{e}]"]
        delta = tuned[fused][e].astype(np.float64) - base[fused][e].astype(np.float64)
        reference = np.linalg.svd(delta, compute_uv=False)
        assert (layer["name"], tuple(layer["shape"])) == (fused, (out, inner))
        assert (layer["stack"], layer["block"], layer["expert"], layer["kind"]) == (
            "",
            0,
            e,
            "mlp.experts.gate_up_proj",
        )
        assert _rank(reference) == e + 1
        assert _rank(np.asarray(layer["singular_values"])) == e + 1
    assert (layers[query]["expert"], layers[query]["kind"]) == (None, "self_attn.q_proj")


def test_encoder_sample_has_six_kinds_per_block_at_their_planted_ranks(tmp_path, run_cli):
    base = SAMPLES / "encoder-base.safetensors"
    tuned = SAMPLES / "encoder-tuned.safetensors"
    out = tmp_path / "encoder.json"

    result = run_cli("diff", base, tuned, "-o", out, "--format", "json")

    assert result.exit_code == 0, result.stderr
    layers = json.loads(out.read_text())["layers"]
    in_blocks = [layer for layer in layers if layer["block"] is not None]
    assert len({(layer["block"], layer["kind"]) for layer in in_blocks}) == len(in_blocks) == 24
    assert len({layer["kind"] for layer in in_blocks}) == 6
    stored_base, stored_tuned = load_file(base), load_file(tuned)
    for layer in in_blocks:
        if layer["kind"].endswith(("query", "key")):
            delta = stored_tuned[layer["name"]].astype(np.float64) - stored_base[layer["name"]]
            sigma = np.linalg.svd(delta, compute_uv=False)
            expected = int(np.count_nonzero(sigma > 1e-4 * sigma[0]))
            assert expected == (2 if layer["kind"].endswith("query") else 4)
            values = np.asarray(layer["singular_values"])
            assert int(np.count_nonzero(values > 1e-4 * values[0])) == expected


@pytest.mark.parametrize("planted", ["t5"], indirect=True)
def test_include_and_exclude_select_by_kind_and_stack(run_cli, planted, tmp_path):
    output = tmp_path / "a.json"
    result = run_cli(
        "diff",
        planted.base,
        planted.tuned,
        "-o",
        output,
        "--format",
        "json",
        "--include",
        "kind=*EncDecAttention.?",
        "--exclude",
        "block=0",
    )
    assert result.exit_code == 0, result.stderr
    layers = json.loads(output.read_text())["layers"]
    expected = {f"decoder.block.1.layer.1.EncDecAttention.{name}" for name in ("q", "k", "v", "o")}
    assert {layer["module"] for layer in layers} == expected
    assert {layer["module"] for layer in layers} == {
        module_of(name)
        for name in planted.deltas
        if "EncDecAttention" in name and name.startswith("decoder.block.1.")
    }

    kept = run_cli("plot", output, "-o", tmp_path / "plots", "--include", "kind=*.q")
    assert kept.exit_code == 0, kept.stderr
