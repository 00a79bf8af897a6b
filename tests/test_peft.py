"""The PEFT rank config, consumed by the real `peft.LoraConfig` on a model built in the test."""

from __future__ import annotations

import json

import peft
import pytest
import transformers

from tests.conftest import SAMPLES


def _sample_sized_llama():
    """A randomly initialised Llama with the sample checkpoints' module names and shapes."""
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "args", [("--preset", "balanced"), ("--energy", "0.8", "--multiple-of", "4")]
)
def test_peft_config_gives_every_module_its_recommended_rank(tmp_path, run_cli, args):
    analysis = tmp_path / "a.json"
    run_cli("diff", SAMPLES / "base.safetensors", SAMPLES / "tuned.safetensors", "-o", analysis)
    native = json.loads(run_cli("recommend", analysis, *args, "--format", "json").stdout)
    peft_path = tmp_path / "peft.json"
    result = run_cli("recommend", analysis, *args, "--format", "peft", "-o", peft_path)
    assert result.exit_code == 0, result.stderr

    with open(peft_path) as stream:
        config = peft.LoraConfig(**json.load(stream))
    model = peft.get_peft_model(_sample_sized_llama(), config)

    adapted = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    expected = {name: item["rank"] for name, item in native["modules"].items() if item["rank"]}
    assert {name: module.r["default"] for name, module in adapted.items()} == expected
    for name, module in adapted.items():
        assert module.scaling["default"] == pytest.approx(2.0), name  # alpha = 2·r everywhere
