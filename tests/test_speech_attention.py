"""Speech attention projections: exact at creation, used at speech positions only, trained by the speech stage."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from deeptalk_hf import (
    DeepTalkForCausalLM,
    add_speech_attention,
    lora_config_for_stage,
    set_training_stage,
    training_stage_parameters,
)

from .conftest import tiny_config
from .test_modality import randomize

SPEECH_START = 64  # tiny_config: vocab 80, the last 16 ids are speech
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def perturb_speech_attention(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".self_attn.speech_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def mixed_ids(batch: int = 2, text: int = 5, speech: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            torch.randint(3, SPEECH_START, (batch, text), generator=generator),
            torch.randint(SPEECH_START, 80, (batch, speech), generator=generator),
        ],
        dim=1,
    )


ATTENTION_VARIANTS = [
    dict(),  # Qwen3: q/k norm per head
    dict(qk_norm_type="full", clip_qkv=3.0),  # OLMoE
    dict(use_qk_norm=False, qkv_bias=True),  # Qwen2
]


@pytest.mark.parametrize("overrides", ATTENTION_VARIANTS)
def test_add_speech_attention_keeps_the_function(overrides):
    model = randomize(DeepTalkForCausalLM(tiny_config(**overrides)), seed=0).eval()
    ids = mixed_ids()
    before = model(ids).logits
    add_speech_attention(model)
    assert model.config.speech_attention
    after = model(ids).logits
    assert torch.equal(after[:, :5], before[:, :5])  # text positions: bit for bit
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # speech rows are projected as a gathered batch
    names = {name.rsplit(".", 2)[1] for name, _ in model.named_parameters() if ".self_attn.speech_" in name}
    expected = {f"speech_{n}" for n in ATTENTION if overrides.get("use_qk_norm", True) or "norm" not in n}
    assert names == expected


@pytest.mark.parametrize("overrides", ATTENTION_VARIANTS)
def test_speech_positions_use_the_speech_projections(overrides):
    """Reference: the same model without speech attention, its attention weights swapped for the speech ones."""
    model = randomize(DeepTalkForCausalLM(tiny_config(speech_attention=True, **overrides)), seed=0).eval()
    perturb_speech_attention(model)
    state = model.state_dict()
    plain = {name: value for name, value in state.items() if ".self_attn.speech_" not in name}
    as_speech = dict(plain)
    for name in plain:
        if ".self_attn." in name:
            layer, _, rest = name.partition(".self_attn.")
            as_speech[name] = state[f"{layer}.self_attn.speech_{rest}"]
    reference = DeepTalkForCausalLM(tiny_config(**overrides)).eval()

    speech_only = torch.randint(SPEECH_START, 80, (2, 7), generator=torch.Generator().manual_seed(1))
    reference.load_state_dict(as_speech)
    torch.testing.assert_close(model(speech_only).logits, reference(speech_only).logits, rtol=1e-5, atol=1e-5)

    # Text positions see only text projections: all-text input, and the text prefix of a mixed input, are exact.
    ids = mixed_ids(text=5)
    reference.load_state_dict(plain)
    assert torch.equal(model(ids[:, :5]).logits, reference(ids[:, :5]).logits)
    assert torch.equal(model(ids).logits[:, :5], reference(ids).logits[:, :5])
    assert not torch.allclose(model(ids).logits[:, 5:], reference(ids).logits[:, 5:])


def test_speech_stage_trains_speech_attention_and_leaves_text_exact():
    model = randomize(DeepTalkForCausalLM(tiny_config()), seed=0)
    add_speech_attention(model)
    trained = set(set_training_stage(model, "speech"))
    assert {f"model.layers.0.self_attn.speech_{n}.weight" for n in ATTENTION} <= trained
    assert not any(".self_attn." in name and "speech" not in name for name in trained)
    text_only = torch.randint(3, SPEECH_START, (2, 9))
    model.eval()
    text_logits = model(text_only).logits[..., :SPEECH_START]  # the speech head's columns do train
    text_state = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trained}
    speech_state = {n: p.detach().clone() for n, p in model.named_parameters() if ".self_attn.speech_" in n}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = mixed_ids()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(torch.equal(p, text_state[n]) for n, p in model.named_parameters() if n in text_state)
    assert torch.equal(model(text_only).logits[..., :SPEECH_START], text_logits)
    assert all(not torch.equal(p, speech_state[n]) for n, p in model.named_parameters() if n in speech_state)

    config = lora_config_for_stage(model, "speech")
    assert {"speech_q_proj", "speech_k_proj", "speech_v_proj", "speech_o_proj"} <= set(config.target_modules)
    assert not {"q_proj", "o_proj"} & set(config.target_modules)


def test_speech_stage_lora_on_speech_attention_merges_up_to_rounding():
    model = randomize(DeepTalkForCausalLM(tiny_config(speech_attention=True)), seed=0)
    peft_model = get_peft_model(model, lora_config_for_stage(model, "speech", r=2))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LoRA B starts at zero: give the speech-attention adapters a visible effect
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and ".self_attn.speech_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.eval()
    ids = mixed_ids()
    adapted = peft_model(ids).logits
    base_text = peft_model.get_base_model()
    with peft_model.disable_adapter():
        plain = peft_model(ids).logits
    assert torch.equal(adapted[:, :5], plain[:, :5])  # text positions before any speech: untouched
    assert not torch.allclose(adapted[:, 5:], plain[:, 5:])
    merged = peft_model.merge_and_unload()
    assert merged is base_text
    merged_logits = merged(ids).logits
    assert torch.equal(merged_logits[:, :5], adapted[:, :5])  # the merge changed only speech-attention weights
    # Folding B @ A into W rounds differently from W x + B (A x): up to rounding, not bitwise. The error scales with the
    # logits (about 10 here), not with each element, so the tolerance is relative to their largest magnitude: the
    # worst of 60 default seeds was 2.8e-6 of it (a fixed 1e-5 absolute bound failed 19 of those 60).
    scale = adapted.abs().max().item()
    torch.testing.assert_close(merged_logits, adapted, rtol=0, atol=1e-5 * scale)


def test_copies_keep_requires_grad_and_stage_names():
    model = DeepTalkForCausalLM(tiny_config())
    set_training_stage(model, "text")
    add_speech_attention(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".self_attn.speech_" in n)
    assert "model.layers.2.self_attn.speech_o_proj.weight" in training_stage_parameters(model, "speech")


def test_save_load_and_cached_generation(tmp_path):
    model = randomize(DeepTalkForCausalLM(tiny_config(speech_attention=True)), seed=0).eval()
    perturb_speech_attention(model)
    model.save_pretrained(tmp_path)
    loaded = DeepTalkForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.speech_attention
    ids = mixed_ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    prompt = mixed_ids(batch=1, text=4, speech=2)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_errors():
    model = DeepTalkForCausalLM(tiny_config(speech_attention=True))
    with pytest.raises(ValueError, match="already has speech attention"):
        add_speech_attention(model)
    mla = dict(
        kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_key_value_heads=4
    )
    with pytest.raises(ValueError, match="speech_attention is not supported with multi-head latent attention"):
        tiny_config(speech_attention=True, **mla)
    with pytest.raises(ValueError, match="no standard attention layers"):
        add_speech_attention(DeepTalkForCausalLM(tiny_config(**mla)))
    assert copy.deepcopy(model).config.speech_attention


def test_q_k_and_v_share_one_gather_of_the_speech_rows():
    """The speech projections of q, k and v read one gathered copy of the speech rows: a copy per projection was kept
    for backward three times over (about 2.5% of a training step's peak memory with speech attention)."""
    model = DeepTalkForCausalLM(tiny_config(speech_attention=True)).train()
    ids = mixed_ids()  # 2 rows of 5 text then 6 speech ids
    layer = model.model.layers[0]
    normed = []
    layer.input_layernorm.register_forward_hook(lambda module, args, output: normed.append(output.detach()))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(ids, labels=ids).loss.backward()
    speech_rows = normed[0][:, 5:].reshape(-1, normed[0].shape[-1])
    copies = {
        t.untyped_storage().data_ptr() for t in saved if t.shape == speech_rows.shape and torch.equal(t, speech_rows)
    }
    assert len(copies) == 1
