"""DeepTalkForCausalLM against independent oracles: transformers' Qwen3-MoE / Qwen2-MoE, its own cache-free path,
hand-computed losses, and black-box modality isolation."""

import copy
import itertools
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    ContinuousBatchingConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.generation.streamers import BaseStreamer
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface
from transformers.models.qwen3_moe.modeling_qwen3_moe import eager_attention_forward, load_balancing_loss_func

from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM, DeepTalkModel, upcycle_moe
from deeptalk_hf.modeling_deeptalk import (
    DeepTalkExperts,
    ModalitySplit,
    RoutingSettings,
    modality_router_losses,
    topk_routing,
    warn_if_checkpointing_stops_balancing,
)

from .conftest import tiny_config

QWEN_FIELDS = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=6,
    num_experts_per_tok=2,
    mlp_only_layers=[1],
    norm_topk_prob=True,
    max_position_embeddings=256,
)


def deeptalk_from(source_config, **overrides) -> DeepTalkConfig:
    fields = {k: v for k, v in source_config.to_dict().items() if k not in ("model_type", "architectures")}
    fields.update(overrides)
    return DeepTalkConfig(**fields)


def load_without_report_issues(path, config):
    model, info = DeepTalkForCausalLM.from_pretrained(path, config=config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {  # yarn RoPE, attention bias, sliding window shorter than the input
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "attention_bias": True,
            "use_sliding_window": True,
            "sliding_window": 5,
            "norm_topk_prob": False,
        },
    ],
    ids=["plain", "yarn-bias-sliding"],
)
def test_qwen3_moe_checkpoint_loads_with_same_logits_and_generation(tmp_path, extra):
    source_config = Qwen3MoeConfig(**(QWEN_FIELDS | extra))
    source = Qwen3MoeForCausalLM(source_config).eval()
    source.save_pretrained(tmp_path)
    model = load_without_report_issues(tmp_path, deeptalk_from(source_config))
    input_ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected, actual = source(input_ids).logits, model(input_ids).logits
    assert (expected - actual).abs().max() <= 1e-5
    generate = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(source.generate(input_ids, **generate), model.generate(input_ids, **generate))


def test_qwen3_moe_checkpoint_loads_without_a_config_and_other_layouts_are_refused(tmp_path):
    """`DeepTalkForCausalLM.from_pretrained` on a Qwen3-MoE checkpoint alone reads its config as a DeepTalk config
    (experts fused on load); a checkpoint that leaves tensors missing (a dense one, or an override that adds tensors)
    is refused by name instead of keeping random weights."""
    source = Qwen3MoeForCausalLM(Qwen3MoeConfig(**QWEN_FIELDS)).eval()
    source.save_pretrained(tmp_path / "qwen3_moe")
    model = DeepTalkForCausalLM.from_pretrained(tmp_path / "qwen3_moe").eval()
    assert model.config.model_type == "deeptalk"
    input_ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert (source(input_ids).logits - model(input_ids).logits).abs().max() <= 1e-5
    # A `layer_types` in its config.json (e.g. copied from a dense Qwen3's) is saved but ignored by Qwen3-MoE, whose
    # window covers every layer: read alike.
    layer_types = ["full_attention", "sliding_attention", "full_attention"]
    windowed = Qwen3MoeConfig(**QWEN_FIELDS, use_sliding_window=True, sliding_window=4, layer_types=layer_types)
    source = Qwen3MoeForCausalLM(windowed).eval()
    source.save_pretrained(tmp_path / "windowed")
    model = DeepTalkForCausalLM.from_pretrained(tmp_path / "windowed").eval()
    with torch.no_grad():
        assert (source(input_ids).logits - model(input_ids).logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="lacks .* tensors.*upcycle_checkpoint"):
        DeepTalkForCausalLM.from_pretrained(tmp_path / "qwen3_moe", speech_attention=True)
    dense = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**{k: QWEN_FIELDS[k] for k in ("vocab_size", "hidden_size", "intermediate_size")},
                                 num_hidden_layers=1, num_attention_heads=4)).save_pretrained(dense)  # fmt: skip
    with pytest.raises(ValueError, match="mlp.experts"):
        DeepTalkForCausalLM.from_pretrained(dense)
    # Only the heads missing: a base model's checkpoint, or tied embeddings read untied; the upcycling hint would mislead.
    DeepTalkForCausalLM(tiny_config()).model.save_pretrained(tmp_path / "base")
    DeepTalkForCausalLM(tiny_config(tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    for folder, overrides in (("base", {}), ("tied", {"tie_word_embeddings": False})):
        with pytest.raises(
            ValueError, match=r"lacks 2 tensors .*\(lm_head.weight, speech_lm_head.weight\)\. Only output heads"
        ):
            DeepTalkForCausalLM.from_pretrained(tmp_path / folder, **overrides)


def test_a_checkpoint_with_tensors_the_config_has_no_place_for_is_refused(tmp_path):
    """Dropped tensors would make another model: speech attention read without it, or a head bias (which DeepTalk's
    heads do not have), is refused by name; the base model leaves a causal LM's heads out as not its own."""
    DeepTalkForCausalLM(tiny_config(speech_attention=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"18 tensors .* no place for \(model\.layers\.0\.self_attn\.speech_k_norm"):
        DeepTalkForCausalLM.from_pretrained(tmp_path, speech_attention=False)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(weights | {"lm_head.bias": torch.ones(64)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensors .* no place for \(lm_head\.bias\)"):
        DeepTalkForCausalLM.from_pretrained(tmp_path)
    assert DeepTalkModel.from_pretrained(tmp_path).config.speech_attention


def test_qwen2_moe_shared_expert_gate_and_qkv_bias_match(tmp_path):
    source_config = Qwen2MoeConfig(
        **QWEN_FIELDS, shared_expert_intermediate_size=24, qkv_bias=True, decoder_sparse_step=1
    )
    source = Qwen2MoeForCausalLM(source_config).eval()
    state = {
        k.replace("mlp.shared_expert.", "mlp.shared_experts.").replace("shared_expert_gate", "shared_experts_gate"): v
        for k, v in source.state_dict().items()
    }
    config = deeptalk_from(source_config, use_qk_norm=False, shared_expert_gate=True)
    model = DeepTalkForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (source(input_ids).logits - model(input_ids).logits).abs().max() <= 1e-5


def perturb(model, predicate) -> DeepTalkForCausalLM:
    perturbed = copy.deepcopy(model)
    touched = 0
    with torch.no_grad():
        for name, param in perturbed.named_parameters():
            if predicate(name):
                param.add_(torch.randn_like(param))
                touched += 1
    assert touched
    return perturbed


def is_speech_tensor(name: str) -> bool:
    return "speech" in name


@given(
    experts=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=3),
    top_k=st.integers(1, 3),
    seq_len=st.integers(2, 7),
    seed=st.integers(0, 2**16),
)
def test_hard_routing_isolates_modalities(experts, top_k, seq_len, seed):
    torch.manual_seed(seed)
    if all(num_speech == 0 for _, num_speech in experts):
        experts[0] = (experts[0][0], 1)
    config = tiny_config(
        num_hidden_layers=len(experts) + 1,
        mlp_only_layers=[len(experts)],
        num_experts=[e for e, _ in experts],
        num_speech_experts=[s for _, s in experts],
        num_experts_per_tok=top_k,
        norm_topk_prob=bool(seed % 2),
    )
    model = DeepTalkForCausalLM(config).eval()
    start = config.speech_token_start
    text_ids = torch.randint(0, start, (2, seq_len))
    speech_ids = torch.randint(start, config.vocab_size, (2, seq_len))
    mixed_ids = torch.cat([text_ids, speech_ids], dim=1)

    speech_changed = perturb(model, is_speech_tensor)
    layers_with_speech = [f"layers.{layer}.mlp." for layer in config.moe_layers if config.layer_experts(layer)[1]]

    def text_routing_tensor(name: str) -> bool:
        return any(
            name.startswith(f"model.{p}experts.") or name == f"model.{p}gate.weight" for p in layers_with_speech
        )

    text_changed = perturb(model, text_routing_tensor)
    with torch.no_grad():
        # Text positions keep their text-block logits (the speech columns come from `speech_lm_head`).
        assert torch.equal(model(text_ids).logits[..., :start], speech_changed(text_ids).logits[..., :start])
        assert torch.equal(model(speech_ids).logits, text_changed(speech_ids).logits)
        before, after = model(mixed_ids).logits, speech_changed(mixed_ids).logits
    if len(layers_with_speech) == len(config.moe_layers):
        assert torch.equal(before[:, :seq_len, :start], after[:, :seq_len, :start])
    else:  # speech tokens share a layer's text experts, whose matmuls then round with other row counts
        torch.testing.assert_close(before[:, :seq_len, :start], after[:, :seq_len, :start], rtol=1e-5, atol=1e-6)
    assert not torch.equal(before[:, seq_len:], after[:, seq_len:])


def routing_settings(top_k, scoring_func="softmax", norm_topk_prob=True):
    return RoutingSettings(
        num_experts_per_tok=top_k,
        scoring_func=scoring_func,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=1.0,
    )


@given(
    logits=st.lists(st.lists(st.integers(-2, 2), min_size=5, max_size=5), min_size=1, max_size=4),
    num_experts=st.integers(1, 5),
    top_k=st.integers(1, 4),
    scoring_func=st.sampled_from(["softmax", "sigmoid"]),
    norm_topk_prob=st.booleans(),
)
def test_topk_is_tie_stable_and_pads_small_groups_with_the_sentinel(
    logits, num_experts, top_k, scoring_func, norm_topk_prob
):
    """Among equal scores the lowest expert index wins (a plain-Python ranking on (-score, index)); a group smaller
    than top-k uses all its experts and fills the spare slots with the sentinel index E and weight 0."""
    logits = torch.tensor(logits, dtype=torch.float)[:, :num_experts]  # small integers: many exact ties
    settings = routing_settings(top_k, scoring_func, norm_topk_prob)
    weights, indices = topk_routing(logits, settings)
    assert weights.shape == indices.shape == (logits.shape[0], top_k)
    for row, token in enumerate(logits.double()):
        scores = (token.softmax(-1) if scoring_func == "softmax" else token.sigmoid()).tolist()
        ranked = sorted(range(num_experts), key=lambda e: (-scores[e], e))[:top_k]
        spare = top_k - len(ranked)
        assert indices[row].tolist() == ranked + [num_experts] * spare
        expected = [scores[e] for e in ranked]
        if norm_topk_prob:
            expected = [s / sum(expected) for s in expected]
        torch.testing.assert_close(weights[row].double(), torch.tensor(expected + [0.0] * spare, dtype=torch.double))


def reference_expert(experts, e, hidden):
    """One expert of a fused experts module in plain torch: down(silu(gate(h)) * up(h))."""
    gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
    return (torch.nn.functional.silu(hidden @ gate.T) * (hidden @ up.T)) @ experts.down_proj[e].T


@pytest.mark.parametrize("routing", ["hard", "none"])
def test_a_zero_router_picks_the_lowest_experts_of_each_group(routing):
    """All scores tie under a zero router: each token takes its group's first k experts ("hard") or the first k of
    `[experts; speech_experts]` ("none"), with equal weights; a plain-torch sum of those experts is the block's
    output."""
    config = tiny_config(num_experts=5, num_speech_experts=4, num_experts_per_tok=3, modality_routing=routing)
    model = DeepTalkForCausalLM(config).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.zero_()
        block.speech_gate.weight.zero_()
    hidden = torch.randn(2, 6, config.hidden_size)
    is_speech = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        output, _ = block(hidden, ModalitySplit(is_speech))
        expected = torch.zeros_like(hidden)
        for b in range(2):
            for t in range(6):
                experts = block.speech_experts if routing == "hard" and is_speech[b, t] else block.experts
                expected[b, t] = sum(reference_expert(experts, e, hidden[b, t]) for e in range(3)) / 3
    torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("routing", ["hard", "none"])
def test_one_modality_batches_give_the_same_logits_in_inference_and_under_autograd(routing):
    """Without autograd a one-modality batch (a decoding step) reads one embedding table and one router: the same
    bits as the general path (both tables, both routers) that training takes."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3, modality_routing=routing)).eval()
    start = model.config.speech_token_start
    for ids in (torch.randint(3, start, (2, 5)), torch.randint(start, model.config.vocab_size, (2, 5))):
        with torch.no_grad():
            fast = model(ids).logits
        assert torch.equal(fast, model(ids).logits.detach())
        assert torch.equal(fast, model(ids, output_router_logits=True).logits.detach())


def test_a_routing_mode_switched_to_an_unknown_value_is_refused():
    model = DeepTalkForCausalLM(tiny_config())
    model.config.modality_routing = "off"
    with pytest.raises(ValueError, match="modality_routing='off' is unknown"):
        model(torch.tensor([[3, 4, 70]]))


def test_modality_ids_override_the_id_block_for_inputs_embeds():
    model = DeepTalkForCausalLM(tiny_config()).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))
    modality_ids = (input_ids >= model.config.speech_token_start).long()
    embeds = model.model.embed(input_ids)
    with torch.no_grad():
        reference = model(input_ids).logits
        assert torch.equal(model(inputs_embeds=embeds, modality_ids=modality_ids).logits, reference)
        all_text = model(inputs_embeds=embeds).logits
        # without either, every position is text (docs/concepts.md)
        assert torch.equal(all_text, model(inputs_embeds=embeds, modality_ids=torch.zeros_like(input_ids)).logits)
    assert not torch.equal(all_text, reference)
    with pytest.raises(ValueError, match="modality_ids has shape"):
        model(input_ids, modality_ids=modality_ids[:, :3])


def test_modality_ids_route_ids_of_either_block_as_told():
    """With ids, `modality_ids` decides routing both ways (docs/concepts.md): speech-block ids marked 0 route as text,
    text ids marked 1 as speech; the same as their embeddings given with those `modality_ids`, router losses too."""
    model = DeepTalkForCausalLM(tiny_config(speech_attention=True)).eval()
    start = model.config.speech_token_start
    input_ids = torch.cat([torch.randint(3, start, (2, 4)), torch.randint(start, model.config.vocab_size, (2, 4))], 1)
    embeds = model.model.embed(input_ids)
    with torch.no_grad():
        for modality_ids in (torch.zeros_like(input_ids), torch.ones_like(input_ids), 1 - (input_ids >= start).long()):
            by_ids = model(input_ids, modality_ids=modality_ids, output_router_logits=True)
            by_embeds = model(inputs_embeds=embeds, modality_ids=modality_ids, output_router_logits=True)
            torch.testing.assert_close(by_ids.logits, by_embeds.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(by_ids.aux_loss, by_embeds.aux_loss)
        assert not torch.equal(by_ids.logits, model(input_ids).logits)  # the swapped modalities route differently


def test_modality_ids_other_than_0_and_1_are_refused_except_on_padding():
    model = DeepTalkForCausalLM(tiny_config()).eval()
    input_ids = torch.tensor([[3, 4, 70], [5, 6, 7]])
    with pytest.raises(ValueError, match=r"modality_ids must be 0 \(text\) or 1 \(speech\) .* got \[-100, 2\]"):
        model(input_ids, modality_ids=torch.tensor([[0, 2, 0], [-100, 0, 0]]))
    attention_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    with pytest.raises(ValueError, match=r"got \[2\]"):
        model(input_ids, attention_mask=attention_mask, modality_ids=torch.tensor([[0, 2, 0], [-100, 0, 0]]))
    with torch.no_grad():
        reference = model(input_ids, attention_mask=attention_mask).logits
        padded = torch.tensor([[0, 0, 1], [-100, 0, 0]])  # padding may hold anything
        assert torch.equal(model(input_ids, attention_mask=attention_mask, modality_ids=padded).logits, reference)
        assert torch.equal(model(input_ids, modality_ids=padded.bool() & (padded > 0)).logits, model(input_ids).logits)
    generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(input_ids, modality_ids=padded, **kwargs), generated)
    with pytest.raises(ValueError, match=r"got \[2\]"):
        model.generate(input_ids, modality_ids=torch.tensor([[0, 2, 1], [0, 0, 0]]), **kwargs)
    # with the static cache the model gets a prepared mask, but generate checked the prompt's padding as given
    static = model.generate(input_ids, modality_ids=padded, cache_implementation="static", **kwargs)
    assert torch.equal(static, generated)
    with pytest.raises(ValueError, match=r"got \[2\]"):
        model.generate(input_ids, modality_ids=padded + 2 * (padded == 0), cache_implementation="static", **kwargs)
    with pytest.raises(ValueError, match=r"modality_ids has shape \(1, 3\) but the input has \(2, 3\)"):
        model(input_ids, attention_mask=attention_mask, modality_ids=padded[:1])


def test_the_pad_row_of_the_text_table_gets_no_gradient_as_in_transformers():
    """`embed_tokens` has Qwen3-MoE's `padding_idx` (the pad id, where it is a text id): its row stays as loaded."""
    model = DeepTalkForCausalLM(tiny_config()).train()  # pad_token_id 0
    reference = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, pad_token_id=0, num_hidden_layers=1))
    assert model.model.embed_tokens.padding_idx == reference.model.embed_tokens.padding_idx == 0
    ids = torch.tensor([[0, 5, 0, 70, 9]])
    model(ids, labels=ids).loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert not grad[0].any() and grad[5].any()
    assert DeepTalkModel(tiny_config(pad_token_id=70)).embed_tokens.padding_idx is None  # a speech id: no text row


def test_modality_ids_of_new_ids_are_checked_against_the_masks_last_columns():
    """Decoding from a cache by hand: `modality_ids` covers the new ids, the mask the whole sequence, so the padding
    that may hold anything is read from the mask's last columns (a left-padded row's first columns are padding)."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    prompt, mask = torch.tensor([[0, 3, 4], [5, 6, 7]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    with torch.no_grad():
        cache = model(prompt, attention_mask=mask, use_cache=True).cache
        step = dict(attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache=cache)
        with pytest.raises(ValueError, match=r"got \[2\]"):
            model(torch.tensor([[70], [8]]), modality_ids=torch.tensor([[2], [0]]), **step)
        # and a new position that the mask's last column pads may hold anything, as without a cache
        padded_step = dict(step, attention_mask=torch.cat([mask, torch.tensor([[0], [1]])], 1))
        model(torch.tensor([[70], [8]]), modality_ids=torch.tensor([[2], [0]]), **padded_step)


@pytest.mark.parametrize("grad", [True, False])  # without autograd a one-modality batch reads only its own table
@pytest.mark.parametrize("bad", [-1, 80, 200])
def test_ids_outside_the_vocabulary_are_refused_by_name(bad, grad):
    model = DeepTalkForCausalLM(tiny_config())  # 64 text ids, 16 speech ids
    with torch.set_grad_enabled(grad):
        for input_ids in ([[3, bad, 70]], [[bad]], [[70, bad]]):
            for call in (model, model.model.embed):  # `embed` builds a user's `inputs_embeds`
                with pytest.raises(
                    ValueError, match=r"input_ids range from .* outside the vocabulary \[0, 80\) \(text ids below 64"
                ):
                    call(torch.tensor(input_ids))


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_generation_equals_uncached_and_streams(attn):
    model = DeepTalkForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(attn)
    input_ids = torch.randint(3, model.config.vocab_size, (1, 6))
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)
    streamer = Collect()
    cached = model.generate(input_ids, use_cache=True, streamer=streamer, **kwargs)
    assert torch.equal(cached, model.generate(input_ids, use_cache=False, **kwargs))
    assert torch.equal(model.generate(input_ids, cache_implementation="static", **kwargs), cached)
    # router logits asked for (a config saved after MoE training): the static cache's per-layer masks are no padding
    routed = model.generate(input_ids, cache_implementation="static", output_router_logits=True, **kwargs)
    assert torch.equal(routed, cached)
    assert streamer.ended
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks]), cached[0])


@pytest.mark.parametrize("speech_attention", [False, True])
def test_continuous_batching_generates_what_generate_does(speech_attention):
    """`generate_batch` (transformers' continuous batching) packs the requests into one row over a paged cache: each
    token must still route and attend by its own modality. (A small cache: by default it
    takes most of the free memory, which takes seconds to fill on CPU.)"""
    model = DeepTalkForCausalLM(tiny_config(speech_attention=speech_attention, eos_token_id=None)).eval()
    start = model.config.speech_token_start
    prompts = [[2, 5, 6, 7, start, start + 1], [2, 9, 10], [2, start + 6, start + 7, start + 8, 11], [2, start + 2]]
    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist() for p in prompts]
    assert any(t >= start for tokens in expected for t in tokens) and any(t < start for t in expected[0])
    paged = ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=64)  # all prompts in one batch
    batched = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=paged)
    assert [batched[f"req_{i}"].generated_tokens for i in range(len(prompts))] == expected


def test_a_cache_passed_by_its_old_name_past_key_values_is_used():
    """transformers 4 code and PEFT's prefix tuning pass `past_key_values=`: it must be the cache, not a dropped kwarg."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model(ids[:, :6], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = model(ids[:, 6:], past_key_values=cache, use_cache=True).logits[:, -1]
        cache = model.model(ids[:, :6], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            hidden = model.model(ids[:, 6:], past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    torch.testing.assert_close(step, full)
    torch.testing.assert_close(hidden, model.model(ids).last_hidden_state[:, -1])


def greedy_recomputed(model, prompt: torch.Tensor, modality_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by full recomputation: `modality_ids` for the first positions, the ids' own block after them."""
    start, sequence = model.config.speech_token_start, prompt
    with torch.no_grad():
        for _ in range(steps):
            given = modality_ids.shape[1]
            modality = torch.cat([modality_ids, (sequence[:, given:] >= start).long()], dim=1)
            next_id = model(sequence, modality_ids=modality).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_id], dim=1)
    return sequence


def test_generation_extends_modality_ids_from_new_ids():
    """A prompt whose modality comes from `modality_ids` must decode like a full recomputation that uses them."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    start = model.config.speech_token_start
    prompt = torch.randint(3, start, (1, 6))
    modality_ids = torch.tensor([[0, 0, 1, 1, 1, 0]])
    out = model.generate(prompt, modality_ids=modality_ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    uncached = model.generate(
        prompt, modality_ids=modality_ids, max_new_tokens=8, do_sample=False, eos_token_id=None, use_cache=False
    )
    assert torch.equal(out, uncached)
    assert torch.equal(out, greedy_recomputed(model, prompt, modality_ids, 8))
    # The same prompt given as embeddings (as from an audio encoder): the same new ids.
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(
        inputs_embeds=embeds, modality_ids=modality_ids, max_new_tokens=8, do_sample=False, eos_token_id=None
    )
    assert torch.equal(from_embeds, out[:, 6:])


def test_generate_refuses_modality_ids_of_another_shape_than_the_prompt():
    """transformers would broadcast a one-row `modality_ids` over the batch, or silently cut it."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, model.config.speech_token_start, (2, 6))
    for shape in [(2, 7), (1, 6), (6,), (2,), (2, 6, 1)]:
        with pytest.raises(ValueError, match=rf"modality_ids has shape \({', '.join(map(str, shape))},?\) but the"):
            model.generate(prompt, modality_ids=torch.ones(shape, dtype=torch.long), max_new_tokens=2)
    # no prompt: generate starts from a BOS, one position
    with pytest.raises(ValueError, match=r"modality_ids has shape \(1, 3\) but the input has \(1, 1\)"):
        DeepTalkForCausalLM(tiny_config(bos_token_id=1)).generate(modality_ids=torch.ones(1, 3, dtype=torch.long))
    embeds = model.get_input_embeddings()(prompt)
    with pytest.raises(ValueError, match="modality_ids has shape"):
        model.generate(inputs_embeds=embeds, modality_ids=torch.ones(2, 5, dtype=torch.long), max_new_tokens=2)
    # a list (as a processor returns without return_tensors): an AttributeError on `.dtype` / `.shape` before
    with pytest.raises(ValueError, match="modality_ids must be a tensor .* got a list"):
        model.generate(prompt, modality_ids=[[0] * 6] * 2, max_new_tokens=2)
    with pytest.raises(ValueError, match="modality_ids must be a tensor .* got a list"):
        model(prompt, modality_ids=[[0] * 6] * 2)


def test_generate_modality_ids_may_cover_a_prefix_and_work_with_an_assistant():
    """Positions after a shorter `modality_ids` take their modality from their ids, like generated tokens; so assisted
    generation works (transformers hands the assistant the prompt's `modality_ids` with ids that have grown)."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3)).eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    by_ids = (prompt >= model.config.speech_token_start).long()
    flipped = by_ids.clone()
    flipped[:, :4] = 1 - flipped[:, :4]  # differs from what the ids say, so modality_ids must be read
    options = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(prompt, modality_ids=flipped, **options)
    assert not torch.equal(expected, model.generate(prompt, **options))
    assert torch.equal(model.generate(prompt, modality_ids=flipped[:, :4], **options), expected)
    assistant = copy.deepcopy(model)
    assert torch.equal(model.generate(prompt, modality_ids=flipped, assistant_model=assistant, **options), expected)


def test_generate_modality_ids_of_a_prefix_route_the_speech_blocks_first_id_after_it_as_speech():
    """Prompt positions after a shorter `modality_ids` take their modality from their ids from `speech_token_start`
    on (unit 0 included), as a recomputation with every position's modality given does."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3)).eval()
    start = model.config.speech_token_start
    prompt = torch.tensor([[5, 9, 12, start, start, start + 3, 7, start]])  # the block's first id after the prefix
    prefix = torch.tensor([[1, 0, 0]])  # not what the ids say, so it must be read
    options = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = model.generate(prompt, modality_ids=prefix, **options)
    assert torch.equal(got, greedy_recomputed(model, prompt, prefix, 6))


def test_generate_with_a_text_draft_model_and_modality_ids():
    """transformers hands the assistant every model kwarg; a plain text LM as draft takes no `modality_ids`, and the
    verified answer is the one without an assistant."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3)).eval()
    config = model.config
    draft = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    ).eval()
    prompt = torch.randint(3, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    flipped = (prompt < config.speech_token_start).long()
    options = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(prompt, modality_ids=flipped, **options)
    assert not torch.equal(expected, model.generate(prompt, **options))
    assert torch.equal(model.generate(prompt, modality_ids=flipped, assistant_model=draft, **options), expected)


def test_generate_from_ids_and_their_embeddings_routes_by_the_ids():
    """Given both, transformers feeds the model only the embeddings at the first step; the ids' modality goes with
    them, as for the ids alone (also from a cached prefix, where it passes only the uncached embeddings)."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3)).eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(prompt, **options)
    embeds = model.model.embed(prompt)
    assert not torch.equal(model.generate(inputs_embeds=embeds, **options), expected[:, 10:])  # all text
    assert torch.equal(model.generate(input_ids=prompt, inputs_embeds=embeds, **options), expected)
    with torch.no_grad():
        cache = model(prompt[:, :6], use_cache=True).cache
    assert torch.equal(model.generate(input_ids=prompt, inputs_embeds=embeds, cache=cache, **options), expected)


def test_generate_on_a_cached_prefix_reads_the_modality_ids_of_the_uncached_positions():
    """Continuing from a cache (e.g. the next turn of a dialogue), the positions still to compute take their
    `modality_ids` from their own place in the prompt, not from its start."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3)).eval()
    prompt = torch.randint(3, model.config.speech_token_start, (1, 10))
    modality_ids = torch.tensor([[0] * 6 + [1] * 4])
    options = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(prompt, modality_ids=modality_ids, **options)
    assert not torch.equal(expected, model.generate(prompt, **options))
    with torch.no_grad():
        cache = model(prompt[:, :6], modality_ids=modality_ids[:, :6], use_cache=True).cache
    assert torch.equal(
        model.generate(prompt, modality_ids=modality_ids, cache=copy.deepcopy(cache), **options), expected
    )
    # Only the new ids with a mask over the whole sequence (transformers' other way to continue): modality_ids is
    # aligned with the mask, as transformers aligns its per-position inputs; chunked prefill too.
    new_ids, mask = prompt[:, 6:], torch.ones(1, 10, dtype=torch.long)
    for chunk in (None, 3):
        got = model.generate(
            new_ids, modality_ids=modality_ids, attention_mask=mask, cache=copy.deepcopy(cache),
            prefill_chunk_size=chunk, **options,
        )  # fmt: skip
        assert torch.equal(got[:, 4:], expected[:, 10:])
    # modality_ids for the new ids alone would cover cached positions only, and be ignored: refused (the cache
    # under its old name too)
    for covered in (modality_ids[:, 6:], modality_ids[:, :6]):  # short of the new ids, or ending where they start
        for name in ("cache", "past_key_values"):
            with pytest.raises(ValueError, match=f"covers {covered.shape[1]} positions, all of them among the 6"):
                model.generate(new_ids, modality_ids=covered, attention_mask=mask, **{name: cache}, **options)
    with pytest.raises(ValueError, match="the attention_mask's 10: new ids after 6 cached positions"):
        model.generate(new_ids, modality_ids=torch.zeros(1, 11, dtype=torch.long), attention_mask=mask, cache=cache)
    # the same from embeddings (transformers passes the uncached ones only)
    embeds = model.model.embed(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, modality_ids=modality_ids, cache=cache, **options)
    assert torch.equal(from_embeds, expected[:, prompt.shape[1] :])


def test_generate_takes_transformers_positional_parameters_and_refuses_parallel_only_options():
    model = DeepTalkForCausalLM(tiny_config()).eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 6))
    # Both with the model's end id (a GenerationConfig's unset one is filled from the model's, as a kwarg-less call's).
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False)
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(prompt, config), expected)
    for option in [dict(batch_parallel=True), dict(speech_answer=False)]:
        with pytest.raises(ValueError, match=r"for models with parallel audio streams.*apply_chat_template\("):
            model.generate(prompt, max_new_tokens=2, **option)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = DeepTalkForCausalLM(tiny_config()).eval()
    prompts = [torch.randint(3, model.config.vocab_size, (n,)) for n in (7, 4)]
    width = max(len(p) for p in prompts)
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([[width - len(p)] for p in prompts])).long()
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    batch = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        assert torch.equal(batch[row, width:], alone[0, len(prompt) :])


def test_router_outputs_requested_by_the_config_work_with_a_cache():
    """The router losses read the padding from the attention mask, which with a cache covers the cached positions too."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 6))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(input_ids, **kwargs)
    model.config.output_router_logits = True
    assert torch.equal(model.generate(input_ids, **kwargs), expected)
    with torch.no_grad():
        cache = model(input_ids[:, :5], attention_mask=attention_mask[:, :5], use_cache=True).cache
        step = model(input_ids[:, 5:], attention_mask=attention_mask, cache=cache, use_cache=True)
        is_speech = input_ids[:, 5:] >= model.config.speech_token_start
        alone = modality_router_losses(step.router_logits, is_speech, model.config)
    torch.testing.assert_close(step.aux_loss, alone[0])


def test_save_pretrained_round_trip_is_bit_identical_safetensors_only(tmp_path):
    model = DeepTalkForCausalLM(tiny_config(num_speech_experts=[2, 0], tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, DeepTalkForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)
    assert loaded.speech_lm_head.weight is loaded.model.speech_embed_tokens.weight
    # The base model of a causal LM's checkpoint (untied: the heads are in the file) leaves the heads out.
    untied = DeepTalkForCausalLM(tiny_config()).eval()
    untied.save_pretrained(tmp_path / "untied")
    base = AutoModel.from_pretrained(tmp_path / "untied")
    assert isinstance(base, DeepTalkModel)
    with torch.no_grad():
        assert torch.equal(base(input_ids).last_hidden_state, untied.model(input_ids).last_hidden_state)


def test_sharded_and_other_dtype_round_trips(tmp_path):
    """A sharded save loads bit-identical; a bf16 checkpoint loads as bf16 (`dtype="auto"`, the default) or widened
    to float32 on request, holding the same values either way; a float32 one narrows to bf16 on request."""
    model = DeepTalkForCausalLM(tiny_config(speech_attention=True)).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(input_ids).logits, model(input_ids).logits
        )
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert {p.dtype for p in narrow.parameters()} == {torch.bfloat16}
    narrow.save_pretrained(tmp_path / "bf16")
    for dtype in ("auto", torch.float32):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {torch.float32 if dtype == torch.float32 else torch.bfloat16}
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, narrow.state_dict()[name].to(tensor.dtype)), name


def test_a_checkpoint_missing_tensors_of_an_overridden_config_names_the_override(tmp_path):
    """A DeepTalk checkpoint loaded with a config override that adds tensors (a dense layer, shared experts) is not
    another model's checkpoint to convert: the refusal names the override first."""
    DeepTalkForCausalLM(tiny_config()).save_pretrained(tmp_path)
    for override in (dict(mlp_only_layers=[0, 1]), dict(shared_expert_intermediate_size=16)):
        with pytest.raises(ValueError, match=r"lacks \d+ tensors.*\. The config was given or overridden"):
            DeepTalkForCausalLM.from_pretrained(tmp_path, **override)


def test_a_checkpoint_whose_config_json_holds_an_unused_n_shared_experts_names_the_override(tmp_path):
    """deeptalk_hf before 2026-11-29 stored a given `n_shared_experts` in config.json without using it; it is read now,
    so such a checkpoint lacks the shared experts its config asks for: the refusal names `n_shared_experts=0`, which
    loads the model as it was saved."""
    import json

    model = DeepTalkForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "n_shared_experts": 1}))  # as the old code wrote it
    with pytest.raises(
        ValueError, match=r"lacks 6 tensors .*shared_experts.*load such a checkpoint with n_shared_experts=0"
    ):
        DeepTalkForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"load such a checkpoint with n_shared_experts=0"):  # its heads unexpected
        AutoModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 80, (2, 7))
    loaded = DeepTalkForCausalLM.from_pretrained(tmp_path, n_shared_experts=0).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_another_moes_checkpoint_whose_shared_expert_is_named_otherwise_is_pointed_to_the_import(tmp_path):
    """A Qwen2-MoE checkpoint (`mlp.shared_expert.*`) loaded as a DeepTalk model lacks only `mlp.shared_experts.*`:
    the refusal points to the import, not to `n_shared_experts=0` (which its config.json does not hold and which would
    not load it)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"shared_experts.*another model's checkpoint.*upcycle_moe_checkpoint"
    ) as error:
        DeepTalkForCausalLM.from_pretrained(tmp_path, use_qk_norm=False)
    assert "n_shared_experts=0" not in str(error.value)


def test_resize_token_embeddings_keeps_the_text_and_speech_blocks_apart(tmp_path):
    """transformers' resize grows the text block of a model without speech ids (old ids keep their logits); with a
    speech block, only a call that changes nothing is allowed (`len(tokenizer)` of a matching tokenizer)."""
    model = DeepTalkForCausalLM(tiny_config(vocab_size=64, speech_vocab_size=0)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(72)
    model.resize_speech_vocab(16)
    assert (model.config.speech_token_start, model.config.vocab_size) == (72, 88)
    with torch.no_grad():
        assert torch.equal(model(ids).logits[..., :64], before)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for size, multiple in ((88, None), (None, None), (88, 8), (None, 11), (81, 11)):  # sizes that stay 88
        assert model.resize_token_embeddings(size, pad_to_multiple_of=multiple) is model.get_input_embeddings()
    for size, multiple in ((96, None), (80, None), (88, 64), (None, 64)):
        with pytest.raises(ValueError, match="72 text ids, then 16 speech ids.*resize_speech_vocab.*discard"):
            model.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    assert model.config.vocab_size == 88
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(DeepTalkForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    base = model.model  # the base model (AutoModel) keeps the blocks apart too
    with pytest.raises(ValueError, match="72 text ids, then 16 speech ids"):
        base.resize_token_embeddings(96)
    assert base.resize_token_embeddings(88) is base.get_input_embeddings() and base.config.vocab_size == 88


@pytest.mark.parametrize("tie", [False, True])
def test_resize_speech_vocab_keeps_rows_ties_the_head_and_sizes_the_loss(tie):
    """Growing the speech block of a bf16 model: kept rows stay, new rows start at the mean of their own table's text
    rows, the new tensors keep the model's dtype, a tied head is the embedding itself (training one trains the other),
    and the loss runs over the new vocabulary (checked against `F.cross_entropy`)."""
    model = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=tie)).to(torch.bfloat16).eval()
    tables = {
        "embed": (lambda: model.model.embed_tokens.weight, lambda: model.model.speech_embed_tokens.weight),
        "head": (lambda: model.lm_head.weight, lambda: model.speech_lm_head.weight),
    }
    before = {name: speech().detach().clone() for name, (_, speech) in tables.items()}
    model.resize_speech_vocab(24)
    assert (model.config.vocab_size, model.config.speech_vocab_size, model.vocab_size) == (88, 24, 88)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for name, (text, speech) in tables.items():
        assert speech().shape == (24, 32), name
        assert torch.equal(speech()[:16], before[name]), name
        mean = text().detach().float().mean(0).to(torch.bfloat16)
        assert torch.equal(speech()[16:], mean.expand(8, -1)), name
    assert (model.speech_lm_head.weight is model.model.speech_embed_tokens.weight) is tie
    ids = torch.randint(0, 88, (2, 7))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, 88), ids[:, 1:].reshape(-1))
    assert out.logits.shape == (2, 7, 88)
    torch.testing.assert_close(out.loss.float(), expected)


def test_resize_speech_vocab_refuses_what_is_not_a_count_before_changing_anything():
    """A fraction or a flag was refused by the config only after the speech tables were deleted: the model was left
    without them. A NumPy count is a count."""
    model = DeepTalkForCausalLM(tiny_config())
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for size in (4.5, 2.0, True, -1):
        with pytest.raises(ValueError, match=f"speech_vocab_size={size!r} must be an integer >= 0"):
            model.resize_speech_vocab(size)
    assert model.config.speech_vocab_size == 16 and model.config.vocab_size == 80
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    model.resize_speech_vocab(np.int64(9))
    assert model.config.speech_vocab_size == 9 and model.speech_lm_head.weight.shape[0] == 9


@pytest.mark.parametrize("tie", [True, False])
def test_resize_speech_vocab_updates_transformers_map_of_tied_weights(tie):
    """transformers computes `all_tied_weights_keys` once when the model is built and ties by it in `init_weights` (and
    device maps): after a resize it must be a model of the new size's, or the speech head is tied to a table that
    is gone (or left untied)."""
    model = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=tie))
    for size in (0, 8):
        model.resize_speech_vocab(size)
        built = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=tie, vocab_size=64 + size, speech_vocab_size=size))
        assert model.all_tied_weights_keys == built.all_tied_weights_keys
        model.init_weights()
    assert (model.speech_lm_head.weight is model.model.speech_embed_tokens.weight) is tie


def test_training_under_a_float64_default_dtype():
    """Gradient checks set the default dtype to float64; the router losses (float32, as the router probabilities) must
    still add up, to the values a float32 default gives the same model."""
    torch.manual_seed(0)
    ids = torch.randint(0, 80, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    model = DeepTalkForCausalLM(tiny_config(router_z_loss_coef=0.01)).train()
    model.set_experts_implementation("eager")
    expected = [model(ids, labels=ids, **kwargs) for kwargs in ({}, {"attention_mask": mask})]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for kwargs, reference in zip(({}, {"attention_mask": mask}), expected, strict=True):
            out = model(ids, labels=ids, **kwargs)
            for name in ("loss", "aux_loss", "z_loss"):
                torch.testing.assert_close(getattr(out, name), getattr(reference, name))
    finally:
        torch.set_default_dtype(default)


def test_a_model_built_under_a_float64_default_dtype_runs_on_the_eager_experts():
    """Weights built in float64 (no `config.dtype`) get the eager experts: torch's grouped matmul refuses float64.
    Its logits are the float32 model's (same weights) up to float32 rounding."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        wide = DeepTalkForCausalLM(tiny_config()).eval()
    finally:
        torch.set_default_dtype(default)
    assert wide.config._experts_implementation == "eager" and model.config._experts_implementation == "grouped_mm"
    wide.load_state_dict({name: tensor.double() for name, tensor in model.state_dict().items()})
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits.float(), model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm", "batched_mm"])
def test_sentinel_slots_never_reach_an_output(backend):
    """Sentinel slots (index 2 in a group of 2): backends that skip them give the experts' own result, bit for bit;
    `batched_mm` runs them on the group's last expert, whose inf times weight 0 made the tokens that never chose it
    NaN. A token with no expert in the group (masked, as under compile) gets zeros. Also with LoRA on the experts (a
    PEFT wrapper, which has no `config` to read the backend from)."""
    config = tiny_config(experts_implementation=backend, modality_routing="none")  # sentinels: the safe path
    model = DeepTalkForCausalLM(config).eval()
    mlp = model.model.layers[0].mlp
    experts = DeepTalkExperts(config, 2)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    hidden = torch.randn(3, config.hidden_size)
    indices, weights = torch.tensor([[0, 2], [0, 2], [2, 2]]), torch.tensor([[0.7, 0.0], [0.4, 0.0], [0.0, 0.0]])
    output = mlp._run(experts, 2, hidden, indices, weights, sentinels=True)
    if backend != "batched_mm":
        assert torch.equal(output, experts(hidden, indices, weights))
    assert torch.equal(output[2], torch.zeros(config.hidden_size))
    with torch.no_grad():
        experts.down_proj[1].fill_(float("inf"))  # the expert no token chose
    assert torch.equal(mlp._run(experts, 2, hidden, indices, weights, sentinels=True), output)
    # Through a block with routing "none" (as profiling runs it): tokens that never chose the inf expert stay finite.
    with torch.no_grad():
        mlp.speech_experts.down_proj[-1].fill_(float("inf"))
        states = torch.randn(1, 12, config.hidden_size)
        _, _, picks = mlp.route_all(torch.cat([mlp.gate(states[0]), mlp.speech_gate(states[0])], -1))
        untouched = ~(picks == mlp.num_text_experts + mlp.num_speech_experts - 1).any(-1)
        assert untouched.any() and mlp(states)[0][0][untouched].isfinite().all()
        # a zero-initialised LoRA on the experts changes nothing
        get_peft_model(model, LoraConfig(r=2, target_parameters=["mlp.speech_experts.down_proj"]))
        assert type(mlp.speech_experts).__name__ == "ParamWrapper"
        assert mlp(states)[0][0][untouched].isfinite().all()


def test_wrong_tensor_shape_fails_naming_it(tmp_path):
    model = DeepTalkForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.speech_gate.weight"] = torch.zeros(5, 32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.speech_gate\.weight.*\(5, 32\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("routing", ["hard", "none"])
def test_experts_backends_agree_forward_and_backward(routing):
    config = tiny_config(modality_routing=routing, num_speech_experts=[3, 1], num_experts_per_tok=3)
    input_ids = torch.randint(0, config.vocab_size, (2, 10))
    results = {}
    for backend in ("eager", "grouped_mm", "batched_mm"):
        torch.manual_seed(0)
        model = DeepTalkForCausalLM(config)
        model.set_experts_implementation(backend)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    logits, grads = results["eager"]
    for backend in ("grouped_mm", "batched_mm"):
        other_logits, other_grads = results[backend]
        torch.testing.assert_close(other_logits, logits, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            if grad is None:
                assert other_grads[name] is None, name
            else:
                torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_aux_loss_matches_transformers_for_a_single_moe_layer():
    config = tiny_config(num_hidden_layers=2, mlp_only_layers=[1], num_speech_experts=0, num_experts=5)
    model = DeepTalkForCausalLM(config).eval()
    input_ids = torch.randint(3, config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    expected = load_balancing_loss_func(out.router_logits, 5, config.num_experts_per_tok, attention_mask)
    torch.testing.assert_close(out.aux_loss, expected)


def reference_group_losses(logits, tokens, top_k, scoring_func="softmax"):
    """Plain-Python load-balancing and z-loss terms of one expert group over the listed tokens."""
    num_experts = logits.shape[1]
    counts = [0.0] * num_experts
    prob_sums = [0.0] * num_experts
    z = 0.0
    for t in tokens:
        scores = torch.softmax(logits[t].double(), -1) if scoring_func == "softmax" else logits[t].double().sigmoid()
        probs = (scores / scores.sum()).tolist()
        ranked = sorted(range(num_experts), key=lambda e: (-scores[e].item(), e))[: min(top_k, num_experts)]
        for e in ranked:
            counts[e] += 1
        for e in range(num_experts):
            prob_sums[e] += probs[e]
        z += torch.logsumexp(logits[t].double(), -1).item() ** 2
    n = len(tokens)
    aux = num_experts * sum((c / n) * (p / n) for c, p in zip(counts, prob_sums))
    return aux, z / n


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_modality_losses_match_hand_computed_values(scoring_func):
    """Layers of one shape are computed together (layers 0 and 3, 1 and 4 here), so shapes repeat."""
    config = tiny_config(
        num_hidden_layers=5,
        mlp_only_layers=[],
        num_experts=[3, 2, 4, 3, 2],
        num_speech_experts=[2, 0, 1, 2, 0],
        scoring_func=scoring_func,
    )
    torch.manual_seed(1)
    is_speech = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    router_logits = tuple(torch.randn(10, sum(config.layer_experts(i))) for i in config.moe_layers)
    aux, z = modality_router_losses(router_logits, is_speech, config, attention_mask)

    flat_speech = is_speech.reshape(-1).tolist()
    valid = [t for t in range(10) if attention_mask.reshape(-1)[t]]
    expected_aux = expected_z = 0.0
    for layer, logits in zip(config.moe_layers, router_logits):
        num_text, num_speech = config.layer_experts(layer)
        if num_speech:
            groups = [
                (logits[:, :num_text], [t for t in valid if not flat_speech[t]]),
                (logits[:, num_text:], [t for t in valid if flat_speech[t]]),
            ]
        else:
            groups = [(logits, valid)]
        for group_logits, tokens in groups:
            group_aux, group_z = reference_group_losses(group_logits, tokens, config.num_experts_per_tok, scoring_func)
            expected_aux += len(tokens) / len(valid) * group_aux
            expected_z += len(tokens) / len(valid) * group_z
    assert aux.item() == pytest.approx(expected_aux / 5, rel=1e-5)
    assert z.item() == pytest.approx(expected_z / 5, rel=1e-5)


def test_router_losses_count_the_experts_the_routing_picks_among_tied_scores():
    """A zero router (an upcycled model's start) ties every score; routing then picks experts 0..k-1. With
    uniform probabilities d aux / d logit[t, j] = (f_j - k/E) / T in closed form, f_j the share of tokens picking j."""
    config = tiny_config(num_speech_experts=0, num_experts=4, num_experts_per_tok=2)
    tokens = 6
    zero = torch.zeros(tokens, 4, requires_grad=True)
    aux, _ = modality_router_losses((zero,), torch.zeros(1, tokens, dtype=torch.bool), config)
    aux.backward()
    picked = torch.tensor([1.0, 1.0, 0.0, 0.0])  # every token picks experts 0 and 1
    torch.testing.assert_close(zero.grad, ((picked - 2 / 4) / tokens).expand(tokens, 4))
    # Some rows tied, some not: the value against the tie-stable hand reference.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    aux, z = modality_router_losses((logits,), torch.zeros(1, 3, dtype=torch.bool), config)
    expected_aux, expected_z = reference_group_losses(logits, range(3), 2)
    assert aux.item() == pytest.approx(expected_aux, rel=1e-6) and z.item() == pytest.approx(expected_z, rel=1e-6)


def test_router_losses_count_the_experts_the_routing_picks_where_float32_scores_tie():
    """Logits a hair apart (1e-9, a near-zero router's start) round to equal float32 softmax scores: the routing
    then picks the lowest experts, and the balancing loss must count those, not the ones the raw logits rank first."""
    config = tiny_config(num_speech_experts=0, num_experts=4, num_experts_per_tok=2)
    tokens = 6
    logits = torch.tensor([0.0, 0.0, 1e-9, 0.0]).repeat(tokens, 1).requires_grad_()
    _, indices = topk_routing(logits.detach(), RoutingSettings.from_config(config))
    assert indices.tolist() == [[0, 1]] * tokens  # tied scores: the lowest experts win
    aux, _ = modality_router_losses((logits,), torch.zeros(1, tokens, dtype=torch.bool), config)
    aux.backward()
    picked = torch.zeros(4).index_fill_(0, indices[0], 1.0)  # uniform probabilities: d aux/d logit = (f_j - k/E) / T
    torch.testing.assert_close(logits.grad, ((picked - 2 / 4) / tokens).expand(tokens, 4))


def test_the_loss_adds_each_router_loss_with_its_own_coefficient():
    """`loss` is the language-model cross entropy (plain torch) + router_aux_loss_coef * aux_loss +
    router_z_loss_coef * z_loss."""
    config = tiny_config(router_aux_loss_coef=0.03, router_z_loss_coef=0.007)
    model = DeepTalkForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        out = model(input_ids, labels=input_ids, output_router_logits=True)
    cross_entropy = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, config.vocab_size), input_ids[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, cross_entropy + 0.03 * out.aux_loss + 0.007 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0


@pytest.mark.parametrize("grad", [False, True])
def test_router_logits_are_text_then_speech_columns_for_any_batch(grad):
    """`router_logits[i]` is `[gate(h) ; speech_gate(h)]` for every token, whichever path the block takes: a batch of
    one modality scores the other router apart, and swapped columns there would balance the wrong group."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    start, vocab = model.config.speech_token_start, model.config.vocab_size
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
    text = torch.randint(3, start, (2, 6))
    speech = torch.randint(start, vocab, (2, 6))
    for input_ids in (text, speech, torch.cat([text, speech], dim=1)):
        with torch.set_grad_enabled(grad):
            out = model(input_ids, output_router_logits=True)
        for logits, layer in zip(out.router_logits, model.config.moe_layers, strict=True):
            mlp, hidden = model.model.layers[layer].mlp, inputs[layer].reshape(-1, model.config.hidden_size)
            expected = torch.cat([mlp.gate(hidden), mlp.speech_gate(hidden)], dim=-1)
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_router_losses_follow_modality_ids():
    """With `inputs_embeds` the router losses split the tokens by `modality_ids`, as the routing does: the same
    losses as the ids that `modality_ids` describes."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))
    input_ids[:, :4] = torch.randint(3, model.config.speech_token_start, (2, 4))
    input_ids[:, 4:] = torch.randint(model.config.speech_token_start, model.config.vocab_size, (2, 4))
    modality_ids = (input_ids >= model.config.speech_token_start).long()
    embeds = model.model.embed(input_ids)
    with torch.no_grad():
        by_ids = model(input_ids, output_router_logits=True)
        by_modality = model(inputs_embeds=embeds, modality_ids=modality_ids, output_router_logits=True)
    torch.testing.assert_close(by_modality.aux_loss, by_ids.aux_loss)
    torch.testing.assert_close(by_modality.z_loss, by_ids.z_loss)


def test_router_losses_under_routing_none_are_transformers_over_all_experts():
    """Routing "none" scores every token over all experts: one balancing group, as transformers computes it."""
    config = tiny_config(
        num_hidden_layers=2, mlp_only_layers=[1], num_experts=3, num_speech_experts=2, modality_routing="none"
    )
    model = DeepTalkForCausalLM(config).eval()
    input_ids = torch.randint(3, config.vocab_size, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    (logits,) = out.router_logits
    expected = load_balancing_loss_func(out.router_logits, 5, config.num_experts_per_tok, attention_mask)
    torch.testing.assert_close(out.aux_loss, expected)
    valid = attention_mask.reshape(-1).bool()
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits[valid], -1).pow(2).mean())


def test_training_lowers_the_loss_with_router_losses():
    config = tiny_config(router_z_loss_coef=1e-3, router_aux_loss_coef=1e-2)
    model = DeepTalkForCausalLM(config).train()
    data = torch.randint(0, config.vocab_size, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(data, labels=data)
        assert out.aux_loss is not None and out.z_loss is not None and out.router_logits is None
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert model.model.layers[0].mlp.speech_gate.weight.grad.abs().sum() > 0
    # Without labels (Trainer's compute_loss_func) the router losses are still on the output, to be added.
    with torch.no_grad():
        labelled, unlabelled = model(data, labels=data), model(data)
    assert torch.equal(unlabelled.aux_loss, labelled.aux_loss) and torch.equal(unlabelled.z_loss, labelled.z_loss)
    assert model.eval()(data).aux_loss is None


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    data = torch.randint(0, config.vocab_size, (2, 8))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DeepTalkForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(data, labels=data).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "options, reentrant", [({"use_reentrant": False}, False), ({"use_reentrant": True}, True), ({}, True)]
)
def test_reentrant_checkpointing_warns_that_the_router_losses_lose_their_gradient(options, reentrant, caplog):
    """Options without `use_reentrant` (PEFT's `prepare_model_for_kbit_training` passes `{}`) get torch's reentrant
    default; no options at all get transformers' non-reentrant one (the test above)."""
    config = tiny_config(router_aux_loss_coef=1e-2, router_z_loss_coef=1e-3)
    model = DeepTalkForCausalLM(config).train()
    with caplog.at_level("WARNING", logger="deeptalk_hf.modeling_deeptalk"):
        model.activation_checkpointing_enable(options)
    data = torch.randint(0, config.vocab_size, (2, 8))
    out = model(data, labels=data)
    assert out.aux_loss.requires_grad is out.z_loss.requires_grad is not reentrant  # what the warning is about
    assert ("router losses (aux_loss, z_loss) get no gradient" in caplog.text) is reentrant


@pytest.mark.parametrize("backend", ["grouped_mm", "batched_mm"])
def test_torch_compile_fullgraph_matches_eager_mode(backend):
    """Where Qwen3-MoE compiles with `fullgraph=True` (grouped_mm, batched_mm), so does DeepTalk's hard routing."""
    model = DeepTalkForCausalLM(tiny_config(experts_implementation=backend)).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 6))
    assert (input_ids >= model.config.speech_token_start).any() and (input_ids < 64).any()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits)
        # Text positions never read the speech experts, not even a non-finite output of theirs (inf * 0 is NaN).
        text = input_ids % model.config.speech_token_start
        expected = model(text).logits
        for layer in model.model.layers:
            if layer.mlp.__class__.__name__ == "DeepTalkSparseMoeBlock":
                layer.mlp.speech_experts.down_proj.fill_(float("inf"))
        assert torch.equal(compiled(text).logits, expected)


@pytest.mark.parametrize("speech_attention", [False, True])
def test_torch_compile_fullgraph_trains_like_eager_mode(speech_attention):
    """Under compile both groups see every token with sentinel slots, and speech attention takes a mask: in training
    the loss, both router losses and every gradient must be eager mode's. (One eager call first: transformers installs
    its output-capturing hooks under a lock on the first call that asks for router logits, which a full graph cannot
    trace; Qwen3-MoE alike.)"""
    model = DeepTalkForCausalLM(tiny_config(router_z_loss_coef=0.01, speech_attention=speech_attention)).train()
    with torch.no_grad():  # speech projections start as copies of the text ones: make them differ
        for name, param in model.named_parameters():
            if ".self_attn.speech_" in name:
                param.add_(0.1 * torch.randn_like(param))
    reference = copy.deepcopy(model)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8))
    input_ids[0, :4] = model.config.speech_token_start + 3
    model(input_ids, labels=input_ids)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out, expected = compiled(input_ids, labels=input_ids), reference(input_ids, labels=input_ids)
    (out.loss + out.aux_loss + out.z_loss).backward()
    (expected.loss + expected.aux_loss + expected.z_loss).backward()
    for name in ("loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name))
    for (name, param), other in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, other.grad, msg=name)


DEEPSEEK_FIELDS = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=12,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    n_shared_experts=2,
    n_routed_experts=8,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    routed_scaling_factor=2.5,
    n_group=4,
    topk_group=2,
)


def deepseek_pair(version: str):
    """A tiny random DeepSeek-V2 (group-limited greedy) or V3 (sigmoid, noaux_tc with a non-zero correction bias)
    and the DeepTalk model imported from it."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    if version == "v2":
        source = DeepseekV2ForCausalLM(DeepseekV2Config(**DEEPSEEK_FIELDS, topk_method="group_limited_greedy")).eval()
    else:
        source = DeepseekV3ForCausalLM(DeepseekV3Config(**DEEPSEEK_FIELDS, norm_topk_prob=True)).eval()
        with torch.no_grad():
            for name, buffer in source.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buffer.normal_(std=0.1)
    return source, upcycle_moe(source).eval()


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_a_deepseek_checkpoint_read_directly_is_refused(version, tmp_path):
    """A DeepSeek checkpoint read as a DeepTalk config directly would load as another model in half precision (routers
    and V2's rotary in the model's dtype; before `n_shared_experts` was read, without its shared experts):
    `upcycle_moe` is the way in."""
    source, _ = deepseek_pair(version)
    source.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"deepseek_{version} config is not read as a DeepTalk config: .*upcycle_moe"):
        DeepTalkForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_deepseek_mla_group_limited_routing_matches(version):
    source, model = deepseek_pair(version)
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (source(input_ids).logits - model(input_ids).logits).abs().max() <= 1e-5
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(input_ids))
    assert torch.equal(source.generate(input_ids, **kwargs), model.generate(input_ids, **kwargs))


def test_offloading_works_but_deepseek_v3_routing_refuses_offloaded_buffers():
    """accelerate's offloading puts a module's tensors in place for its own forward only; DeepSeek-V3 routing reads the
    routers' correction biases after their forward, so their buffers may not be offloaded: refused by name."""
    from accelerate import cpu_offload

    _, model = deepseek_pair("v3")
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(input_ids).logits
        offloaded = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
        torch.testing.assert_close(offloaded(input_ids).logits, expected, rtol=0, atol=1e-6)
        with_buffers = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"), offload_buffers=True)
        with pytest.raises(ValueError, match="e_score_correction_bias.*meta device.*offload_buffers=False"):
            with_buffers(input_ids)


def move_to_speech_group(model: DeepTalkForCausalLM, speech_ids: list[int]) -> DeepTalkForCausalLM:
    """An independent, by-hand expert move: the listed experts (and their router rows and correction biases) of every
    MoE layer go to a new speech group, recorded in `speech_expert_ids`."""
    config = copy.deepcopy(model.config)
    config.num_speech_experts = len(speech_ids)
    config.num_experts = config.num_experts - len(speech_ids)
    config.speech_expert_ids = [list(speech_ids) for _ in config.moe_layers]
    split = DeepTalkForCausalLM(config).eval()
    text_ids = [i for i in range(model.config.num_experts) if i not in speech_ids]
    state = {}
    for name, tensor in model.state_dict().items():
        for group, ids in (("experts", text_ids), ("speech_experts", speech_ids)):
            if ".mlp.experts." in name:
                state[name.replace(".mlp.experts.", f".mlp.{group}.")] = tensor[ids]
        for group, ids in (("gate", text_ids), ("speech_gate", speech_ids)):
            if ".mlp.gate." in name:
                state[name.replace(".mlp.gate.", f".mlp.{group}.")] = tensor[ids]
        if ".mlp.experts." not in name and ".mlp.gate." not in name:
            state[name] = tensor
    missing, unexpected = split.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return split


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_routing_none_scores_moved_experts_in_source_order(version):
    source, model = deepseek_pair(version)
    split = move_to_speech_group(model, [6, 1, 3])
    split.config.modality_routing = "none"
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = source(input_ids).logits
        assert (split(input_ids).logits - expected).abs().max() <= 1e-5
        split.config.modality_routing = "hard"  # now each modality uses its own group: a different model
        assert (split(input_ids).logits - expected).abs().max() > 1e-3


def test_default_backend_avoids_grouped_mm_on_unaligned_expert_strides():
    aligned = DeepTalkForCausalLM(tiny_config())
    assert aligned.config._experts_implementation == "grouped_mm"
    odd = DeepTalkForCausalLM(tiny_config(moe_intermediate_size=6))
    assert odd.config._experts_implementation == "eager"
    odd(torch.randint(0, 80, (2, 5)))  # grouped_mm would raise "strides should be multiple of 16 bytes"


def test_generate_from_a_cache_with_the_whole_prompt_and_its_mask_takes_prefix_modality_ids():
    """Continuing from a cache with the whole prompt (ids and mask of the same length), a `modality_ids` covering a
    prefix is allowed as without a cache: only a mask longer than the ids means "new ids only"."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.3)).eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    modality_ids = 1 - (prompt[:, :4] >= model.config.speech_token_start).long()
    options = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(prompt, modality_ids=modality_ids, **options)
    with torch.no_grad():
        full_modality = torch.cat([modality_ids, (prompt[:, 4:6] >= model.config.speech_token_start).long()], 1)
        cache = model(prompt[:, :6], modality_ids=full_modality, use_cache=True).cache
    mask = torch.ones(1, 10, dtype=torch.long)
    got = model.generate(prompt, modality_ids=modality_ids, attention_mask=mask, cache=cache, **options)
    assert torch.equal(got, expected)


def test_sigmoid_top_k_weights_stay_finite_when_every_score_underflows():
    """Sigmoid scores of very negative router logits round to 0: the normalised top-k weights must stay finite (the
    epsilon guard), not 0/0 = NaN that would poison the whole forward."""
    config = tiny_config(scoring_func="sigmoid", norm_topk_prob=True)
    logits = torch.tensor([[-200.0, -300.0, -250.0, -400.0], [1.0, 0.0, -1.0, 2.0]])
    weights, indices = topk_routing(logits, RoutingSettings.from_config(config))
    assert torch.isfinite(weights).all()
    assert indices[0].tolist() == [0, 1] and weights[0].tolist() == [0.0, 0.0]  # all scores 0: a tie
    torch.testing.assert_close(weights[1].sum(), torch.tensor(1.0))


def test_low_precision_routing_scores_in_float32_like_transformers():
    """Router scores are computed and normalised in float32 whatever the logits' dtype (as transformers' MoE routers
    do) and only the final weights are cast: bfloat16 logits give exactly the float32 routing, rounded once."""
    settings = RoutingSettings.from_config(tiny_config(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True))
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weights, indices = topk_routing(logits, settings)
    ref_weights, ref_indices = topk_routing(logits.float(), settings)
    assert weights.dtype == torch.bfloat16
    assert torch.equal(indices, ref_indices)
    assert torch.equal(weights, ref_weights.to(torch.bfloat16))
    # `routing_weights_dtype="float32"` (Mixtral): the same weights, not rounded.
    mixtral = RoutingSettings.from_config(
        tiny_config(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, routing_weights_dtype="float32")
    )
    weights, indices = topk_routing(logits, mixtral)
    assert weights.dtype == torch.float32 and torch.equal(weights, ref_weights) and torch.equal(indices, ref_indices)


@pytest.mark.parametrize("router_dtype", [None, "float32"])
def test_router_dtype_decides_the_routers_precision_in_a_half_precision_model(router_dtype, tmp_path):
    """`router_dtype="float32"` keeps both routers (text and speech) in float32 when loaded in bf16 and scores from
    float32 inputs; without it the routers are plain bf16 linears, as in transformers' Qwen-MoE."""
    config = tiny_config(router_dtype=router_dtype)
    DeepTalkForCausalLM(config).save_pretrained(tmp_path)
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected_dtype = torch.bfloat16 if router_dtype is None else torch.float32
    # Loaded in bf16, or built in bf16 (transformers' DeepSeek routers are built in float32 too).
    for model in (
        DeepTalkForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16),
        DeepTalkForCausalLM._from_config(config, dtype=torch.bfloat16),
    ):
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        for router in (model.model.layers[0].mlp.gate, model.model.layers[0].mlp.speech_gate):
            assert router.weight.dtype == expected_dtype
            with torch.no_grad():
                logits = router(hidden)
                reference = torch.nn.functional.linear(hidden.to(expected_dtype), router.weight)
            assert logits.dtype == expected_dtype and torch.equal(logits, reference)
    # DeepSeek-V3's correction bias is float32 whatever the routers' dtype, as in transformers' DeepSeek-V3.
    noaux = tiny_config(router_dtype=router_dtype, topk_method="noaux_tc", n_group=1, topk_group=1)
    model = DeepTalkForCausalLM._from_config(noaux, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_deferred_initialisation_zeroes_the_score_correction_bias():
    """A model built on the meta device and initialised later (`to_empty`, then `init_weights`, as FSDP and accelerate
    do) starts with DeepSeek-V3's correction bias at zero, as transformers' DeepSeek-V3 does: whatever the memory held
    would pick other experts."""
    with torch.device("meta"):
        model = DeepTalkForCausalLM(tiny_config(topk_method="noaux_tc", n_group=1, topk_group=1))
    model.to_empty(device="cpu")
    biases = [buffer for name, buffer in model.named_buffers() if name.endswith("e_score_correction_bias")]
    with torch.no_grad():
        for bias in biases:
            bias.fill_(float("nan"))
    model.init_weights()
    assert len(biases) == 4 and all(torch.equal(bias, torch.zeros_like(bias)) for bias in biases)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_dropout_applies_in_training_only(attn):
    """`attention_dropout` is a training regulariser: an eval model is deterministic, a training one is not."""
    config = tiny_config(attention_dropout=0.5, attn_implementation=attn)
    model = DeepTalkForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 9))
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
        assert torch.equal(first, second)
        model.train()
        assert not torch.equal(model(ids).logits, first)


MLA = dict(
    kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4
)


@pytest.mark.parametrize("mla", [False, True])
def test_each_layer_calls_the_configured_attention_function_and_records_its_weights(mla):
    """A registered attention function (a kernel of the user's) is what every layer calls, with the sliding window of
    its layer type only (as transformers' Qwen3-MoE passes it; flash attention reads it), and `output_attentions`
    returns each layer's weights, for the standard and the latent attention alike."""
    calls = []

    def recording(module, *args, **kwargs):
        calls.append((module.layer_idx, kwargs.get("sliding_window")))
        return eager_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("deeptalk_test_recording", recording)
    AttentionMaskInterface.register("deeptalk_test_recording", eager_mask)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = tiny_config(**MLA) if mla else tiny_config(sliding_window=4, layer_types=layer_types)
    model = DeepTalkForCausalLM(config).eval()
    ids = torch.randint(3, 80, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        model.set_attn_implementation("deeptalk_test_recording")
        outputs = model(ids, output_attentions=True)
    assert calls == ([(0, None), (1, None), (2, None)] if mla else [(0, 4), (1, None), (2, 4)])
    torch.testing.assert_close(outputs.logits, reference, rtol=1e-5, atol=1e-5)
    assert [tuple(weights.shape) for weights in outputs.attentions] == [(2, 4, 7, 7)] * 3


def test_reentrant_checkpointing_warns_with_a_z_loss_alone(caplog):
    """The z-loss loses its gradient under reentrant checkpointing as the balancing loss does: the warning also
    fires where only `router_z_loss_coef` is set."""
    for aux, z, warned in [(0.0, 1e-3, True), (0.0, 0.0, False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="deeptalk_hf.modeling_deeptalk"):
            warn_if_checkpointing_stops_balancing(tiny_config(router_aux_loss_coef=aux, router_z_loss_coef=z), {})
        assert ("get no gradient" in caplog.text) is warned


def test_a_sparse_block_called_without_a_split_routes_every_token_as_text():
    """`DeepTalkSparseMoeBlock(hidden)` without a modality split treats every token as text, as documented."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    block = model.model.layers[0].mlp
    hidden = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        out, logits = block(hidden)
        text, text_logits = block(hidden, ModalitySplit(torch.zeros(2, 5, dtype=torch.bool)))
        speech, _ = block(hidden, ModalitySplit(torch.ones(2, 5, dtype=torch.bool)))
    assert torch.equal(out, text) and torch.equal(logits, text_logits)
    assert not torch.equal(out, speech)


@pytest.mark.parametrize("num_speech_experts", [3, 4])
def test_hard_routing_chooses_with_each_groups_own_correction_bias(num_speech_experts):
    """DeepSeek-V3 routing (sigmoid, noaux_tc) under hard routing, in a batch of both modalities: each token's experts
    are the top-k of its own group's scores plus that group's `e_score_correction_bias`, its weights the renormalised
    scores times `routed_scaling_factor`: a plain-torch sum over the picked experts."""
    config = tiny_config(
        num_speech_experts=num_speech_experts, scoring_func="sigmoid", topk_method="noaux_tc", n_group=1,
        topk_group=1, routed_scaling_factor=2.5, experts_implementation="eager",
    )  # fmt: skip
    model = DeepTalkForCausalLM(config).eval()
    block = model.model.layers[0].mlp
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in (block.gate, block.speech_gate):
            gate.weight.normal_(std=0.5)
            gate.e_score_correction_bias.uniform_(-0.5, 0.5)  # large enough to change the choice
        for experts in (block.experts, block.speech_experts):
            experts.gate_up_proj.normal_(std=0.3)
            experts.down_proj.normal_(std=0.3)
        hidden = torch.randn(2, 6, config.hidden_size)
        mixed = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)
        # a mixed batch, and batches of one modality (a decoding step's path)
        for is_speech in (mixed, torch.ones_like(mixed), torch.zeros_like(mixed)):
            out, _ = block(hidden, ModalitySplit(is_speech))
            expected = torch.zeros_like(hidden)
            for b, t in itertools.product(range(2), range(6)):
                h = hidden[b, t]
                speech = is_speech[b, t]
                gate, experts = (block.speech_gate, block.speech_experts) if speech else (block.gate, block.experts)
                scores = (h @ gate.weight.T).sigmoid()
                picked = (scores + gate.e_score_correction_bias).argsort(descending=True)[:2]
                weights = scores[picked] / scores[picked].sum() * 2.5
                for e, w in zip(picked.tolist(), weights):
                    g, u = (experts.gate_up_proj[e] @ h).chunk(2)
                    expected[b, t] += w * (experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_ignore_mismatched_sizes_loads_a_checkpoint_of_other_shapes(tmp_path):
    """transformers' `ignore_mismatched_sizes=True` re-initialises tensors of another shape instead of refusing."""
    DeepTalkForCausalLM(tiny_config()).save_pretrained(tmp_path)
    config = tiny_config(moe_intermediate_size=24)
    with pytest.raises(ValueError, match="wrong shape"):
        DeepTalkForCausalLM.from_pretrained(tmp_path, config=config)
    # A config of other sizes is named as a cause beside another model's checkpoint (only the conversion was named)
    for other in ({"config": config}, {"speech_vocab_size": 20, "vocab_size": 84}):
        with pytest.raises(ValueError, match="the config was given or overridden with other sizes"):
            DeepTalkForCausalLM.from_pretrained(tmp_path, **other)
    model, info = DeepTalkForCausalLM.from_pretrained(
        tmp_path, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert info["mismatched_keys"] and model.model.layers[0].mlp.experts.down_proj.shape[-1] == 24


def test_a_zero_router_over_many_experts_picks_the_lowest_experts():
    """Tie-stable top-k also for a large expert group (128, as Qwen3-30B-A3B): torch's unstable CPU sort reorders
    ties from 128 columns on, which would route an upcycled model's zero router to arbitrary experts."""
    settings = RoutingSettings.from_config(tiny_config(num_experts=128, num_experts_per_tok=8))
    weights, indices = topk_routing(torch.zeros(16, 128), settings)
    assert torch.equal(indices, torch.arange(8).expand(16, 8))
    torch.testing.assert_close(weights, torch.full((16, 8), 1 / 8))


def test_shrinking_the_speech_block_keeps_its_first_rows():
    """`resize_speech_vocab` to fewer ids keeps the kept speech rows (embedding and head), as growing does."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    embed = model.model.speech_embed_tokens.weight.detach().clone()
    head = model.speech_lm_head.weight.detach().clone()
    model.resize_speech_vocab(10)
    assert model.config.vocab_size == model.config.speech_token_start + 10
    assert torch.equal(model.model.speech_embed_tokens.weight, embed[:10])
    assert torch.equal(model.speech_lm_head.weight, head[:10])


def test_training_with_a_z_loss_alone_adds_it_without_asking_for_router_logits():
    """In training the router losses are computed whenever a coefficient is set: a z-loss alone
    (`router_aux_loss_coef=0`) must not stop silently because router logits were not requested."""
    config = tiny_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.01)
    model = DeepTalkForCausalLM(config).train()
    data = torch.randint(0, config.vocab_size, (2, 8))
    out = model(data, labels=data)
    assert out.z_loss is not None and out.z_loss > 0
    logits = out.logits[:, :-1].reshape(-1, config.vocab_size)
    cross_entropy = torch.nn.functional.cross_entropy(logits, data[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, cross_entropy + 0.01 * out.z_loss)


def test_speech_id_reads_its_own_row_of_the_speech_tables():
    """Speech id `speech_token_start + u` embeds as row u of `speech_embed_tokens` and scores with row u of
    `speech_lm_head`, on every lookup path (mixed ids, all speech, a split given or not): a permuted row would leave
    every test on random tables passing, and read a trained checkpoint's units from other units' rows."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config()).eval()
    config, decoder = model.config, model.model
    start, units = config.speech_token_start, torch.tensor([[3, 0, 15, 7]])
    mixed = torch.tensor([[5, start + 3, 9, start + 15]])
    with torch.no_grad():
        for ids in (mixed, units + start):
            is_speech = ids >= start
            for split in (None, ModalitySplit(is_speech)):
                embedded = decoder.embed(ids, split)
                torch.testing.assert_close(
                    embedded[is_speech], decoder.speech_embed_tokens.weight[ids[is_speech] - start]
                )
                torch.testing.assert_close(embedded[~is_speech], decoder.embed_tokens.weight[ids[~is_speech]])
        hidden = torch.randn(1, 1, config.hidden_size)
        logits = model.compute_logits(hidden)[0, 0]
        torch.testing.assert_close(logits[start:], model.speech_lm_head.weight @ hidden[0, 0])
        torch.testing.assert_close(logits[:start], model.lm_head.weight[:start] @ hidden[0, 0])


def test_ten_or_more_experts_keep_their_order_on_disk(tmp_path):
    """Experts are written one by one (`mlp.experts.{j}...`): with 10 or more, an order by name ("10" before "2")
    would permute them on load."""
    model = DeepTalkForCausalLM(tiny_config(num_experts=12, num_speech_experts=11))
    model.save_pretrained(tmp_path)
    loaded = DeepTalkForCausalLM.from_pretrained(tmp_path)
    for (name, param), reloaded in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(param, reloaded), name


def test_a_model_cut_to_its_first_layers_runs_them_as_the_full_model_does():
    """Pruning or early exit keeps the first decoder layers (`model.layers[:k]`, `num_hidden_layers = k`), as
    transformers' MoE models allow: the cut model's output is the full model's after those layers."""
    mixed = ["full_attention", "sliding_attention", "full_attention"]
    model = DeepTalkForCausalLM(tiny_config(sliding_window=2, layer_types=mixed)).eval()
    ids = torch.tensor([[5, 70, 9, 71, 12, 3]])
    with torch.no_grad():
        after_two = model.model.norm(model.model(ids, output_hidden_states=True).hidden_states[2])
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        torch.testing.assert_close(model.model(ids).last_hidden_state, after_two, rtol=0, atol=0)
        assert torch.isfinite(model(ids, labels=ids, output_router_logits=True).loss)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm", "batched_mm"])
def test_hard_routing_keeps_no_copy_of_the_groups_outputs_for_backward(backend):
    """Merging the two groups' outputs into the token order must not keep them for the backward (autograd's
    `index_copy_` keeps its whole source, `[rows, hidden]` per group and layer, for its shape alone): training would
    hold one more activation per MoE layer than Qwen3-MoE does."""
    torch.manual_seed(0)
    block = DeepTalkForCausalLM(tiny_config(experts_implementation=backend)).train().model.layers[0].mlp
    hidden = torch.randn(1, 10, 32, requires_grad=True)
    split = ModalitySplit(torch.arange(10) % 3 == 0)
    outputs, saved = [], set()
    run = block._run

    def recorded(*args, **kwargs):
        outputs.append(run(*args, **kwargs))
        return outputs[-1]

    block._run = recorded

    def pack(tensor):
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output, _ = block(hidden, split)
    assert len(outputs) == 2 and not saved & {o.untyped_storage().data_ptr() for o in outputs}
    output.sum().backward()
    assert hidden.grad is not None
