"""Importing MoE checkpoints (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3): the imported model is the source
model, in memory and streamed to disk; after profiling and assignment it still is (routing "none"), and speech-stage
training leaves its text outputs bit-identical (hard routing)."""

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from deeptalk_hf import (
    DeepTalkForCausalLM,
    assign_modality_experts,
    profile_modality_load,
    set_training_stage,
    upcycle_dense,
    upcycle_moe,
    upcycle_moe_checkpoint,
)
from deeptalk_hf.cli import EXIT_OK, EXIT_SOURCE, EXIT_USAGE, upcycle_main, upcycle_parser
from deeptalk_hf.upcycling import MOE_ARCHITECTURES, CheckpointError

from .test_upcycling import corrupt, fake_hub, leftovers, load_checked, save_dense

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64  # save_dense's tokenizer has 64 words
SEQ = 20  # longer than the sliding windows and than the YaRN scalings' original context
BODY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    num_experts_per_tok=2,
    eos_token_id=None,
    bos_token_id=None,
    pad_token_id=None,
)
# Multi-head latent attention, 8 routed experts in 4 groups (top-2 groups), 2 shared experts, first layer dense.
MLA = BODY | dict(
    num_key_value_heads=4,
    intermediate_size=48,
    moe_intermediate_size=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_shared_experts=2,
    n_routed_experts=8,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    n_group=4,
    topk_group=2,
)
# DeepSeek-V2-Lite's YaRN scaling, with a short original context.
DEEPSEEK_YARN = {
    "rope_type": "yarn",
    "rope_theta": 1000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
FAMILIES = sorted(MOE_ARCHITECTURES)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of order one (norms around 1, biases non-zero) and DeepSeek-V3 correction biases that change the
    choice, so that any wrong mapping shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model.eval()


def source_model(kind: str, seed: int = 0):
    """A tiny random model of each family, exercising that family's particular details."""
    if kind == "qwen2_moe":  # gated shared expert, q/k/v bias, dense layers from decoder_sparse_step, sliding layer 0
        config = Qwen2MoeConfig(
            **BODY | dict(num_hidden_layers=4),
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=6,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=2,
        )
        model = Qwen2MoeForCausalLM(config)
    elif kind == "qwen3_moe":  # per-head q/k norm, head_dim != hidden/heads, attention bias, renormalised top-k
        config = Qwen3MoeConfig(
            **BODY,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=6,
            head_dim=16,
            attention_bias=True,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        )
        model = Qwen3MoeForCausalLM(config)
    elif kind == "mixtral":  # block_sparse_moe / w1 w3 w2 names, sliding window, head_dim != hidden/heads
        config = MixtralConfig(**BODY, intermediate_size=16, num_local_experts=4, head_dim=12, sliding_window=5)
        model = MixtralForCausalLM(config)
    elif kind == "olmoe":  # q/k norm over the whole projection, q/k/v clipping, tied embeddings, bias
        config = OlmoeConfig(
            **BODY, intermediate_size=16, num_experts=6, clip_qkv=1.5, attention_bias=True, tie_word_embeddings=True
        )
        model = OlmoeForCausalLM(config)
    elif kind == "deepseek_v2":  # V2-Lite: no q LoRA, softmax, group-limited greedy, YaRN
        config = DeepseekV2Config(
            **MLA, q_lora_rank=None, topk_method="group_limited_greedy", rope_parameters=DEEPSEEK_YARN
        )
        model = DeepseekV2ForCausalLM(config)
    elif kind == "deepseek_v3":  # q LoRA, sigmoid, noaux_tc with a correction bias, renormalised top-k
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**MLA, q_lora_rank=12, norm_topk_prob=True))
    else:
        raise ValueError(kind)
    return randomize(model, seed)


def text_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_same_model(model: DeepTalkForCausalLM, source, ids: torch.Tensor | None = None) -> None:
    """Same logits over the source's vocabulary (fp32, <= 1e-5) and the same greedy generation with the KV cache."""
    ids = text_ids() if ids is None else ids
    with torch.no_grad():
        assert max_diff(model(ids).logits[..., :VOCAB], source(ids).logits) <= 1e-5
    prompt = ids[:, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    generated = source.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs), generated)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, source_model(request.param)


def test_imported_model_is_the_source_in_memory_and_streamed(family, tmp_path):
    kind, source = family
    model = upcycle_moe(source)
    assert isinstance(model, DeepTalkForCausalLM) and model.config.num_speech_experts == 0
    assert model.name_or_path == ""  # no hub repo, as for a model built from a config
    assert_same_model(model, source)
    if not kind.startswith("deepseek"):  # DeepSeek: another top-k slot order, so another float sum order
        with torch.no_grad():
            assert torch.equal(model(text_ids()).logits[..., :VOCAB], source(text_ids()).logits)

    checkpoint = save_dense(source, tmp_path / "source", max_shard_size="30KB")
    assert len(list(checkpoint.glob("*.safetensors"))) > 1
    destination = tmp_path / "deeptalk"
    upcycle_moe_checkpoint(checkpoint, destination, max_shard_size="40KB", progress=False)
    files = set(os.listdir(destination))
    assert {"model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"} <= files
    weight_map = json.loads((destination / "model.safetensors.index.json").read_text())["weight_map"]
    last = model.config.moe_layers[-1]
    assert f"model.layers.{last}.mlp.experts.1.down_proj.weight" in weight_map  # DeepTalk's on-disk expert layout
    streamed = load_checked(destination)
    assert_same_model(streamed, source)
    # Both paths (and the in-memory path from the directory) give the same tensors, bit for bit.
    streamed_state, from_path = streamed.state_dict(), upcycle_moe(checkpoint).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(streamed_state[name], tensor), name
        assert torch.equal(from_path[name], tensor), name
    assert leftovers(tmp_path) == []


def test_each_family_detail_is_carried():
    """The config fields behind each family's detail (the logits tests show that they are also used)."""
    expected = {
        "qwen2_moe": dict(shared_expert_gate=True, shared_expert_intermediate_size=24, qkv_bias=True, use_qk_norm=False,
                          mlp_only_layers=[0, 2], sliding_window=5,
                          layer_types=["sliding_attention"] + ["full_attention"] * 3),
        "qwen3_moe": dict(use_qk_norm=True, qk_norm_type="head", head_dim=16, attention_bias=True, norm_topk_prob=True,
                          mlp_only_layers=[0], sliding_window=None),
        "mixtral": dict(moe_intermediate_size=16, num_experts=4, norm_topk_prob=True, head_dim=12, sliding_window=5,
                        use_qk_norm=False),
        "olmoe": dict(qk_norm_type="full", use_qk_norm=True, clip_qkv=1.5, tie_word_embeddings=True, num_experts=6),
        "deepseek_v2": dict(q_lora_rank=None, kv_lora_rank=8, scoring_func="softmax", norm_topk_prob=False,
                            topk_method="group_limited_greedy", routed_scaling_factor=2.5, mlp_only_layers=[0],
                            shared_expert_intermediate_size=32, rope_parameters=DEEPSEEK_YARN | {"factor": 4.0}),
        "deepseek_v3": dict(q_lora_rank=12, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                            n_group=4, topk_group=2, rope_interleave=True, shared_expert_gate=False),
    }  # fmt: skip
    assert sorted(expected) == FAMILIES
    for kind, fields in expected.items():
        config = upcycle_moe(source_model(kind)).config
        for name, value in fields.items():
            actual = getattr(config, name)
            if name == "rope_parameters":
                actual = {key: actual[key] for key in value}
            assert actual == value, (kind, name, actual)


@pytest.mark.parametrize("kind", ["qwen3_moe_sliding", "deepseek_v3_not_interleaved"])
def test_source_variants_import_as_the_source(kind):
    """Details the family fixtures leave at their defaults: Qwen3-MoE with a sliding window (every layer), DeepSeek-V3
    with rope_interleave=False. The source must differ without them, so the comparison can fail."""
    if kind == "qwen3_moe_sliding":
        config = Qwen3MoeConfig(
            **BODY,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=6,
            use_sliding_window=True,
            sliding_window=5,
        )
        source, field, other = randomize(Qwen3MoeForCausalLM(config)), "sliding_window", None
    else:
        config = DeepseekV3Config(**MLA, q_lora_rank=12, rope_interleave=False)
        source, field, other = randomize(DeepseekV3ForCausalLM(config)), "rope_interleave", True
    model = upcycle_moe(source)
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(model(ids).logits[..., :VOCAB], source(ids).logits) <= 1e-5
        setattr(source.config, field, other)
        assert max_diff(model(ids).logits[..., :VOCAB], source(ids).logits) > 1e-3


def test_router_settings_are_carried():
    """Each family's `router_aux_loss_coef` and `output_router_logits` are carried into the config (not replaced by
    the DeepTalk defaults): with the latter, evaluation returns the router logits and adds the balancing loss."""
    for kind in FAMILIES:
        source = source_model(kind)
        source.config.router_aux_loss_coef = 0.037
        source.config.output_router_logits = True
        model = upcycle_moe(source).eval()
        assert model.config.router_aux_loss_coef == 0.037 and model.config.output_router_logits, kind
        ids = torch.randint(0, VOCAB, (1, 6))
        with torch.no_grad():
            assert model(ids, labels=ids).router_logits, kind


def test_olmoe_clipping_is_exercised():
    """The OLMoE test model clips: without `clip_qkv` the imported model would differ (so the test can fail)."""
    source = source_model("olmoe")
    model = upcycle_moe(source)
    model.config.clip_qkv = None
    with torch.no_grad():
        assert max_diff(model(text_ids()).logits, source(text_ids()).logits) > 1e-3


def test_a_hub_moe_source_is_checked_before_its_weights_are_downloaded(tmp_path, monkeypatch):
    """A dense-only option on an MoE source fails on the configs alone, not after a download of many GB."""
    source_model("qwen3_moe").save_pretrained(tmp_path / "repo")
    calls = fake_hub(tmp_path / "repo", tmp_path / "cache", monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        upcycle_main(["org/moe", str(tmp_path / "out"), "--num-text-experts", "2", "--quiet"])
    assert exit_info.value.code == EXIT_USAGE
    assert calls == [("org/moe", None, False)] and not (tmp_path / "out").exists()
    assert upcycle_main(["org/moe", str(tmp_path / "out"), "--quiet"]) == EXIT_OK
    # the command reads the configs, then the import reads them again (from the hub cache) and the weights, all from
    # the commit the command's configs came from
    assert calls[1:] == [("org/moe", None, False), ("org/moe", "0123abcd", False), ("org/moe", "0123abcd", True)]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kind", ["qwen2_moe", "deepseek_v3"])
def test_a_zero_width_shared_expert_is_imported_as_none(kind, tmp_path):
    """transformers builds a zero-width shared expert with empty weights (Qwen2-MoE's with its gate); it adds nothing,
    so the import has no shared experts and is still the source. Non-empty weights under a zero width are refused."""
    if kind == "qwen2_moe":
        config = Qwen2MoeConfig(**BODY, intermediate_size=48, moe_intermediate_size=16, num_experts=6)
        config.shared_expert_intermediate_size = 0
        source = randomize(Qwen2MoeForCausalLM(config))
    else:
        source = randomize(DeepseekV3ForCausalLM(DeepseekV3Config(**MLA | dict(n_shared_experts=0), q_lora_rank=12)))
    model = upcycle_moe(source)
    assert model.config.shared_expert_intermediate_size == 0 and not model.config.shared_expert_gate
    assert_same_model(model, source)
    checkpoint = save_dense(source, tmp_path / "source")
    upcycle_moe_checkpoint(checkpoint, tmp_path / "deeptalk", progress=False)
    assert_same_model(load_checked(tmp_path / "deeptalk"), source)

    corrupted = save_dense(source, tmp_path / "corrupted", max_shard_size="10MB")
    state = load_file(corrupted / "model.safetensors")
    name = next(name for name in state if re.search(r"shared_experts?\.down_proj", name))
    state[name] = torch.ones(state[name].shape[0], 2)
    save_file(state, corrupted / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} has shape \(\d+, 2\).* width 0"):
        upcycle_moe_checkpoint(corrupted, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["olmoe", "deepseek_v3"])
def test_speech_vocabulary_and_dtype(kind, tmp_path):
    source = source_model(kind)
    model = upcycle_moe(source, speech_vocab_size=10)
    config = model.config
    assert config.vocab_size == VOCAB + 10 and config.speech_token_start == VOCAB
    text_rows = model.model.embed_tokens.weight
    assert torch.allclose(model.model.speech_embed_tokens.weight, text_rows.mean(0).expand(10, -1))
    assert (model.speech_lm_head.weight is model.model.speech_embed_tokens.weight) == config.tie_word_embeddings
    assert_same_model(model, source)
    speech = torch.cat([text_ids()[:, :4], torch.full((2, 3), VOCAB + 1)], dim=1)
    with torch.no_grad():
        assert model(speech).logits.shape[-1] == VOCAB + 10

    half = upcycle_moe(source, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.model.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    with torch.no_grad():  # independent of the source
        model.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)

    checkpoint = save_dense(source, tmp_path / "source")
    upcycle_moe_checkpoint(checkpoint, tmp_path / "out", speech_vocab_size=10, dtype="bfloat16", progress=False)
    streamed = load_checked(tmp_path / "out")
    assert streamed.dtype == torch.bfloat16 and streamed.config.speech_vocab_size == 10
    streamed_state = streamed.state_dict()
    for name, tensor in upcycle_moe(checkpoint, speech_vocab_size=10, dtype="bfloat16").state_dict().items():
        assert torch.equal(streamed_state[name], tensor), name


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_imports_in_bf16_route_as_transformers_bf16_models(kind, tmp_path):
    """transformers' DeepSeek models keep their routers (and V3's correction bias) in float32 in half precision and
    score in float32: the import does too (in bf16 it picked other experts than transformers' model for ~1% of
    tokens with biases near 1, a bias 1.0017 read as 1.0)."""
    source = source_model(kind)
    if kind == "deepseek_v3":
        with torch.no_grad():  # a trained V3's biases are O(1): their bf16 rounding moves choices
            for layer in source.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.uniform_(0.98, 1.02)
    source.save_pretrained(tmp_path / "fp32")
    reference = type(source).from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    reference.save_pretrained(tmp_path / "bf16")
    imported = upcycle_moe(tmp_path / "bf16").eval()
    upcycle_moe_checkpoint(tmp_path / "bf16", tmp_path / "out", progress=False)
    for model in (imported, load_checked(tmp_path / "out")):
        assert model.dtype == torch.bfloat16 and model.config.router_dtype == "float32"
        gate = model.model.layers[1].mlp.gate
        assert gate.weight.dtype == torch.float32
        assert kind == "deepseek_v2" or gate.e_score_correction_bias.dtype == torch.float32
        hidden = torch.randn(4096, source.config.hidden_size, generator=torch.Generator().manual_seed(5))
        hidden = hidden.to(torch.bfloat16)
        block = model.model.layers[1].mlp
        with torch.no_grad():
            _, indices = block._route(block.gate(hidden), block.gate, group_limited=True)
            expected = reference.model.layers[1].mlp.gate(hidden)[2]  # (logits, weights, indices)
        assert torch.equal(indices.sort(-1).values, expected.sort(-1).values)
    # Whole sequences: V2's rotary (a float32 complex product) is V2's too, so nothing differs (bf16 logits moved by
    # up to ~0.3 with V3's model-dtype rotary).
    ids = text_ids()
    with torch.no_grad():
        torch.testing.assert_close(imported(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # Converted to bf16 from float32: the float32 routers and bias stay unrounded, as transformers loads and saves them
    # (rounded, ~1% of the tokens went to other experts and the logits moved by up to ~0.03).
    upcycle_moe_checkpoint(tmp_path / "fp32", tmp_path / "out_bf16", dtype="bfloat16", progress=False)
    with safe_open(tmp_path / "out_bf16" / "model.safetensors", "pt") as handle:
        stored = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert (
        stored["model.layers.1.mlp.gate.weight"] == "F32" and stored["model.layers.0.mlp.gate_proj.weight"] == "BF16"
    )
    assert kind == "deepseek_v2" or stored["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    for model in (
        upcycle_moe(source, dtype="bfloat16"),
        upcycle_moe(tmp_path / "fp32", dtype="bfloat16"),
        load_checked(tmp_path / "out_bf16"),
    ):
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_half_precision_source_keeps_float32_routers_as_a_conversion_does(tmp_path):
    """A DeepSeek checkpoint whose routers are stored in bf16 (cast with `.to`, not loaded by transformers) converts
    with float32 routers and bias with or without `dtype="bfloat16"`, as transformers loads it: the files agree (the
    kept names were chosen by the target dtype alone, so without one they stayed BF16)."""
    source = source_model("deepseek_v3").to(torch.bfloat16)
    source.save_pretrained(tmp_path / "bf16")
    reference = type(source).from_pretrained(tmp_path / "bf16").eval()
    assert reference.model.layers[1].mlp.gate.weight.dtype == torch.float32
    stored = {}
    for dtype in (None, "bfloat16"):
        out = tmp_path / f"out_{dtype}"
        upcycle_moe_checkpoint(tmp_path / "bf16", out, dtype=dtype, progress=False)
        with safe_open(out / "model.safetensors", "pt") as handle:
            stored[dtype] = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
        with torch.no_grad():
            torch.testing.assert_close(
                load_checked(out).eval()(text_ids()).logits, reference(text_ids()).logits, rtol=0, atol=0
            )
    assert stored[None] == stored["bfloat16"]
    assert stored[None]["model.layers.1.mlp.gate.weight"] == "F32"
    assert stored[None]["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    model = upcycle_moe(tmp_path / "bf16")
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32 and model.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_half_precision_imports_weigh_the_experts_as_their_family(kind, tmp_path):
    """Mixtral multiplies its experts' outputs by float32 routing weights, Qwen-MoE by weights rounded to the model's
    dtype: a bf16 import gives transformers' bf16 logits bit for bit either way (Mixtral's moved by up to ~0.05 when
    its weights were rounded)."""
    source = source_model(kind)
    source.save_pretrained(tmp_path / "fp32")
    reference = type(source).from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    reference.save_pretrained(tmp_path / "bf16")
    ids = text_ids()
    for model in (upcycle_moe(tmp_path / "bf16"), upcycle_moe(tmp_path / "fp32", dtype="bfloat16")):
        assert model.config.routing_weights_dtype == ("float32" if kind == "mixtral" else None)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_deepseek_v3_multi_token_prediction_layers_are_left_out(tmp_path):
    """DeepSeek-V3 checkpoints carry a multi-token-prediction layer after the decoder layers; transformers leaves it
    out of the causal LM, and so does the import. Any other stray tensor is still an error."""
    source = source_model("deepseek_v3")
    checkpoint = save_dense(source, tmp_path / "source", max_shard_size="10MB")
    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    extra = {name.replace("layers.2.", "layers.3."): t.clone() for name, t in tensors.items() if ".layers.2." in name}
    extra["model.layers.3.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors | extra, weights, metadata={"format": "pt"})
    assert source.config.num_mtp_layers == 1
    upcycle_moe_checkpoint(checkpoint, tmp_path / "out", progress=False)
    assert_same_model(load_checked(tmp_path / "out"), source)
    save_file(tensors | {"model.layers.4.eh_proj.weight": torch.zeros(32, 64)}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): model\.layers\.4\.eh_proj\.weight"):
        upcycle_moe(checkpoint)


# Profiling and assignment: the paper's recipe on imported DeepSeek models

SPEECH = 16


def speech_batch(seed: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, VOCAB + SPEECH, (batch, length), generator=generator)


@pytest.fixture(scope="module", params=["deepseek_v2", "deepseek_v3"])
def deepseek(request):
    source = source_model(request.param)
    return source, upcycle_moe(source, speech_vocab_size=SPEECH)


def profiled_split(model: DeepTalkForCausalLM, count: int = 3) -> list[list[int]]:
    """Profile on speech and text batches and move the experts with the highest rhoA * (1 - rhoT)."""
    batches = [{"input_ids": speech_batch(seed)} for seed in range(2)]
    batches += [{"input_ids": text_ids(seed=seed)} for seed in range(2)]
    load = profile_modality_load(model, batches)
    assert load.speech_tokens == 48 and load.text_tokens == 80
    return assign_modality_experts(model, load, num_speech_experts=count)


def test_profiled_split_keeps_the_source_and_isolates_text(deepseek):
    source, imported = deepseek
    model = copy.deepcopy(imported)
    moved = profiled_split(model)
    num_experts = source.config.n_routed_experts
    assert model.config.speech_expert_ids == moved and model.config.num_experts == [num_experts - 3] * 2
    # A real permutation: some layer's speech experts are not just the last ones (which would keep the order).
    assert any(ids != list(range(num_experts - 3, num_experts)) for ids in moved)

    ids = text_ids()
    model.config.modality_routing = "none"  # every token scored over all experts in source order: the source model
    with torch.no_grad():
        assert max_diff(model(ids).logits[..., :VOCAB], source(ids).logits) <= 1e-5
    model.config.modality_routing = "hard"
    with torch.no_grad():
        text_before = model(ids).logits[..., :VOCAB]
        assert max_diff(text_before, source(ids).logits) > 1e-3  # hard routing is another model (text rows only)

    # Speech stage, one AdamW step over every tensor (weight decay, as users build it): text stays bit-identical.
    set_training_stage(model, "speech")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    model.train()
    speech = speech_batch(seed=5)
    model(speech, labels=speech).loss.backward()
    optimizer.step()
    model.eval()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed and all("speech" in name for name in changed)
    assert {"model.layers.1.mlp.speech_gate.weight", "model.layers.2.mlp.speech_experts.down_proj"} <= changed
    with torch.no_grad():
        assert torch.equal(model(ids).logits[..., :VOCAB], text_before)


@given(
    counts=st.lists(st.integers(0, 7), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
    second=st.booleans(),
)
def test_any_assignment_keeps_the_source_function(deepseek, counts, seed, second):
    """Whatever experts move (random choices, composed twice), routing "none" is the source model: the move is a
    permutation that the config records, correction biases and group limits included."""
    source, imported = deepseek
    model = copy.deepcopy(imported)
    load = profile_modality_load(model, [{"input_ids": speech_batch(0)}, {"input_ids": text_ids()}])
    assign_modality_experts(model, load, num_speech_experts=counts, strategy="random", seed=seed)
    if second:
        assign_modality_experts(model, load, num_speech_experts=counts[::-1], strategy="random", seed=seed + 1)
    model.config.modality_routing = "none"
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(model(ids).logits[..., :VOCAB], source(ids).logits) <= 1e-5


# Bad sources and the command line


def test_unsupported_sources_are_refused(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(**{k: BODY[k] for k in ("vocab_size", "hidden_size", "num_attention_heads")},
                                         intermediate_size=48, num_hidden_layers=1))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"model_type 'llama'.*supported MoE architectures are "
                                              r"deepseek_v2, deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe.*upcycle_dense"):  # fmt: skip
        upcycle_moe(llama)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        upcycle_moe(gpt2)
    with pytest.raises(CheckpointError, match=r"model_type 'mixtral'.*use upcycle_moe, or upcycle_moe_checkpoint"):
        upcycle_dense(source_model("mixtral"), num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1)
    llama.save_pretrained(tmp_path / "llama")  # the checkpoint-writing entry points name their counterpart too
    with pytest.raises(CheckpointError, match=r"model_type 'llama'.*or upcycle_checkpoint to write a checkpoint"):
        upcycle_moe_checkpoint(tmp_path / "llama", tmp_path / "out", progress=False)
    deeptalk = upcycle_moe(source_model("mixtral"))
    with pytest.raises(CheckpointError, match=r"model_type 'deeptalk'.*already a DeepTalk model"):
        upcycle_moe(deeptalk)

    checkpoint = save_dense(source_model("qwen3_moe"), tmp_path / "quantized")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantized qwen3_moe checkpoint \(fp8\)"):
        upcycle_moe_checkpoint(checkpoint, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral", "olmoe"])
def test_an_moe_checkpoint_loaded_directly_points_to_upcycle_moe(kind, tmp_path):
    """Its config reads as a DeepTalk config; its tensors then miss (renamed experts) or have other shapes (OLMoE's
    fused q/k norms): each refusal names the import, which OLMoE's did not."""
    checkpoint = save_dense(source_model(kind), tmp_path / kind)
    with pytest.raises(ValueError, match="converted with upcycle_checkpoint / upcycle_moe_checkpoint"):
        DeepTalkForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize("kind", ["truncated", "garbage-header", "missing-shard", "missing-tensor", "no-weights"])
def test_corrupt_source_fails_cleanly(kind, tmp_path):
    checkpoint = save_dense(source_model("qwen2_moe"), tmp_path / "source", max_shard_size="30KB")
    corrupt(kind, checkpoint)
    destination = tmp_path / "out" / "deeptalk"
    with pytest.raises(CheckpointError):
        upcycle_moe_checkpoint(checkpoint, destination, progress=False)
    assert not destination.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []
    with pytest.raises(CheckpointError):
        upcycle_moe(checkpoint)


def test_cli_detects_an_moe_source(tmp_path, capsys):
    source = source_model("mixtral")
    checkpoint = save_dense(source, tmp_path / "mixtral")
    destination = tmp_path / "deeptalk"
    arguments = [str(checkpoint), str(destination), "--speech-vocab-size", "8", "--max-shard-size", "40KB"]
    assert upcycle_main([*arguments, "--quiet"]) == EXIT_OK
    assert "imported mixtral" in capsys.readouterr().out
    model = load_checked(destination)
    assert model.config.speech_vocab_size == 8 and model.config.num_speech_experts == 0
    assert_same_model(model, source)

    for dense_only in (["--top-k", "2"], ["--num-speech-experts", "2", "--granularity", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            upcycle_main([str(checkpoint), str(tmp_path / "other"), *dense_only, "--quiet"])
        assert exit_info.value.code == EXIT_USAGE
        assert "apply to dense sources only" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(gpt2)
    assert upcycle_main([str(gpt2), str(tmp_path / "other"), "--quiet"]) == EXIT_SOURCE
    assert "supported dense or MoE architectures" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    help_text = upcycle_parser().format_help()
    assert all(kind in help_text for kind in FAMILIES)


def test_recipe_example_runs():
    """examples/deepseek_recipe.py end to end (fast mode), on one thread: import, profile, assign, three stages."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "deepseek_recipe.py"), "--fast"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout
    steps = ("imported deepseek_v2", "speech experts per MoE layer", "routing 'none' after assignment", "stage speech")
    steps += ("text logits after the speech stage", "stage text", "stage joint", "recipe finished")
    assert [line for line in output.splitlines() if line.startswith(steps)] == [
        next(line for line in output.splitlines() if line.startswith(step)) for step in steps
    ], output  # each once, in the recipe's order
    assert "routing 'none' after assignment: max |logit diff| vs import" in output
    assert "text logits after the speech stage: bit-identical" in output
    print(f"recipe example (fast mode): {time.perf_counter() - started:.1f} s")
