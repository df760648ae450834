"""Upcycling dense Llama / Qwen2 / Qwen3 / Mistral models: the upcycled model is the dense model, in memory and on disk."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from deeptalk_hf import DeepTalkForCausalLM, upcycle_dense
from deeptalk_hf.modeling_deeptalk import topk_routing
from deeptalk_hf.upcycling import CheckpointError, deeptalk_config_from_dense

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
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, attention_bias=True))
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


def test_architecture_details_are_carried():
    """The config fields behind each family's detail; the logits test shows they are also used."""
    cases = {
        "llama": {"rope_parameters": LLAMA3_ROPE, "use_qk_norm": False, "qkv_bias": False, "attention_bias": False},
        "qwen2": {"tie_word_embeddings": True, "qkv_bias": True, "use_qk_norm": False, "attention_bias": False},
        "qwen3": {"use_qk_norm": True, "attention_bias": True, "head_dim": 16},
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
    _, weights, picks = topk_routing(torch.zeros(1, num_scored), config.num_experts_per_tok, True)
    held = []
    for j in picks[0][weights[0] > 0].tolist():
        matches = [p for p in range(granularity) if torch.equal(experts[j, :part], gate[p * part : (p + 1) * part])]
        held += matches
    assert sorted(held) == sorted(list(range(shared, granularity)) * (len(held) // routed_parts))
    assert len(held) == min(num_scored, config.num_experts_per_tok)
    with torch.no_grad():
        assert max_diff(moe(text_ids(1)).logits, dense(text_ids(1)).logits) <= 1e-5


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(granularity=5), "granularity=5"),
        (dict(granularity=2, num_text_experts=3), "multiples"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(granularity=2, num_shared_experts=2), "num_shared_experts=2"),
        (dict(num_text_experts=0), "at least one text expert"),
        (dict(init_noise=-1.0), "init_noise"),
        (dict(drop_fraction=1.5), "drop_fraction"),
    ],
)
def test_invalid_options_are_refused(options, message):
    arguments = dict(num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2) | options
    with pytest.raises(ValueError, match=message):
        upcycle_dense(dense_model("llama"), **arguments)


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
    assert 0.005 < relative < 0.02
    assert not torch.equal(gate[0], gate[2])  # copies of the same part now differ
    for model in (dropped, noisy):  # routers stay zero and attention untouched
        assert not model.model.layers[0].mlp.gate.weight.any()
        assert torch.equal(
            model.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
        )


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
        speech = torch.cat([ids[:, :4], torch.full((2, 3), VOCAB + 1)], dim=1)
        assert torch.isfinite(moe(speech).logits).all()


def test_dtype_and_independence_from_the_source():
    dense = dense_model("llama")
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, dtype="bfloat16")
    assert moe.dtype == torch.bfloat16 and moe.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
    assert not hasattr(moe.model.layers[0].mlp, "speech_experts")
    fp32 = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    with torch.no_grad():
        fp32.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(fp32.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="not a torch dtype"):
        upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, dtype="float33")


def test_mlp_only_layers_stay_dense():
    dense = dense_model("mistral")
    moe = upcycle_dense(dense, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1, mlp_only_layers=[1])
    assert moe.config.moe_layers == [0]
    assert torch.equal(moe.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    with torch.no_grad():
        assert max_diff(moe(text_ids()).logits, dense(text_ids()).logits) <= 1e-5
