"""Upcycling dense Llama / Qwen2 / Qwen3 / Mistral models: the upcycled model is the dense model, in memory and on disk."""

import json
import math
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import utils as hf_utils
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from deeptalk_hf import (
    DeepTalkConfig,
    DeepTalkForCausalLM,
    upcycle_checkpoint,
    upcycle_dense,
    upcycle_moe,
    upcycle_moe_checkpoint,
)
from deeptalk_hf.modeling_deeptalk import topk_routing
from deeptalk_hf.upcycling import (
    CheckpointError,
    _Converter,
    _umask,
    atomic_output_dir,
    atomic_output_file,
    check_output_dir,
    deeptalk_config_from_dense,
    deeptalk_config_from_moe,
)

VOCAB = 64
SEQ = 20  # longer than Mistral's window and than the llama3 scaling's original context
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,  # granularities 1-4 give parts whose rows are multiples of 16 bytes (grouped_mm)
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 2.0,
    "original_max_position_embeddings": 8,
}

YARN_ROPE = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 8}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order one (norms around 1, biases non-zero), so that a wrong mapping shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


def dense_model(kind: str, seed: int = 0):
    """Tiny random dense models, each exercising its family's particular detail."""
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, attention_bias=True, rope_parameters=YARN_ROPE))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=6, head_dim=12))
    else:
        raise ValueError(kind)
    return randomize(model, seed)


def text_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("granularity", [1, 2])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_upcycled_model_is_the_dense_model(kind, granularity):
    dense = dense_model(kind)
    moe = upcycle_dense(
        dense,
        num_text_experts=4 * granularity,
        num_speech_experts=2 * granularity,
        num_experts_per_tok=2 * granularity,
        granularity=granularity,
    )
    assert isinstance(moe, DeepTalkForCausalLM)
    ids = text_ids()
    with torch.no_grad():
        expected = dense(ids).logits
        assert max_diff(moe(ids).logits, expected) <= 1e-5
        moe.config.modality_routing = "none"  # the speech experts join the top-k: still whole sets of parts
        assert max_diff(moe(ids).logits, expected) <= 1e-5
    moe.config.modality_routing = "hard"
    prompt = ids[:, :6]
    dense_out = dense.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    moe_out = moe.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(dense_out, moe_out)


def test_special_token_ids_are_carried():
    """The source's pad, bos and eos ids (generation pads and stops with them) carry over, dense and MoE alike."""
    ids = dict(pad_token_id=3, bos_token_id=4, eos_token_id=[5, 6])
    dense = deeptalk_config_from_dense(
        LlamaConfig(**(COMMON | ids)), num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1
    )
    moe = deeptalk_config_from_moe(Qwen3MoeConfig(**(COMMON | ids)), speech_vocab_size=8)
    for config in (dense, moe):
        assert {name: getattr(config, name) for name in ids} == ids


def test_architecture_details_are_carried():
    """The config fields behind each family's detail; the logits test shows they are also used."""
    cases = {
        "llama": {"rope_parameters": LLAMA3_ROPE, "use_qk_norm": False, "qkv_bias": False, "attention_bias": False},
        "qwen2": {"tie_word_embeddings": True, "qkv_bias": True, "use_qk_norm": False, "attention_bias": False},
        "qwen3": {"use_qk_norm": True, "attention_bias": True, "head_dim": 16, "rope_parameters": YARN_ROPE},
        "mistral": {"sliding_window": 6, "head_dim": 12, "layer_types": ["sliding_attention"] * 2},
    }
    for kind, fields in cases.items():
        dense = dense_model(kind)
        config = deeptalk_config_from_dense(
            dense.config, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1
        )
        for field, value in fields.items():
            assert getattr(config, field) == value, (kind, field)
        assert config.rms_norm_eps == 1e-5 and config.norm_topk_prob and config.vocab_size == VOCAB


def test_fields_off_their_defaults_are_carried():
    """The common fields, each off its default (a field left out would fall back to DeepTalk's default unseen at the
    defaults the other tests use); a non-SiLU activation is also used: the logits stay the dense model's."""
    fields = dict(max_position_embeddings=96, use_cache=False, attention_dropout=0.25, initializer_range=0.05)
    torch.manual_seed(0)
    dense = randomize(LlamaForCausalLM(LlamaConfig(**(COMMON | fields), hidden_act="gelu_pytorch_tanh")))
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    for name, value in (fields | {"hidden_act": "gelu_pytorch_tanh"}).items():
        assert getattr(moe.config, name) == value, name
    with torch.no_grad():
        assert max_diff(moe(text_ids()).logits, dense(text_ids()).logits) <= 1e-5


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_full_attention_below_max_window_layers_is_kept(kind):
    """Qwen2/Qwen3 with `max_window_layers`: full attention in the lower layers, the window above."""
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        kind
    ]
    config = config_class(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    dense = randomize(model_class(config))
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    assert moe.config.layer_types == config.layer_types
    with torch.no_grad():  # SEQ = 20 positions, beyond the window
        assert max_diff(moe(text_ids()).logits, dense(text_ids()).logits) <= 1e-5


def test_fields_a_family_does_not_declare_are_not_read():
    """Any config takes extra attributes, which its model ignores: Mistral slides the window on every layer whatever
    a `layer_types` attribute says, and Llama has no window at all."""
    torch.manual_seed(0)
    extra = dict(sliding_window=4, layer_types=["full_attention", "sliding_attention"])
    for dense in (
        MistralForCausalLM(MistralConfig(**COMMON, **extra)),
        LlamaForCausalLM(LlamaConfig(**COMMON, **extra)),
    ):
        dense = randomize(dense)
        moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
        ids = text_ids()
        with torch.no_grad():
            assert max_diff(moe(ids).logits, dense(ids).logits) <= 1e-5, type(dense).__name__


def test_a_tensor_given_twice_is_refused_before_anything_is_written():
    converter = _Converter(config=DeepTalkConfig(**COMMON, num_experts=2, num_experts_per_tok=1))
    norm = torch.empty(COMMON["hidden_size"], device="meta")
    with pytest.raises(
        CheckpointError, match=r"gives model.norm.weight twice \(the second time from model.norm.weight"
    ):
        converter.plan([("model.norm.weight", norm), ("model.norm.weight", norm)])


@settings(max_examples=12, deadline=None)
@given(
    granularity=st.integers(1, 4),
    shared_fraction=st.floats(0, 0.99),
    text_sets=st.integers(1, 3),
    speech_sets=st.integers(0, 2),
    k_sets=st.integers(1, 3),
    routing=st.sampled_from(["hard", "none"]),
)
def test_zero_router_picks_whole_sets_of_parts(granularity, shared_fraction, text_sets, speech_sets, k_sets, routing):
    """With the tie-stable top-k, the k lowest-index experts hold every routed part equally often."""
    shared = int(shared_fraction * granularity)
    routed_parts = granularity - shared
    dense = dense_model("llama")
    moe = upcycle_dense(
        dense,
        num_text_experts=text_sets * routed_parts,
        num_speech_experts=speech_sets * routed_parts,
        num_experts_per_tok=k_sets * routed_parts,
        granularity=granularity,
        num_shared_experts=shared,
    )
    config = moe.config
    config.modality_routing = routing
    part = config.moe_intermediate_size
    gate = dense.model.layers[0].mlp.gate_proj.weight
    block = moe.model.layers[0].mlp
    experts = torch.cat([block.experts.gate_up_proj] + ([block.speech_experts.gate_up_proj] if speech_sets else []))
    if shared:
        assert torch.equal(block.shared_experts.gate_proj.weight, gate[: shared * part])
    # The experts a zero router picks for a text token, in `[experts; speech_experts]` order.
    num_scored = experts.shape[0] if routing == "none" else text_sets * routed_parts
    weights, picks = topk_routing(torch.zeros(1, num_scored), config)
    held = []
    for j in picks[0][weights[0] > 0].tolist():
        matches = [p for p in range(granularity) if torch.equal(experts[j, :part], gate[p * part : (p + 1) * part])]
        held += matches
    assert sorted(held) == sorted(list(range(shared, granularity)) * (len(held) // routed_parts))
    assert len(held) == min(num_scored, config.num_experts_per_tok)
    with torch.no_grad():
        assert max_diff(moe(text_ids(1)).logits, dense(text_ids(1)).logits) <= 1e-5


def test_expert_j_holds_routed_part_j_mod_the_routed_parts():
    """docs/upcycling.md's map: the first s of the g parts are shared; expert j of each group holds routed part
    j mod (g - s), gate and up rows and down columns alike (the zero-router test compares the parts as a multiset)."""
    granularity, shared = 4, 1
    routed = granularity - shared
    dense = dense_model("llama")
    moe = upcycle_dense(
        dense,
        num_text_experts=2 * routed,
        num_speech_experts=routed,
        num_experts_per_tok=routed,
        granularity=granularity,
        num_shared_experts=shared,
    )
    mlp, block, part = dense.model.layers[0].mlp, moe.model.layers[0].mlp, moe.config.moe_intermediate_size
    for group in (block.experts, block.speech_experts):
        for j in range(group.num_experts):
            rows = slice((shared + j % routed) * part, (shared + j % routed + 1) * part)
            assert torch.equal(group.gate_up_proj[j, :part], mlp.gate_proj.weight[rows]), j
            assert torch.equal(group.gate_up_proj[j, part:], mlp.up_proj.weight[rows]), j
            assert torch.equal(group.down_proj[j], mlp.down_proj.weight[:, rows]), j


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(granularity=5), "granularity=5"),
        (dict(granularity=2, num_text_experts=3), r"^\{'num_text_experts': 3\} must be multiples"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok=0 >= 1"),
        (dict(num_speech_experts=-1), "num_speech_experts=-1 >= 0"),  # not "multiples of 1"
        (dict(granularity=2, num_shared_experts=2), "num_shared_experts=2"),
        (dict(num_text_experts=0), "at least one text expert"),
        (dict(init_noise=-1.0), "init_noise"),
        (dict(drop_fraction=1.5), "drop_fraction"),
        (dict(speech_vocab_size=-1), "speech_vocab_size=-1 must be a whole number of speech ids, >= 0"),
        (dict(speech_vocab_size=2.5), "speech_vocab_size=2.5 must be a whole number"),
    ],
)
def test_invalid_options_are_refused(options, message):
    arguments = dict(num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2) | options
    with pytest.raises(ValueError, match=message):
        upcycle_dense(dense_model("llama"), **arguments)


def test_a_peft_model_source_is_refused_naming_the_merge():
    """Upcycling reads the base weights: adapters would be lost (wrapped or injected), a PeftModel is not a path."""
    peft_model = get_peft_model(dense_model("llama"), LoraConfig(target_modules=["q_proj", "gate_proj"], r=2))
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    with pytest.raises(TypeError, match="the source is a PeftModel: .*merge_and_unload"):
        upcycle_dense(peft_model, **options)
    with pytest.raises(ValueError, match="already holds PEFT adapters: upcycling would copy the base weights"):
        upcycle_dense(peft_model.get_base_model(), **options)
    merged = peft_model.merge_and_unload()
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(upcycle_dense(merged, **options)(ids).logits, merged(ids).logits)


def test_unsupported_architectures_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2'.*supported .*llama, mistral, qwen2, qwen3"):
        upcycle_dense(gpt2, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    biased = LlamaForCausalLM(LlamaConfig(**COMMON, mlp_bias=True))
    with pytest.raises(CheckpointError, match="mlp_bias"):
        upcycle_dense(biased, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)


def expert_weights(model: DeepTalkForCausalLM, layer: int = 0, group: str = "experts"):
    """`(gate, up, down)` of a group, each `[E, I, H]` / `[E, H, I]`."""
    experts = getattr(model.model.layers[layer].mlp, group)
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    return gate, up, experts.down_proj.detach()


def test_noise_and_drop_upcycling():
    dense = dense_model("qwen3")
    options = dict(num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2, granularity=2)
    plain = upcycle_dense(dense, **options)
    dropped = upcycle_dense(dense, drop_fraction=0.5, seed=3, **options)
    again = upcycle_dense(dense, drop_fraction=0.5, seed=3, **options)
    other_seed = upcycle_dense(dense, drop_fraction=0.5, seed=4, **options)
    for group in ("experts", "speech_experts"):
        gate, up, down = expert_weights(dropped, group=group)
        plain_gate, plain_up, plain_down = expert_weights(plain, group=group)
        assert all(
            torch.equal(a, b) for a, b in zip(expert_weights(again, group=group), (gate, up, down), strict=True)
        )
        assert not torch.equal(expert_weights(other_seed, group=group)[0], gate)
        for j in range(gate.shape[0]):
            changed_gate = (gate[j] != plain_gate[j]).any(dim=1)
            changed_up = (up[j] != plain_up[j]).any(dim=1)
            changed_down = (down[j] != plain_down[j]).any(dim=0)
            # Half of the expert's 24 channels, the same ones in gate, up and down.
            assert changed_gate.sum() == 12
            assert torch.equal(changed_gate, changed_up) and torch.equal(changed_gate, changed_down)
    noisy = upcycle_dense(dense, init_noise=0.01, **options)
    gate, _, _ = expert_weights(noisy)
    plain_gate, _, _ = expert_weights(plain)
    relative = (gate - plain_gate).std() / dense.model.layers[0].mlp.gate_proj.weight.std()
    # std × the dense matrix's std, measured over 3,072 entries (the sample's own spread is about 1.3%)
    assert relative.item() == pytest.approx(0.01, rel=0.08)
    assert not torch.equal(gate[0], gate[2])  # copies of the same part now differ
    # Seeded per (layer, group, expert): text expert 0 and speech expert 0, copies of the same part, differ too.
    assert torch.equal(expert_weights(plain)[0][0], expert_weights(plain, group="speech_experts")[0][0])
    for model in (dropped, noisy):
        assert not torch.equal(expert_weights(model)[0][0], expert_weights(model, group="speech_experts")[0][0])
    for model in (dropped, noisy):  # routers stay zero and attention untouched
        assert not model.model.layers[0].mlp.gate.weight.any()
        assert torch.equal(
            model.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
        )


def test_noise_reaches_gate_up_and_down_of_every_routed_expert_and_spares_the_shared_one():
    """docs/upcycling.md: `init_noise=σ` adds noise of std σ × std(dense matrix) to each routed expert's gate_proj,
    up_proj and down_proj (each matrix's own std: here 1x, 3x and 0.5x apart); the shared expert stays the dense
    parts (the test above measures the gate alone)."""
    dense = dense_model("llama")
    with torch.no_grad():
        dense.model.layers[0].mlp.up_proj.weight.mul_(3.0)
        dense.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    options = dict(
        num_text_experts=3, num_speech_experts=3, num_experts_per_tok=3, granularity=4, num_shared_experts=1
    )
    plain, noisy = upcycle_dense(dense, **options), upcycle_dense(dense, init_noise=0.01, seed=1, **options)
    mlp = dense.model.layers[0].mlp
    for i, proj in enumerate((mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        change = torch.cat(
            [
                (expert_weights(noisy, group=g)[i] - expert_weights(plain, group=g)[i]).reshape(-1)
                for g in ("experts", "speech_experts")
            ]
        )
        assert change.count_nonzero() == change.numel(), i  # every entry of every routed expert
        # 2,304 entries: the sample's own spread is about 1.5%
        assert (change.std() / proj.weight.std()).item() == pytest.approx(0.01, rel=0.08), i
    for name in ("gate_proj", "up_proj", "down_proj"):
        shared = (getattr(m.model.layers[0].mlp.shared_experts, name).weight for m in (noisy, plain))
        assert torch.equal(*shared), name


def test_noise_and_dropped_channels_are_seeded_per_layer():
    """Two layers holding the same dense MLP get different noise and different re-initialised channels."""
    dense = dense_model("llama")
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(dense.model.layers[1].mlp, name).weight.copy_(getattr(dense.model.layers[0].mlp, name).weight)
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    plain = upcycle_dense(dense, **options)
    for option in (dict(init_noise=0.01), dict(drop_fraction=0.5)):
        model = upcycle_dense(dense, seed=3, **options, **option)
        changes = [expert_weights(model, layer)[0] - expert_weights(plain, layer)[0] for layer in (0, 1)]
        assert changes[0].any() and not torch.equal(changes[0], changes[1]), option


def test_drop_fraction_rounds_to_the_nearest_channel_count():
    """r times an expert's 24 channels, rounded: 3.6 -> 4 and 2.4 -> 2 channels re-initialised, in each expert."""
    dense = dense_model("llama")
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=2, granularity=2)
    plain = upcycle_dense(dense, **options)
    for fraction, channels in ((0.15, 4), (0.1, 2)):
        dropped = upcycle_dense(dense, drop_fraction=fraction, **options)
        changed = (expert_weights(dropped)[2] != expert_weights(plain)[2]).any(dim=1)  # down_proj [E, H, I]
        assert changed.sum(-1).tolist() == [channels, channels], fraction


def test_drop_upcycling_draws_from_each_dense_matrix_statistics():
    """Re-initialised channels follow a normal distribution with the mean and std of the dense matrix they replace."""
    dense = dense_model("llama")
    with torch.no_grad():
        for shift, layer in zip((1.0, -2.0), dense.model.layers, strict=True):
            layer.mlp.gate_proj.weight.add_(shift)
            layer.mlp.down_proj.weight.mul_(3.0)
    moe = upcycle_dense(dense, num_text_experts=8, num_speech_experts=4, num_experts_per_tok=2, drop_fraction=1.0)
    for layer in range(2):
        mlp = dense.model.layers[layer].mlp
        fresh = [
            torch.cat([group.reshape(-1) for group in groups])
            for groups in zip(expert_weights(moe, layer), expert_weights(moe, layer, "speech_experts"), strict=True)
        ]
        for values, proj in zip(fresh, (mlp.gate_proj, mlp.up_proj, mlp.down_proj), strict=True):
            mean, std = proj.weight.mean().item(), proj.weight.std().item()
            assert abs(values.mean().item() - mean) < 0.05 * std and abs(values.std().item() / std - 1) < 0.05


def test_fine_grained_drop_upcycling_draws_from_the_whole_dense_matrix():
    """With granularity 2 each expert holds half of the MLP; its re-initialised channels still follow the mean and std
    of the whole dense matrix, not of its own half (here the halves are shifted apart: +2 and -2)."""
    dense = dense_model("llama")
    with torch.no_grad():
        for layer in dense.model.layers:
            for weight, axis in ((layer.mlp.gate_proj.weight, 0), (layer.mlp.down_proj.weight, 1)):
                half = weight.shape[axis] // 2
                weight.narrow(axis, 0, half).add_(2.0)
                weight.narrow(axis, half, half).sub_(2.0)
    moe = upcycle_dense(
        dense, num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2, granularity=2, drop_fraction=1.0
    )
    mlp = dense.model.layers[0].mlp
    gate, _, down = expert_weights(moe, 0)
    for fresh, proj in ((gate, mlp.gate_proj), (down, mlp.down_proj)):
        mean, std = proj.weight.mean().item(), proj.weight.std().item()
        for expert in fresh:  # each expert alone, parts 0 and 1 alike
            assert abs(expert.mean().item() - mean) < 0.15 * std and abs(expert.std().item() / std - 1) < 0.15


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_speech_vocabulary(kind):
    dense = dense_model(kind)
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=2, num_experts_per_tok=2, speech_vocab_size=10)
    assert moe.config.vocab_size == VOCAB + 10 and moe.config.speech_token_start == VOCAB
    text_rows = moe.model.embed_tokens.weight
    assert torch.allclose(moe.model.speech_embed_tokens.weight, text_rows.mean(0).expand(10, -1))
    assert (moe.speech_lm_head.weight is moe.model.speech_embed_tokens.weight) == (kind == "qwen2")
    ids = text_ids()
    with torch.no_grad():
        logits = moe(ids).logits
        assert logits.shape[-1] == VOCAB + 10
        assert max_diff(logits[..., :VOCAB], dense(ids).logits) <= 1e-5
        # Untrained speech ids score the text logits' mean (docs/upcycling.md): never above the best text id.
        assert (
            max_diff(logits[..., VOCAB:], logits[..., :VOCAB].mean(-1, keepdim=True).expand_as(logits[..., VOCAB:]))
            <= 1e-5
        )
        speech = torch.cat([ids[:, :4], torch.full((2, 3), VOCAB + 1)], dim=1)
        assert torch.isfinite(moe(speech).logits).all()
    prompt = ids[:, :6]
    assert torch.equal(
        moe.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
        dense.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
    )


def test_dtype_and_independence_from_the_source():
    dense = dense_model("llama")
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, dtype="bfloat16")
    assert moe.dtype == torch.bfloat16 and moe.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    assert not hasattr(moe.model.layers[0].mlp, "speech_experts")
    assert moe.name_or_path == moe.config.name_or_path == ""  # no hub repo (PEFT records it as the adapter's base)
    fp32 = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    with torch.no_grad():
        fp32.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(fp32.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    config = deeptalk_config_from_dense(dense.config, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    config.rope_parameters["factor"] = 8.0  # e.g. extending the context before training: the source keeps its own
    assert dense.config.rope_parameters["factor"] == 4.0
    for wrong in ["float33", "int8", torch.float8_e4m3fn]:  # a checkpoint in an integer or float8 dtype would not load
        with pytest.raises(ValueError, match="is not a weights dtype"):
            upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, dtype=wrong)
    with pytest.raises(ValueError, match="init_noise=inf must be finite and >= 0"):
        upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, init_noise=math.inf)


def test_in_memory_upcycling_keeps_the_model_dtype_and_generation_config():
    """A model cast after it was built (its config may still name another dtype) and its own generation settings."""
    dense = dense_model("llama")
    dense.config.dtype = torch.float32  # as `from_pretrained` leaves it
    dense = dense.to(torch.bfloat16)
    dense.generation_config = GenerationConfig(max_new_tokens=7, temperature=0.3, do_sample=True, top_k=5)
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    assert moe.dtype == torch.bfloat16 and moe.config.dtype == torch.bfloat16
    generation = moe.generation_config
    assert (generation.max_new_tokens, generation.temperature, generation.do_sample, generation.top_k) == (
        7,
        0.3,
        True,
        5,
    )


def test_speech_rows_in_another_dtype_are_those_of_resize_speech_vocab():
    """The mean of the text rows is taken after the cast, as `resize_speech_vocab` takes it: the same rows, bit for
    bit, whichever way the speech block is added."""
    dense = dense_model("llama")
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, dtype="bfloat16")
    moe = upcycle_dense(dense, speech_vocab_size=4, **options)
    reference = upcycle_dense(dense, **options)
    reference.resize_speech_vocab(4)
    assert torch.equal(moe.model.speech_embed_tokens.weight, reference.model.speech_embed_tokens.weight)
    assert torch.equal(moe.speech_lm_head.weight, reference.speech_lm_head.weight)


def test_bf16_upcycling_is_bit_exact_where_nothing_is_rounded_apart(tmp_path):
    """Granularity 1 with a power-of-two top-k: the bf16 dense model's logits, bit for bit (docs/upcycling.md)."""
    dense_model("qwen3").save_pretrained(tmp_path)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    moe = upcycle_dense(tmp_path, num_text_experts=2, num_speech_experts=2, num_experts_per_tok=2, dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(moe(text_ids()).logits, dense(text_ids()).logits)


def test_mlp_only_layers_stay_dense():
    dense = dense_model("mistral")
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, mlp_only_layers=[1])
    assert moe.config.moe_layers == [0]
    assert torch.equal(moe.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():
        assert max_diff(moe(text_ids()).logits, dense(text_ids()).logits) <= 1e-5


# Streaming conversion, checkpoint directory to checkpoint directory


def save_dense(model, path, max_shard_size="40KB"):
    """A sharded dense checkpoint with a small word-level tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    model.save_pretrained(path, max_shard_size=max_shard_size)
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)
    return path


def load_checked(path) -> DeepTalkForCausalLM:
    """`AutoModelForCausalLM.from_pretrained` with no missing, unexpected or mismatched keys (else random weights)."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def leftovers(parent) -> list[str]:
    return sorted(name for name in os.listdir(parent) if name.startswith("."))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_streaming_checkpoint_is_the_dense_model(kind, tmp_path):
    dense = dense_model(kind)
    source = save_dense(dense, tmp_path / "dense")
    assert len([f for f in os.listdir(source) if f.endswith(".safetensors")]) > 1
    destination = tmp_path / "moe"
    options = dict(num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2, granularity=2)
    assert upcycle_checkpoint(source, destination, max_shard_size="60KB", progress=False, **options) == destination
    files = sorted(os.listdir(destination))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in index["weight_map"]  # the per-expert on-disk layout
    assert set(index["weight_map"].values()) == set(shards)
    moe = load_checked(destination)
    assert isinstance(moe, DeepTalkForCausalLM)
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(moe(ids).logits, dense(ids).logits) <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(
        moe.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
        dense.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
    )
    assert leftovers(tmp_path) == []


def fake_hub(repo: Path, cache: Path, monkeypatch) -> list[tuple[str, str | None, bool]]:
    """`snapshot_download` from the folder `repo`; each call is recorded as (id, revision, weights asked for)."""
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, any(pattern.endswith(".safetensors") for pattern in allow_patterns)))
        snapshot = cache / "0123abcd"  # the hub cache's snapshot folder is named by its commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in hf_utils.filter_repo_objects(os.listdir(repo), allow_patterns=allow_patterns):
            shutil.copyfile(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr("deeptalk_hf.upcycling.snapshot_download", snapshot_download)
    return calls


def test_a_hub_source_is_checked_before_its_weights_are_downloaded(tmp_path, monkeypatch, capsys):
    """A wrong option or an unsupported model fails on the configs alone, not after a download of many GB."""
    repo = save_dense(dense_model("llama"), tmp_path / "repo")
    calls = fake_hub(repo, tmp_path / "cache", monkeypatch)
    with pytest.raises(ValueError, match="granularity=5"):
        upcycle_checkpoint("org/llama", tmp_path / "moe", num_text_experts=2, num_speech_experts=0,
                           num_experts_per_tok=1, granularity=5)  # fmt: skip
    from deeptalk_hf.cli import EXIT_SOURCE, EXIT_USAGE, upcycle_main

    base = ["org/llama", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as exit_info:  # --num-text-experts and --top-k missing
        upcycle_main(base)
    assert exit_info.value.code == EXIT_USAGE
    assert upcycle_main([*base, "--num-text-experts", "2", "--top-k", "1", "--granularity", "5"]) == EXIT_USAGE
    (repo / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert upcycle_main([*base, "--num-text-experts", "2", "--top-k", "1"]) == EXIT_SOURCE
    assert "'gpt2'" in capsys.readouterr().err
    assert calls and not any(weights for *_, weights in calls)
    assert not (tmp_path / "moe").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["sharded", "single", "both"])
def test_a_hub_source_downloads_only_the_weights_its_index_names(layout, tmp_path, monkeypatch):
    """Mistral's repositories also hold `consolidated.safetensors` (the same weights again): only the configs,
    tokenizer files and `model.safetensors` (or, without it, the files of the index) are fetched, from one commit. A
    repository holding both a single file and an index (a sharded save over a single one) converts the single file,
    as transformers loads it (the index's shards were converted)."""
    dense = dense_model("mistral")
    repo = save_dense(dense, tmp_path / "repo", max_shard_size="40KB" if layout == "sharded" else "10MB")
    if layout == "both":
        save_dense(dense_model("mistral", seed=5), repo, max_shard_size="40KB")  # other weights, in shards
    (repo / "consolidated.safetensors").write_bytes(b"not needed")
    calls = fake_hub(repo, tmp_path / "cache", monkeypatch)
    options = dict(num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2, progress=False)
    upcycle_checkpoint("mistralai/tiny", tmp_path / "moe", revision="main", **options)
    shards = [("mistralai/tiny", "0123abcd", True)] if layout == "sharded" else []
    # the configs first (the options are checked before any weights come), then the weights from their commit
    assert calls == [("mistralai/tiny", "main", False), ("mistralai/tiny", "0123abcd", True), *shards]
    downloaded = set(os.listdir(tmp_path / "cache" / "0123abcd"))
    shards = {name for name in os.listdir(repo) if name.startswith("model-")} if layout == "both" else set()
    assert downloaded == set(os.listdir(repo)) - {"consolidated.safetensors"} - shards
    loaded = AutoModelForCausalLM.from_pretrained(repo)  # what transformers reads from the repository
    with torch.no_grad():
        ids = text_ids()
        assert max_diff(load_checked(tmp_path / "moe")(ids).logits, loaded(ids).logits) <= 1e-5


def test_streaming_equals_in_memory_with_every_option(tmp_path):
    """Disk to disk, from a path, and from the model in memory: the same tensors, bit for bit."""
    dense = dense_model("qwen2")  # tied embeddings: the speech rows are tied too
    source = save_dense(dense, tmp_path / "dense")
    options = dict(
        num_text_experts=2,
        num_speech_experts=4,
        num_experts_per_tok=2,
        granularity=3,
        num_shared_experts=1,
        speech_vocab_size=6,
        init_noise=0.05,
        drop_fraction=0.25,
        seed=11,
        mlp_only_layers=[0],
    )
    upcycle_checkpoint(source, tmp_path / "moe", max_shard_size="30KB", progress=False, **options)
    streamed = load_checked(tmp_path / "moe").state_dict()
    from_path = upcycle_dense(source, **options).state_dict()
    from_memory = upcycle_dense(dense, **options).state_dict()
    assert streamed.keys() == from_path.keys() == from_memory.keys()
    for name in streamed:
        assert torch.equal(streamed[name], from_path[name]), name
        assert torch.equal(streamed[name], from_memory[name]), name


def test_streaming_tensors_of_any_byte_size_keep_their_own_bytes(tmp_path):
    """Tensors whose sizes are not multiples of 64 bytes (hidden 20: 80-byte norms) share one shard buffer at aligned
    offsets: rounding an offset down would overlap the next tensor (the test models' sizes above are all aligned)."""
    config = LlamaConfig(**{**COMMON, "hidden_size": 20, "intermediate_size": 30, "head_dim": 10})
    dense = randomize(LlamaForCausalLM(config))
    options = dict(num_text_experts=2, num_speech_experts=1, num_experts_per_tok=1)
    upcycle_checkpoint(save_dense(dense, tmp_path / "dense"), tmp_path / "moe", progress=False, **options)
    streamed = load_checked(tmp_path / "moe").state_dict()
    expected = upcycle_dense(dense, **options).state_dict()
    assert streamed.keys() == expected.keys()
    for name in streamed:
        assert torch.equal(streamed[name], expected[name]), name
    # Mixed dtypes: 63 x 21 fp16 embedding values (2,646 bytes) beside fp32 tensors, which need aligned offsets.
    mixed = dict(vocab_size=63, hidden_size=21, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True)
    dense = randomize(LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), **mixed, "head_dim": 8})))
    dense.model.embed_tokens.half()
    upcycle_checkpoint(save_dense(dense, tmp_path / "mixed"), tmp_path / "mixed_moe", progress=False, **options)
    assert stored_dtypes(tmp_path / "mixed_moe")["model.embed_tokens.weight"] == "F16"
    streamed = load_checked(tmp_path / "mixed_moe").state_dict()
    for name, tensor in upcycle_dense(tmp_path / "mixed", **options).state_dict().items():
        assert torch.equal(streamed[name].float(), tensor.float()), name


def stored_dtypes(folder: Path) -> dict[str, str]:
    """Each tensor's dtype as the shards store it (loading would hide a wrong one: `from_pretrained` casts)."""
    dtypes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            dtypes |= {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    return dtypes


def test_streamed_tensors_are_stored_in_the_asked_or_source_dtype(tmp_path):
    """Every stored tensor (copies, speech rows, zero routers, imported experts) in the dtype asked for; without one,
    perturbed experts of a bf16 source stay bf16, equal to the in-memory result."""
    dense = dense_model("llama")
    source = save_dense(dense, tmp_path / "dense")
    options = dict(num_text_experts=2, num_speech_experts=2, num_experts_per_tok=1, progress=False)
    upcycle_checkpoint(source, tmp_path / "bf16", speech_vocab_size=4, dtype="bfloat16", **options)
    dtypes = stored_dtypes(tmp_path / "bf16")
    assert "model.layers.0.mlp.gate.weight" in dtypes and "model.speech_embed_tokens.weight" in dtypes
    assert set(dtypes.values()) == {"BF16"}
    torch.manual_seed(0)
    moe_source = Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4, head_dim=8))
    randomize(moe_source).save_pretrained(tmp_path / "moe_source")
    upcycle_moe_checkpoint(tmp_path / "moe_source", tmp_path / "imported", dtype="bfloat16", progress=False)
    assert set(stored_dtypes(tmp_path / "imported").values()) == {"BF16"}

    save_dense(dense.to(torch.bfloat16), tmp_path / "dense_bf16")
    perturbed = dict(options, init_noise=0.01, drop_fraction=0.25)
    upcycle_checkpoint(tmp_path / "dense_bf16", tmp_path / "noisy", **perturbed)
    assert set(stored_dtypes(tmp_path / "noisy").values()) == {"BF16"}
    streamed = load_checked(tmp_path / "noisy").state_dict()
    del perturbed["progress"]
    for name, tensor in upcycle_dense(tmp_path / "dense_bf16", **perturbed).state_dict().items():
        assert torch.equal(streamed[name], tensor), name


def test_a_single_shard_output_has_no_index(tmp_path):
    """As `save_pretrained` writes it: `model.safetensors` alone."""
    source = save_dense(dense_model("llama"), tmp_path / "dense", max_shard_size="5GB")
    upcycle_checkpoint(source, tmp_path / "moe", num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1,
                       progress=False)  # fmt: skip
    files = set(os.listdir(tmp_path / "moe"))
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files


def test_upcycled_model_saves_and_reloads(tmp_path):
    """Round trip of the in-memory result through save_pretrained / from_pretrained (buffers, meta device)."""
    moe = upcycle_dense(dense_model("llama"), num_text_experts=2, num_speech_experts=2, num_experts_per_tok=2)
    moe.save_pretrained(tmp_path)
    reloaded = load_checked(tmp_path)
    ids = text_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, moe(ids).logits)


def rewrite_shard(shard: Path, edit) -> None:
    """`edit` the shard's tensors (a dict, in place) and write them back."""
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def corrupt(kind: str, source):
    shards = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
    victim = source / shards[-1]
    data = victim.read_bytes()
    if kind == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif kind == "garbage-header":
        victim.write_bytes(b"\xff" * 16 + data[16:])
    elif kind == "missing-shard":
        victim.unlink()
    elif kind == "missing-tensor":
        rewrite_shard(victim, lambda tensors: tensors.pop(sorted(tensors)[0]))
    elif kind == "no-weights":
        for shard in shards:
            (source / shard).unlink()
        (source / "model.safetensors.index.json").unlink()
    elif kind in ("index-not-a-map", "index-not-an-object"):
        (source / "model.safetensors.index.json").write_text(
            '{"weight_map": []}' if kind == "index-not-a-map" else "[]"
        )
    elif kind in ("mlp-wider-than-config", "mlp-narrower-than-config"):  # transformers refuses both
        config = json.loads((source / "config.json").read_text())
        config["intermediate_size"] += -16 if kind == "mlp-wider-than-config" else 16
        (source / "config.json").write_text(json.dumps(config))


CORRUPTIONS = ["truncated", "garbage-header", "missing-shard", "missing-tensor", "no-weights", "index-not-a-map"]
CORRUPTIONS += ["index-not-an-object", "mlp-wider-than-config", "mlp-narrower-than-config"]


# What each corruption is refused as, where the message is the check's own (not a later failure's).
NAMED_PROBLEMS = {
    "missing-shard": "lacks the shard files",
    "missing-tensor": "index lists tensors that their shards lack",
    "index-not-a-map": "is not a name -> file map",
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_source_fails_cleanly(kind, tmp_path):
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    corrupt(kind, source)
    destination = tmp_path / "out" / "moe"
    with pytest.raises(CheckpointError, match=NAMED_PROBLEMS.get(kind, "")):
        upcycle_checkpoint(source, destination, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    assert not destination.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []
    with pytest.raises(CheckpointError):
        upcycle_dense(source, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)


def test_a_single_file_checkpoint_missing_a_tensor_or_with_a_wrong_shape_is_refused(tmp_path):
    """Without an index to compare with, the tensors themselves are checked against the config before anything is
    written (a missing norm would otherwise be left out, a wrong-shaped one streamed as it is)."""
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    cases = {
        r"missing \(1\): model\.norm\.weight": lambda tensors: tensors.pop("model.norm.weight"),
        r"shape \(1\): model\.norm\.weight: \(33,\) vs \(32,\)": lambda tensors: tensors.update(
            {"model.norm.weight": torch.ones(COMMON["hidden_size"] + 1)}
        ),
    }
    for i, (message, edit) in enumerate(cases.items()):
        source = save_dense(dense_model("llama"), tmp_path / f"dense{i}", max_shard_size="5GB")
        rewrite_shard(source / "model.safetensors", edit)
        with pytest.raises(CheckpointError, match=message):
            upcycle_checkpoint(source, tmp_path / "moe", progress=False, **options)
        assert not (tmp_path / "moe").exists()
        with pytest.raises(CheckpointError, match=message):
            upcycle_dense(source, **options)


def test_a_file_given_as_the_source_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors is a file; expected a checkpoint directory"):
        upcycle_checkpoint(
            tmp_path / "model.safetensors", tmp_path / "moe", num_text_experts=2, num_speech_experts=0,
            num_experts_per_tok=1,
        )  # fmt: skip


def test_each_tensor_is_read_from_the_shard_its_index_names(tmp_path):
    """A shard may hold a stale copy of a tensor that the index places in another shard: transformers reads the
    index's, and so does conversion (reading both wrote one output shard twice, the second time with that tensor
    alone)."""
    from safetensors.torch import load_file, save_file

    dense = dense_model("llama")
    source = save_dense(dense, tmp_path / "dense", max_shard_size="20KB")
    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    other = next(f for f in sorted(set(weight_map.values())) if f != weight_map["model.norm.weight"])
    tensors = load_file(source / other)
    tensors["model.norm.weight"] = torch.zeros_like(dense.model.norm.weight)  # stale: not what the model holds
    save_file(tensors, source / other, metadata={"format": "pt"})
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    upcycle_checkpoint(source, tmp_path / "moe", max_shard_size="20KB", progress=False, **options)
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(load_checked(tmp_path / "moe")(ids).logits, dense(ids).logits) < 1e-5


@pytest.mark.parametrize("single_last", [True, False])
def test_a_folder_holding_a_single_file_and_an_index_converts_what_transformers_loads(single_last, tmp_path):
    """transformers' `save_pretrained` leaves the other layout's files of an earlier save, and `from_pretrained` reads
    the single `model.safetensors` where both are there: conversion reads the same (it preferred the index, refusing
    the folder or converting other weights than the dense model's)."""
    source, sizes = tmp_path / "dense", ["20KB", "1GB"] if single_last else ["1GB", "20KB"]
    for seed, size in enumerate(sizes):  # the second save leaves the first's other layout
        save_dense(dense_model("llama", seed=seed), source, max_shard_size=size)
    assert {"model.safetensors", "model.safetensors.index.json"} <= {p.name for p in source.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(source)
    moe = upcycle_dense(source, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(moe(ids).logits, loaded(ids).logits) < 1e-5


@pytest.mark.parametrize("text", ["{not json", "[]", '{"max_new_tokens": "x"}', '{"watermarking_config": 5}'])
def test_an_unreadable_generation_config_falls_back_to_the_model_configs(tmp_path, caplog, text):
    """As transformers loads such a folder (it failed after every shard was written, as an unexpected error: not
    JSON, then a JSON list or a field of the wrong type, a TypeError, or a sub-config that is not one)."""
    dense = dense_model("llama")
    source = save_dense(dense, tmp_path / "dense")
    (source / "generation_config.json").write_text(text)
    with caplog.at_level("WARNING", logger="deeptalk_hf.upcycling"):
        upcycle_checkpoint(
            source, tmp_path / "moe", num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, progress=False
        )
    assert "generation_config.json is unreadable" in caplog.text
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(load_checked(tmp_path / "moe")(ids).logits, dense(ids).logits) < 1e-5


def test_a_float64_model_runs_on_the_eager_experts():
    """No grouped matmul takes float64: an upcycled float64 model failed at its first forward."""
    dense = dense_model("llama").double()
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, dtype="float64")
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(moe(ids).logits, dense(ids).logits) < 1e-12


def test_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    destination = tmp_path / "moe"
    writes = []

    def failing_save_file(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:
            raise OSError("No space left on device")
        return save_file(tensors, filename, metadata=metadata)

    from safetensors.torch import save_file

    monkeypatch.setattr("deeptalk_hf.upcycling.save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        upcycle_checkpoint(
            source,
            destination,
            num_text_experts=2,
            num_speech_experts=0,
            num_experts_per_tok=1,
            max_shard_size="20KB",
            progress=False,
        )
    assert len(writes) == 2 and not destination.exists() and leftovers(tmp_path) == []


def test_destination_rules(tmp_path):
    source = save_dense(dense_model("mistral"), tmp_path / "dense")
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, progress=False)
    destination = tmp_path / "moe"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    # Not a model folder: `overwrite` would delete what it holds (a user asking to "write into" it), so it is kept,
    # and said so at once (not "pass --overwrite", which would only lead to this refusal).
    with pytest.raises(FileExistsError, match="holds files but no config.json"):
        upcycle_checkpoint(source, destination, **options)
    with pytest.raises(FileExistsError, match="holds files but no config.json"):
        upcycle_checkpoint(source, destination, overwrite=True, **options)
    assert os.listdir(destination) == ["notes.txt"]
    (destination / "notes.txt").unlink()
    upcycle_checkpoint(source, destination, overwrite=True, **options)  # an empty folder, then a model folder
    (destination / "notes.txt").write_text("mine")
    upcycle_checkpoint(source, destination, overwrite=True, **options)
    assert "config.json" in os.listdir(destination) and "notes.txt" not in os.listdir(destination)
    assert leftovers(tmp_path) == []
    # A dangling symlink is a name that exists: refused unasked (the final rename failed after the whole run).
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="already exists"):
        upcycle_checkpoint(source, tmp_path / "dangling", **options)
    # Neither the source nor a folder holding it (which --overwrite would delete) can be the destination.
    for holder in (source, tmp_path):
        with pytest.raises(ValueError, match="is or holds the source"):
            upcycle_checkpoint(source, holder, overwrite=True, **options)
        assert "model.safetensors.index.json" in os.listdir(source)
    # Nor an existing part of it (a file or folder inside the source).
    with pytest.raises(ValueError, match="is part of the source"):
        upcycle_checkpoint(source, source / "model.safetensors.index.json", overwrite=True, **options)
    assert (source / "model.safetensors.index.json").is_file()
    with pytest.raises(CheckpointError, match="neither a local directory"):
        upcycle_dense(str(tmp_path / "nowhere"), num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match="a_file is a file, not a directory"):
        upcycle_checkpoint(source, tmp_path / "a_file" / "moe", overwrite=True, **options)


def test_a_folder_holding_the_files_a_source_links_to_is_not_replaced(tmp_path):
    """A source folder of symlinks (files kept elsewhere): the folder holding their targets is the source too; replacing
    it left the source's links pointing at the new output."""
    store = save_dense(dense_model("llama"), tmp_path / "store")
    view = tmp_path / "view"
    view.mkdir()
    for file in store.iterdir():
        (view / file.name).symlink_to(file)
    before = {file.name: file.read_bytes() for file in store.iterdir()}
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, progress=False)
    with pytest.raises(ValueError, match="is or holds the source"):
        upcycle_checkpoint(view, store, overwrite=True, **options)
    assert {file.name: file.read_bytes() for file in store.iterdir()} == before and leftovers(tmp_path) == []


def test_a_source_holding_a_symlink_loop_converts(tmp_path):
    """A link that points at nothing (a loop) is no file the source reads: the folder converted before its links were
    taken as sources, then failed with "RuntimeError: Symlink loop"."""
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    (source / "latest").symlink_to("latest")
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, progress=False)
    assert upcycle_checkpoint(source, tmp_path / "moe", **options) == tmp_path / "moe"


def test_a_destination_ending_in_dotdot_is_the_folder_it_names(tmp_path):
    """`deeptalk-upcycle SRC .. --overwrite` from a folder inside a model folder: the temporary folders went inside the
    folder to replace, whose rename then failed (EBUSY) after the whole conversion."""
    old = tmp_path / "old"
    (old / "additional_chat_templates").mkdir(parents=True)  # a folder a model folder may hold
    (old / "config.json").write_text("old")
    with atomic_output_dir(old / "additional_chat_templates" / "..", overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert os.listdir(tmp_path) == ["old"] and os.listdir(old) == ["config.json"]
    assert (old / "config.json").read_text() == "new"


def test_replacing_the_current_directory_is_refused(tmp_path, monkeypatch):
    """`deeptalk-upcycle SRC . --overwrite` (or `..` from inside the model folder), or the library called so from a
    notebook: the process's current directory was the replaced folder, deleted, so every relative path failed after
    (`os.getcwd()`: FileNotFoundError). A new folder inside the current directory is written as ever."""
    model = tmp_path / "model"
    (model / "additional_chat_templates").mkdir(parents=True)
    (model / "config.json").write_text("old")
    for inside, destination in (("", "."), ("additional_chat_templates", "..")):
        monkeypatch.chdir(model / inside)
        with pytest.raises(ValueError, match="is or holds the current directory"):
            with atomic_output_dir(destination, overwrite=True) as staging:
                (staging / "config.json").write_text("new")
        assert os.getcwd() == str((model / inside).resolve()) and (model / "config.json").read_text() == "old"
    with atomic_output_dir("new", overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert (model / "additional_chat_templates" / "new" / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("folder", ["src", ".git"])  # a hidden folder counts as any other (.git/: all the history)
def test_overwrite_never_replaces_a_project_folder_that_has_a_config_json(tmp_path, folder):
    """`deeptalk-upcycle SRC . --overwrite` in a project keeping its own config.json deleted the whole project (code,
    .git, data): a model folder holds files only (a tokenizer's additional_chat_templates/ aside)."""
    project = tmp_path / "project"
    (project / folder).mkdir(parents=True)
    (project / folder / "work").write_text("work")
    (project / "config.json").write_text('{"lr": 0.001}')
    with pytest.raises(FileExistsError, match=rf"holds folders \({re.escape(folder)}\) besides its config.json"):
        with atomic_output_dir(project, overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
    assert (project / folder / "work").read_text() == "work" and leftovers(tmp_path) == []
    shutil.rmtree(project / folder)
    (project / "additional_chat_templates").mkdir()  # a saved tokenizer's folder: a model folder still
    with atomic_output_dir(project, overwrite=True) as staging:
        (staging / "config.json").write_text("{}")
    assert os.listdir(project) == ["config.json"] and leftovers(tmp_path) == []


def test_overwrite_replaces_a_model_folder_holding_hf_downloads_metadata(tmp_path):
    """`hf download REPO --local-dir DIR` leaves its metadata in DIR/.cache/huggingface/: DIR is still a model folder
    that --overwrite replaces (a project's other folders are refused)."""
    model = tmp_path / "model"
    (model / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("commit")
    (model / "config.json").write_text("old")
    with atomic_output_dir(model, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert os.listdir(model) == ["config.json"] and leftovers(tmp_path) == []


def test_a_destination_that_cannot_be_moved_aside_is_kept(tmp_path, monkeypatch):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("mine")
    replace = os.replace

    def refuse_the_first_move(source, target):
        monkeypatch.setattr("deeptalk_hf.upcycling.os.replace", replace)
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr("deeptalk_hf.upcycling.os.replace", refuse_the_first_move)
    with pytest.raises(PermissionError), atomic_output_dir(destination, overwrite=True) as staging:
        (staging / "config.json").write_text("{}")
    assert os.listdir(tmp_path) == ["out"] and (destination / "config.json").read_text() == "mine"


def test_a_failed_final_move_puts_the_old_destination_back(tmp_path, monkeypatch):
    """The old folder was moved aside; if moving the new one in then fails, the old one comes back, nothing beside it."""
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("mine")
    replace, calls = os.replace, []

    def refuse_the_second_move(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(target))
        return replace(source, target)

    monkeypatch.setattr("deeptalk_hf.upcycling.os.replace", refuse_the_second_move)
    with pytest.raises(OSError, match="No space left"), atomic_output_dir(destination, overwrite=True) as staging:
        (staging / "config.json").write_text("{}")
    assert os.listdir(tmp_path) == ["out"] and (destination / "config.json").read_text() == "mine"


def test_destinations_that_could_not_be_written_are_refused_before_the_work(tmp_path, monkeypatch):
    """A folder without write permission (read-only mount) and a mount point as the folder to replace failed after
    the whole conversion (or download, or profiling)."""
    real_access = os.access
    monkeypatch.setattr(
        "deeptalk_hf.upcycling.os.access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode)
    )
    with pytest.raises(ValueError, match=f"no permission to write in {tmp_path}$"):
        check_output_dir(tmp_path / "new" / "deeper")
    monkeypatch.undo()
    (tmp_path / "volume").mkdir()
    monkeypatch.setattr("deeptalk_hf.upcycling.os.path.ismount", lambda path: Path(path) == tmp_path / "volume")
    with pytest.raises(ValueError, match="is a mount point"):
        check_output_dir(tmp_path / "volume", overwrite=True)


def test_a_replaced_folder_that_cannot_all_be_deleted_leaves_the_new_output_and_says_where(
    tmp_path, monkeypatch, caplog
):
    """Once the new output is in place the work is done: what is left of the old one is named, not an error."""
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "config.json").write_text("old")

    def undeletable(path, ignore_errors=False):  # a file the user cannot delete: an error unless ignored
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("deeptalk_hf.upcycling.shutil.rmtree", undeletable)
    with caplog.at_level("WARNING"), atomic_output_dir(destination, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert (destination / "config.json").read_text() == "new"
    (old,) = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert f"they remain in {old}" in caplog.text and (old / "out" / "config.json").read_text() == "old"
    # Interrupted while deleting the old output (Ctrl-C, or SIGTERM as the CLI raises it): it is named too.
    monkeypatch.undo()
    shutil.rmtree(old)
    caplog.clear()
    real_rmtree = shutil.rmtree

    def interrupted(path, ignore_errors=False):
        if str(path).endswith(".old"):
            raise SystemExit(143)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("deeptalk_hf.upcycling.shutil.rmtree", interrupted)
    with (
        pytest.raises(SystemExit),
        caplog.at_level("WARNING"),
        atomic_output_dir(destination, overwrite=True) as staging,
    ):
        (staging / "config.json").write_text("newer")
    assert (destination / "config.json").read_text() == "newer"
    (old,) = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert f"they remain in {old}" in caplog.text


def test_symlinks_and_names_that_only_look_like_model_folders_as_destinations(tmp_path, monkeypatch):
    """A symlink at the destination is the name to replace, never the folder it points to; a dangling one that
    appears meanwhile is kept unasked, as a file would be; a `config.json` that is a folder makes no model folder; a
    folder that cannot be entered cannot be written in."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("link", "dangling"):
        with atomic_output_dir(tmp_path / name, overwrite=True) as staging:
            (staging / "config.json").write_text("new")
        assert not (tmp_path / name).is_symlink() and (tmp_path / name / "config.json").read_text() == "new"
    assert os.listdir(target) == ["notes.txt"] and leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="created while the output was written"):
        with atomic_output_dir(tmp_path / "late") as staging:
            (tmp_path / "late").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="created while the output was written"):
        with atomic_output_file(tmp_path / "late.json", overwrite=False) as partial:
            partial.write_text("ours")
            (tmp_path / "late.json").symlink_to(tmp_path / "nowhere")
    assert (tmp_path / "late").is_symlink() and (tmp_path / "late.json").is_symlink()
    odd = tmp_path / "odd"
    (odd / "config.json").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds files but no config.json"):
        check_output_dir(odd, overwrite=True)
    real_access = os.access
    monkeypatch.setattr(
        "deeptalk_hf.upcycling.os.access",
        lambda path, mode: not (Path(path) == tmp_path and mode & os.X_OK) and real_access(path, mode),
    )
    with pytest.raises(ValueError, match="no permission to write in"):
        check_output_dir(tmp_path / "new")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_the_umask_is_read_without_being_changed(monkeypatch, mask):
    """Reading the umask by setting it changed it for every thread meanwhile: a file another thread created then got
    0644 under a 077 umask."""
    previous = os.umask(mask)
    try:
        set_to = []
        umask = os.umask
        monkeypatch.setattr(os, "umask", lambda value: set_to.append(value) or umask(value))
        assert _umask() == mask and set_to == []
    finally:
        os.umask(previous)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"),
    reason="process names (prctl) and /proc are Linux's",
)
def test_the_umask_is_read_without_being_changed_whatever_the_process_name(monkeypatch):
    """/proc/self/status starts with the process name, cut to 15 bytes: a non-ASCII name (a script's own name, or
    one set as setproctitle does) can end inside a character, which is no UTF-8 text: the umask must still be read
    from it, not by setting it."""
    import ctypes

    libc = ctypes.CDLL(None)
    name = ctypes.create_string_buffer(16)
    libc.prctl(16, name, 0, 0, 0)  # PR_GET_NAME
    previous = os.umask(0o077)
    try:
        assert libc.prctl(15, "обучение-модели".encode()[:15], 0, 0, 0) == 0  # PR_SET_NAME: ends in half a character
        set_to = []
        umask = os.umask
        monkeypatch.setattr(os, "umask", lambda value: set_to.append(value) or umask(value))
        assert _umask() == 0o077 and set_to == []
    finally:
        libc.prctl(15, name.value, 0, 0, 0)
        os.umask(previous)


def test_output_files_follow_the_umask_and_a_file_created_meanwhile_is_kept(tmp_path):
    """safetensors writes its files 0600: the weights of an output meant for a group stayed private. A file that
    appears while an output file is written is kept unless `overwrite` (it was replaced silently)."""
    previous = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "out") as staging:
            save_file({"w": torch.zeros(2)}, staging / "model.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644
    with pytest.raises(FileExistsError, match="created while the output was written"):
        with atomic_output_file(tmp_path / "load.json", overwrite=False) as partial:
            partial.write_text("ours")
            (tmp_path / "load.json").write_text("theirs")
    assert (tmp_path / "load.json").read_text() == "theirs" and leftovers(tmp_path) == []


def test_an_index_whose_weight_map_is_not_names_to_files_is_refused(tmp_path):
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 1}}))
    with pytest.raises(CheckpointError, match="its weight_map is not a name -> file map"):
        upcycle_checkpoint(source, tmp_path / "moe", num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    assert not (tmp_path / "moe").exists()


def test_atomic_output_file_without_overwrite_says_a_file_exists_before_writing(tmp_path):
    """An existing file is refused up front as existing (it was written first, then refused as "created while the
    output was written", which it was not)."""
    target = tmp_path / "load.json"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_output_file(target, overwrite=False) as partial:
            raise AssertionError(f"{partial} is written although {target} exists")
    assert os.listdir(tmp_path) == ["load.json"] and target.read_text() == "mine"


def test_atomic_output_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "load.json"
    target.write_text("old")
    with pytest.raises(OSError, match="No space"), atomic_output_file(target) as partial:
        partial.write_text("half")
        raise OSError("No space left on device")
    assert os.listdir(tmp_path) == ["load.json"] and target.read_text() == "old"
    with atomic_output_file(target) as partial:
        partial.write_text("new")
    assert os.listdir(tmp_path) == ["load.json"] and target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_atomic_output_dir_creates_parents_follows_the_umask_and_may_sit_inside_an_input(tmp_path):
    """A folder from mkdtemp is 0700: the output must follow the umask as `mkdir` would (shared clusters); a new
    folder inside an input (a source checkpoint) is allowed, only one that holds it or is it is refused."""
    with atomic_output_dir(tmp_path / "runs" / "exp1" / "out") as staging:
        (staging / "weights").write_text("x")
    out = tmp_path / "runs" / "exp1" / "out"
    assert (out / "weights").is_file() and stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    (tmp_path / "source").mkdir()
    check_output_dir(tmp_path / "source" / "moe", inputs=[tmp_path / "source"])
    with pytest.raises(ValueError):
        check_output_dir(tmp_path, inputs=[tmp_path / "source"])


def test_streamed_shards_say_their_format_and_the_index_counts_the_parameters(tmp_path):
    """The safetensors "format": "pt" tag (loaders such as transformers 4 require it) and the index's
    total_parameters, as transformers' own save_pretrained writes them."""
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, progress=False)
    out = upcycle_checkpoint(source, tmp_path / "moe", max_shard_size="40KB", **options)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            total += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    assert index["metadata"]["total_parameters"] == total
    with pytest.raises(ValueError, match="max_shard_size=2000000000.0"):  # a float: before any reading
        upcycle_checkpoint(tmp_path / "nowhere", tmp_path / "other", max_shard_size=2e9, **options)
    (source / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(CheckpointError, match="cannot read the config"):
        upcycle_checkpoint(source, tmp_path / "other", **options)


def test_upcycle_dense_and_moe_in_memory_from_a_hub_id(tmp_path, monkeypatch):
    """As the streaming functions: the options are checked on the configs before any weights are fetched, then the
    weights come from the configs' commit."""
    repo = save_dense(dense_model("llama"), tmp_path / "repo")
    calls = fake_hub(repo, tmp_path / "cache", monkeypatch)
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="granularity=5"):
        upcycle_dense("org/llama", **options, granularity=5)
    with pytest.raises(ValueError, match="llama"):  # a dense source given to the MoE import
        upcycle_moe("org/llama")
    assert calls and not any(weights for *_, weights in calls)
    calls.clear()
    model = upcycle_dense("org/llama", **options, revision="main")
    assert calls[0] == ("org/llama", "main", False) and set(calls[1:]) == {("org/llama", "0123abcd", True)}
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(model(ids).logits, AutoModelForCausalLM.from_pretrained(repo)(ids).logits) <= 1e-5


def create_while_writing(monkeypatch, destination: Path, file: str, text: str) -> None:
    """Someone else (another job, a second run) creates `destination` holding `file` while the output is written."""
    from safetensors.torch import save_file

    def save_while_someone_creates_the_destination(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        destination.mkdir(exist_ok=True)
        (destination / file).write_text(text)

    monkeypatch.setattr("deeptalk_hf.upcycling.save_file", save_while_someone_creates_the_destination)


def test_a_destination_created_during_the_run_is_never_replaced_unasked(tmp_path, monkeypatch):
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    destination = tmp_path / "moe"
    create_while_writing(monkeypatch, destination, "notes.txt", "mine")
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, progress=False)
    with pytest.raises(FileExistsError, match="created while the output was written"):
        upcycle_checkpoint(source, destination, **options)
    assert os.listdir(destination) == ["notes.txt"] and leftovers(tmp_path) == []


def test_what_transformers_reads_from_older_checkpoints_is_read_alike(tmp_path):
    """Llama-2-era files hold each layer's rotary `inv_freq` (transformers drops it); a config.json without a dtype
    takes the weights' dtype (transformers' `dtype="auto"`); a tokenizer that ships its own code is copied as is."""
    from safetensors.torch import load_file, save_file

    dense = dense_model("llama").to(torch.bfloat16)
    source = save_dense(dense, tmp_path / "dense", max_shard_size="1GB")
    weights = load_file(source / "model.safetensors")
    weights |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4) for i in range(2)}
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    del config["dtype"]
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenization_custom.py").write_text("# the source's own tokenizer code\n")
    (source / "additional_chat_templates").mkdir()
    (source / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}
    (source / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    in_memory = upcycle_dense(source, **options).eval()
    destination = upcycle_checkpoint(source, tmp_path / "moe", progress=False, **options)
    moe = load_checked(destination)
    assert moe.dtype == in_memory.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(moe(text_ids()).logits, in_memory(text_ids()).logits)
        assert max_diff(moe(text_ids()).logits.float(), dense(text_ids()).logits.float()) < 0.2  # bf16 rounding
    for name in (
        "tokenization_custom.py",
        "tokenizer_config.json",
        "tokenizer.json",
        "additional_chat_templates/tool_use.jinja",
    ):
        assert (destination / name).read_bytes() == (source / name).read_bytes()


def untied_under_a_tied_config(path: Path, moe: bool = False) -> Path:
    """A checkpoint whose config ties the head to the embeddings but whose `lm_head.weight` differs (a fine-tune that
    untied them and left the config), which transformers loads untied."""
    if moe:
        source = Qwen3MoeForCausalLM(
            Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        )
    else:
        source = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    randomize(source)
    source.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    return path


def test_a_head_that_differs_from_tied_embeddings_is_converted_untied_as_transformers_loads_it(tmp_path, caplog):
    """It was dropped for the embeddings (the config's word), giving another model without a word said."""
    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    dense, moe = untied_under_a_tied_config(tmp_path / "dense"), untied_under_a_tied_config(tmp_path / "moe", moe=True)
    ids = text_ids()
    in_memory = AutoModelForCausalLM.from_pretrained(dense)
    for path, results in [
        (
            dense,
            lambda: [
                upcycle_dense(dense, **options),
                upcycle_dense(in_memory, **options),
                load_checked(upcycle_checkpoint(dense, tmp_path / "out", progress=False, **options)),
            ],
        ),
        (
            moe,
            lambda: [
                upcycle_moe(moe),
                load_checked(upcycle_moe_checkpoint(moe, tmp_path / "out_moe", progress=False)),
            ],
        ),
    ]:
        source = AutoModelForCausalLM.from_pretrained(path).eval()
        assert source.lm_head.weight is not source.model.embed_tokens.weight
        with caplog.at_level("WARNING"):
            upcycled = results()
        assert "holds a different lm_head.weight: kept untied" in caplog.text
        with torch.no_grad():
            expected = source(ids).logits
            for model in upcycled:
                assert not model.config.tie_word_embeddings
                assert max_diff(model.eval()(ids).logits, expected) < 1e-5
    assert in_memory.config.tie_word_embeddings  # the user's model is left as it was


def test_a_tied_checkpoint_holding_the_head_alone_or_a_base_models_names_converts_what_transformers_loads(tmp_path):
    """`safetensors.torch.save_model` keeps a shared tensor's first name (`lm_head.weight`); a base model's checkpoint
    has no `model.` prefix: transformers loads both as the causal LM (they were refused as missing tensors)."""
    from safetensors.torch import save_model
    from transformers import LlamaModel

    options = dict(num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, speech_vocab_size=4)
    tied = randomize(Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True)))
    (tmp_path / "head").mkdir()
    tied.config.save_pretrained(tmp_path / "head")
    save_model(tied, tmp_path / "head" / "model.safetensors", metadata={"format": "pt"})
    with safe_open(tmp_path / "head" / "model.safetensors", "pt") as handle:
        assert "lm_head.weight" in handle.keys() and "model.embed_tokens.weight" not in handle.keys()
    randomize(LlamaModel(LlamaConfig(**COMMON, tie_word_embeddings=True))).save_pretrained(tmp_path / "base")
    ids = text_ids()
    for name in ("head", "base"):
        source = (
            load_checked(tmp_path / name)
            if name == "head"
            else AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        )
        streamed = load_checked(
            upcycle_checkpoint(tmp_path / name, tmp_path / f"{name}_out", progress=False, **options)
        )
        for model in (upcycle_dense(tmp_path / name, **options), streamed):
            assert model.config.tie_word_embeddings
            speech_rows = model.model.speech_embed_tokens.weight
            torch.testing.assert_close(speech_rows, source.model.embed_tokens.weight.mean(0).expand_as(speech_rows))
            with torch.no_grad():
                assert max_diff(model.eval()(ids).logits[..., :VOCAB], source(ids).logits) < 1e-5
    randomize(LlamaModel(LlamaConfig(**COMMON))).save_pretrained(tmp_path / "untied_base")
    with pytest.raises(CheckpointError, match="missing \\(2\\): lm_head.weight, speech_lm_head.weight"):
        upcycle_dense(tmp_path / "untied_base", **options)
    # A causal LM's names with the base model's prefix taken off: the head keeps its name, as transformers reads it.
    untied = randomize(LlamaForCausalLM(LlamaConfig(**COMMON)))
    untied.save_pretrained(tmp_path / "stripped")
    stripped = {name.removeprefix("model."): tensor for name, tensor in untied.state_dict().items()}
    save_file(stripped, tmp_path / "stripped" / "model.safetensors", metadata={"format": "pt"})
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "stripped").eval()
    with torch.no_grad():
        assert torch.equal(source(ids).logits, untied.eval()(ids).logits)
        for model in (
            upcycle_dense(tmp_path / "stripped", **options),
            load_checked(
                upcycle_checkpoint(tmp_path / "stripped", tmp_path / "stripped_out", progress=False, **options)
            ),
        ):
            assert max_diff(model.eval()(ids).logits[..., :VOCAB], source(ids).logits) < 1e-5


def test_a_state_dict_with_fused_experts_is_refused_naming_the_layout(tmp_path):
    """A Qwen3-MoE saved by `safetensors.torch.save_model` holds transformers' fused experts, not the on-disk layout."""
    from safetensors.torch import save_model

    config = Qwen3MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    (tmp_path / "fused").mkdir()
    config.save_pretrained(tmp_path / "fused")
    save_model(Qwen3MoeForCausalLM(config), tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="fused in-memory layout.*save_pretrained"):
        upcycle_moe(tmp_path / "fused")
