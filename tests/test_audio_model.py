"""DeepTalkForConditionalGeneration: a tiny random Whisper encoder (and a wav2vec2 one) + speech connector + tiny
DeepTalk LLM. Masks and placeholder counts, bad input, cached generation, modality isolation under hard routing,
composition from checkpoints and save/load, the "align" stage, and learning to transcribe synthetic tones."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMultimodalLM,
    DataCollatorWithFlattening,
    GenerationConfig,
    HubertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    SeamlessM4TFeatureExtractor,
    Trainer,
    TrainingArguments,
    Wav2Vec2BertConfig,
    Wav2Vec2Config,
    Wav2Vec2ConformerConfig,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForAudioClassification,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from deeptalk_hf import (
    DeepTalkAudioConfig,
    DeepTalkConfig,
    DeepTalkForCausalLM,
    DeepTalkForConditionalGeneration,
    audio_token_lengths,
    expand_audio_placeholders,
    extract_audio_features,
    fit_speech_vocab,
    lora_config_for_stage,
    set_training_stage,
)

from .conftest import tiny_config
from .speech_fixtures import tiny_processor
from .test_modeling import perturb

ROOT = Path(__file__).resolve().parents[1]
SAMPLING_RATE = 16000
# 16 mel bins, a 1 s window: 100 mel frames -> 50 encoder frames -> 10 LLM positions at stack factor 5.
WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    num_mel_bins=16,
    max_source_positions=50,
    max_target_positions=32,
    vocab_size=100,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)
BOS, SEP, EOS, PAD = 2, 3, 1, 0


def whisper_audio_config(**overrides) -> DeepTalkAudioConfig:
    fields = dict(audio_config=WhisperConfig(**WHISPER), text_config=tiny_config(), stack_factor=5) | overrides
    return DeepTalkAudioConfig(**fields)


def whisper_features() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE, chunk_length=1)


def tone(frequency: float, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE).astype(np.float32)


def audio_batch(config, feature_extractor, texts, audios, padding_side="right") -> dict[str, torch.Tensor]:
    """What a processor does: features, placeholder expansion, padding of ids/modality ids/attention mask."""
    features = extract_audio_features(audios, SAMPLING_RATE, feature_extractor, config)
    expanded = expand_audio_placeholders(texts, features["num_audio_tokens"], config)
    width = max(len(ids) for ids in expanded["input_ids"])

    def pad(rows, value):
        padded = [
            ([value] * (width - len(r)) + r) if padding_side == "left" else (r + [value] * (width - len(r)))
            for r in rows
        ]
        return torch.tensor(padded)

    return {
        "input_ids": pad(expanded["input_ids"], PAD),
        "attention_mask": pad([[1] * len(r) for r in expanded["input_ids"]], 0),
        "modality_ids": pad(expanded["modality_ids"], 0),
        "input_features": features["input_features"],
        "input_features_mask": features["input_features_mask"],
    }


def test_two_audio_lengths_give_their_positions_and_masked_batches_match_single_items():
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    audio_id = config.audio_token_id
    audios = [tone(440, 0.25), tone(880, 0.5625)]  # 4000 and 9000 samples
    features = extract_audio_features(audios, SAMPLING_RATE, whisper_features(), config)
    assert features["input_features"].shape == (2, 16, 100)  # Whisper's fixed window
    assert features["input_features_mask"].sum(-1).tolist() == [25, 57]  # ceil(samples / hop 160)
    # encoder frames (L - 1) // 2 + 1 = 13 and 29, stacked by 5 (a partial last stack counts)
    assert features["num_audio_tokens"].tolist() == [3, 6]
    with torch.no_grad():
        embeds, lengths = model.get_audio_features(features["input_features"], features["input_features_mask"])
    assert embeds.shape == (2, 10, 32) and lengths.tolist() == [3, 6]

    texts = [[BOS, audio_id, 5], [BOS, 9, audio_id, 6, 7]]
    batch = audio_batch(config, whisper_features(), texts, audios)
    assert batch["input_ids"].tolist() == [
        [BOS, audio_id, audio_id, audio_id, 5, PAD, PAD, PAD, PAD, PAD],
        [BOS, 9] + [audio_id] * 6 + [6, 7],
    ]
    assert batch["modality_ids"].tolist() == [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0] + [1] * 6 + [0, 0]]
    with torch.no_grad():
        logits = model(**batch).logits
        assert logits.shape == (2, 10, config.text_config.vocab_size)
        for row in range(2):
            alone = audio_batch(config, whisper_features(), texts[row : row + 1], audios[row : row + 1])
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(model(**alone).logits[0], logits[row, :length], rtol=1e-5, atol=1e-5)
        # Without the modality ids the placeholders are still speech: the model marks them itself.
        without = {k: v for k, v in batch.items() if k != "modality_ids"}
        assert torch.equal(model(**without).logits, logits)
        # The audio reaches the text after it.
        louder = model(**dict(batch, input_features=batch["input_features"] + 0.5)).logits
        assert not torch.allclose(louder[:, -1], logits[:, -1])


def test_audio_positions_are_speech_whatever_modality_ids_say():
    """The placeholders' positions are always routed as speech: modality ids marking them text (0) change nothing,
    while the same ids marking a text position speech do (the model still reads the caller's ids)."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    batch = audio_batch(config, whisper_features(), [[BOS, config.audio_token_id, 5, 6]], [tone(440, 0.25)])
    assert batch["modality_ids"].tolist() == [[0, 1, 1, 1, 0, 0]]
    with torch.no_grad():
        logits = model(**batch).logits
        as_text = model(**dict(batch, modality_ids=torch.zeros_like(batch["modality_ids"]))).logits
        torch.testing.assert_close(as_text, logits, rtol=0, atol=0)
        marked = model(**dict(batch, modality_ids=torch.tensor([[0, 0, 0, 0, 1, 0]]))).logits
        assert not torch.allclose(marked[0, 4:], logits[0, 4:])


def test_each_position_is_the_connector_over_its_consecutive_valid_encoder_frames():
    """Position j of an audio is `linear_2(act(linear_1([f_sj; ...; f_sj+s-1])))` over consecutive encoder frames,
    the frames past its valid length (Whisper's padded window, the tail of a partial last stack) reading as zeros.
    Stack factor 3 does not divide Whisper's 50 frames, so the connector's own padding is exercised too."""
    config = whisper_audio_config(stack_factor=3)
    model = DeepTalkForConditionalGeneration(config).eval()
    features = extract_audio_features([tone(440, 0.25), tone(880, 0.5625)], SAMPLING_RATE, whisper_features(), config)
    connector = model.speech_connector
    with torch.no_grad():
        embeds, lengths = model.get_audio_features(features["input_features"], features["input_features_mask"])
        frames = model.audio_encoder(features["input_features"]).last_hidden_state
        assert lengths.tolist() == [5, 10]  # ceil(13 / 3), ceil(29 / 3)
        for audio, num_frames in enumerate([13, 29]):
            for j in range(int(lengths[audio])):
                stack = [frames[audio, f] if f < num_frames else torch.zeros(32) for f in range(3 * j, 3 * j + 3)]
                expected = connector.linear_2(connector.act(connector.linear_1(torch.cat(stack))))
                torch.testing.assert_close(embeds[audio, j], expected)


def test_features_without_a_mask_are_a_whole_window():
    """Without `input_features_mask` every feature frame is valid: 100 mel frames fill 10 positions, as a full mask."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    features = extract_audio_features([tone(440, 0.25)], SAMPLING_RATE, whisper_features(), config)["input_features"]
    input_ids = torch.tensor([[BOS] + [config.audio_token_id] * 10 + [SEP]])
    full = torch.ones(1, features.shape[-1], dtype=torch.long)
    with torch.no_grad():
        assert model.get_audio_features(features)[1].tolist() == [10]
        masked = model(input_ids, input_features=features, input_features_mask=full).logits
        assert torch.equal(model(input_ids, input_features=features).logits, masked)


def test_a_padding_free_batch_with_its_audios_gives_each_items_logits():
    """Packing (transformers' `DataCollatorWithFlattening`) keeps only ids, labels and positions: without the audios
    the placeholders are refused; with the items' features concatenated in order, each item's logits are its own."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).train()
    audio_id = config.audio_token_id
    texts, audios = [[BOS, audio_id, 5], [BOS, 9, audio_id, 6, 7]], [tone(440, 0.25), tone(880, 0.5625)]
    items = [audio_batch(config, whisper_features(), texts[i : i + 1], audios[i : i + 1]) for i in range(2)]
    packed = DataCollatorWithFlattening()([{"input_ids": item["input_ids"][0]} for item in items])
    with pytest.raises(ValueError, match="audio placeholders .* but no input_features were given"):
        model(**packed, use_cache=False)
    features = {key: torch.cat([item[key] for item in items]) for key in ("input_features", "input_features_mask")}
    logits = model(**packed, **features, use_cache=False).logits[0]
    for item, item_logits in zip(items, logits.split([item["input_ids"].shape[1] for item in items]), strict=True):
        torch.testing.assert_close(item_logits, model(**item, use_cache=False).logits[0])


def test_trainer_packed_batches_of_the_audio_model_are_the_padded_batch(tmp_path):
    """`Trainer` turns the cache off on the model's own config, the composite one here; the LLM must take that, or its
    training forward makes a cache and transformers' masks then let the packed sequences attend to each other."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config())
    rows = [[BOS, 5, 9, 6], [BOS, 7, 8, 9, 10, 11, 4], [BOS, 12, 13]]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, data_collator=DataCollatorWithFlattening())
    model.train()
    packed = trainer.compute_loss(model, DataCollatorWithFlattening()([{"input_ids": row} for row in rows]))
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(row) for row in rows], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(row), dtype=torch.long) for row in rows], batch_first=True)
    padded = trainer.compute_loss(
        model, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    )
    torch.testing.assert_close(packed, padded)
    ids = torch.tensor([rows[0]])
    model.config.use_cache = False
    assert model(ids, None, None, None, None, None, None, None, True).cache is not None  # a positional use_cache wins


def features_of(batch: dict) -> dict:
    return {key: batch[key] for key in ("input_features", "input_features_mask")}


def test_bad_audio_input_raises_naming_the_problem():
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    extractor = whisper_features()
    audio_id = config.audio_token_id
    with pytest.raises(ValueError, match="8000 Hz.*16000 Hz"):
        extract_audio_features([tone(440, 0.2)], 8000, extractor, config)
    # A rate read from a text file: it read "sampled at 16000 Hz but ... expects 16000 Hz; resample it first".
    with pytest.raises(ValueError, match="sampled at '16000' Hz.*give the rate as a number"):
        extract_audio_features([tone(440, 0.2)], "16000", extractor, config)
    with pytest.raises(ValueError, match="audio 1 is empty"):
        extract_audio_features([tone(440, 0.2), np.zeros(0)], SAMPLING_RATE, extractor, config)
    with pytest.raises(ValueError, match=r"audio 0 has shape \(2, 100\)"):
        extract_audio_features([np.zeros((2, 100))], SAMPLING_RATE, extractor, config)
    with pytest.raises(ValueError, match="audio 0 has 20000 samples.*window of 16000"):
        extract_audio_features([tone(440, 1.25)], SAMPLING_RATE, extractor, config)
    whole = extract_audio_features([tone(440, 1.0)], SAMPLING_RATE, extractor, config)  # exactly one window fits
    assert whole["num_audio_tokens"].tolist() == [10]
    with pytest.raises(ValueError, match="audio 0 has 16001 samples.*window of 16000"):
        extract_audio_features([np.zeros(16001, np.float32)], SAMPLING_RATE, extractor, config)
    with pytest.raises(ValueError, match="no audio"):
        extract_audio_features([], SAMPLING_RATE, extractor, config)
    eighty_bins = WhisperFeatureExtractor(sampling_rate=SAMPLING_RATE, chunk_length=1)  # the default 80 mel bins
    with pytest.raises(ValueError, match="makes 80 mel bins but the audio encoder takes 16 \\(num_mel_bins\\)"):
        extract_audio_features([tone(440, 0.2)], SAMPLING_RATE, eighty_bins, config)
    # A 30 s extractor for this 1 s encoder counted 30 positions for a 3 s audio: Whisper failed at the forward.
    thirty_seconds = WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE)
    with pytest.raises(ValueError, match=r"windows of 3000 frames but the audio encoder takes 100 \(2 × max_source"):
        extract_audio_features([tone(440, 3.0)], SAMPLING_RATE, thirty_seconds, config)
    with pytest.raises(ValueError, match="has 2 audio placeholders.*but 1 audios"):
        expand_audio_placeholders([[BOS, audio_id, audio_id]], [3], config)

    batch = audio_batch(config, extractor, [[BOS, audio_id, 5]], [tone(440, 0.25)])
    too_many = {
        "input_ids": torch.cat([batch["input_ids"], torch.tensor([[audio_id]])], 1),
        "input_features": batch["input_features"],
        "input_features_mask": batch["input_features_mask"],
    }
    with pytest.raises(ValueError, match=r"4 audio placeholders.*fill 3 positions \(\[3\] each\)"):
        model(**too_many)
    with pytest.raises(ValueError, match="3 audio placeholders.*no input_features"):
        model(input_ids=batch["input_ids"])
    with torch.no_grad():  # nor on a later turn (with a cache): a new audio needs its features
        cache = model(input_ids=batch["input_ids"], **features_of(batch), use_cache=True).cache
    with pytest.raises(ValueError, match="3 audio placeholders.*no input_features"):
        model(input_ids=batch["input_ids"], cache=cache)
    with pytest.raises(ValueError, match="no input_features.*assistant model in generate gets none"):
        model.generate(**batch, assistant_model=model, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="cannot go with inputs_embeds"):  # the audio would be dropped silently
        model(inputs_embeds=model.get_input_embeddings()(batch["input_ids"]), **features_of(batch))
    mask = batch["input_features_mask"]
    frames = batch["input_features"].shape[-1]
    with pytest.raises(ValueError, match=rf"\(1 audios of {frames} frames\) does not match input_features_mask \(2, "):
        model(**dict(batch, input_features_mask=mask.repeat(2, 1)))
    # A wider mask counted frames the features lack: a masked_scatter error, or a placeholder count that blamed the ids.
    wider = torch.cat([mask, torch.ones_like(mask[:, :10])], dim=1)
    with pytest.raises(ValueError, match=rf"does not match input_features_mask \(1, {frames + 10}\)"):
        model(**dict(batch, input_features_mask=wider))
    with pytest.raises(ValueError, match="every audio fills at least one position"):
        expand_audio_placeholders([[BOS, audio_id]], [0], config)
    with pytest.raises(ValueError, match="audios_per_sequence has 1 entries for 2 sequences"):  # zip's message before
        expand_audio_placeholders([[BOS, audio_id], [BOS, audio_id]], [3, 3], config, audios_per_sequence=[2])
    # Two audios given in another order than their placeholder runs: one would be split over two rows.
    pair = audio_batch(config, extractor, [[BOS, audio_id], [BOS, audio_id]], [tone(440, 0.25), tone(440, 0.5)])
    swapped = dict(
        pair, input_features=pair["input_features"].flip(0), input_features_mask=pair["input_features_mask"].flip(0)
    )
    with pytest.raises(ValueError, match=r"runs \(reading order\) hold \[\d+, \d+\] positions"):
        model(**swapped)
    # ... or within one row: runs of 3 and 2 placeholders, audios of 2 then 3 positions (it was accepted)
    row = audio_batch(config, extractor, [[BOS, audio_id, 5, audio_id]], [tone(440, 0.5), tone(440, 0.25)])
    flipped = {key: value.flip(0) for key, value in features_of(row).items()}
    with pytest.raises(ValueError, match="give the audios in the order of their placeholder runs"):
        model(input_ids=row["input_ids"], **flipped)
    model(input_ids=row["input_ids"], **features_of(row))  # in order: accepted
    with pytest.raises(ValueError, match="input_features must be 3-D"):  # one audio without its batch dimension
        model(input_ids=row["input_ids"], input_features=row["input_features"][0])
    with pytest.raises(ValueError, match=r"input_features must be 3-D.*input_features_mask \(1, 2, \d+\)"):
        model(**dict(row, input_features_mask=row["input_features_mask"][None]))  # a mask with a batch dim too many
    # A mask padded on the left would have the encoder read padding as the audio; one with no valid frame would fill
    # no placeholder and drop out.
    with pytest.raises(ValueError, match="must mark each audio's first frames"):
        model(**dict(pair, input_features_mask=pair["input_features_mask"].flip(-1)))
    empty = dict(pair, input_ids=pair["input_ids"][:1], input_features_mask=pair["input_features_mask"].clone())
    empty["input_features_mask"][1] = 0
    with pytest.raises(ValueError, match="audio 1 \\(0 valid features\\) is too short for the encoder to make a"):
        model(**empty)


def test_an_audio_is_not_split_over_a_rows_end_and_the_next_rows_start():
    """A run of placeholders ends with its row, also where the next row starts with placeholders: an audio of 3
    positions cannot fill the last 2 of one row and the first of the next (two runs, of 2 and 1)."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    audio_id = config.audio_token_id
    one = audio_batch(config, whisper_features(), [[BOS, audio_id, 5]], [tone(440, 0.25)])
    assert one["input_ids"][0].tolist().count(audio_id) == 3
    split = torch.tensor([[BOS, 5, audio_id, audio_id], [audio_id, 6, 7, SEP]])
    with pytest.raises(ValueError, match=r"runs \(reading order\) hold \[2, 1\] positions"):
        model(input_ids=split, **features_of(one))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(audio_token_id=80), "audio_token_id=80"),
        (dict(stack_factor=0), "stack_factor=0"),
        (dict(text_config=tiny_config(num_audio_streams=2)), "num_audio_streams=2"),
        (dict(text_config=WhisperConfig(**WHISPER)), "text_config must be a DeepTalkConfig"),
        # the placeholder on padding would read padding as audio; on an end id, generate would never end
        (dict(audio_token_id=0), "audio_token_id=0 is the LLM's pad_token_id"),
        (dict(audio_token_id=1), "audio_token_id=1 is the LLM's eos_token_id"),
        (dict(text_config=tiny_config(eos_token_id=[1, 7]), audio_token_id=7), "audio_token_id=7 is the LLM's eos"),
        (dict(audio_token_id=2), "audio_token_id=2 is the LLM's bos_token_id"),
        # transformers counts an adapter's frames right for its default kernel and stride only
        (
            dict(audio_config=Wav2Vec2Config(add_adapter=True, adapter_kernel_size=5, adapter_stride=3)),
            "miscounts the frames of a wav2vec2 adapter with adapter_kernel_size=5, adapter_stride=3",
        ),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, message):
    fields = dict(audio_config=WhisperConfig(**WHISPER), text_config=tiny_config()) | overrides
    with pytest.raises(ValueError, match=message):
        DeepTalkAudioConfig(**fields)


def test_adapters_whose_frames_transformers_counts_right_are_taken():
    """wav2vec2's adapter pads by 1 (counted right for kernel 3, any stride); w2v-bert's by stride // 2."""
    for audio_config in (
        Wav2Vec2Config(add_adapter=True, adapter_kernel_size=3, adapter_stride=3),
        Wav2Vec2BertConfig(add_adapter=True, adapter_kernel_size=3, adapter_stride=3),
    ):
        DeepTalkAudioConfig(audio_config=audio_config, text_config=tiny_config())
    with pytest.raises(ValueError, match="wav2vec2-bert adapter with adapter_kernel_size=3, adapter_stride=1"):
        DeepTalkAudioConfig(
            audio_config=Wav2Vec2BertConfig(add_adapter=True, adapter_kernel_size=3, adapter_stride=1),
            text_config=tiny_config(),
        )


def test_load_time_override_is_checked(tmp_path):
    whisper_audio_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="stack_factor=0"):
        AutoConfig.from_pretrained(tmp_path, stack_factor=0)
    assert AutoConfig.from_pretrained(tmp_path, stack_factor=2).stack_factor == 2
    # a text_config dict updates the saved LLM config, and the composite's checks see the result
    updated = AutoConfig.from_pretrained(tmp_path, text_config={"num_experts_per_tok": 1}).text_config
    saved_text = whisper_audio_config().text_config.to_dict()
    assert updated.to_dict() == saved_text | {"num_experts_per_tok": 1}  # the other saved LLM fields kept
    with pytest.raises(ValueError, match="num_audio_streams=1"):
        AutoConfig.from_pretrained(tmp_path, text_config={"num_audio_streams": 1})
    saved = json.loads((tmp_path / "config.json").read_text())  # the LLM's field spelled by an alias
    saved["text_config"]["n_routed_experts"] = saved["text_config"].pop("num_experts")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path, text_config={"num_experts": 6}).text_config.num_experts == 6


def test_config_defaults_and_dict_round_trip():
    config = whisper_audio_config()
    assert config.audio_token_id == config.text_config.speech_token_start - 1  # the last text-block id
    assert config.connector_hidden_size == config.text_config.hidden_size
    narrow = whisper_audio_config(audio_config=WhisperConfig(**WHISPER | {"d_model": 16}))  # not the LLM's 32
    assert narrow.connector_hidden_size == narrow.text_config.hidden_size == 32
    rebuilt = AutoConfig.for_model(**config.to_dict())
    assert isinstance(rebuilt, DeepTalkAudioConfig) and isinstance(rebuilt.text_config, DeepTalkConfig)
    assert rebuilt.audio_config.model_type == "whisper" and rebuilt.to_dict() == config.to_dict()
    default = DeepTalkAudioConfig()
    assert default.audio_config.model_type == "whisper" and isinstance(default.text_config, DeepTalkConfig)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cached_generation_equals_uncached_from_audio_and_text(cache_implementation):
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    audio_id = config.audio_token_id
    batch = audio_batch(
        config,
        whisper_features(),
        [[BOS, audio_id, SEP], [BOS, 7, audio_id, 8, SEP]],
        [tone(300, 0.4), tone(1200, 0.8)],
        padding_side="left",
    )
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    cached = model.generate(**batch, cache_implementation=cache_implementation, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert cached.shape == (2, batch["input_ids"].shape[1] + 10)
    assert torch.equal(cached, uncached)


def test_assisted_decoding_with_audio_inputs_is_refused():
    """docs/speech_input.md: an assistant model gets none of the audio inputs, so the composite as its own assistant
    is refused saying so, and a text assistant meets transformers' check of unused kwargs (as Qwen2-Audio does)."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    batch = audio_batch(config, whisper_features(), [[BOS, config.audio_token_id, SEP]], [tone(300, 0.4)])
    kwargs = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    with pytest.raises(ValueError, match="assisted generation does not support audio inputs"):
        model.generate(**batch, assistant_model=model, **kwargs)
    with pytest.raises(ValueError, match="not used by the model.*input_features"):
        model.generate(**batch, assistant_model=model.language_model, **kwargs)


def test_a_second_turn_from_the_first_turns_cache_takes_the_new_audios_only():
    """The next turn of a dialogue continues from the cache: only the uncached ids are read, so only their audios are
    given (as transformers' own multimodal models take them); all of them is refused, saying so."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    audio_id = config.audio_token_id
    kwargs = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    first = audio_batch(config, whisper_features(), [[BOS, audio_id, SEP]], [tone(300, 0.4)])
    turn = model.generate(**first, return_dict_in_generate=True, **kwargs)
    history = turn.sequences[0, first["input_ids"].shape[1] :].tolist()
    both = audio_batch(
        config,
        whisper_features(),
        [[BOS, audio_id, SEP] + history + [7, audio_id, SEP]],
        [tone(300, 0.4), tone(900, 0.3)],
    )
    assert torch.equal(both["input_ids"][:, : turn.sequences.shape[1]], turn.sequences)
    expected = model.generate(**both, **kwargs)
    new = {key: both[key][1:] for key in ("input_features", "input_features_mask")}
    assert torch.equal(model.generate(**(both | new), cache=copy.deepcopy(turn.cache), **kwargs), expected)
    with pytest.raises(ValueError, match="positions cached, only the uncached ids are read: give the audios of those"):
        model.generate(**both, cache=turn.cache, **kwargs)


def test_a_cache_passed_by_its_old_name_past_key_values_is_used():
    model = DeepTalkForConditionalGeneration(whisper_audio_config()).eval()
    ids = torch.randint(3, 60, (1, 7))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :6], use_cache=True).cache
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = model(input_ids=ids[:, 6:], past_key_values=cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, model(input_ids=ids).logits[:, -1])


@pytest.mark.parametrize("expand", [dict(num_return_sequences=2, do_sample=True), dict(num_beams=2)])
def test_each_copy_of_a_sequence_hears_its_own_audios(expand):
    """Beams and returned sequences repeat a sequence with all of its audios, in order (a row with two audios too)."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).eval()
    audio_id = config.audio_token_id
    audios = [tone(300, 0.25), tone(900, 0.5), tone(1500, 0.3)]
    batch = audio_batch(config, whisper_features(), [[BOS, audio_id, 5, audio_id], [BOS, audio_id, 6]], audios, "left")
    with torch.no_grad():
        expected = model(**batch).logits[:, -1].repeat_interleave(2, dim=0)
    out = model.generate(
        **batch, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, pad_token_id=PAD, **expand
    )
    torch.testing.assert_close(out.logits[0], expected)
    with pytest.raises(ValueError, match="modality_ids has shape"):  # would be broadcast over the batch
        model.generate(**dict(batch, modality_ids=batch["modality_ids"][:1]), max_new_tokens=1, **expand)


def test_the_placeholder_stays_suppressed_when_the_caller_suppresses_other_tokens():
    """A `suppress_tokens=` of the caller's replaces the generation config's list in transformers: the placeholder,
    which a model may prefer, must still never be generated (it has no audio to fill it)."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config()).eval()
    audio_id = model.config.audio_token_id
    with torch.no_grad():
        model.language_model.lm_head.weight[[audio_id, 5]] = 50.0  # a model that prefers the placeholder and 5
    batch = audio_batch(model.config, whisper_features(), [[BOS, audio_id, SEP]], [tone(300, 0.3)])
    options = dict(
        max_new_tokens=3, do_sample=False, pad_token_id=PAD, output_scores=True, return_dict_in_generate=True
    )
    for suppressed in ([5], [audio_id, 5], None):
        out = model.generate(**batch, suppress_tokens=suppressed, **options)
        assert all(scores[0, audio_id] == -float("inf") for scores in out.scores), suppressed
        assert all((scores[0, 5] == -float("inf")) == (suppressed is not None) for scores in out.scores), suppressed
        assert audio_id not in out.sequences[0, batch["input_ids"].shape[1] :].tolist()
    assert model.generation_config.suppress_tokens == [audio_id]  # the model's own config is left as it was


def test_a_placeholder_changed_at_load_replaces_the_saved_one_in_suppress_tokens(tmp_path):
    """The saved generation config suppresses the placeholder it was saved with; a model loaded with another
    `audio_token_id` suppresses the new placeholder, no longer the old one (now a token it may generate), and keeps the
    user's own suppressed ids."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config())
    old = model.config.audio_token_id
    model.generation_config.suppress_tokens = [5, old]
    model.save_pretrained(tmp_path)
    loaded = DeepTalkForConditionalGeneration.from_pretrained(tmp_path, audio_token_id=old - 1)
    assert loaded.generation_config.suppress_tokens == [5, old - 1]
    assert DeepTalkForConditionalGeneration.from_pretrained(tmp_path).generation_config.suppress_tokens == [5, old]
    # A generation config the caller passes is taken as it is.
    settings = GenerationConfig(suppress_tokens=[old])
    loaded = DeepTalkForConditionalGeneration.from_pretrained(
        tmp_path, audio_token_id=old - 1, generation_config=settings
    )
    assert loaded.generation_config.suppress_tokens == [old]


def test_text_only_input_is_the_language_model():
    model = DeepTalkForConditionalGeneration(whisper_audio_config()).eval()
    input_ids = torch.randint(3, 60, (2, 7))
    # The composite never generates the placeholder; ask the same of the LLM alone.
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, suppress_tokens=[model.config.audio_token_id])
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, model.language_model(input_ids).logits)
        # Given modality ids route the text-block positions they mark as speech, as they do in the LLM.
        modality_ids = torch.zeros_like(input_ids)
        modality_ids[:, 2:5] = 1
        marked = model(input_ids, modality_ids=modality_ids).logits
        assert torch.equal(marked, model.language_model(input_ids, modality_ids=modality_ids).logits)
        assert not torch.equal(marked, model(input_ids).logits)
        with pytest.raises(ValueError, match="modality_ids must be 0"):  # the composite reads them itself
            model(input_ids, modality_ids=modality_ids * 2)
    assert torch.equal(model.generate(input_ids, **kwargs), model.language_model.generate(input_ids, **kwargs))
    # Resizing is the LLM's, which keeps its text and speech blocks apart.
    with pytest.raises(ValueError, match="resize_speech_vocab"):
        model.resize_token_embeddings(model.config.text_config.vocab_size + 8)
    assert model.resize_token_embeddings(model.config.text_config.vocab_size) is model.get_input_embeddings()
    model.train()(input_ids, labels=input_ids).loss.backward()  # a text-only batch trains the embeddings too
    assert model.get_input_embeddings().weight.grad[input_ids.unique()].abs().sum(-1).gt(0).all()


def is_speech_side(name: str) -> bool:
    """The audio encoder and every speech tensor (connector, speech experts and routers, speech rows)."""
    return "speech" in name or name.startswith("audio_encoder.")


@pytest.mark.parametrize("num_speech_experts", [3, [2, 0]], ids=["all-layers", "a-layer-without-speech-experts"])
def test_hard_routing_keeps_audio_positions_on_speech_tensors(num_speech_experts):
    config = whisper_audio_config(text_config=tiny_config(num_speech_experts=num_speech_experts))
    model = DeepTalkForConditionalGeneration(config).eval()
    text_config = config.text_config
    start = text_config.speech_token_start
    # Equal lengths: no padding, whose text tokens would change the expert batches of layers without speech experts.
    audio_only = audio_batch(
        config, whisper_features(), [[config.audio_token_id]] * 2, [tone(500, 0.5), tone(900, 0.5)]
    )
    mixed = audio_batch(config, whisper_features(), [[BOS, config.audio_token_id, 9]], [tone(500, 0.5)])
    audio_only.pop("modality_ids"), mixed.pop("modality_ids")  # the model marks the audio positions as speech
    text_only = torch.randint(3, config.audio_token_id, (2, 6))

    speech_changed = perturb(model, is_speech_side)
    layers_with_speech = [f"layers.{i}.mlp." for i in text_config.moe_layers if text_config.layer_experts(i)[1]]

    def text_routing_tensor(name: str) -> bool:
        return any(
            name.startswith(f"language_model.model.{p}experts.") or name == f"language_model.model.{p}gate.weight"
            for p in layers_with_speech
        )

    text_changed = perturb(model, text_routing_tensor)
    with torch.no_grad():
        # Text input keeps its text-block logits whatever happens to the speech side...
        assert torch.equal(model(text_only).logits[..., :start], speech_changed(text_only).logits[..., :start])
        # ...and audio positions (with the positions before them) never touch the text experts or routers.
        assert torch.equal(model(**audio_only).logits, text_changed(**audio_only).logits)
        # Both perturbations matter where they should.
        assert not torch.equal(model(**mixed).logits, speech_changed(**mixed).logits)
        assert not torch.equal(model(text_only).logits, text_changed(text_only).logits)
        for copy in (model, text_changed):
            copy.config.text_config.modality_routing = "none"
        assert not torch.equal(model(**audio_only).logits, text_changed(**audio_only).logits)


def test_composed_from_checkpoints_saves_and_loads_identically(tmp_path):
    whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER)).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    llm = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    llm.save_pretrained(tmp_path / "llm")

    model = DeepTalkForConditionalGeneration.from_parts(tmp_path / "whisper", tmp_path / "llm", stack_factor=5).eval()
    assert isinstance(model.audio_encoder, WhisperEncoder)
    assert model.config.audio_config is model.audio_encoder.config
    assert model.config.text_config is model.language_model.config
    for prefix, source in (("audio_encoder.", whisper.model.encoder), ("language_model.", llm)):
        for name, tensor in source.state_dict().items():
            assert torch.equal(model.state_dict()[prefix + name], tensor), name
    assert not any(p.is_meta for p in model.parameters())
    # The new connector is initialised as the model's own init does (std 0.02), not as torch's default (~0.046).
    assert abs(model.speech_connector.linear_1.weight.std().item() - 0.02) < 0.002
    text_ids = torch.randint(3, 60, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(text_ids).logits, llm(text_ids).logits)

    batch = audio_batch(model.config, whisper_features(), [[BOS, model.config.audio_token_id, SEP]], [tone(700, 0.6)])
    model.save_pretrained(tmp_path / "composite")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "composite"), DeepTalkAudioConfig)
    loaded, info = AutoModelForMultimodalLM.from_pretrained(tmp_path / "composite", output_loading_info=True)
    assert isinstance(loaded, DeepTalkForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.eval()(**batch).logits)
    assert loaded.generation_config.suppress_tokens == [model.config.audio_token_id]
    # The encoder offloaded to disk (accelerate's hook loads its weights at each call): the same logits.
    offloaded = AutoModelForMultimodalLM.from_pretrained(
        tmp_path / "composite",
        device_map={"audio_encoder": "disk", "speech_connector": "cpu", "language_model": "cpu"},
        offload_folder=tmp_path / "offload",
    )
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, offloaded.eval()(**batch).logits)
    # Its device is the LLM's (ids go there; the first parameter is the offloaded encoder's, on the meta device).
    assert offloaded.device == torch.device("cpu")
    assert offloaded.generate(max_new_tokens=2, do_sample=False).shape == (1, 3)  # from a BOS it makes there
    # A tensor the composite has no place for is refused, a top-level `lm_head` too (only the LLM's base model
    # leaves a causal LM's heads out).
    weights = load_file(tmp_path / "composite" / "model.safetensors")
    save_file(weights | {"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "composite" / "model.safetensors")
    with pytest.raises(ValueError, match="no place for .*lm_head.weight"):
        AutoModelForMultimodalLM.from_pretrained(tmp_path / "composite")


def test_loading_the_other_deeptalk_models_checkpoint_says_which_it_is(tmp_path):
    """The audio model's checkpoint loaded as a language model (as it is, or with `key_mapping` taking its
    `language_model.` prefix off), and a language model's loaded as the audio model, are refused naming the way that
    works, not upcycling (whose hint was given for any missing or extra tensor)."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config())
    model.save_pretrained(tmp_path / "audio")
    model.language_model.save_pretrained(tmp_path / "llm")
    for overrides in ({}, {"key_mapping": {r"^language_model\.": ""}}):
        with pytest.raises(ValueError, match=r"audio model's checkpoint .*AutoModelForMultimodalLM") as refused:
            DeepTalkForCausalLM.from_pretrained(tmp_path / "audio", **overrides)
        assert "upcycl" not in str(refused.value)
        assert ("no place for (audio_encoder." in str(refused.value)) == bool(overrides)  # the renamed LLM loaded
    with pytest.raises(ValueError, match=r"language model's checkpoint .*from_parts") as refused:
        DeepTalkForConditionalGeneration.from_pretrained(tmp_path / "llm", config=model.config)
    assert "upcycl" not in str(refused.value)
    # A language model's checkpoint that only lacks the speech attention asked for still points there.
    with pytest.raises(ValueError, match="add_speech_attention"):
        DeepTalkForCausalLM.from_pretrained(tmp_path / "llm", speech_attention=True)


def test_generation_entries_of_the_language_model_work_on_the_composite():
    """What transformers reaches through the composite: a prompt given as embeddings (accepted only where
    `prepare_inputs_for_generation` names `inputs_embeds`), a text LM as draft beside `modality_ids`, the output
    embeddings; self-speculative early exit looks for layers the composite does not expose and is refused by name."""
    torch.manual_seed(0)
    model = DeepTalkForConditionalGeneration(whisper_audio_config()).eval()
    llm = model.language_model
    start = llm.config.speech_token_start
    ids = torch.tensor([[BOS, 4, 5, start, start + 1, 6, 7]])
    modality_ids = (ids >= start).long()  # as the processors give them
    greedy = dict(max_new_tokens=5, do_sample=False)
    expected = model.generate(ids, **greedy)
    embeds = llm.model.embed(ids)
    assert torch.equal(model.generate(inputs_embeds=embeds, modality_ids=modality_ids, **greedy), expected[:, 7:])
    draft = LlamaForCausalLM(
        LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).eval()
    assert torch.equal(model.generate(ids, modality_ids=modality_ids, assistant_model=draft, **greedy), expected)
    with pytest.raises(ValueError, match="assistant_early_exit .* model.language_model"):
        model.generate(ids, assistant_early_exit=1, **greedy)
    head = torch.nn.Linear(32, 64, bias=False)
    model.set_output_embeddings(head)
    assert llm.lm_head is head and model.get_output_embeddings() is head


def test_parts_of_another_dtype_and_the_llms_generation_settings(tmp_path):
    """A float32 encoder with a bf16 LLM (as the checkpoints come) runs; the composite generates with the LLM's
    settings (its end-of-turn ids, sampling) and never the placeholder; every experts backend reaches the LLM."""
    whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER)).eval()
    llm = DeepTalkForCausalLM(tiny_config()).to(torch.bfloat16).eval()
    llm.generation_config.update(eos_token_id=[1, 7], do_sample=True, temperature=0.6)
    model = DeepTalkForConditionalGeneration.from_parts(whisper, llm, stack_factor=5).eval()
    assert llm.generation_config.suppress_tokens is None  # the composite suppresses the placeholder in its own copy
    batch = audio_batch(model.config, whisper_features(), [[BOS, model.config.audio_token_id, SEP]], [tone(700, 0.6)])
    with torch.no_grad():
        assert model(**batch).logits.dtype == torch.bfloat16
        model.speech_connector.float()  # a connector kept in float32 beside the bf16 LLM
        assert model(**batch).logits.dtype == torch.bfloat16
    settings = model.generation_config
    assert (settings.eos_token_id, settings.do_sample, settings.temperature) == ([1, 7], True, 0.6)
    assert settings.suppress_tokens == [model.config.audio_token_id]
    for backend in ("grouped_mm", "eager", "grouped_mm"):  # both ways
        model.set_experts_implementation(backend)
        assert model.language_model.config._experts_implementation == backend


def test_float32_features_are_cast_to_a_bf16_encoders_dtype():
    """A feature extractor gives float32 features; a bf16 model (encoder included) takes them as bf16 features."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config()).to(torch.bfloat16).eval()
    batch = audio_batch(model.config, whisper_features(), [[BOS, model.config.audio_token_id, SEP]], [tone(700, 0.6)])
    assert batch["input_features"].dtype == torch.float32
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(logits, model(**dict(batch, input_features=batch["input_features"].bfloat16())).logits)


class Float8Linear(torch.nn.Linear):
    """A linear layer storing its weight in float8 and computing in its input's dtype, as weight-only quantisers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def test_a_float8_connector_reads_frames_in_the_llms_dtype():
    """A connector whose stored weight is 8-bit gets the frames in the LLM's dtype, not in float8 (which would lose
    almost all of their precision, and which activations such as GELU do not take)."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config()).eval()
    batch = audio_batch(model.config, whisper_features(), [[BOS, model.config.audio_token_id, SEP]], [tone(440, 0.25)])
    features = (batch["input_features"], batch["input_features_mask"])
    linear = model.speech_connector.linear_1
    with torch.no_grad():
        linear.weight.copy_(linear.weight.to(torch.float8_e4m3fn))  # values float8 can hold, so both runs agree
        expected, _ = model.get_audio_features(*features)
        quantised = Float8Linear(linear.in_features, linear.out_features)
        quantised.load_state_dict(linear.state_dict())
        quantised.weight.data = quantised.weight.data.to(torch.float8_e4m3fn)
        model.speech_connector.linear_1 = quantised
        embeds, _ = model.get_audio_features(*features)
    assert embeds.dtype == torch.float32
    torch.testing.assert_close(embeds, expected)


def test_a_float32_encoder_beside_a_bf16_llm_saves_as_the_llms_dtype(tmp_path):
    """The composite's dtype is its LLM's, not its first parameter's (the encoder's): saving records it, and
    `from_pretrained` (one dtype for the whole model) reloads the LLM as it was rather than widened to float32."""
    whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER))
    llm = DeepTalkForCausalLM(tiny_config()).to(torch.bfloat16)
    llm.generation_config.suppress_tokens = [5]
    model = DeepTalkForConditionalGeneration.from_parts(whisper, llm, stack_factor=5)
    # The LLM's own suppressed ids stay, beside the audio placeholder (which must never be generated).
    assert model.generation_config.suppress_tokens == sorted([5, model.config.audio_token_id])
    assert model.audio_encoder.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert model.speech_connector.linear_1.weight.dtype == torch.bfloat16  # the new connector is made in it
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMultimodalLM.from_pretrained(tmp_path)
    assert loaded.language_model.dtype == loaded.speech_connector.linear_1.weight.dtype == torch.bfloat16
    for name, tensor in loaded.language_model.state_dict().items():
        assert torch.equal(tensor, llm.state_dict()[name]), name


class UnregisteredEncoderConfig(PreTrainedConfig):
    """An encoder config transformers' AutoModel does not know (e.g. remote code that was never registered)."""

    model_type = "unregistered_audio_encoder"


def test_only_encoders_whose_frames_can_be_counted_are_taken():
    from transformers import BertConfig, Qwen2AudioEncoderConfig, Speech2TextConfig

    for audio_config, message in [
        (Speech2TextConfig(), "speech_to_text config is not an audio encoder DeepTalk can use"),
        (Qwen2AudioEncoderConfig(), "qwen2_audio_encoder audio encoder counts its frames in a way"),
        (UnregisteredEncoderConfig(), "unregistered_audio_encoder config is not an audio encoder DeepTalk can use"),
        (BertConfig(), "bert audio encoder does not say how many frames"),
    ]:
        with pytest.raises(ValueError, match=message):
            audio_token_lengths(whisper_audio_config(audio_config=audio_config), torch.tensor([1600]))
        with pytest.raises(ValueError, match=message):  # when the model is built, not at its first audio
            DeepTalkForConditionalGeneration(whisper_audio_config(audio_config=audio_config))


def test_from_parts_loads_whisper_checkpoints_without_a_decoder(tmp_path):
    """A saved encoder alone (`model.audio_encoder.save_pretrained`) and an encoder-only fine-tune (audio
    classification) give their encoder; only the encoder's weights must all be there."""
    whisper = WhisperForAudioClassification(WhisperConfig(**WHISPER))
    whisper.encoder.save_pretrained(tmp_path / "encoder")
    whisper.save_pretrained(tmp_path / "classifier")
    llm = DeepTalkForCausalLM(tiny_config())
    for folder in ("encoder", "classifier"):
        model = DeepTalkForConditionalGeneration.from_parts(tmp_path / folder, llm, stack_factor=5)
        assert isinstance(model.audio_encoder, WhisperEncoder)
        for name, tensor in whisper.encoder.state_dict().items():
            assert torch.equal(model.audio_encoder.state_dict()[name], tensor), (folder, name)
    weights = load_file(tmp_path / "classifier" / "model.safetensors")
    del weights["encoder.conv1.weight"]
    save_file(weights, tmp_path / "classifier" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"under encoder\.: missing \['encoder.conv1.weight'\]"):
        DeepTalkForConditionalGeneration.from_parts(tmp_path / "classifier", llm, stack_factor=5)
    weights["encoder.conv1.weight"] = whisper.encoder.conv1.weight.detach()[:, :-1].clone()  # a wrong shape
    save_file(weights, tmp_path / "classifier" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # refused by from_pretrained itself
        DeepTalkForConditionalGeneration.from_parts(tmp_path / "classifier", llm, stack_factor=5)


def test_from_parts_refuses_an_encoder_of_another_class():
    whisper = WhisperForConditionalGeneration(WhisperConfig(**WHISPER))
    with pytest.raises(ValueError, match="builds a WhisperEncoder encoder, but the given encoder is a WhisperDecoder"):
        DeepTalkForConditionalGeneration.from_parts(whisper.model.decoder, DeepTalkForCausalLM(tiny_config()))


@pytest.mark.parametrize("top_layers", [0, 1])
def test_align_stage_trains_the_connector_only(top_layers):
    """`set_training_stage(model, "align", also=model.audio_encoder_top_layers(n))`: after AdamW steps with weight
    decay, the encoder (but for its top n layers) and the LLM are bit-identical and the connector has moved."""
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config).train()
    top = model.audio_encoder_top_layers(top_layers)
    assert top == [n for n, _ in model.named_parameters() if n.startswith("audio_encoder.layers.1.")][: len(top)]
    assert len(top) == (len(list(model.audio_encoder.layers[1].parameters())) if top_layers else 0)
    trainable = set(set_training_stage(model, "align", also=top))
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("speech_connector.")} | set(top)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = audio_batch(
        config, whisper_features(), [[BOS, config.audio_token_id, SEP, 11, 12]] * 2, [tone(400, 0.5), tone(800, 0.7)]
    )
    labels = batch["input_ids"].masked_fill(batch["modality_ids"].bool() | ~batch["attention_mask"].bool(), -100)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name
    # A fully frozen encoder stays in eval mode in training (its normalisation statistics, dropout untouched).
    assert model.training and model.audio_encoder.training == bool(top_layers)
    all_layers = [n for n, _ in model.named_parameters() if n.startswith("audio_encoder.layers.")]
    assert model.audio_encoder_top_layers(2) == all_layers
    with pytest.raises(ValueError, match=r"num_layers=3 must be in \[0, 2\]"):
        model.audio_encoder_top_layers(3)


@pytest.mark.parametrize("prefix", ["", "speech_llm."])
def test_stages_never_train_what_the_encoder_keeps_fixed(tmp_path, prefix):
    """Whisper builds its sinusoidal positions frozen (and transformers' loading turns them trainable): no `also`
    pattern unfreezes them, and one that names them alone is refused by name; the same where the model is held by a
    user's module (`prefix`), whose stage also puts the frozen encoder in eval mode."""
    DeepTalkForConditionalGeneration(whisper_audio_config()).save_pretrained(tmp_path)
    model = holder = DeepTalkForConditionalGeneration.from_pretrained(tmp_path)
    if prefix:
        holder = nn.Module()
        holder.speech_llm = model
    fixed = "audio_encoder.embed_positions.weight"
    encoder = {prefix + n for n, _ in model.named_parameters() if n.startswith("audio_encoder.")} - {prefix + fixed}
    assert set(set_training_stage(holder, "align", also=[f"{prefix}audio_encoder.*"])) >= encoder
    assert not model.get_parameter(fixed).requires_grad
    with pytest.raises(ValueError, match=f"matches only .'{prefix}{fixed}'., which WhisperEncoder"):
        set_training_stage(holder, "joint", also=["*.embed_positions.*"])
    holder.train()
    set_training_stage(holder, "align")
    assert model.training and not model.audio_encoder.training


def test_other_stages_keep_their_meaning_and_leave_the_encoder_frozen():
    model = DeepTalkForConditionalGeneration(whisper_audio_config())
    names = [n for n, _ in model.named_parameters()]
    speech = set_training_stage(model, "speech")
    assert set(speech) == {n for n in names if "speech" in n}  # connector, speech experts/routers/rows
    assert any(n.startswith("speech_connector.") for n in speech)
    text = set_training_stage(model, "text")
    assert text and all(".mlp.experts." in n or ".mlp.gate." in n for n in text)
    assert all(n.startswith("language_model.") for n in text)
    joint = set_training_stage(model, "joint")
    assert set(joint) == {n for n in names if not n.startswith("audio_encoder.")}
    model.eval()  # a stage chosen on a model in eval mode leaves it there
    set_training_stage(model, "speech")
    assert not model.training and not any(module.training for module in model.modules())


@pytest.mark.parametrize("reentrant", [False, True])
def test_reentrant_checkpointing_warns_that_the_llm_router_losses_lose_their_gradient(reentrant, caplog):
    """The composite checkpoints its language model's layers too, so it warns as the language model alone does."""
    text_config = tiny_config(router_aux_loss_coef=1e-2, router_z_loss_coef=1e-3)
    model = DeepTalkForConditionalGeneration(whisper_audio_config(text_config=text_config)).train()
    with caplog.at_level("WARNING", logger="deeptalk_hf.modeling_deeptalk"):
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
    input_ids = torch.tensor([[BOS, 11, 12, 70, 71, 72]])
    out = model(input_ids, labels=input_ids)
    assert out.aux_loss.requires_grad is out.z_loss.requires_grad is not reentrant  # what the warning is about
    assert ("router losses (aux_loss, z_loss) get no gradient" in caplog.text) is reentrant


def batch_logits_are_its_items(model, extractor, texts, audios, batch):
    """The batch's logits, checked row by row against each item run alone (padding must not leak into an item)."""
    with torch.no_grad():
        logits = model(**batch).logits
        for row in range(len(texts)):
            alone = audio_batch(model.config, extractor, texts[row : row + 1], audios[row : row + 1])
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(model(**alone).logits[0], logits[row, :length], rtol=1e-4, atol=1e-4)
    return logits


CONV_ENCODER = dict(  # a tiny wav2vec2-family encoder: raw samples in, two strided convs
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    conv_dim=(16, 16),
    conv_kernel=(10, 8),
    conv_stride=(5, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="layer",
    mask_time_prob=0.0,
)


def test_any_audio_encoder_through_auto_model_wav2vec2(tmp_path):
    """A non-Whisper encoder (wav2vec2: raw samples in, sample-level mask) is built by `AutoModel` and masked."""
    encoder_config = Wav2Vec2Config(**CONV_ENCODER, do_stable_layer_norm=True)
    config = DeepTalkAudioConfig(audio_config=encoder_config, text_config=tiny_config(), stack_factor=5)
    model = DeepTalkForConditionalGeneration(config).eval()
    assert type(model.audio_encoder).__name__ == "Wav2Vec2Model"
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True)
    audios = [tone(300, 0.1), tone(600, 0.25)]  # 1600 and 4000 samples
    texts = [[BOS, config.audio_token_id, 5], [BOS, config.audio_token_id, 6]]
    batch = audio_batch(config, extractor, texts, audios)
    # conv lengths: (1600 - 10) // 5 + 1 = 319 -> (319 - 8) // 4 + 1 = 78 frames -> 16 positions; 4000 -> 198 -> 40
    assert batch["modality_ids"].sum(-1).tolist() == [16, 40]
    logits = batch_logits_are_its_items(model, extractor, texts, audios, batch)
    assert model.audio_encoder_top_layers(1)[0].startswith("audio_encoder.encoder.layers.1.")
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForMultimodalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, logits)


def test_frozen_encoder_layers_keep_their_batchnorm_statistics_and_skip_dropout():
    """A conformer's convolution module holds BatchNorm: training the top layer only must leave the layer below it
    bit-identical, buffers included (its running statistics would move in train mode), and without dropout."""
    encoder_config = Wav2Vec2ConformerConfig(
        **CONV_ENCODER, conv_depthwise_kernel_size=3, hidden_dropout=0.5, layerdrop=0.0
    )
    config = DeepTalkAudioConfig(audio_config=encoder_config, text_config=tiny_config(), stack_factor=5)
    model = DeepTalkForConditionalGeneration(config).train()
    set_training_stage(model, "align", also=model.audio_encoder_top_layers(1))
    low, top = model.audio_encoder.encoder.layers
    assert not low.training and not low.conv_module.batch_norm.training and top.conv_module.batch_norm.training
    assert not any(module.training for module in low.modules())
    dropouts = [module for module in top.modules() if isinstance(module, torch.nn.Dropout)]
    assert dropouts and all(module.training for module in dropouts)  # parameter-free: they follow the trained layer
    before = {n: t.clone() for n, t in model.audio_encoder.state_dict().items()}
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True)
    batch = audio_batch(config, extractor, [[BOS, config.audio_token_id, 5]] * 2, [tone(300, 0.1), tone(600, 0.25)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
    after = model.audio_encoder.state_dict()
    moved = {n for n, t in before.items() if not torch.equal(t, after[n])}
    assert moved and all(n.startswith("encoder.layers.1.") for n in moved), sorted(moved)
    assert "encoder.layers.1.conv_module.batch_norm.running_mean" in moved
    set_training_stage(model, "align", also=model.audio_encoder_top_layers(2))  # now both layers train
    assert low.training and low.conv_module.batch_norm.training


@pytest.mark.parametrize("adapter_width", [16, 32])
def test_an_adapter_of_another_width_feeds_the_connector(adapter_width):
    """With `add_adapter=True` the encoder's frames are `output_hidden_size` wide, which the connector must take."""
    encoder_config = Wav2Vec2Config(
        **CONV_ENCODER, add_adapter=True, num_adapter_layers=1, output_hidden_size=adapter_width
    )
    config = DeepTalkAudioConfig(audio_config=encoder_config, text_config=tiny_config(), stack_factor=5)
    model = DeepTalkForConditionalGeneration(config).eval()
    assert model.speech_connector.linear_1.in_features == 5 * adapter_width
    extractor = Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True)
    batch = audio_batch(config, extractor, [[BOS, config.audio_token_id, 5]], [tone(300, 0.25)])
    with torch.no_grad():
        frames = model.audio_encoder(batch["input_features"]).last_hidden_state
        assert frames.shape[-1] == adapter_width
        assert model(**batch).logits.isfinite().all()


W2V_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    feature_projection_input_dim=160,
    conv_depthwise_kernel_size=7,
    mask_time_prob=0.0,
    layerdrop=0.0,  # in train mode a layer would be skipped at random (a trained layer's gradient with it)
)


def encoder_extractor(encoder_config):
    """The feature extractor of a tiny wav2vec2-family or w2v-bert encoder."""
    if isinstance(encoder_config, Wav2Vec2BertConfig):
        return SeamlessM4TFeatureExtractor(feature_size=80, sampling_rate=SAMPLING_RATE, return_attention_mask=True)
    return Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True)


@pytest.mark.parametrize(
    "encoder_config", [WavLMConfig(**CONV_ENCODER), Wav2Vec2BertConfig(**W2V_BERT)], ids=["wavlm", "w2v-bert"]
)
def test_align_lora_on_the_top_encoder_layer_adapts_only_what_trains(encoder_config):
    """WavLM's attention hands its projections' weights to `F.multi_head_attention_forward` (a LoRA wrapper would never
    run) and w2v-bert's depthwise convolution is grouped (PEFT refuses a rank its groups do not divide): both are left
    out; every adapter that remains gets a gradient."""
    from peft import get_peft_model

    config = DeepTalkAudioConfig(audio_config=encoder_config, text_config=tiny_config(), stack_factor=5)
    model = DeepTalkForConditionalGeneration(config)
    lora = lora_config_for_stage(model, "align", also=model.audio_encoder_top_layers(1), r=8)
    assert not any(".attention." in t or "depthwise" in t for t in lora.target_modules), lora.target_modules
    assert any("intermediate_dense" in t for t in lora.target_modules)  # the top layer's feed-forward is adapted
    adapted = get_peft_model(model, lora)
    extractor = encoder_extractor(encoder_config)
    batch = audio_batch(config, extractor, [[BOS, config.audio_token_id, 5]], [tone(300, 0.25)])
    adapted(**batch, labels=batch["input_ids"]).loss.backward()
    factors = {name: p.grad for name, p in adapted.named_parameters() if "lora_" in name}
    assert factors and all(grad is not None for grad in factors.values())


def test_w2v_bert_top_layer_trains_under_reentrant_checkpointing_and_short_audio_is_named():
    """w2v-bert exposes no input embedding for transformers' hook, so under a reentrant checkpoint its trainable top
    layer got no gradient (silently: the connector still trained); and its fbank extractor failed on short audio with
    numpy's errors."""
    config = DeepTalkAudioConfig(
        audio_config=Wav2Vec2BertConfig(**W2V_BERT), text_config=tiny_config(), stack_factor=5
    )
    model = DeepTalkForConditionalGeneration(config).train()
    extractor = encoder_extractor(config.audio_config)
    batch = audio_batch(config, extractor, [[BOS, config.audio_token_id, 5]], [tone(300, 0.25)])
    set_training_stage(model, "align", also=model.audio_encoder_top_layers(1))
    model.activation_checkpointing_enable({"use_reentrant": True})
    model(**batch, labels=batch["input_ids"]).loss.backward()
    missing = [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]
    assert not missing, missing
    for samples in (1, 100):
        with pytest.raises(ValueError, match=f"audio 0 \\({samples} samples\\) is too short"):
            extract_audio_features([np.full(samples, 0.1, np.float32)], SAMPLING_RATE, extractor, config)


@pytest.mark.parametrize(
    "encoder_config",
    [
        Wav2Vec2Config(**CONV_ENCODER, do_stable_layer_norm=False),  # the stable variant: the wav2vec2 test above
        HubertConfig(**CONV_ENCODER, do_stable_layer_norm=False),
        HubertConfig(**CONV_ENCODER, do_stable_layer_norm=True),
        WavLMConfig(**CONV_ENCODER, do_stable_layer_norm=False),  # with its relative position bias
        WavLMConfig(**CONV_ENCODER, do_stable_layer_norm=True),
        Wav2Vec2BertConfig(**W2V_BERT),
    ],
    ids=["wav2vec2", "hubert", "hubert-stable", "wavlm", "wavlm-stable", "w2v-bert"],
)
def test_encoders_documented_batch_invariant_give_each_items_logits(encoder_config, one_thread):
    """docs/speech_input.md: layer-norm wav2vec2, HuBERT and WavLM (stable layer norm or not) and w2v-bert, without an
    adapter, give a padded batch its items' logits. 1900 samples make odd frame counts, where an adapter's stride-2 conv reaches the padding."""
    torch.manual_seed(0)
    config = DeepTalkAudioConfig(audio_config=encoder_config, text_config=tiny_config(), stack_factor=5)
    model = DeepTalkForConditionalGeneration(config).eval()
    extractor = encoder_extractor(encoder_config)
    audios = [tone(300, 1900 / SAMPLING_RATE), tone(600, 0.25)]
    texts = [[BOS, config.audio_token_id, 5], [BOS, config.audio_token_id, 6]]
    batch = audio_batch(config, extractor, texts, audios)
    batch_logits_are_its_items(model, extractor, texts, audios, batch)
    # One audio cut to its valid frames: without a mask every frame is valid (w2v-bert's are axis 1, not the last)
    alone = audio_batch(config, extractor, texts[1:], audios[1:])
    valid = int(alone["input_features_mask"].sum())
    unpadded = dict(alone, input_features=alone["input_features"][:, :valid], input_features_mask=None)
    with torch.no_grad():
        torch.testing.assert_close(model(**unpadded).logits, model(**alone).logits)


@pytest.fixture
def one_thread():
    """Tiny matrices run fastest on one thread, and a second one only waits on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_learns_to_transcribe_synthetic_tones(one_thread):
    """Four tones (two durations, so neither length nor position alone tells them apart) -> four short transcripts;
    the whole model trains. The loss must fall far below chance and greedy decoding must give every transcript."""
    torch.manual_seed(0)
    config = whisper_audio_config()
    model = DeepTalkForConditionalGeneration(config)
    audio_id = config.audio_token_id
    clips = [tone(300, 0.3), tone(1500, 0.3), tone(600, 0.6), tone(3000, 0.6)]
    transcripts = [[10, 20, 30], [40, 11, 21], [31, 41, 12], [22, 32, 42]]
    batch = audio_batch(config, whisper_features(), [[BOS, audio_id, SEP, *t, EOS] for t in transcripts], clips)
    ids = batch["input_ids"]
    answer = ((ids == SEP).cumsum(-1) > 0) & (ids != SEP) & batch["attention_mask"].bool()
    labels = ids.masked_fill(~answer, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(100):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    assert loss < 0.1, loss  # chance: ln(80) = 4.38

    prompts = audio_batch(config, whisper_features(), [[BOS, audio_id, SEP]] * 4, clips, padding_side="left")
    generated = model.generate(**prompts, max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    answers = [row[prompts["input_ids"].shape[1] :].tolist() for row in generated]
    assert [a[: a.index(EOS)] if EOS in a else a for a in answers] == transcripts


def test_asr_example_runs_and_transcribes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matrices: one thread is fastest, and shares a busy machine
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "asr_tiny.py")], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "reloaded as DeepTalkForConditionalGeneration" in result.stdout
    assert result.stdout.count(": ok") == 4, result.stdout


def audio_processor(tmp_path=None):
    """A tokenizer with `<|audio|>` in its text block, a Whisper feature extractor and the model config."""
    from tokenizers import AddedToken

    from deeptalk_hf import DeepTalkAudioProcessor, add_speech_tokens

    from .speech_fixtures import TEXT_VOCAB_SIZE, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("<|audio|>", special=True)])
    speech = add_speech_tokens(tokenizer, 8, text_vocab_size=TEXT_VOCAB_SIZE)
    text = tiny_config(vocab_size=speech.stop, speech_vocab_size=len(speech), pad_token_id=tokenizer.pad_token_id)
    config = whisper_audio_config(text_config=text, audio_token_id=tokenizer.convert_tokens_to_ids("<|audio|>"))
    return DeepTalkAudioProcessor(tokenizer, whisper_features(), config), config


def test_audio_processor_expands_placeholders_and_round_trips(tmp_path):
    from transformers import AutoProcessor

    processor, config = audio_processor()
    texts = ["hello <|audio|> world", "what <|audio|> is it <|audio|>"]
    audios = [[tone(300, 0.3)], [tone(500, 0.9), tone(700, 0.5)]]
    batch = processor(text=texts, audio=audios, sampling_rate=SAMPLING_RATE, padding=True, return_tensors="pt")
    tokens = [processor.tokenizer(t)["input_ids"] for t in texts]
    expected = audio_batch(config, processor.feature_extractor, tokens, [a for s in audios for a in s])
    for key in ("input_ids", "attention_mask", "modality_ids", "input_features", "input_features_mask"):
        assert torch.equal(batch[key], expected[key]), key
    model = DeepTalkForConditionalGeneration(config).eval()
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "DeepTalkAudioProcessor"
    again = loaded(text=texts, audio=audios, sampling_rate=SAMPLING_RATE, padding=True, return_tensors="pt")
    assert all(torch.equal(again[key], batch[key]) for key in batch)
    # The layout settings are saved too.
    processor.interleave, processor.text_speech_ratio = "speech_only", (4, 9)
    processor.save_pretrained(tmp_path / "layout")
    loaded = AutoProcessor.from_pretrained(tmp_path / "layout")
    assert (loaded.interleave, tuple(loaded.text_speech_ratio)) == ("speech_only", (4, 9))
    # So is a chat template of the user's (transformers passes at load only what `__init__` names).
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    processor = type(processor)(processor.tokenizer, processor.feature_extractor, config, chat_template=template)
    processor.save_pretrained(tmp_path / "template")
    loaded = AutoProcessor.from_pretrained(tmp_path / "template")
    chat = [{"role": "user", "content": "hello"}]
    assert loaded.chat_template == template and loaded.apply_chat_template(chat) == "[user]hello\n"


def test_audio_processor_passes_its_audio_kwargs_to_the_feature_extractor():
    # As transformers' processors (Qwen2-Audio) do: `audio_kwargs={"do_normalize": True}` reaches Whisper's extractor,
    # while the text's padding stays the text's (the extractor's own padding is set by the encoder's window).
    processor, _ = audio_processor()
    clip = 0.3 * tone(300, 0.5) + 0.1  # an offset that normalising removes
    extractor = processor.feature_extractor

    def features(**options):
        return extractor([clip], sampling_rate=SAMPLING_RATE, padding="max_length", return_tensors="pt", **options)

    plain = processor(text="hello <|audio|>", audio=clip, sampling_rate=SAMPLING_RATE, padding=True)
    normalised = processor(
        text="hello <|audio|>",
        audio=clip,
        sampling_rate=SAMPLING_RATE,
        padding=True,
        audio_kwargs={"do_normalize": True},
    )
    assert not torch.allclose(features()["input_features"], features(do_normalize=True)["input_features"])
    torch.testing.assert_close(plain["input_features"], features()["input_features"])
    torch.testing.assert_close(normalised["input_features"], features(do_normalize=True)["input_features"])
    assert normalised["input_ids"] == plain["input_ids"]


def test_audio_processor_loads_from_a_checkpoint_folder_without_a_saved_processor(tmp_path):
    # As AutoProcessor loads DeepTalkProcessor (and transformers' Qwen2-Audio) from a model folder: config.json,
    # tokenizer and feature extractor files, no processor_config.json.
    from transformers import AutoProcessor, WhisperConfig

    processor, config = audio_processor()
    config.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    processor.feature_extractor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    saved = {**loaded.audio_model_config.to_dict(), "_name_or_path": ""}  # the folder's path: the rest is the config
    assert type(loaded) is type(processor) and saved == config.to_dict()
    clip = tone(300, 0.5)
    inputs = {"text": "hello <|audio|>", "audio": clip, "sampling_rate": SAMPLING_RATE, "return_tensors": "pt"}
    for key, value in processor(**inputs).items():
        torch.testing.assert_close(loaded(**inputs)[key], value)
    WhisperConfig().save_pretrained(tmp_path)  # not the model's config: still refused, saying what to pass
    with pytest.raises(ValueError, match="pass audio_model_config="):
        type(processor).from_pretrained(tmp_path)


def test_audio_processor_takes_a_spoken_question_with_a_speech_answer_and_chat_turns():
    """`audio=` feeds the encoder and `speech_units=` the speech block in one call; the chat template renders audio
    blocks as `<|audio|>` and speech blocks as `<|speech|>`, and tokenizes to the same inputs as that call."""
    processor, config = audio_processor()
    question = tone(300, 0.3)
    both = processor(
        text="hi <|audio|> ok <|speech|>", audio=question, speech_units=[1, 2], sampling_rate=SAMPLING_RATE
    )
    alone = processor(text="hi <|audio|> ok", audio=question, sampling_rate=SAMPLING_RATE)
    assert both["input_ids"][0][: len(alone["input_ids"][0])] == alone["input_ids"][0]
    assert processor.decode(both["input_ids"][0]).speech_units == [[1, 2]]
    assert torch.equal(torch.as_tensor(both["input_features"]), torch.as_tensor(alone["input_features"]))
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": question, "sampling_rate": SAMPLING_RATE}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "speech", "units": [1, 2]}]},
    ]
    rendered = processor.apply_chat_template(conversation)
    assert rendered.count("<|audio|>") == 1 and rendered.count("<|speech|>") == 1
    encoded = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    expected = processor(
        text=rendered, audio=question, speech_units=[1, 2], sampling_rate=SAMPLING_RATE, return_tensors="pt"
    )
    assert all(torch.equal(encoded[key], expected[key]) for key in expected)
    with pytest.raises(ValueError, match="ends in an audio block, which feeds the audio encoder"):
        processor.apply_chat_template(conversation[:1], continue_final_message=True)
    # a batch whose audio entries are all None is text only, as audio=None
    texts = ["hi ok", "how are you"]
    without = processor(text=texts, padding=True)
    assert processor(text=texts, audio=[None, None], sampling_rate=SAMPLING_RATE, padding=True) == without
    assert processor(text=texts, audio=[None, None], padding=True) == without
    # an audio block at another rate is resampled to the feature extractor's
    conversation[0]["content"][0] = {
        "type": "audio",
        "audio": tone(300, 0.3)[::2],
        "sampling_rate": SAMPLING_RATE // 2,
    }
    resampled = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert resampled["input_ids"].shape == encoded["input_ids"].shape
    assert resampled["input_features"].shape == encoded["input_features"].shape


def test_audio_processor_masks_the_answers_after_a_spoken_question():
    """With the audio-encoder path one `<|audio|>` becomes the audio's positions: the assistant tokens mask (TRL's
    assistant-only loss) must still mark exactly the answer, its speech units and its `<|im_end|>`."""
    processor, _ = audio_processor()
    conversation = [
        {"role": "user", "content": [{"type": "audio", "audio": tone(300, 0.3), "sampling_rate": SAMPLING_RATE}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}, {"type": "speech", "units": [1, 2]}]},
    ]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    audio_id = processor.audio_model_config.audio_token_id
    assert ids.count(audio_id) > 1 and not any(m for token, m in zip(ids, mask) if token == audio_id)
    answer = [token for token, m in zip(ids, mask) if m]
    tokens = processor.tokenizer.convert_tokens_to_ids(["ok", "<|im_end|>"])
    begin, units = processor.begin_of_speech_id, [processor.speech_token_start + 1, processor.speech_token_start + 2]
    assert answer == [tokens[0], begin, *units, processor.end_of_speech_id, tokens[1]]
    assert ids[-len(answer) :] == answer


def test_audio_processor_refuses_bad_audio():
    processor, _ = audio_processor()
    with pytest.raises(ValueError, match="sampling_rate="):
        processor(text="hello <|audio|>", audio=tone(300, 0.3))
    with pytest.raises(ValueError, match="8000 Hz"):
        processor(text="hello <|audio|>", audio=tone(300, 0.3), sampling_rate=8000)
    with pytest.raises(ValueError, match="2 audio placeholders"):
        processor(text="<|audio|> <|audio|>", audio=tone(300, 0.3), sampling_rate=SAMPLING_RATE)
    with pytest.raises(ValueError, match=r"text\[1\] has an audio placeholder \(audio_token_id=\d+\) but no audio="):
        processor(text=["hello", "hello <|audio|>"])
    for bad, message in ((np.full(1600, np.nan, np.float32), "NaN"), (np.full(1600, 2000, np.int16), "int16")):
        with pytest.raises(ValueError, match=f"audio 0 .*{message}"):
            processor(text="hello <|audio|>", audio=bad, sampling_rate=SAMPLING_RATE)
    # As many audios as placeholders over the batch, but not per text: one text's audio must not fill another's.
    with pytest.raises(ValueError, match=r"text\[0\] has 2 audio placeholders .* but 1 audios were given for it"):
        processor(
            text=["<|audio|> <|audio|>", "hello"], audio=[tone(300, 0.3), tone(900, 0.5)], sampling_rate=SAMPLING_RATE
        )
    # bfloat16 samples are read as floats (numpy has no bfloat16).
    bf16 = torch.tensor(tone(300, 0.3)).bfloat16()
    expected = processor(text="hello <|audio|>", audio=bf16.float().numpy(), sampling_rate=SAMPLING_RATE)
    assert torch.equal(
        torch.as_tensor(processor(text="hello <|audio|>", audio=bf16, sampling_rate=SAMPLING_RATE)["input_features"]),
        torch.as_tensor(expected["input_features"]),
    )
    # Truncation may cut text, not an audio's placeholders (the audio fills all of them or none).
    kwargs = dict(audio=tone(300, 0.3), sampling_rate=SAMPLING_RATE)
    whole = processor(text="<|audio|> hello", **kwargs)["input_ids"][0]
    assert (
        processor(text="<|audio|> hello", truncation=True, max_length=len(whole) - 1, **kwargs)["input_ids"][0]
        == (whole[:-1])
    )
    with pytest.raises(ValueError, match=r"truncating text\[0\] to 2 ids would cut 1 of its audio positions"):
        processor(text="<|audio|> hello", truncation=True, max_length=2, **kwargs)


def test_composite_resizes_pass_every_argument_on_and_keep_the_placeholder():
    """The composite's resizes are the LLM's, with padding and `mean_resizing` as given; the placeholder check sees
    the padded size, and a speech block that would lose a placeholder at its end is refused, nothing changed."""
    model = DeepTalkForConditionalGeneration(
        whisper_audio_config(text_config=tiny_config(speech_vocab_size=0), audio_token_id=40)
    )
    reference = copy.deepcopy(model.language_model)
    for resize, size in ((model.resize_token_embeddings, 36), (reference.resize_token_embeddings, 48)):
        torch.manual_seed(0)
        resize(size, pad_to_multiple_of=48)  # 48 ids keep id 40
        torch.manual_seed(1)
        resize(96, mean_resizing=False)
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    # A placeholder added after the speech units (a tokenizer's new token lands there) is the last speech-block id.
    model = DeepTalkForConditionalGeneration(whisper_audio_config(text_config=tiny_config(), audio_token_id=79))
    with pytest.raises(ValueError, match="leaves out audio_token_id=79"):
        model.resize_speech_vocab(4)
    assert model.config.text_config.speech_vocab_size == 16 and model.get_input_embeddings().num_embeddings == 64


def test_resizing_the_speech_vocabulary_keeps_the_tie_map_and_round_trips(tmp_path):
    """The composite's map of tied parameters (gathered from the parts when it is built, read by `init_weights`,
    loading and device maps) follows a resize made through the composite or `fit_speech_vocab`."""
    config = whisper_audio_config(text_config=tiny_config(tie_word_embeddings=True), audio_token_id=40)
    model = DeepTalkForConditionalGeneration(config)
    speech_tie = {"language_model.speech_lm_head.weight": "language_model.model.speech_embed_tokens.weight"}
    assert speech_tie.items() <= model.all_tied_weights_keys.items()
    model.resize_speech_vocab(0)
    assert not speech_tie.keys() & model.all_tied_weights_keys.keys()
    model.init_weights()  # read a map naming the removed speech head, and failed
    processor = tiny_processor(8)
    # A vocabulary without the placeholder's id would save a config that cannot be loaded: refused, nothing changed.
    with pytest.raises(ValueError, match="leaves out audio_token_id=40"):
        model.resize_token_embeddings(40)
    assert model.get_input_embeddings().num_embeddings == model.config.text_config.vocab_size == 64
    model.resize_token_embeddings(processor.speech_tokens.start)
    fit_speech_vocab(model, processor.speech_tokens)
    processor.check_config(model.config)  # the LLM's config, read from the audio model's (an AttributeError before)
    with pytest.raises(ValueError, match="speech_vocab_size=11"):
        tiny_processor(4).check_config(model.config)
    assert speech_tie.items() <= model.all_tied_weights_keys.items()
    llm = model.language_model
    assert llm.speech_lm_head.weight is llm.model.speech_embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = DeepTalkForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.language_model.speech_lm_head.weight is loaded.language_model.model.speech_embed_tokens.weight
    ids = torch.tensor([[2, 5, processor.speech_tokens.start + 3, 7]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
