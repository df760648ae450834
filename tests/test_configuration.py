import json
import re

import pytest
from transformers import AutoConfig, Qwen3MoeConfig, WhisperConfig

from deeptalk_hf import DeepTalkAudioConfig, DeepTalkConfig, DeepTalkForCausalLM

from .conftest import tiny_config


def test_speech_block_is_the_end_of_the_vocabulary():
    config = tiny_config(vocab_size=100, speech_vocab_size=30)
    assert config.speech_token_start == 70


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(speech_vocab_size=80), "speech_vocab_size"),
        (dict(speech_vocab_size=-1), "speech_vocab_size"),
        (dict(num_experts=[4, 4, 4]), "num_experts"),
        (dict(num_speech_experts=[1]), "num_speech_experts"),
        (dict(num_experts=0), "num_experts"),
        (dict(num_speech_experts=[2, -1]), "num_speech_experts"),
        (dict(modality_routing="soft"), "modality_routing"),
        (dict(mlp_only_layers=[5]), "mlp_only_layers"),
        (dict(mlp_only_layers=[3]), "mlp_only_layers"),  # one past the last of 3 layers
        (dict(decoder_sparse_step=True), "decoder_sparse_step"),  # not read as 1
        (dict(first_k_dense_replace=True), "first_k_dense_replace"),
        (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), "sliding_window is None"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok"),
        (dict(layer_types=["full_attention"]), "layer_types"),
        (dict(speech_expert_ids=[[0, 1, 9], [0, 1, 2]]), "speech_expert_ids"),
        (dict(speech_expert_ids=[[0, 1, 7], [0, 1, 2]]), "speech_expert_ids"),  # 7 experts: index 7 is one past
        (dict(speech_expert_ids=[[0], [0, 1, 2]]), r"speech_expert_ids\[0\]=\[0\] must list 3"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(topk_method="noaux_tc"), "n_group"),
        (dict(topk_method="noaux_tc", n_group=3, topk_group=1, num_speech_experts=0), "n_group=3"),
        (dict(kv_lora_rank=8, qk_rope_head_dim=4), "v_head_dim"),
        (dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6), "num_key_value_heads=2"),
        (dict(qk_norm_type="layer"), "qk_norm_type"),
        (dict(clip_qkv=0.0), "clip_qkv"),
        (dict(topk_method="noaux_tc", n_group=4, topk_group=1, num_speech_experts=0), "topk_group=1 groups of 1"),
        (dict(num_audio_streams=2, audio_codebook_size=-5), "audio_codebook_size"),
        (dict(num_audio_streams=2, audio_stream_delays=[0, 1]), "audio_stream_delays"),
        (dict(num_audio_streams=2, stream_loss_weights=[0.0, 0.0, 0.0]), "stream_loss_weights"),
        (dict(num_audio_streams=2, stream_loss_weights=[1.0, -1.0, 0.0]), "stream_loss_weights"),
        (dict(num_audio_streams=2, stream_loss_weights=[1.0, float("inf"), 0.0]), "stream_loss_weights"),
        (dict(num_audio_streams=2, stream_loss_weights=[1.0, -0.5, 1.0]), "stream_loss_weights"),  # a positive sum
        (dict(num_audio_streams=2, stream_loss_weights=[1.0, 1.0]), "needs 3 entries"),
        (dict(num_audio_streams=2, stream_loss_weights=[1.0] * 4), "needs 3 entries"),
        (dict(num_audio_streams=-1), "num_audio_streams=-1 must be >= 0"),
        (
            dict(num_audio_streams=2, audio_pad_token_id=10, audio_bos_token_id=11, audio_eos_token_id=10),
            "must be distinct",  # a padded stream would read as ended
        ),
        # Accepted before, then a shape error in forward, NaN logits, or a wrong cached generation:
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
        (dict(num_key_value_heads=8), "multiple of num_key_value_heads=8"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(head_dim=3), "head_dim=3 must be even"),
        # A head_dim derived from the width is named as such (the user gave no head_dim):
        (
            dict(head_dim=None, hidden_size=28),
            r"head_dim=7 must be even.*defaults to hidden_size=28 // num_attention_heads=4",
        ),
        (dict(head_dim=None, hidden_size=2), r"\{'head_dim': 0\} must be positive sizes \(head_dim defaults to"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size"),
        (dict(intermediate_size=-4), "{'intermediate_size': -4}"),  # the dense layer's MLP (mlp_only_layers=[1])
        (dict(intermediate_size=0), "{'intermediate_size': 0}"),
        (dict(sliding_window=1), "sliding_window=1"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(clip_qkv=float("nan")), "clip_qkv"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(topk_method="noaux_tc", n_group=-1, topk_group=-1), "n_group"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=3, v_head_dim=6, num_key_value_heads=4), "even"),
        (dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=0, num_key_value_heads=4), "v_head"),
        (dict(kv_lora_rank=8, qk_nope_head_dim=-2, qk_rope_head_dim=4, v_head_dim=6, num_key_value_heads=4), "nope"),
        (
            dict(
                kv_lora_rank=8,
                qk_nope_head_dim=8,
                qk_rope_head_dim=4,
                v_head_dim=6,
                num_key_value_heads=4,
                clip_qkv=1.0,
            ),
            "clip_qkv",
        ),
        (dict(router_dtype="bfloat16"), "router_dtype='bfloat16'"),
        (dict(routing_weights_dtype="float16"), "routing_weights_dtype='float16'"),
        (dict(rope_complex=True), "rope_complex=True .* set kv_lora_rank"),  # V2's rotary exists only in MLA
        # Checks that reach a layer's own counts or every entry, not only the common case:
        (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size=-1"),  # else a torch error
        (dict(speech_expert_ids=[[-1, 1, 2], [0, 1, 2]]), r"speech_expert_ids\[0\]=\[-1, 1, 2\]"),  # not from the end
        (dict(speech_expert_ids=[[0, 0, 1], [0, 1, 2]]), r"speech_expert_ids\[0\]=\[0, 0, 1\] must list 3 distinct"),
        (dict(speech_expert_ids=[[0, 1, 2]]), "speech_expert_ids has 1 entries but the model has 2 MoE layers"),
        (  # the second MoE layer has 3 + 2 experts: ids valid for the first layer's 4 + 3 are not its
            dict(num_experts=[4, 3], num_speech_experts=[3, 2], speech_expert_ids=[[0, 1, 2], [0, 1, 2]]),
            r"speech_expert_ids\[1\]=\[0, 1, 2\] must list 2 distinct expert indices in \[0, 5\) for layer 2",
        ),
        (
            dict(num_experts=[4, 3], num_speech_experts=0, topk_method="noaux_tc", n_group=2, topk_group=1),
            "n_group=2 does not divide the 3 experts of layer 2",  # the first layer's 4 would divide
        ),
        (  # the pad code on the last audio code: that code would read as padding
            dict(num_audio_streams=2, audio_codebook_size=10, audio_pad_token_id=9, audio_bos_token_id=10),
            "must be distinct and above the 10 codes",
        ),
        (
            dict(
                kv_lora_rank=8,
                q_lora_rank=0,
                qk_nope_head_dim=8,
                qk_rope_head_dim=4,
                v_head_dim=6,
                num_key_value_heads=4,
            ),
            "{'q_lora_rank': 0}",  # None is no query compression; 0 is not a rank
        ),
    ],
)
def test_invalid_fields_raise_value_error_naming_them(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_group_limits_may_be_reached_exactly():
    """DeepSeek-style group limits at their bounds are valid: one group with topk_group == n_group (Moonlight's and
    Kimi-K2's n_group=topk_group=1), and top groups that hold exactly num_experts_per_tok experts."""
    for n_group, topk_group in [(1, 1), (2, 2), (2, 1)]:
        config = tiny_config(
            num_experts=4, num_speech_experts=0, topk_method="noaux_tc", n_group=n_group, topk_group=topk_group
        )
        assert (config.n_group, config.topk_group, config.num_experts_per_tok) == (n_group, topk_group, 2)


def test_a_config_broken_after_construction_is_not_saved(tmp_path):
    """`save_pretrained` runs the checks again: a checkpoint that would not load is never written."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    for change in [{"num_speech_experts": [2, 2, 2]}, {"modality_routing": "Hard"}, {"decoder_sparse_step": 2}]:
        model = DeepTalkForCausalLM(tiny_config())
        model.config.update(change)
        with pytest.raises(StrictDataclassClassValidationError, match=next(iter(change))):
            model.save_pretrained(tmp_path / "model")
        assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())


def test_a_config_broken_after_construction_is_named_when_a_model_is_built():
    """Attribute edits skip the config's checks (as in transformers); the model checks again instead of failing in
    torch (an IndexError, a negative tensor dimension) or at its first forward."""
    for change, field in (
        ({"num_speech_experts": [2, 1, 1, 1]}, "num_speech_experts has 4 entries"),
        ({"speech_vocab_size": 100}, "speech_vocab_size=100 does not fit"),
        ({"num_experts": 0}, "num_experts=0"),
        ({"layer_types": None}, "['layer_types'] are None: they are derived when the config is built"),
        ({"mlp_only_layers": None, "audio_stream_delays": None}, "['mlp_only_layers', 'audio_stream_delays'] are"),
    ):
        config = tiny_config(num_audio_streams=1, audio_codebook_size=8)
        config.update(change)
        with pytest.raises(ValueError, match=re.escape(field)):
            DeepTalkForCausalLM(config)


def test_per_layer_expert_counts_follow_moe_layers():
    config = tiny_config(num_hidden_layers=4, mlp_only_layers=[0], num_experts=[2, 3, 4], num_speech_experts=[0, 1, 2])
    assert config.moe_layers == [1, 2, 3]
    assert [config.layer_experts(i) for i in config.moe_layers] == [(2, 0), (3, 1), (4, 2)]
    for layer in (0, 4):  # a dense layer, one past the last: no experts (an order `None` would read as the identity)
        for method in (config.layer_experts, config.expert_order):
            with pytest.raises(ValueError, match=rf"layer {layer} is not an MoE layer \(moe_layers: \[1, 2, 3\]\)"):
                method(layer)


def test_sparse_step_and_first_dense_fold_into_mlp_only_layers():
    config = tiny_config(num_hidden_layers=6, mlp_only_layers=[5], decoder_sparse_step=2, first_k_dense_replace=1)
    assert config.mlp_only_layers == [0, 2, 4, 5]
    assert not hasattr(config, "decoder_sparse_step") and not hasattr(config, "first_k_dense_replace")
    assert DeepTalkConfig(**config.to_dict()).mlp_only_layers == config.mlp_only_layers
    # None is the default, as in Qwen/DeepSeek configs.
    assert (
        tiny_config(decoder_sparse_step=None, first_k_dense_replace=None).mlp_only_layers
        == tiny_config().mlp_only_layers
    )
    # Refused (0 and -1 used to read as "every layer is MoE", -2 as 2; Qwen2/3-MoE itself divides by the step).
    for field, value in (("decoder_sparse_step", 0), ("decoder_sparse_step", -2), ("decoder_sparse_step", 1.5)):
        with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} must be an integer >= 1")):
            tiny_config(**{field: value})
    with pytest.raises(ValueError, match=re.escape("first_k_dense_replace=-1 must be an integer >= 0")):
        tiny_config(first_k_dense_replace=-1)
    # As in DeepSeek, a count of at least the layer count makes every layer dense.
    for count in (3, 5):
        config = tiny_config(num_hidden_layers=3, mlp_only_layers=[], first_k_dense_replace=count)
        assert config.mlp_only_layers == [0, 1, 2] and config.moe_layers == []


def test_deepseek_shared_expert_count_folds_into_the_shared_width(tmp_path):
    """`n_shared_experts` (DeepSeek's spelling, beside `n_routed_experts` and `first_k_dense_replace`, which the config
    also takes) gives shared experts of that many expert widths; it was stored and ignored: no shared experts."""
    config = tiny_config(n_shared_experts=2)
    assert config.shared_expert_intermediate_size == 2 * config.moe_intermediate_size and not hasattr(
        config, "n_shared_experts"
    )
    shared = DeepTalkForCausalLM(config).model.layers[0].mlp.shared_experts
    assert shared.gate_proj.weight.shape == (2 * config.moe_intermediate_size, config.hidden_size)
    assert tiny_config(n_shared_experts=0).shared_expert_intermediate_size == 0
    assert tiny_config(n_shared_experts=2, shared_expert_intermediate_size=32).shared_expert_intermediate_size == 32
    with pytest.raises(ValueError, match="n_shared_experts=2 .*32 wide in all.* shared_expert_intermediate_size=24"):
        tiny_config(n_shared_experts=2, shared_expert_intermediate_size=24)
    with pytest.raises(ValueError, match=re.escape("n_shared_experts=-1 must be an integer >= 0")):
        tiny_config(n_shared_experts=-1)
    config.n_shared_experts = 1  # set later: refused, as the other construction-time keys
    with pytest.raises(ValueError, match="read when the config is built"):
        config.validate_deeptalk()


def test_qwen3_moe_fields_build_an_equivalent_config():
    qwen = Qwen3MoeConfig(
        num_experts=6,
        num_experts_per_tok=3,
        mlp_only_layers=[0],
        num_hidden_layers=2,
        use_sliding_window=False,
        sliding_window=64,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    fields = {k: v for k, v in qwen.to_dict().items() if k not in ("model_type", "architectures")}
    config = DeepTalkConfig(**fields)
    assert config.num_experts == 6 and config.num_local_experts == 6
    assert config.sliding_window is None and config.layer_types == ["full_attention"] * 2
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.num_speech_experts == 0 and config.use_qk_norm
    # Qwen3MoeModel ignores a saved `layer_types` (its window covers every layer): read with its model_type, so is it.
    windowed = Qwen3MoeConfig(num_hidden_layers=2, use_sliding_window=True, sliding_window=4).to_dict()
    config = DeepTalkConfig(**{**windowed, "layer_types": ["full_attention"] * 2})
    assert config.layer_types == ["sliding_attention"] * 2 and config.sliding_window == 4


def test_expert_order_records_the_source_positions():
    config = tiny_config(num_experts=3, num_speech_experts=2, speech_expert_ids=[[1, 4], [0, 2]])
    assert config.expert_order(0) == [0, 2, 3, 1, 4]
    assert config.expert_order(2) == [1, 3, 4, 0, 2]
    # The recorded order is speech_experts' order, sorted or not.
    unsorted = tiny_config(num_experts=3, num_speech_experts=2, speech_expert_ids=[[4, 1], [2, 0]])
    assert unsorted.expert_order(2) == [1, 3, 4, 2, 0]
    assert tiny_config(speech_expert_ids=[[4, 5, 6], [4, 5, 6]]).expert_order(0) is None


def test_load_time_overrides_are_checked_and_derive_fields(tmp_path):
    """`from_pretrained(path, field=value)` builds the config with the value: the constructor's checks name a bad one
    and derived fields follow (transformers sets overrides after construction, past both)."""
    tiny_config().save_pretrained(tmp_path)
    for override in ({"speech_vocab_size": 100}, {"num_experts_per_tok": 0}):
        with pytest.raises(ValueError, match="{}={}".format(*next(iter(override.items())))):
            AutoConfig.from_pretrained(tmp_path, **override)
    streams, unused = AutoConfig.from_pretrained(tmp_path, num_audio_streams=2, other=1, return_unused_kwargs=True)
    codes = streams.audio_codebook_size
    assert (streams.audio_pad_token_id, streams.audio_eos_token_id, streams.audio_stream_delays) == (
        codes,
        codes + 2,
        [1, 2],
    )
    assert unused == {"other": 1}
    assert AutoConfig.from_pretrained(tmp_path, num_local_experts=6).num_experts == 6  # an alias names its field
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["n_routed_experts"] = saved.pop("num_experts")  # a config.json that spells the field by an alias
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for name in ("num_experts", "n_routed_experts"):
        assert AutoConfig.from_pretrained(tmp_path, **{name: 6}).num_experts == 6
    # Qwen/DeepSeek's layout keys, read at construction only, fold into the layout as they do when given to it.
    for override, dense in (({"decoder_sparse_step": 2}, [0, 1, 2]), ({"first_k_dense_replace": 1}, [0, 1])):
        assert AutoConfig.from_pretrained(tmp_path, **override).mlp_only_layers == dense  # with the saved [1]


def test_load_time_overrides_derive_again_what_the_saved_config_derived(tmp_path):
    """A saved config holds the values `__post_init__` derived (`layer_types`, the audio ids, ...): overriding a field
    they come from derives them again, as a new config with that field does (a saved full-attention `layer_types` kept
    a window given at load from sliding anything, silently), unless they were set to values of their own."""
    tiny_config().save_pretrained(tmp_path / "full")
    for override in ({"sliding_window": 4}, {"num_hidden_layers": 4}):
        loaded = AutoConfig.from_pretrained(tmp_path / "full", **override)
        assert loaded.layer_types == tiny_config(**override).layer_types, override
    tiny_config(sliding_window=4).save_pretrained(tmp_path / "sliding")
    for override in ({"use_sliding_window": False}, {"sliding_window": None}):  # refused: sliding layers, no window
        assert AutoConfig.from_pretrained(tmp_path / "sliding", **override).layer_types == ["full_attention"] * 3
    mixed = ["full_attention", "sliding_attention", "full_attention"]  # a layout of its own stays
    tiny_config(sliding_window=4, layer_types=mixed).save_pretrained(tmp_path / "mixed")
    assert AutoConfig.from_pretrained(tmp_path / "mixed", sliding_window=8, num_experts_per_tok=1).layer_types == mixed
    tiny_config(num_audio_streams=2, audio_codebook_size=8).save_pretrained(tmp_path / "streams")
    loaded = AutoConfig.from_pretrained(tmp_path / "streams", audio_codebook_size=16, num_audio_streams=3)
    fresh = tiny_config(num_audio_streams=3, audio_codebook_size=16)
    for name in ("audio_pad_token_id", "audio_eos_token_id", "audio_stream_delays", "stream_loss_weights"):
        assert getattr(loaded, name) == getattr(fresh, name), name
    # The audio model's LLM config, overridden by a dict, likewise.
    DeepTalkAudioConfig(audio_config=WhisperConfig(), text_config=tiny_config()).save_pretrained(tmp_path / "audio")
    loaded = AutoConfig.from_pretrained(tmp_path / "audio", text_config={"sliding_window": 4})
    assert loaded.text_config.layer_types == ["sliding_attention"] * 3


def test_auto_config_round_trip(tmp_path):
    config = tiny_config(num_speech_experts=[1, 2], modality_routing="none")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DeepTalkConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}


def test_mla_head_dim_is_the_rope_part():
    config = tiny_config(
        kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_key_value_heads=4
    )
    assert config.head_dim == 4 and config.qk_head_dim == 12
    assert DeepTalkConfig(**config.to_dict()).qk_head_dim == 12
    # DeepSeek's config.json stores the derived width too: read, not refused (it is a property here).
    assert DeepTalkConfig(**config.to_dict() | {"qk_head_dim": 12}).qk_head_dim == 12
    # Switched to MLA after construction (head_dim not derived): named, not a shape error in the rotary embedding.
    edited = tiny_config()
    edited.kv_lora_rank, edited.qk_nope_head_dim, edited.qk_rope_head_dim, edited.v_head_dim = 8, 4, 4, 8
    with pytest.raises(ValueError, match="head_dim=8 must equal qk_rope_head_dim=4"):
        DeepTalkForCausalLM(edited)


def test_derived_defaults_follow_the_documented_rules():
    """docs/configuration.md's defaults of the derived fields, each where tiny_config does not set the field."""
    assert tiny_config(num_key_value_heads=None).num_key_value_heads == 4  # None: multi-head attention
    assert tiny_config(head_dim=None).head_dim == 32 // 4  # hidden_size // num_attention_heads
    assert tiny_config().expert_order(0) is None  # no speech_expert_ids: speech experts follow the text experts
    streams = tiny_config(num_audio_streams=2, audio_codebook_size=10)
    assert (streams.audio_pad_token_id, streams.audio_bos_token_id, streams.audio_eos_token_id) == (10, 11, 12)
    assert streams.stream_loss_weights == [1.0, 1.0, 1.0] and streams.audio_stream_vocab_size == 13
    # A stream's table covers every special code, whichever is the largest.
    for specials in ((12, 10, 11), (10, 12, 11), (10, 11, 12)):
        pad, bos, eos = specials
        config = tiny_config(
            num_audio_streams=1,
            audio_codebook_size=10,
            audio_pad_token_id=pad,
            audio_bos_token_id=bos,
            audio_eos_token_id=eos,
        )
        assert config.audio_stream_vocab_size == 13
    # The dense MLP's width is checked only where a layer is dense (DeepSeek-style all-MoE configs may leave it 0).
    assert tiny_config(mlp_only_layers=[], intermediate_size=0).moe_layers == [0, 1, 2]


def test_load_time_text_config_overrides_derive_the_audio_models_fields_again(tmp_path):
    """The audio model's placeholder (the last text-block id) and connector width are derived from its LLM's config:
    a load-time `text_config` override derives them again, as a new config does (the saved placeholder stayed, an
    ordinary text id once the speech block moved), unless they were set to values of their own."""
    DeepTalkAudioConfig(audio_config=WhisperConfig(), text_config=tiny_config()).save_pretrained(tmp_path / "audio")
    for text in ({"vocab_size": 100}, {"hidden_size": 64}):
        loaded = AutoConfig.from_pretrained(tmp_path / "audio", text_config=text)
        fresh = DeepTalkAudioConfig(audio_config=WhisperConfig(), text_config=tiny_config(**text))
        assert (loaded.audio_token_id, loaded.connector_hidden_size) == (
            fresh.audio_token_id,
            fresh.connector_hidden_size,
        ), text
    own = DeepTalkAudioConfig(audio_config=WhisperConfig(), text_config=tiny_config(), audio_token_id=5)
    own.save_pretrained(tmp_path / "own")
    assert AutoConfig.from_pretrained(tmp_path / "own", text_config={"vocab_size": 100}).audio_token_id == 5


def test_a_load_time_override_keeps_the_saved_head_dim_as_qwen3_moe_does(tmp_path):
    """`head_dim` is saved and kept whatever the override of the width or head count (Qwen3's is 128 at every size),
    as transformers' Qwen3-MoE and Llama configs keep it."""
    tiny_config(hidden_size=32, num_attention_heads=4, head_dim=8).save_pretrained(tmp_path / "deeptalk")
    Qwen3MoeConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8).save_pretrained(
        tmp_path / "qwen3_moe"
    )
    for override in ({"hidden_size": 64}, {"num_attention_heads": 2, "num_key_value_heads": 1}):
        expected = AutoConfig.from_pretrained(tmp_path / "qwen3_moe", **override).head_dim
        assert AutoConfig.from_pretrained(tmp_path / "deeptalk", **override).head_dim == expected == 8, override


def test_a_saved_config_the_checks_refuse_loads_repaired_by_an_override(tmp_path):
    """An override that repairs the refused field (as the refusal says: "set layer_types too") loads, derived fields
    and all; the saved config alone, which the re-derivation compares with, was built first and refused."""
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(saved, num_hidden_layers=2)))  # layer_types: 3 entries
    with pytest.raises(ValueError, match="must have num_hidden_layers=2 entries"):
        AutoConfig.from_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, layer_types=["full_attention"] * 2)
    assert loaded.layer_types == ["full_attention"] * 2 and loaded.num_hidden_layers == 2
    (tmp_path / "config.json").write_text(json.dumps(dict(saved, num_experts_per_tok="2")))  # a field of a wrong type
    assert AutoConfig.from_pretrained(tmp_path, num_experts_per_tok=2).num_experts_per_tok == 2
