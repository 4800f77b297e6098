"""Every error message of the elastic adapters, asserted."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, fresh, peft_kwargs
from peft import LoraConfig, get_peft_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_elastic import ElasticLoraConfig, NLSConfig, SuperNetwork, get_supernet, load_super_network

LLAMA = ARCHS["llama"]


@pytest.fixture(scope="module")
def llama():
    return LLAMA.build()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank_choices": []}, r"NLSConfig.rank_choices must be a non-empty list, got \[\]"),
        ({"rank_choices": [8, 0]}, r"rank_choices must hold positive integers, got 0 in \[8, 0\]"),
        ({"rank_choices": [8, 2.5]}, r"rank_choices must hold positive integers, got 2.5"),
        ({"r": 4, "rank_choices": [8, 4]}, r"rank_choices contains 8, above r=4. Raise r to 8"),
        ({"use_dora": True}, r"NLSConfig.use_dora=True is not supported"),
        ({"lora_bias": True}, r"NLSConfig.lora_bias=True is not supported"),
        ({"rank_pattern": {"q_proj": 4}}, r"NLSConfig.rank_pattern=\{'q_proj': 4\} is not supported"),
        ({"rank_groups": [["q_proj"], []]}, r"rank_groups must be a non-empty list of non-empty lists"),
        ({"nls_target_modules": []}, r"nls_target_modules is empty"),
    ],
)
def test_nls_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NLSConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ffn_width_choices": [1.0, 1.5]}, r"ffn_width_choices holds 1.5, outside \(0, 1\]"),
        ({"head_choices": [0.0]}, r"head_choices holds 0.0, outside \(0, 1\]"),
        ({"ffn_width_choices": [0]}, r"ffn_width_choices holds 0; absolute sizes must be >= 1"),
        ({"ffn_width_choices": []}, r"ffn_width_choices must be a non-empty list or None"),
        ({"head_choices": ["half"]}, r"head_choices holds 'half'; use fractions"),
        ({"channel_order": [1, 2]}, r"channel_order must be a dict or None, got list"),
        ({"rank_choices": [16], "r": 8}, r"ElasticLoraConfig.rank_choices contains 16, above r=8"),
    ],
)
def test_elastic_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticLoraConfig(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_choices": [1.0, 0.25]}, r"head counts \[1\] that are not whole key/value groups: layer 0 has 4 heads"),
        ({"head_choices": [3]}, r"Use multiples of 2 up to 4"),
        ({"ffn_width_choices": [1.0, 0.3]}, r"ffn_width_choices value 0.3 gives 14.4 of 48, not a whole number"),
        ({"ffn_width_choices": [100]}, r"gives widths \[100\] outside \[1, 48\] for layer 0"),
        ({"nls_target_modules": ["nope"]}, r"nls_target_modules=\['nope'\] matches none of the adapted modules"),
        ({"rank_groups": [["q_proj"], ["nope"]]}, r"rank_groups entries \[\['nope'\]\] match no elastic adapter"),
    ],
)
def test_space_errors(llama, kwargs, message):
    model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4]) | kwargs))
    with pytest.raises(ValueError, match=message):
        get_supernet(model)


def test_target_modules_matching_nothing(llama):
    with pytest.raises(ValueError, match=r"Target modules \{'nope'\} not found in the base model"):
        get_peft_model(fresh(llama), NLSConfig(target_modules=["nope"]))


def test_unsupported_module_and_architecture(llama):
    model = get_peft_model(fresh(llama), NLSConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(
        ValueError, match=r"Module 'model.embed_tokens' is of type Embedding; an elastic rank supports"
    ):
        get_supernet(model)
    fixed = get_peft_model(
        fresh(llama), NLSConfig(target_modules=["q_proj", "embed_tokens"], nls_target_modules=["q_proj"])
    )
    counts = get_supernet(fixed).count("max")
    assert counts["adapter_params"] == sum(p.numel() for n, p in fixed.named_parameters() if "lora_" in n)

    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    )
    model = get_peft_model(neox, ElasticLoraConfig(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match=r"Elastic width is not supported for model_type='gpt_neox'; supported: "):
        get_supernet(model)


def test_subnet_config_errors(llama, tmp_path):
    model = get_peft_model(fresh(llama), ElasticLoraConfig(**peft_kwargs(LLAMA, rank_choices=[8, 4])))
    sn = get_supernet(model)
    full = sn.space.max_config()
    with pytest.raises(ValueError, match=r"names unknown dimensions \['bogus'\]"):
        sn.activate(full | {"bogus": 1})
    with pytest.raises(ValueError, match=r"misses dimensions \['0.ffn'\]. Start from space.max_config\(\)"):
        sn.activate({k: v for k, v in full.items() if k != "0.ffn"})
    with pytest.raises(ValueError, match=r"sets 0.ffn=47, which is not among its choices \[48, 42, 36, 30, 24\]"):
        sn.activate(full | {"0.ffn": 47})
    with pytest.raises(ValueError, match=r"Unknown named sub-network 'huge'"):
        sn.activate("huge")
    with pytest.raises(ValueError, match=r"must be a dict of dimension name to value, got \[1, 2\]"):
        sn.activate([1, 2])
    with pytest.raises(ValueError, match=r"Expected \d+ choice indices, got 1"):
        sn.space.decode([0])
    with pytest.raises(ValueError, match=r"a plain LoRA adapter cannot express that. Use SuperNetwork.extract_model"):
        sn.extract_adapter("min", tmp_path)
    with pytest.raises(ValueError, match=r"Unknown importance method 'random'"):
        sn.reorder_channels("random")
    with pytest.raises(ValueError, match=r"needs `batches` of model inputs with labels"):
        sn.reorder_channels("gradient")
    with pytest.raises(ValueError, match=r"got no batches"):
        sn.reorder_channels("gradient", batches=[])


def test_model_errors(llama, tmp_path):
    with pytest.raises(ValueError, match=r"SuperNetwork needs a peft.PeftModel, got LlamaForCausalLM"):
        SuperNetwork(fresh(llama))
    lora = get_peft_model(fresh(llama), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"Adapter 'default' uses LoraConfig, not an elastic config"):
        get_supernet(lora)
    nls = get_peft_model(fresh(llama), NLSConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"reorder_channels needs an ElasticLoraConfig"):
        get_supernet(nls).reorder_channels()
    lora.save_pretrained(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"No elastic_config.json in .*: this is not an hf_elastic super-adapter"
    ):
        load_super_network(fresh(llama), tmp_path)


def test_conv1d_without_fan_in_fan_out_warns_and_fixes():
    gpt2 = ARCHS["gpt2"]
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=False does not fit Conv1D; setting fan_in_fan_out=True"):
        model = get_peft_model(gpt2.build(), NLSConfig(target_modules=["c_attn"], rank_choices=[4, 2]))
    assert model.peft_config["default"].fan_in_fan_out is True
    assert torch.isfinite(model(**gpt2.batch()).loss)
