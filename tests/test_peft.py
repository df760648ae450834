"""PEFT LoRA on DeepTalk: every part (attention, dense MLPs, shared experts, routers, both experts groups) with every
experts backend (`deeptalk_triton` under Triton's interpreter on CPU), merging, adapter save/load, and the stage
helper's configs, which must adapt exactly what `set_training_stage` would train."""

import copy

import peft
import pytest
import torch
from packaging import version
from peft import (
    AutoPeftModelForCausalLM,
    LoraConfig,
    PeftModel,
    PeftModelForCausalLM,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
)
from transformers.integrations.peft import MIN_PEFT_VERSION

from deeptalk_hf import (
    DeepTalkAudioConfig,
    DeepTalkForCausalLM,
    DeepTalkForConditionalGeneration,
    add_speech_attention,
    lora_config_for_stage,
    move_speech_experts,
    profile_modality_load,
    set_training_stage,
    training_stage_parameters,
    upcycle_moe,
)
from deeptalk_hf.lora import NEW_SPEECH_MODULES

from .conftest import tiny_config
from .test_audio_model import BOS, CONV_ENCODER, SAMPLING_RATE, audio_batch, tone, whisper_audio_config

BACKENDS = ["eager", "grouped_mm", "batched_mm", "deeptalk_triton"]


def lora_model_config(**overrides):
    """Shared experts too, so every kind of linear layer and experts tensor is there to adapt."""
    return tiny_config(shared_expert_intermediate_size=8, **overrides)


def mixed_batch(config, batch: int = 2, length: int = 6) -> torch.Tensor:
    """Text ids then speech ids in each row: both experts groups see tokens."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, config.speech_token_start, (batch, length), generator=generator)
    speech = torch.randint(config.speech_token_start, config.vocab_size, (batch, length), generator=generator)
    return torch.cat([text, speech], dim=1)


def train(model: nn.Module, input_ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW with weight decay over *all* parameters (frozen ones included): freezing must hold anyway."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def adapted_parameters(peft_model: PeftModel) -> set[str]:
    """Base-model names of the tensors that carry a LoRA adapter (PEFT's wrappers stripped from the names)."""
    names = set()
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            base = name.replace(".base_layer", "")
            names.add(f"{base}.{getattr(module, 'parameter_name', 'weight')}")
    return names


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_on_every_part_trains_merges_and_round_trips(backend, tmp_path):
    """Joint-stage LoRA (attention, dense MLP, shared experts, routers, text and speech experts): a few steps lower the
    loss; the adapter's logits survive `merge_and_unload` and a `save_pretrained`/`PeftModel.from_pretrained` trip."""
    config = lora_model_config(num_hidden_layers=2)  # a MoE layer and a dense one
    DeepTalkForCausalLM(config).save_pretrained(tmp_path / "base")
    load = dict(experts_implementation=backend)
    model = DeepTalkForCausalLM.from_pretrained(tmp_path / "base", **load)
    # The interpreter pays per kernel program: fewer tokens and steps for deeptalk_triton.
    interpreted = backend == "deeptalk_triton"
    input_ids = mixed_batch(config, batch=1, length=4) if interpreted else mixed_batch(config)
    with torch.no_grad():
        base_logits = model(input_ids).logits

    # Speech tables frozen: what trains is LoRA alone.
    lora_config = lora_config_for_stage(model, "joint", train_new_speech_modules=False, r=4, lora_alpha=8)
    peft_model = get_peft_model(model, lora_config)
    adapted = adapted_parameters(peft_model)
    for part in (
        "layers.0.self_attn.q_proj.weight",
        "layers.1.mlp.down_proj.weight",  # the dense layer
        "layers.0.mlp.shared_experts.up_proj.weight",
        "layers.0.mlp.gate.weight",
        "layers.0.mlp.speech_gate.weight",
        "layers.0.mlp.experts.gate_up_proj",
        "layers.0.mlp.experts.down_proj",
        "layers.0.mlp.speech_experts.gate_up_proj",
        "layers.0.mlp.speech_experts.down_proj",
    ):
        assert f"model.{part}" in adapted, part
    losses = train(peft_model, input_ids, steps=2 if interpreted else 6)
    assert losses[-1] < losses[0] - 0.1, losses
    # Every adapter learned: a backend that dropped the gradient of an experts tensor's LoRA factors would show here.
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            assert param.abs().sum() > 0, name

    peft_model.eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter does something

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        DeepTalkForCausalLM.from_pretrained(tmp_path / "base", **load), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids).logits
    # Same weights, same kernels; the Triton kernels' atomic adds may change the last bit between runs.
    tolerance = dict(rtol=1e-6, atol=1e-6) if interpreted else dict(rtol=0, atol=0)
    torch.testing.assert_close(reloaded_logits, adapter_logits, **tolerance)
    # The stage helper's task type lets PEFT's auto class find the base model and the causal-LM wrapper.
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", **load).eval()
    assert isinstance(auto, PeftModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(auto(input_ids).logits, adapter_logits, **tolerance)

    merged = peft_model.merge_and_unload()
    assert type(merged) is DeepTalkForCausalLM
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["speech", "text", "joint"])
def test_stage_config_adapts_what_the_stage_trains(stage):
    """Every adapted or fully trained tensor belongs to the stage (as `set_training_stage` defines it), and every
    experts tensor and linear weight of the stage is adapted (bar the text LM head, which LoRA leaves alone)."""
    model = DeepTalkForCausalLM(lora_model_config())
    stage_names = set(training_stage_parameters(model, stage))
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    config = lora_config_for_stage(model, stage, r=2)
    if stage == "speech":
        assert all("speech" in name for name in [*config.target_modules, *config.target_parameters])
    peft_model = get_peft_model(model, config)
    adapted = adapted_parameters(peft_model)
    saved = {
        name.replace(".modules_to_save.default", "")
        for name, param in peft_model.get_base_model().named_parameters()
        if ".modules_to_save." in name and param.requires_grad
    }
    assert adapted and adapted <= stage_names
    assert saved <= stage_names
    trainable_base = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert all(".modules_to_save." in name for name in trainable_base)  # nothing else trains in full

    def adaptable(name: str) -> bool:  # experts tensors and linear weights, not the output heads
        module = modules[name.rpartition(".")[0]]
        linear_weight = isinstance(module, nn.Linear) and name.endswith(".weight") and "lm_head" not in name
        return params[name].dim() == 3 or linear_weight

    expected = {name for name in stage_names if adaptable(name)}
    assert adapted == expected
    if stage in ("speech", "joint"):
        assert saved == {"model.speech_embed_tokens.weight", "speech_lm_head.weight"}
    else:
        assert not saved
    if stage == "text":
        assert all(".mlp.experts." in name or ".mlp.gate." in name for name in adapted)


def test_a_model_held_by_a_users_module_takes_the_stage_adapter_in_place():
    """docs/lora.md: the config comes from the held DeepTalk model, `get_peft_model` adapts that model's layers in
    place, so the user's module, which keeps the same object, runs the adapters."""
    model = DeepTalkForCausalLM(lora_model_config()).eval()
    wrapper = nn.Module()
    wrapper.speech_llm = model
    ids = mixed_batch(model.config)
    with torch.no_grad():
        base = wrapper.speech_llm(ids).logits
        peft_model = get_peft_model(model, lora_config_for_stage(model, "speech", init_lora_weights=False))
        adapted = wrapper.speech_llm(ids).logits
        assert wrapper.speech_llm is model and torch.equal(adapted, peft_model(input_ids=ids).logits)
    assert not torch.equal(adapted, base)


def test_stage_config_options_and_errors():
    model = DeepTalkForCausalLM(lora_model_config())
    with_attention = lora_config_for_stage(model, "speech", also=("*.self_attn.*",))
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "speech_gate"} <= set(with_attention.target_modules)
    from_generator = lora_config_for_stage(model, "speech", also=(pattern for pattern in ["*.self_attn.*"]))
    assert from_generator.target_modules == with_attention.target_modules
    assert lora_config_for_stage(model, "speech", train_new_speech_modules=False).modules_to_save is None
    wrapper = nn.Module()
    wrapper.speech_llm = model
    with pytest.raises(TypeError, match="takes a transformers model, got Module: pass the DeepTalk model it holds"):
        lora_config_for_stage(wrapper, "speech")
    with pytest.raises(ValueError, match="reaches no linear layer, convolution or experts tensor"):
        lora_config_for_stage(model, "text", also=("*norm*",))
    # A layer's bias alone (named by also=) does not make LoRA adapt the layer's weight, which the stage keeps frozen.
    biased = DeepTalkForCausalLM(tiny_config(attention_bias=True))
    with_bias = lora_config_for_stage(biased, "speech", also=("*.q_proj.bias", "*.k_proj.weight"))
    assert "k_proj" in with_bias.target_modules and "q_proj" not in with_bias.target_modules
    with pytest.raises(ValueError, match="stage='voice' is unknown"):
        lora_config_for_stage(model, "voice")
    # PEFT's "got multiple values" blamed LoraConfig; an exclude_modules would drop the stage's own modules, silently.
    for field in ("target_modules", "target_parameters", "modules_to_save", "exclude_modules"):
        with pytest.raises(ValueError, match=f"chooses \\['{field}'\\] from the stage: add tensors with also="):
            lora_config_for_stage(model, "speech", **{field: ["lm_head"]})
    # PEFT refuses dropout on experts tensors naming its ParamWrapper: named here by the stage's experts.
    with pytest.raises(
        ValueError, match=r"lora_dropout=0.05: stage 'speech' adapts experts tensors .* pass lora_dropout=0"
    ):
        lora_config_for_stage(model, "speech", lora_dropout=0.05)
    assert lora_config_for_stage(model, "speech", lora_dropout=0.0).lora_dropout == 0  # the default, said explicitly
    tied = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="model.speech_embed_tokens: the speech embeddings and output head are tied"):
        lora_config_for_stage(tied, "speech")
    assert lora_config_for_stage(tied, "speech", train_new_speech_modules=False).target_parameters
    # Tied text and speech tables do not stop modules that are not tied: the parallel audio streams' tables.
    streams = DeepTalkForCausalLM(
        tiny_config(tie_word_embeddings=True, speech_vocab_size=0, num_audio_streams=2, audio_codebook_size=10)
    )
    saved = lora_config_for_stage(streams, "speech").modules_to_save
    assert saved == ["model.speech_stream_embed", "speech_stream_heads"]
    peft_model = get_peft_model(model, lora_config_for_stage(model, "speech"))
    with pytest.raises(ValueError, match="already holds PEFT adapters"):
        lora_config_for_stage(model, "text")
    # set_training_stage would select the frozen base tensors inside PEFT's wrappers by their names.
    frozen = {name for name, param in peft_model.named_parameters() if not param.requires_grad}
    with pytest.raises(ValueError, match="already holds PEFT adapters"):
        set_training_stage(peft_model, "speech")
    assert frozen == {name for name, param in peft_model.named_parameters() if not param.requires_grad}


def test_what_would_reach_past_or_copy_adapters_is_refused():
    """Speech attention copies the text projections (a copied LoRA layer is saved, then dropped on loading, as its
    config does not name it); moving experts regroups the base tensors under the adapters."""
    peft_model = get_peft_model(DeepTalkForCausalLM(tiny_config()), LoraConfig(r=2, target_modules=["q_proj"]))
    for change in (add_speech_attention, lambda model: move_speech_experts(model, [[0], [1]])):
        with pytest.raises(ValueError, match="already holds PEFT adapters"):
            change(peft_model)
    assert not peft_model.config.speech_attention


def test_resizing_speech_tables_under_adapters_is_refused_and_other_adapters_resize():
    """A resize replaces the speech tables: wrappers on them (`modules_to_save`, LoRA, trainable tokens) would be
    dropped, their trained copies becoming base weights and the saved adapter naming tables it no longer holds."""
    model = DeepTalkForCausalLM(tiny_config())
    speech_vocab = model.config.speech_vocab_size
    peft_model = get_peft_model(model, lora_config_for_stage(model, "speech", r=2))
    assert isinstance(model.speech_lm_head, ModulesToSaveWrapper)
    with pytest.raises(ValueError, match="already holds PEFT adapters: resizing"):
        model.resize_speech_vocab(speech_vocab + 4)
    assert model.config.speech_vocab_size == speech_vocab and isinstance(model.speech_lm_head, ModulesToSaveWrapper)
    assert peft_model.speech_lm_head is model.speech_lm_head

    model = DeepTalkForCausalLM(tiny_config())
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    model.resize_speech_vocab(speech_vocab + 4)
    assert model.speech_lm_head.out_features == model.config.speech_vocab_size == speech_vocab + 4


def test_profiling_a_peft_model_measures_the_adapted_model():
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config())
    peft_model = get_peft_model(model, lora_config_for_stage(model, "joint", r=2))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # nonzero adapters, so the adapted routing differs from the base one
            nn.init.normal_(param, std=0.5)
    batches = [{"input_ids": mixed_batch(model.config)}]
    profiled = profile_modality_load(peft_model, batches)
    with peft_model.disable_adapter():
        base = profile_modality_load(peft_model, batches)
    merged = profile_modality_load(peft_model.merge_and_unload(), batches)
    for field in ("speech_counts", "text_counts"):
        assert torch.equal(torch.stack(getattr(profiled, field)), torch.stack(getattr(merged, field)))
    assert not torch.equal(torch.stack(profiled.speech_counts), torch.stack(base.speech_counts))
    for field in ("speech_mass", "text_mass"):  # float32 routing, merged weights round differently
        torch.testing.assert_close(getattr(profiled, field), getattr(merged, field), rtol=1e-5, atol=1e-5)
    assert profiled.speech_tokens == profiled.text_tokens == batches[0]["input_ids"].numel() // 2


@pytest.mark.parametrize(
    "audio, indices, pair",
    [
        (False, [5], "speech_embed_tokens / speech_lm_head"),  # "lm_head" names speech_lm_head too
        (False, {"model.speech_embed_tokens": [2, 3]}, "speech_embed_tokens / speech_lm_head"),
        (True, [5], "embed_tokens / lm_head"),  # the composite's config does not say its LLM is tied
    ],
)
def test_trainable_tokens_that_leave_a_tied_head_apart_are_refused(audio, indices, pair):
    """PEFT ties trainable tokens' heads to the text table only, where the model's own config says it is tied, and
    picks modules by name suffix: a tied head trained apart from its table's rows (or with the other table's), and
    merging gave another model than the adapter's."""
    tied = tiny_config(tie_word_embeddings=True)
    model = (
        DeepTalkForConditionalGeneration(whisper_audio_config(text_config=tied))
        if audio
        else DeepTalkForCausalLM(tied)
    )
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices))
    with pytest.raises(ValueError, match=f"tie_word_embeddings leave the tied pair {pair} apart"):
        peft_model(input_ids=torch.tensor([[5, 6, 70]]))


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_that_keep_the_heads_with_their_tables_train_and_merge(tied):
    """Untied, rows of either table by their full names; tied without a speech block, the text rows (PEFT ties the
    head): the adapter trains, and its merge computes what it did."""
    config = tiny_config(tie_word_embeddings=True, speech_vocab_size=0) if tied else tiny_config()
    indices = [5] if tied else {"model.embed_tokens": [5], "model.speech_embed_tokens": [2, 3]}
    peft_model = get_peft_model(
        DeepTalkForCausalLM(config), LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices)
    )
    ids = torch.tensor([[5, 6, config.vocab_size - 14]])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(2):
        optimizer.zero_grad()
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        torch.testing.assert_close(peft_model.merge_and_unload()(ids).logits, adapted)


def test_frozen_new_speech_modules_get_no_lora_either_and_the_model_is_a_causal_lm():
    """`train_new_speech_modules=False` leaves the speech embeddings and output head frozen: neither trained in full
    nor given LoRA (the speech output head is a linear layer of the speech stage); the experts and routers still
    are. The stage config makes `get_peft_model` give a `PeftModelForCausalLM` (so `generate` and
    `AutoPeftModelForCausalLM` work)."""
    model = DeepTalkForCausalLM(lora_model_config())
    peft_model = get_peft_model(model, lora_config_for_stage(model, "speech", train_new_speech_modules=False))
    assert isinstance(peft_model, PeftModelForCausalLM)
    adapted = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert any("speech_experts" in name for name in adapted) and any("speech_gate" in name for name in adapted)
    assert not [name for name in adapted + trainable if any(new in name for new in NEW_SPEECH_MODULES)]


def test_align_stage_config_on_the_audio_model():
    """The connector trains in full; `also=model.audio_encoder_top_layers(1)` adds LoRA on that encoder layer only,
    and the joint stage never adapts the encoder although its layers share names with the LLM's."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config())
    with pytest.raises(ValueError, match="no linear layer or experts tensor to adapt"):
        lora_config_for_stage(model, "align")
    config = lora_config_for_stage(model, "align", also=model.audio_encoder_top_layers(1), lora_dropout=0.1)
    assert config.modules_to_save == ["speech_connector"] and config.lora_dropout == 0.1  # linear layers only
    tied = DeepTalkForConditionalGeneration(whisper_audio_config(text_config=tiny_config(tie_word_embeddings=True)))
    assert lora_config_for_stage(tied, "align", also=tied.audio_encoder_top_layers(1)).modules_to_save == [
        "speech_connector"
    ]  # the connector is not tied to anything
    # The speech tables are: the tie is the text config's (the composite config's own field is None).
    with pytest.raises(ValueError, match="language_model.model.speech_embed_tokens: the speech embeddings and output"):
        lora_config_for_stage(tied, "speech")
    joint = get_peft_model(model, lora_config_for_stage(model, "joint"))
    adapted = adapted_parameters(joint)
    assert any(name.startswith("language_model.model.layers.") for name in adapted)
    assert not any(name.startswith("audio_encoder.") for name in adapted)
    peft_model = get_peft_model(DeepTalkForConditionalGeneration(whisper_audio_config()), config)
    adapted = adapted_parameters(peft_model)
    assert adapted and all(name.startswith("audio_encoder.layers.1.") for name in adapted)
    # Whisper's encoder reads its convolutions' stride, which PEFT's wrapper lacks (every forward failed): refused,
    # naming them.
    fresh = DeepTalkForConditionalGeneration(whisper_audio_config())
    with pytest.raises(
        ValueError, match=r"\(audio_encoder.conv1.weight: their module reads their attributes directly"
    ):
        lora_config_for_stage(fresh, "align", also=("audio_encoder.conv1.*",))


def test_lora_on_an_audio_encoders_convolution():
    """A convolution of the encoder (wav2vec2's feature encoder) gets PEFT's convolution LoRA, not the experts
    treatment of 3D tensors; the adapted model runs, and its merge is the same model."""
    encoder_config = Wav2Vec2Config(**CONV_ENCODER, do_stable_layer_norm=True)
    config = DeepTalkAudioConfig(audio_config=encoder_config, text_config=tiny_config(), stack_factor=5)
    model = DeepTalkForConditionalGeneration(config).eval()
    pattern = "audio_encoder.feature_extractor.conv_layers.1.conv.*"
    lora = lora_config_for_stage(model, "align", also=(pattern,), init_lora_weights=False)
    assert lora.target_modules == {"conv_layers.1.conv"} and not lora.target_parameters
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True)
    batch = audio_batch(config, extractor, [[BOS, config.audio_token_id, 5]], [tone(300, 0.1)])
    with torch.no_grad():
        base = model(**batch).logits
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base)  # the adapter is in the model


@pytest.mark.parametrize("merge", [False, True])
def test_speech_stage_lora_leaves_the_text_model_bit_identical(merge, tmp_path):
    """After speech-stage LoRA steps (AdamW with weight decay), merged or not: every text tensor is bit-identical and
    a text-only input gets bit-identical logits over the text block. The fully trained speech tables
    (`modules_to_save`) come back with the adapter."""
    config = lora_model_config()
    model = DeepTalkForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    text_ids = mixed_batch(config)[:, :6]
    with torch.no_grad():
        text_logits = model(text_ids).logits[..., : config.speech_token_start]
    peft_model = get_peft_model(model, lora_config_for_stage(model, "speech", r=4))
    train(peft_model, mixed_batch(config), steps=3)
    trained = peft_model.eval().merge_and_unload() if merge else peft_model.eval()
    after = dict(trained.named_parameters()) if merge else dict(trained.get_base_model().named_parameters())
    speech_changed = 0
    for name, value in before.items():
        if "speech" in name:
            speech_changed += not torch.equal(after.get(name, value), value)
        else:
            assert torch.equal(after[name], value), name
    if merge:  # the adapters and the fully trained speech rows are in the merged tensors
        assert speech_changed == len([name for name in before if "speech" in name])
    with torch.no_grad():
        assert torch.equal(trained(text_ids).logits[..., : config.speech_token_start], text_logits)
    if not merge:
        trained.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(
            DeepTalkForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
        )
        with torch.no_grad():
            assert torch.equal(reloaded(mixed_batch(config)).logits, trained(mixed_batch(config)).logits)


def test_mixed_adapter_batches_with_lora_on_speech_attention_give_each_row_its_adapter():
    """PEFT's `adapter_names` maps a layer's input rows to adapters: the speech projections must see the batch's rows,
    not the gathered speech positions (whose count may equal the batch size: then no error, the wrong adapters)."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(tiny_config(speech_attention=True)).eval()
    targets = ["speech_q_proj", "speech_v_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, init_lora_weights=False), "x")
    peft_model.add_adapter("y", LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    peft_model.eval()
    start = model.config.speech_token_start
    for ids in ([[5, start + 1, start + 2], [6, 7, 8]], [[5, start + 1, start + 2], [6, start + 3, 8]]):
        ids = torch.tensor(ids)
        with torch.no_grad():
            alone = []
            for name in ("x", "y"):
                peft_model.set_adapter(name)
                alone.append(peft_model(ids).logits)
            mixed = peft_model(ids, adapter_names=["x", "y"]).logits
        assert (alone[0][0] - alone[1][0]).abs().max() > 0.01  # the adapters differ on the speech row
        torch.testing.assert_close(mixed[0], alone[0][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(mixed[1], alone[1][1], rtol=0, atol=1e-6)


def test_prefix_tuning_reaches_the_attention_and_trains():
    """PEFT's prefix tuning hands its virtual keys and values over as `past_key_values`."""
    model = DeepTalkForCausalLM(tiny_config()).eval()
    input_ids = mixed_batch(model.config, batch=1)
    with torch.no_grad():
        plain = model(input_ids).logits
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for parameter in peft_model.prompt_encoder.parameters():
            parameter.normal_()
    out = peft_model(input_ids=input_ids, labels=input_ids)
    assert not torch.allclose(out.logits.detach(), plain)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.prompt_encoder.parameters())
    # Its virtual tokens are PeftModel's, which profiling passes by: refused, not the base model measured silently.
    with pytest.raises(ValueError, match="a PREFIX_TUNING adapter's virtual tokens would be left out"):
        profile_modality_load(peft_model, [{"input_ids": input_ids}])


def test_prompt_tuning_works_without_a_speech_block_and_fails_as_documented_with_one():
    """Prompt tuning prepends its virtual token embeddings to the text table's rows: the same as the model on those
    embeddings; P-tuning trains its prompt encoder. With a speech block PEFT finds no table of `vocab_size` rows and
    both fail (docs/lora.md names the error), as they do on the audio model without one (PEFT reads its encoder)."""
    model = DeepTalkForCausalLM(tiny_config(speech_vocab_size=0)).eval()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 5))
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        prompts = peft_model.get_prompt(batch_size=2)
        expected = model(inputs_embeds=torch.cat([prompts, model.get_input_embeddings()(input_ids)], dim=1)).logits
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, expected)
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.prompt_encoder.parameters())
    p_tuning = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
    encoder_model = get_peft_model(DeepTalkForCausalLM(tiny_config(speech_vocab_size=0)), p_tuning)
    encoder_model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder_model.prompt_encoder.parameters())
    # Their virtual tokens are PeftModel's, which profiling passes by: refused as prefix tuning is, not measured without.
    for prompted, kind in ((peft_model, "PROMPT_TUNING"), (encoder_model, "P_TUNING")):
        with pytest.raises(ValueError, match=f"a {kind} adapter's virtual tokens would be left out"):
            profile_modality_load(prompted, [{"input_ids": input_ids}])
    audio_model = whisper_audio_config(text_config=tiny_config(speech_vocab_size=0))
    for prompt_config in (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), p_tuning):
        for failing in (DeepTalkForCausalLM(tiny_config()), DeepTalkForConditionalGeneration(audio_model)):
            with pytest.raises(TypeError, match="'NoneType' object is not callable"):
                get_peft_model(failing, prompt_config)(input_ids=input_ids)


def perturbed_stage_adapter(base_dir, stage: str, adapter_dir) -> torch.Tensor:
    """A stage helper's adapter on the checkpoint at `base_dir`, its trainable tensors moved off their init, saved to
    `adapter_dir`; returns its logits on a mixed batch."""
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(base, lora_config_for_stage(base, stage, r=4))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
        logits = peft_model(mixed_batch(base.config)).logits
    peft_model.save_pretrained(adapter_dir)
    return logits


@pytest.mark.parametrize("stage", ["speech", "joint"])
def test_transformers_load_adapter_and_from_pretrained_of_an_adapter_dir(stage, tmp_path):
    """transformers' own PEFT integration reads a stage helper's adapter (LoRA on experts tensors, speech tables in
    full): `model.load_adapter(dir)` and `AutoModelForCausalLM.from_pretrained(dir)`, which finds the base checkpoint
    in `adapter_config.json`, give the adapter's logits bit for bit."""
    DeepTalkForCausalLM(lora_model_config()).save_pretrained(tmp_path / "base")
    logits = perturbed_stage_adapter(tmp_path / "base", stage, tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    info = model.load_adapter(tmp_path / "adapter")
    assert not info.missing_keys and not info.unexpected_keys
    with torch.no_grad():
        assert torch.equal(model(mixed_batch(model.config)).logits, logits)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        assert isinstance(loaded, DeepTalkForCausalLM)
        assert torch.equal(loaded(mixed_batch(model.config)).logits, logits)


def test_transformers_adapter_methods_need_the_peft_version_transformers_asks_for(tmp_path):
    """`add_adapter`, `set_adapter`, `enable_adapters`/`disable_adapters`, `active_adapters` and saving an
    adapter-carrying model: transformers refuses them below its minimum PEFT version (docs/lora.md says so); above
    it, they work on DeepTalk as on transformers' own MoE models."""
    model = DeepTalkForCausalLM(lora_model_config()).eval()
    lora = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.speech_experts.gate_up_proj"])
    if version.parse(peft.__version__) < version.parse(MIN_PEFT_VERSION):
        with pytest.raises(ValueError, match=f">= {MIN_PEFT_VERSION}"):
            model.add_adapter(lora)
        return
    input_ids = mixed_batch(model.config)
    fresh = DeepTalkForCausalLM(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        base = model(input_ids).logits
        for name in ("a", "b"):
            model.add_adapter(lora, adapter_name=name)
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name and f".{name}." in param_name:
                    param.normal_(std=0.1)
        outputs = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            assert model.active_adapters() == [name]
            outputs[name] = model(input_ids).logits
        assert not torch.equal(outputs["a"], outputs["b"])
        model.disable_adapters()
        assert torch.equal(model(input_ids).logits, base)
        model.enable_adapters()
        assert torch.equal(model(input_ids).logits, outputs["b"])
        model.save_pretrained(tmp_path, selected_adapters=["b"])
        fresh.load_adapter(tmp_path)
        assert torch.equal(fresh(input_ids).logits, outputs["b"])


def test_trainable_tokens_on_both_tied_tables_are_refused_where_a_head_follows_the_other_table():
    """Rows of both tables of a tied model: PEFT ties both heads (`lm_head` names `speech_lm_head` too) to the text
    table's adapter, so `speech_lm_head` is wrapped but follows the wrong table: refused as well, not only where one
    side is unwrapped."""
    indices = {"model.embed_tokens": [5], "model.speech_embed_tokens": [2, 3]}
    model = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=True))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=indices))
    with pytest.raises(ValueError, match="leave the tied pair speech_embed_tokens / speech_lm_head apart"):
        peft_model(input_ids=torch.tensor([[5, 6, 70]]))


@pytest.mark.parametrize(
    "lora_config",
    [
        LoraConfig(target_modules="all-linear", init_lora_weights=False),  # takes speech_lm_head (docs/lora.md)
        LoraConfig(target_modules=["speech_embed_tokens"], init_lora_weights=False),
        LoraConfig(target_modules=["q_proj"], modules_to_save=["speech_lm_head"]),
    ],
    ids=["all-linear", "lora-on-the-table", "modules-to-save"],
)
def test_adapters_on_the_tied_speech_pair_are_refused_and_leaving_it_out_merges_exactly(lora_config):
    """PEFT ties adapters to the text table only: an adapter on one side of the tied speech pair trains it apart from
    the other, and merging it changes the shared tensor, so both sides (the merged model's speech embeddings differed
    from the adapter's by ~2 in the logits, silently). Leaving the pair out, the merged model is the adapter's."""
    model = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    input_ids = mixed_batch(model.config)
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(lora_config))
    with pytest.raises(ValueError, match="PEFT adapter on .*speech.* of a model with tie_word_embeddings"):
        peft_model(input_ids)
    left_out = LoraConfig(target_modules="all-linear", exclude_modules=["speech_lm_head"], init_lora_weights=False)
    peft_model = get_peft_model(model, left_out).eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids).logits, adapter_logits, rtol=1e-5, atol=1e-5)
    assert merged.speech_lm_head.weight is merged.model.speech_embed_tokens.weight


def test_a_transformers_4_expert_adapter_applies_once_resaved_through_the_source_model(tmp_path):
    """docs/lora.md: an adapter in transformers 4's per-expert layout (`mlp.experts.{j}.gate_proj`, ...) loads on an
    imported MoE without its experts (PEFT converts it for the model types it knows only); loaded on the source model
    and saved again, it gives the source's adapted logits. Reference: each expert's update `B A alpha / r` by hand."""
    source_config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    source = Qwen3MoeForCausalLM(source_config).eval()
    upcycled = upcycle_moe(source).eval()
    rank, alpha, inner = 2, 4, source_config.moe_intermediate_size
    # With attention in it, as adapters usually have (on DeepTalk, the expert names alone match nothing: an error).
    targets = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets).save_pretrained(tmp_path / "v4")
    weights, reference = {}, copy.deepcopy(source)
    for layer in range(source_config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"  # no update: the experts' alone is tested
        weights |= {f"{prefix}.lora_A.weight": torch.randn(rank, 32), f"{prefix}.lora_B.weight": torch.zeros(32, rank)}
        experts = reference.model.layers[layer].mlp.experts
        for expert in range(source_config.num_experts):
            for projection, (fan_in, fan_out) in {
                "gate_proj": (32, inner),
                "up_proj": (32, inner),
                "down_proj": (inner, 32),
            }.items():
                prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{expert}.{projection}"
                a, b = torch.randn(rank, fan_in) * 0.3, torch.randn(fan_out, rank) * 0.3
                weights |= {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}
                update = b @ a * alpha / rank
                with torch.no_grad():
                    if projection == "down_proj":
                        experts.down_proj[expert] += update
                    else:
                        experts.gate_up_proj[
                            expert, slice(inner) if projection == "gate_proj" else slice(inner, None)
                        ] += update
    save_file(weights, tmp_path / "v4" / "adapter_model.safetensors")
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        expected, unadapted = reference(ids).logits, upcycled(ids).logits
        assert not torch.allclose(expected, unadapted, atol=1e-2)
        dropped = PeftModel.from_pretrained(copy.deepcopy(upcycled), tmp_path / "v4").eval()(ids).logits
        torch.testing.assert_close(dropped, unadapted)
        PeftModel.from_pretrained(copy.deepcopy(source), tmp_path / "v4").save_pretrained(tmp_path / "v5")
        converted = PeftModel.from_pretrained(upcycled, tmp_path / "v5").eval()(ids).logits
        torch.testing.assert_close(converted, expected, rtol=1e-5, atol=1e-5)


def test_layer_replication_is_refused_at_the_first_forward():
    """PEFT copies decoder layers but none of the per-layer settings the model reads (`layer_types`, MoE layers)."""
    model = DeepTalkForCausalLM(tiny_config())
    layers = model.config.num_hidden_layers
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], layer_replication=[[0, layers], [1, layers]])
    )
    assert len(model.model.layers) == layers + layers - 1
    with pytest.raises(ValueError, match=f"holds {2 * layers - 1} decoder layers but its config describes {layers}"):
        peft_model(mixed_batch(model.config))
