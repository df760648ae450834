"""Parallel text-speech streams: delay pattern, generation rules, batch parallel decoding, losses, isolation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import DataCollatorWithFlattening
from transformers.generation import GenerationConfig, LogitsProcessor

from deeptalk_hf import DeepTalkForCausalLM, profile_modality_load
from deeptalk_hf.generation_deeptalk import (
    AudioStreamReader,
    audio_codes_per_stream,
    build_delay_pattern,
    revert_delay_pattern,
    text_pad_token_id,
)
from deeptalk_hf.modeling_deeptalk import speech_positions

from .conftest import tiny_config


def parallel_config(**overrides):
    fields = dict(num_audio_streams=3, audio_codebook_size=10, audio_stream_delays=[1, 2, 4])
    fields.update(overrides)
    return tiny_config(**fields)


def text_query(config, batch=2, length=5):
    text = torch.randint(3, config.speech_token_start, (batch, 1, length))
    audio = torch.full((batch, config.num_audio_streams, length), config.audio_pad_token_id)
    return torch.cat([text, audio], dim=1)


def test_a_padding_free_batch_of_parallel_streams_packs_along_the_sequence():
    """`DataCollatorWithFlattening` cannot flatten `[1 + S, seq]` items (it fails); packed by hand along the sequence,
    with positions restarting and -100 on each item's first label, each item's logits and the loss are the padded
    batch's."""
    config = parallel_config()
    model = DeepTalkForCausalLM(config).train()
    items = []
    for length in (5, 7):
        ids = torch.randint(0, config.audio_codebook_size, (1 + config.num_audio_streams, length))
        ids[0] = torch.randint(3, config.speech_token_start, (length,))
        items.append(ids)
    with pytest.raises((ValueError, TypeError)):
        DataCollatorWithFlattening()([{"input_ids": ids} for ids in items])
    input_ids = torch.cat(items, dim=-1)[None]
    labels = input_ids.clone()
    labels[..., [0, 5]] = -100
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed = model(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False)
    padded_ids = torch.stack([F.pad(ids, (0, 7 - ids.shape[-1])) for ids in items])
    padded_labels = torch.stack([F.pad(ids, (0, 7 - ids.shape[-1]), value=-100) for ids in items])
    padded_labels[..., 0] = -100
    mask = torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
    padded = model(input_ids=padded_ids, labels=padded_labels, attention_mask=mask, use_cache=False)
    for i, (start, length) in enumerate([(0, 5), (5, 7)]):
        torch.testing.assert_close(packed.logits[0, start : start + length], padded.logits[i, :length])
        torch.testing.assert_close(
            packed.audio_logits[0, :, start : start + length], padded.audio_logits[i, :, :length]
        )
    torch.testing.assert_close(packed.loss, padded.loss)


@given(
    streams=st.integers(1, 7),
    frames=st.integers(0, 9),
    batch=st.integers(1, 3),
    data=st.data(),
)
def test_delay_pattern_round_trip(streams, frames, batch, data):
    delays = data.draw(st.lists(st.integers(1, 8), min_size=streams, max_size=streams))
    config = tiny_config(num_audio_streams=streams, audio_codebook_size=16, audio_stream_delays=delays)
    codes = torch.randint(0, 16, (batch, streams, frames))
    delayed = build_delay_pattern(codes, config)
    assert delayed.shape == (batch, streams, frames + max(delays) + 1)
    assert torch.equal(revert_delay_pattern(delayed, config), codes)
    for s, delay in enumerate(delays):
        assert (delayed[:, s, : delay - 1] == config.audio_pad_token_id).all()
        assert (delayed[:, s, delay - 1] == config.audio_bos_token_id).all()
        assert (delayed[:, s, delay + frames] == config.audio_eos_token_id).all()
    for item in range(batch):
        assert all(torch.equal(a, b) for a, b in zip(audio_codes_per_stream(delayed, config)[item], codes[item]))


def codes_between_begin_and_end(stream: list[int], config) -> list[int]:
    """The documented rule on a whole stream: the codes after its first begin code (from the start without one), up
    to the first end code after that, without pad or other non-code ids."""
    start = stream.index(config.audio_bos_token_id) + 1 if config.audio_bos_token_id in stream else 0
    rest = stream[start:]
    stop = rest.index(config.audio_eos_token_id) if config.audio_eos_token_id in rest else len(rest)
    return [code for code in rest[:stop] if 0 <= code < config.audio_codebook_size]


@given(data=st.data())
def test_the_step_by_step_reader_reads_what_the_whole_answer_gives(data):
    """Any ids (codes, pad, begin and end codes in any order, repeated): `AudioStreamReader` after each step, and
    `audio_codes_per_stream` of the steps so far, hold what the rule gives on the whole streams so far."""
    config = parallel_config()
    ids = st.integers(-1, config.audio_codebook_size + 2)  # -1 (as a label's -100), codes, pad, begin and end codes
    steps = data.draw(st.lists(st.lists(ids, min_size=3, max_size=3), max_size=12))
    reader = AudioStreamReader(config)
    for t, step in enumerate(steps):
        reader.push(step)
        expected = [codes_between_begin_and_end(list(stream), config) for stream in zip(*steps[: t + 1])]
        assert reader.codes == expected
        read = audio_codes_per_stream(torch.tensor(steps[: t + 1], dtype=torch.int32).T[None], config)[0]
        assert [codes.tolist() for codes in read] == expected
        assert all(codes.dtype == torch.int32 for codes in read)  # the ids' own dtype


def test_build_delay_pattern_rejects_codes_out_of_range():
    """Past the codebook, or negative (a -1 or labels' -100 left in would be laid into the streams as a code)."""
    config = parallel_config()
    with pytest.raises(ValueError, match="audio codes"):
        build_delay_pattern(torch.full((1, 3, 2), 10), config)
    codes = torch.zeros((1, 3, 2), dtype=torch.long)
    codes[0, 1, 1] = -1
    with pytest.raises(ValueError, match="audio codes"):
        build_delay_pattern(codes, config)


@pytest.mark.parametrize("streams", [2, 4])
@pytest.mark.parametrize("read", [revert_delay_pattern, audio_codes_per_stream])
def test_reading_the_streams_back_refuses_another_stream_count(streams, read):
    """Streams are read with the config's delays: too few gave an IndexError (or were read silently), extra ones were
    dropped, or read as audio (the text stream left in); a `[S, frames]` tensor is named too."""
    config = parallel_config()
    with pytest.raises(ValueError, match=f"streams have {streams} streams but the config has 3"):
        read(torch.full((1, streams, 8), config.audio_pad_token_id), config)
    with pytest.raises(ValueError, match=r"streams must be a tensor \[batch, 3 streams, length\], got \(3, 8\)"):
        read(torch.full((3, 8), config.audio_pad_token_id), config)


def test_without_parallel_fields_there_are_no_stream_weights():
    names = [name for name, _ in DeepTalkForCausalLM(tiny_config()).named_parameters()]
    assert not any("stream" in name for name in names)


def test_text_positions_of_a_parallel_model_equal_the_single_stream_model():
    parallel = DeepTalkForCausalLM(parallel_config()).eval()
    single = DeepTalkForCausalLM(tiny_config()).eval()
    missing, unexpected = single.load_state_dict(parallel.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"model.speech_stream_embed.weight", "speech_stream_heads.weight"}
    query = text_query(parallel.config)
    with torch.no_grad():
        assert torch.equal(parallel(query).logits, single(query[:, 0]).logits)


def test_each_stream_reads_its_own_rows_of_the_shared_table():
    """Stream s's code c embeds as row `(s - 1) * audio_stream_vocab_size + c` of the shared table, added to the text
    embedding (pad adds nothing): without the offset every stream would read stream 1's rows, and the model could not
    tell the codebook levels apart."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(parallel_config()).eval()
    config, decoder = model.config, model.model
    text, table = decoder.embed_tokens.weight, decoder.speech_stream_embed.weight
    ids = torch.tensor([[5, 3, config.audio_pad_token_id, 7]])[..., None]  # text 5; stream 1: code 3; stream 3: code 7
    expected = text[5] + table[3] + table[2 * config.audio_stream_vocab_size + 7]
    with torch.no_grad():
        torch.testing.assert_close(decoder.embed(ids)[0, 0], expected, rtol=0, atol=1e-6)
        # The fused heads likewise: stream s's logits come from rows `(s - 1) * V` to `s * V` of the head's weight.
        hidden = torch.randn(1, 1, config.hidden_size)
        logits, head = model.audio_stream_logits(hidden), model.speech_stream_heads.weight
        vocab = config.audio_stream_vocab_size
        for s in range(config.num_audio_streams):
            torch.testing.assert_close(logits[0, s, 0], hidden[0, 0] @ head[s * vocab : (s + 1) * vocab].T)


def test_parallel_generation_follows_the_pattern_and_cache_changes_nothing():
    torch.manual_seed(3)
    model = DeepTalkForCausalLM(parallel_config()).eval()
    config = model.config
    query = text_query(config)
    kwargs = dict(max_new_tokens=14, do_sample=False)
    cached = model.generate(query, **kwargs)
    assert cached.shape[:2] == (2, 4) and torch.equal(cached[:, :, :5], query)
    assert torch.equal(cached, model.generate(query, use_cache=False, **kwargs))
    answer = cached[:, 1:, 5:]
    for s, delay in enumerate(config.audio_stream_delays):
        assert (answer[:, s, : delay - 1] == config.audio_pad_token_id).all()
        assert (answer[:, s, delay - 1] == config.audio_bos_token_id).all()
        assert (answer[:, s, delay:] != config.audio_bos_token_id).all()
    for item in audio_codes_per_stream(answer, config):
        for codes in item:
            assert ((codes >= 0) & (codes < config.audio_codebook_size)).all()


def test_each_audio_stream_follows_its_own_delay_in_any_order():
    """Delays need not increase with the stream (the config takes any >= 1): stream s pads for its own
    `delay - 1` steps, then emits its begin code, then codes."""
    torch.manual_seed(3)
    model = DeepTalkForCausalLM(parallel_config(audio_stream_delays=[4, 1, 2])).eval()
    config = model.config
    answer = model.generate(text_query(config, batch=1), max_new_tokens=6, do_sample=False)[:, 1:, 5:]
    for s, delay in enumerate(config.audio_stream_delays):
        assert (answer[:, s, : delay - 1] == config.audio_pad_token_id).all()
        assert (answer[:, s, delay - 1] == config.audio_bos_token_id).all()
        assert (answer[:, s, delay:] != config.audio_bos_token_id).all()


class PreferAudioEnd(LogitsProcessor):
    """A user processor: every row prefers the audio end code (the pattern still decides where it may go)."""

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos] += 1e4
        return scores


def test_generation_stops_when_every_audio_stream_has_ended():
    model = DeepTalkForCausalLM(parallel_config()).eval()
    config = model.config
    query = text_query(config, batch=1)
    out = model.generate(
        query, max_new_tokens=30, do_sample=False, logits_processor=[PreferAudioEnd(config.audio_eos_token_id)]
    )
    # Each stream: pads, begin at delay - 1, end right after; the last stream's end closes the answer.
    assert out.shape[-1] == 5 + max(config.audio_stream_delays) + 1
    for s, delay in enumerate(config.audio_stream_delays):
        assert out[0, s + 1, 5 + delay] == config.audio_eos_token_id
        assert (out[0, s + 1, 5 + delay + 1 :] == config.audio_pad_token_id).all()


class AudioEndsAt(LogitsProcessor):
    """Row r may not emit the audio end code before step `ends[r]` and emits it as soon as it may from then on (the
    delay pattern decides when an audio row may; text rows get 0 and their ids are not checked)."""

    def __init__(self, prompt_length: int, ends: list[int], config):
        self.prompt_length, self.ends, self.eos = prompt_length, torch.tensor(ends), config.audio_eos_token_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        may_end = input_ids.shape[1] - self.prompt_length >= self.ends
        scores[:, self.eos] = torch.where(may_end, 1e4, -float("inf"))
        return scores


ENDING_MODEL = DeepTalkForCausalLM(parallel_config()).eval()


@given(data=st.data())
def test_each_stream_ends_when_it_may_and_generation_stops_with_the_last(data):
    """Left-padded items of different lengths, each audio stream ending at its own step: stream s of item b pads until
    its begin code at delay - 1, ends at its first free step from its end step on, then pads; generation stops at the
    step after the batch's last end (or at max_new_tokens)."""
    model = ENDING_MODEL
    config, batch = model.config, data.draw(st.integers(1, 3))
    lengths = data.draw(st.lists(st.integers(1, 4), min_size=batch, max_size=batch))
    ends = data.draw(st.lists(st.integers(0, 8), min_size=3 * batch, max_size=3 * batch))
    max_new = data.draw(st.integers(1, 10))
    query, prompt = text_query(config, batch, max(lengths)), max(lengths)
    for item, length in enumerate(lengths):
        query[item, 0, : prompt - length] = config.pad_token_id
    rows = [0 if s == 0 else ends[3 * b + s - 1] for b in range(batch) for s in range(4)]
    out = model.generate(
        query, max_new_tokens=max_new, do_sample=False, logits_processor=[AudioEndsAt(prompt, rows, config)]
    )
    end_steps = [
        [max(ends[3 * b + s], delay) for s, delay in enumerate(config.audio_stream_delays)] for b in range(batch)
    ]
    assert out.shape[-1] - prompt == min(max_new, max(map(max, end_steps)) + 1)
    for b in range(batch):
        for s, delay in enumerate(config.audio_stream_delays):
            pattern = [config.audio_pad_token_id] * (delay - 1) + [config.audio_bos_token_id]
            pattern += [None] * (end_steps[b][s] - delay) + [config.audio_eos_token_id]
            pattern += [config.audio_pad_token_id] * (out.shape[-1] - prompt - len(pattern))
            got = out[b, s + 1, prompt:].tolist()
            assert [g if p is None else p for g, p in zip(got, pattern)] == got
            assert all(g < config.audio_codebook_size for g, p in zip(got, pattern) if p is None)


def test_the_text_of_a_speech_answer_runs_until_its_last_audio_stream_ends():
    """The text stream is forced to pad once every audio stream of its item has ended, not at the first end. Here
    `AudioEndsAt` also pushes the text rows to one id (the audio end code's column), so only the pattern pads them."""
    model = ENDING_MODEL
    config = model.config
    query = text_query(config, batch=1)
    out = model.generate(
        query, max_new_tokens=12, do_sample=False, logits_processor=[AudioEndsAt(5, [0, 1, 2, 7], config)]
    )
    assert out.shape[-1] == 5 + 8  # the last stream ends at step 7
    assert out[0, 3, -1] == config.audio_eos_token_id
    assert out[0, 0, 5:].tolist() == [config.audio_eos_token_id] * 8
    # A text that ends first (its end id at step 0) ends the text alone: the speech goes on to its last stream's end.
    end_text = AudioEndsAt(5, [0, 1, 2, 7], config)
    out = model.generate(
        query, max_new_tokens=12, do_sample=False, eos_token_id=config.audio_eos_token_id, logits_processor=[end_text]
    )
    assert out.shape[-1] == 5 + 8 and out[0, 3, -1] == config.audio_eos_token_id
    assert out[0, 0, 5:].tolist() == [config.audio_eos_token_id] + [config.pad_token_id] * 7


def test_batch_parallel_text_equals_text_only_generation():
    torch.manual_seed(5)
    model = DeepTalkForCausalLM(parallel_config()).eval()
    query = text_query(model.config)
    kwargs = dict(max_new_tokens=10, do_sample=False)
    text_only = model.generate(query, speech_answer=False, **kwargs)
    assert (text_only[:, 1:] == model.config.audio_pad_token_id).all()
    assert torch.equal(model.generate(query, speech_answer=0, **kwargs), text_only)  # any false value
    parallel = model.generate(query, batch_parallel=True, **kwargs)
    length = min(parallel.shape[-1], text_only.shape[-1])
    assert torch.equal(parallel[:, 0, :length], text_only[:, 0, :length])
    alone = model.generate(query, **kwargs)
    assert not torch.equal(alone[:, 0, 5:length], text_only[:, 0, 5:length])  # the copy really drives the text


def test_the_speech_answer_of_batch_parallel_decoding_is_conditioned_on_its_copys_text():
    """Teacher-forced on the returned streams (the copy's text as the text stream), the model's greedy pick among the
    codes and the end code is each generated audio code: the answer's audio was decoded reading the copy's text."""
    torch.manual_seed(5)
    model = DeepTalkForCausalLM(parallel_config(initializer_range=0.3)).eval()
    config = model.config
    query = text_query(config)
    parallel = model.generate(query, batch_parallel=True, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        audio_logits = model(parallel).audio_logits[:, :, 5 - 1 : -1]
    audio_logits[..., [config.audio_pad_token_id, config.audio_bos_token_id]] = -float("inf")
    generated = parallel[:, 1:, 5:]
    is_code = generated < config.audio_codebook_size
    assert is_code.sum() >= 10
    assert torch.equal(audio_logits.argmax(-1)[is_code], generated[is_code])


@pytest.mark.parametrize("batch_parallel", [False, True])
def test_returned_scores_are_per_flattened_row(batch_parallel):
    """`sequences` is `[batch, 1 + S, seq]`; each step's scores keep generate's rows (`b * (1 + S) + s`, the
    text-only copies after the items), so the greedy pick of each row is its id in the returned streams."""
    model = DeepTalkForCausalLM(parallel_config()).eval()
    query = text_query(model.config)
    out = model.generate(
        query, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True,
        batch_parallel=batch_parallel,
    )  # fmt: skip
    picks = torch.stack([scores.argmax(-1) for scores in out.scores], dim=-1).view(-1, 4, len(out.scores))
    if batch_parallel:  # the answer's text stream is its copy's
        picks = torch.cat([picks[2:, :1], picks[:2, 1:]], dim=1)
    assert torch.equal(picks, out.sequences[:, :, 5:])


@pytest.mark.parametrize("delays", [[1, 2, 4], [2, 3, 4]])
def test_a_speech_prompt_with_a_padded_text_stream_is_not_padding(delays):
    """Without an attention mask, a position is padding only where the text stream and every audio stream pad before
    the prompt begins: a speech query (text pad beside audio codes, some streams still in their delay, and with every
    delay above 1 a first audio column of pads only, after the text) attends to all its positions."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(parallel_config(initializer_range=0.3, audio_stream_delays=delays)).eval()
    config = model.config
    audio = build_delay_pattern(torch.randint(0, config.audio_codebook_size, (2, 3, 3)), config)
    spoken = torch.cat([torch.full((2, 1, audio.shape[-1]), config.pad_token_id), audio], dim=1)
    query = torch.cat([text_query(config, length=3), spoken], dim=-1)
    options = dict(max_new_tokens=6, do_sample=False)
    expected = model.generate(query, attention_mask=torch.ones(2, query.shape[-1], dtype=torch.long), **options)
    assert torch.equal(model.generate(query, **options), expected)
    padded = torch.cat([text_query(config, length=2).fill_(config.pad_token_id), query], dim=-1)
    padded[:, 1:, :2] = config.audio_pad_token_id  # two columns of left padding, masked as such
    assert torch.equal(model.generate(padded, **options)[:, :, 2:], expected)
    # A prompt that opens with the speech: its first column (text pad, a begin code beside streams still in their
    # delay) is part of it too. (With every delay above 1 that column is all pad: left padding, without the mask.)
    if min(delays) == 1:
        ones = torch.ones(2, spoken.shape[-1], dtype=torch.long)
        assert torch.equal(model.generate(spoken, **options), model.generate(spoken, attention_mask=ones, **options))


def test_stream_losses_are_weighted_means_of_each_stream():
    config = parallel_config(stream_loss_weights=[1.0, 0.5, 0.25, 2.0], router_aux_loss_coef=0.0)
    model = DeepTalkForCausalLM(config).eval()
    codes = torch.randint(0, 10, (2, 3, 4))
    audio = build_delay_pattern(codes, config)
    text = torch.randint(3, config.speech_token_start, (2, 1, audio.shape[-1]))
    ids = torch.cat([text, audio], dim=1)
    out = model(ids, labels=ids)
    ce = torch.nn.functional.cross_entropy
    terms = [ce(out.logits[:, :-1].flatten(0, 1), ids[:, 0, 1:].flatten())]
    for s in range(3):
        terms.append(ce(out.audio_logits[:, s, :-1].flatten(0, 1), ids[:, s + 1, 1:].flatten()))
    expected = sum(w * t for w, t in zip(config.stream_loss_weights, terms)) / sum(config.stream_loss_weights)
    torch.testing.assert_close(out.loss, expected)
    # Flattened as generate lays them out, the same loss.
    torch.testing.assert_close(model(ids.flatten(0, 1), labels=ids.flatten(0, 1)).loss, expected)
    # A stream without labels (the audio of a text-only batch) has no loss: the mean is over the other streams.
    text_only = ids.clone()
    text_only[:, 1:] = -100
    torch.testing.assert_close(model(ids, labels=text_only).loss, terms[0])
    # Streams with different label counts: each is the mean over its own labels.
    fewer = ids.clone()
    fewer[:, 2, :6] = -100
    terms[2] = ce(out.audio_logits[:, 1, :-1].flatten(0, 1), fewer[:, 2, 1:].flatten())
    expected = sum(w * t for w, t in zip(config.stream_loss_weights, terms)) / sum(config.stream_loss_weights)
    torch.testing.assert_close(model(ids, labels=fewer).loss, expected)
    # No labels at all: a zero loss that still backpropagates (zeros, not NaN).
    nothing = model(ids, labels=torch.full_like(ids, -100)).loss
    nothing.backward()
    assert nothing == 0 and all(not p.grad.isnan().any() for p in model.parameters() if p.grad is not None)
    # Trainer must not hand over its token count, which counts every stream (each stream is its own mean).
    assert not model.accepts_loss_kwargs and DeepTalkForCausalLM(tiny_config()).accepts_loss_kwargs
    with pytest.raises(ValueError, match=r"labels has shape \(2, 9\)"):
        model(ids, labels=ids[:, 0])
    # Embeddings in place of the ids (`model.model.embed`), with the ids' modality: the same loss.
    modality_ids = speech_positions(config, ids, None, ids.shape[::2], ids.device).long()
    embedded = model(inputs_embeds=model.model.embed(ids), modality_ids=modality_ids, labels=ids)
    torch.testing.assert_close(embedded.loss, out.loss)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 9\); the streams need .* = \(2, 4, 9\)"):
        model(inputs_embeds=model.model.embed(ids), modality_ids=modality_ids, labels=ids[:, 0])


def test_streams_asked_for_at_load_time_are_added_as_new_tables(tmp_path):
    """A checkpoint without parallel streams (an upcycled model) loaded with `num_audio_streams`: the stream tables
    are new and initialised like the model's, and a text query's text logits are the single-stream model's."""
    source = DeepTalkForCausalLM(tiny_config()).eval()
    source.save_pretrained(tmp_path)
    model = DeepTalkForCausalLM.from_pretrained(tmp_path, num_audio_streams=3, audio_codebook_size=10).eval()
    for table in (model.model.speech_stream_embed.weight, model.speech_stream_heads.weight):
        assert abs(table.std().item() - model.config.initializer_range) < 0.1 * model.config.initializer_range
    query = text_query(model.config)
    with torch.no_grad():
        torch.testing.assert_close(model(query).logits, source(query[:, 0]).logits, rtol=0, atol=0)
    # Other missing tensors are still refused, naming them.
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="the checkpoint lacks .*model.norm.weight"):
        DeepTalkForCausalLM.from_pretrained(tmp_path, num_audio_streams=3, audio_codebook_size=10)
    # A checkpoint saved with streams that lost its tables (one or both) is corrupt, not a request for new ones.
    DeepTalkForCausalLM(parallel_config()).save_pretrained(tmp_path / "parallel")
    weights = load_file(tmp_path / "parallel" / "model.safetensors")
    for lost in (["speech_stream_heads.weight"], ["speech_stream_heads.weight", "model.speech_stream_embed.weight"]):
        save_file(
            {key: value for key, value in weights.items() if key not in lost},
            tmp_path / "parallel" / "model.safetensors",
            metadata={"format": "pt"},
        )
        with pytest.raises(ValueError, match="the checkpoint lacks .*speech_stream_heads.weight"):
            DeepTalkForCausalLM.from_pretrained(tmp_path / "parallel")


def test_torch_compile_fullgraph_trains_like_eager_mode():
    """The stream losses are computed in tensors (a stream without labels weighted 0, no host sync), so a parallel-
    stream model compiles whole: the same loss and gradients as eager mode, with a stream that has no labels."""
    model = DeepTalkForCausalLM(parallel_config(router_z_loss_coef=0.01)).train()
    reference = copy.deepcopy(model)
    audio = build_delay_pattern(torch.randint(0, 10, (2, 3, 4)), model.config)
    ids = torch.cat([torch.randint(3, model.config.speech_token_start, (2, 1, audio.shape[-1])), audio], dim=1)
    labels = ids.clone()
    labels[:, 2] = -100
    model(ids, labels=labels)  # one eager call first: transformers installs its output hooks under a lock
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out, expected = compiled(ids, labels=labels), reference(ids, labels=labels)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    for (name, param), other in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, other.grad, msg=name)


def test_bad_stream_ids_and_layouts_are_refused_by_name():
    model = DeepTalkForCausalLM(parallel_config()).eval()
    ids = text_query(model.config, batch=1)
    for stream, bad in [(1, model.config.audio_stream_vocab_size), (3, -1)]:
        wrong = ids.clone()
        wrong[0, stream, 2] = bad  # the streams share one table: it would read another stream's row
        with pytest.raises(ValueError, match=f"input_ids: audio stream {stream} holds {bad}, outside"):
            model(wrong)
    with pytest.raises(ValueError, match="for a model with parallel audio streams"):
        DeepTalkForCausalLM(tiny_config())(ids[:, :1])


def test_labels_outside_their_streams_vocabulary_are_refused_by_name():
    """torch's cross entropy said "Target 13 is out of bounds" (a device assert on a GPU), naming no stream; -100 and
    every id of a stream's own vocabulary (codes, pad, begin, end) stay labels."""
    model = DeepTalkForCausalLM(parallel_config()).eval()
    config = model.config
    ids = text_query(config, batch=1)
    labels = ids.clone()
    labels[0, 1:, 1:] = torch.arange(config.audio_stream_vocab_size - 4, config.audio_stream_vocab_size)
    labels[0, :, 0] = -100
    model(ids, labels=labels)  # accepted
    for stream, bad in [(2, config.audio_stream_vocab_size), (3, -1)]:
        wrong = labels.clone()
        wrong[0, stream, 3] = bad
        with pytest.raises(ValueError, match=f"labels: audio stream {stream} holds {bad}, outside"):
            model(ids, labels=wrong)
        with pytest.raises(ValueError, match=f"audio stream {stream}"):  # generate's flattened rows too
            model(ids.flatten(0, 1), labels=wrong.flatten(0, 1))
    wrong = labels.clone()
    wrong[0, 0, 2] = config.vocab_size
    with pytest.raises(ValueError, match=f"labels: the text stream holds {config.vocab_size}, outside"):
        model(ids, labels=wrong)


def test_flattened_input_takes_one_row_per_stream_and_refuses_other_layouts():
    """2D ids are the streams flattened into rows, as `generate` lays them out; an item's mask ([batch, seq]) was read
    as if it had one row per stream (`mask[::1 + S]`) and gave other items' masks, silently; so were an item's
    position ids."""
    model = DeepTalkForCausalLM(parallel_config()).eval()
    ids = text_query(model.config, batch=4)
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        flat = model(ids.flatten(0, 1), attention_mask=mask.repeat_interleave(4, dim=0)).logits
        assert torch.equal(flat.view(4, 4, 5, -1)[:, 0, :, : expected.shape[-1]], expected)
        for rows, mask_rows in [(16, 4), (15, 15)]:
            with pytest.raises(ValueError, match=r"2D input_ids are the 4 streams of each item flattened into rows"):
                model(ids.flatten(0, 1)[:rows], attention_mask=torch.ones(mask_rows, 5, dtype=torch.long))
        # The same for position_ids (e.g. packed sequences restarting at 0): one row per row, or one for all rows.
        positions = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
        expected = model(ids, position_ids=positions, use_cache=False).logits
        flat = model(ids.flatten(0, 1), position_ids=positions.repeat_interleave(4, dim=0), use_cache=False).logits
        assert torch.equal(flat.view(4, 4, 5, -1)[:, 0, :, : expected.shape[-1]], expected)
        shared = model(ids.flatten(0, 1), position_ids=positions[3:], use_cache=False).logits
        assert torch.equal(shared, model(ids.flatten(0, 1), position_ids=positions[[3] * 16], use_cache=False).logits)
        with pytest.raises(
            ValueError,
            match=r"one attention_mask and position_ids row per row .*: got 16 rows, None mask rows and 4 position_ids",
        ):
            model(ids.flatten(0, 1), position_ids=positions)


def test_audio_positions_route_as_speech():
    config = parallel_config(num_speech_experts=[2, 2])
    model = DeepTalkForCausalLM(config).eval()
    ids = text_query(config, batch=1, length=6)
    ids[0, 1, 3:5] = 4  # stream 1 carries codes at positions 3 and 4, the last stream alone at 5 (a delayed tail)
    ids[0, -1, 5] = 4
    out = model(ids, output_router_logits=True)
    perturbed = DeepTalkForCausalLM(config).eval()
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        # The last layer's: each position's logits then change only where that position itself routes as speech.
        perturbed.model.layers[-1].mlp.speech_experts.down_proj.add_(1.0)
        changed = perturbed(ids).logits
    assert (changed[0] != out.logits[0]).any(-1).tolist() == [False] * 3 + [True] * 3


def test_wrong_stream_count_no_prompt_or_a_mask_of_another_shape_is_refused():
    model = DeepTalkForCausalLM(parallel_config())
    with pytest.raises(ValueError, match=r"parallel-stream generation takes input_ids of shape \[batch, 4, seq\]"):
        model.generate(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"takes input_ids of shape \[batch, 4, seq\] .*, got None"):
        model.generate(max_new_tokens=2)
    query = text_query(model.config)  # 2 items of 5 positions
    for mask in (torch.ones(8, 5), torch.ones(2, 4), torch.ones(2, 4, 5)):  # per stream, short, per-stream 3D
        with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq\] = \(2, 5\)"):
            model.generate(query, attention_mask=mask.long(), max_new_tokens=2)


def test_without_a_pad_id_the_text_pad_is_the_first_end_id():
    """transformers' fallback: `eos_token_id[0]`, for the pattern, the prompt's padding and `generate`'s check."""
    config = parallel_config(pad_token_id=None, eos_token_id=[7, 1])
    assert text_pad_token_id(config) == 7 and text_pad_token_id(parallel_config(pad_token_id=2)) == 2
    model = DeepTalkForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"pad_token_id=1: parallel-stream generation pads with the config's .*\(7\)"):
        model.generate(text_query(config, batch=1), max_new_tokens=2, pad_token_id=1)
    # A pad that is an end id may open a prompt (BOS = EOS, as in GPT-2's vocabulary): without a mask nothing is read
    # as padding (it masked the BOS).
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(
        parallel_config(pad_token_id=None, eos_token_id=2, bos_token_id=2, initializer_range=0.3)
    ).eval()
    query = text_query(model.config, batch=1)
    query[0, 0, 0] = 2
    options = dict(max_new_tokens=4, do_sample=False, speech_answer=False)
    expected = model.generate(query, attention_mask=torch.ones(1, query.shape[-1], dtype=torch.long), **options)
    assert torch.equal(model.generate(query, **options), expected)


def test_the_configs_pad_id_may_be_passed_another_is_refused():
    model = DeepTalkForCausalLM(parallel_config()).eval()
    query = text_query(model.config, batch=1)
    options = dict(max_new_tokens=5, do_sample=False)
    expected = model.generate(query, **options)
    assert torch.equal(model.generate(query, pad_token_id=model.config.pad_token_id, **options), expected)
    with pytest.raises(ValueError, match="pad_token_id=7: parallel-stream generation pads with the config's"):
        model.generate(query, pad_token_id=7, **options)


def test_the_text_stream_ends_at_the_end_ids_of_the_argument_or_the_generation_config():
    """As in transformers: an `eos_token_id` argument, else the generation config's (one id or several), else the
    model config's. A text-only answer stops right after its text stream emits one of them."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(parallel_config()).eval()
    config, query = model.config, text_query(model.config, batch=1)
    options = dict(max_new_tokens=8, do_sample=False, speech_answer=False)
    free = model.generate(query, **options)[0, 0, query.shape[-1] :].tolist()
    step = next(i for i, token in enumerate(free) if token not in free[:i] and token != config.eos_token_id)
    assert step < len(free) - 1  # it ends early below
    stopped = model.generate(query, eos_token_id=free[step], **options)
    assert stopped[0, 0, query.shape[-1] :].tolist() == free[: step + 1]
    model.generation_config.eos_token_id = [config.eos_token_id, free[step]]
    assert torch.equal(model.generate(query, **options), stopped)
    # A given `GenerationConfig` takes the model's end ids where it sets none, as transformers fills it.
    given = GenerationConfig(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(query, given, speech_answer=False), stopped)


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(num_beams=2), "num_beams > 1"),
        (dict(num_return_sequences=2, do_sample=True), "num_return_sequences > 1"),
        (dict(cache_implementation="static"), "cache_implementation='static'"),
        (dict(modality_ids=torch.zeros(4, 5, dtype=torch.long)), "modality_ids"),
        (dict(min_new_tokens=2), "min_new_tokens / min_length"),
        (dict(min_length=8), "min_new_tokens / min_length"),
        (dict(prompt_lookup_num_tokens=2), r"assisted decoding \("),
        (dict(assistant_early_exit=1), r"assisted decoding \("),
        (dict(assistant_early_exit=0), r"assisted decoding \("),  # transformers assists on any value set
        # end-id options: the text's end id would be forced on, or read from, the audio rows too
        (dict(forced_eos_token_id=1), "forced_eos_token_id / exponential_decay_length_penalty"),
        (dict(exponential_decay_length_penalty=(2, 1.5)), "forced_eos_token_id / exponential_decay_length_penalty"),
        (dict(stop_strings=["hello"]), "stop_strings"),  # only the text row spells it: the item never stopped
    ],
)
def test_options_that_would_split_an_items_streams_are_refused_by_name(options, named):
    """Given as keywords, in a `GenerationConfig`, or in the model's own generation config (from which transformers
    fills a given config's unset fields), as transformers would run them."""
    model = DeepTalkForCausalLM(parallel_config()).eval()
    query = text_query(model.config, batch=1)
    with pytest.raises(ValueError, match=f"does not support {named}"):
        model.generate(query, max_new_tokens=3, **options)
    generation_options = {k: v for k, v in options.items() if k != "modality_ids"}
    if generation_options:
        with pytest.raises(ValueError, match=f"does not support {named}"):
            model.generate(query, GenerationConfig(max_new_tokens=3, **generation_options))
        model.generation_config.update(**generation_options)
        with pytest.raises(ValueError, match=f"does not support {named}"):
            model.generate(query, GenerationConfig(max_new_tokens=3))


def test_a_static_cache_object_is_refused_by_name():
    from transformers import StaticCache

    model = DeepTalkForCausalLM(parallel_config()).eval()
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="does not support a StaticCache"):
        model.generate(text_query(model.config, batch=1), max_new_tokens=3, cache=cache)


def test_free_audio_rows_emit_only_codes_and_their_end():
    """Audio specials need not follow the codes: an id between the codes and the specials is neither, and reading the
    codes back would drop it and shift the later frames, so the pattern never lets an audio stream emit it."""
    config = parallel_config(
        initializer_range=0.3, audio_pad_token_id=20, audio_bos_token_id=21, audio_eos_token_id=22
    )
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(config).eval()
    query = torch.cat([torch.randint(3, 60, (2, 1, 5)), torch.full((2, 3, 5), 20)], dim=1)
    for seed in range(3):
        torch.manual_seed(seed)
        audio = model.generate(query, max_new_tokens=12, do_sample=True)[:, 1:, 5:]
        assert ((audio < 10) | (audio >= 20)).all() and (audio < 10).any()


def test_speech_answer_may_be_given_per_item():
    """A batch mixing speech and text-only answers: each item is what it gives alone with its own setting."""
    torch.manual_seed(5)
    model = DeepTalkForCausalLM(parallel_config(initializer_range=0.3)).eval()
    query = text_query(model.config)
    options = dict(max_new_tokens=10, do_sample=False)
    mixed = model.generate(query, speech_answer=[True, False], **options)
    for item, speech in enumerate((True, False)):
        alone = model.generate(query[item : item + 1], speech_answer=speech, **options)
        assert torch.equal(mixed[item, :, : alone.shape[-1]], alone[0])
        assert (
            mixed[item, :, alone.shape[-1] :] == torch.tensor([0, *[model.config.audio_pad_token_id] * 3])[:, None]
        ).all()
    assert (mixed[1, 1:] == model.config.audio_pad_token_id).all()
    for bad in ([True], torch.tensor([1, 0]), [[True, False]]):
        with pytest.raises(ValueError, match=r"speech_answer must be a bool or one bool per item \(2 items\)"):
            model.generate(query, speech_answer=bad, **options)
    with pytest.raises(ValueError, match="needs speech_answer=True for every item"):
        model.generate(query, speech_answer=[True, False], batch_parallel=True, **options)


def test_a_batch_parallel_turns_cache_continues_the_conversation():
    """The cache that batch parallel decoding returns is the returned sequences' (one row per item): the next turn
    from it, with or without batch parallel decoding, is the next turn recomputed."""
    torch.manual_seed(0)
    model = DeepTalkForCausalLM(parallel_config(initializer_range=0.3)).eval()
    options = dict(max_new_tokens=8, do_sample=False)
    first = model.generate(text_query(model.config), batch_parallel=True, return_dict_in_generate=True, **options)
    assert first.cache.layers[0].keys.shape[0] == 2
    following = torch.cat([first.sequences, text_query(model.config, length=3)], dim=-1)
    for batch_parallel in (True, False):
        recomputed = model.generate(following, batch_parallel=batch_parallel, **options)
        cache = copy.deepcopy(first.cache)
        assert torch.equal(
            model.generate(following, cache=cache, batch_parallel=batch_parallel, **options), recomputed
        )


def test_a_generation_config_may_be_passed_positionally_as_in_transformers():
    model = DeepTalkForCausalLM(parallel_config()).eval()
    query = text_query(model.config, batch=1)
    expected = model.generate(query, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(query, GenerationConfig(max_new_tokens=5, do_sample=False)), expected)


class EndFirstItemEarly(LogitsProcessor):
    """The first item's audio streams end as soon as the pattern allows; the other items' never end."""

    def __init__(self, config):
        self.rows, self.eos = config.num_audio_streams + 1, config.audio_eos_token_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[: self.rows, self.eos] += 1e4
        scores[self.rows :, self.eos] = -float("inf")
        return scores


class NeverEnds(LogitsProcessor):
    """No audio stream ends."""

    def __init__(self, config):
        self.eos = config.audio_eos_token_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.eos] = -float("inf")
        return scores


def test_an_item_that_has_ended_only_pads_while_the_batch_goes_on():
    torch.manual_seed(3)
    model = DeepTalkForCausalLM(parallel_config()).eval()
    config = model.config
    query = text_query(config)
    kwargs = dict(max_new_tokens=12, do_sample=False, logits_processor=[EndFirstItemEarly(config)])
    batch = model.generate(query, **kwargs)
    alone = model.generate(query[:1], **kwargs)
    length = alone.shape[-1]
    assert length < batch.shape[-1] and torch.equal(batch[:1, :, :length], alone)
    assert (batch[0, 0, length:] == config.pad_token_id).all()
    assert (batch[0, 1:, length:] == config.audio_pad_token_id).all()
    # The items that go on are not cut by another item's end: each is what it gives alone.
    assert torch.equal(batch[1:], model.generate(query[1:], **kwargs | {"logits_processor": [NeverEnds(config)]}))


def test_profiling_the_modality_load_is_refused_by_name():
    model = DeepTalkForCausalLM(parallel_config())
    with pytest.raises(ValueError, match="num_audio_streams=3 parallel streams, which it does not support"):
        profile_modality_load(model, [{"input_ids": text_query(model.config)}])


def test_parallel_streams_route_the_first_speech_block_id_of_the_text_stream_as_speech():
    """With parallel streams a text-stream id routes as speech from `speech_token_start` on, as in a single-stream
    model: the block's boundary ids on both sides."""
    config = parallel_config()
    ids = text_query(config, batch=1, length=4)
    ids[0, 0, 1] = config.speech_token_start
    ids[0, 0, 2] = config.speech_token_start - 1
    got = speech_positions(config, ids, None, (1, 4), ids.device)
    assert got.tolist() == [[False, True, False, False]]
    assert torch.equal(got, speech_positions(config, ids[:, 0], None, (1, 4), ids.device))


def test_a_left_padded_batch_of_parallel_prompts_generates_like_each_prompt_alone():
    """Each item's attention_mask row goes to all of its own stream rows: a left-padded batch of prompts of
    different lengths answers each as alone."""
    torch.manual_seed(0)
    config = parallel_config(initializer_range=0.3)
    model = DeepTalkForCausalLM(config).eval()
    short, long = text_query(config, batch=1, length=3), text_query(config, batch=1, length=6)
    padded = short.new_full((1, config.num_audio_streams + 1, 3), config.audio_pad_token_id)
    padded[:, 0] = config.pad_token_id
    batch = torch.cat([torch.cat([padded, short], dim=2), long])
    options = dict(max_new_tokens=6, do_sample=False, speech_answer=False)
    together = model.generate(batch, **options)
    for row, prompt in ((together[1:], long), (together[:1, :, 3:], short)):
        alone = model.generate(prompt, **options)
        assert torch.equal(row[..., : alone.shape[-1]], alone)  # (an item that ended pads while the batch goes on)
