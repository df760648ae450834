"""DeepTalkStreamer and SpeechUnitsLogitsProcessor: streamed text and speech equal the final decode, audio chunks come
as soon as enough frames are pending, and the end-to-end path processor → generate → decode → codec gives audio."""

import math
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from deeptalk_hf import (
    AudioChunk,
    DeepTalkProcessor,
    DeepTalkStreamer,
    MimiCodec,
    SnacCodec,
    SpeechChunk,
    SpeechUnitsLogitsProcessor,
    TextDelta,
    add_speech_tokens,
)

from .speech_fixtures import (
    HAVE_SNAC,
    WORDS,
    needs_snac,
    tiny_mimi,
    tiny_model,
    tiny_processor,
    tiny_snac,
    tiny_tokenizer,
)

SNAC = SnacCodec(tiny_snac()) if HAVE_SNAC else None
MIMI = MimiCodec(tiny_mimi(), num_codebooks=4)
PROCESSOR = tiny_processor(max(SNAC.num_units if SNAC else 0, MIMI.num_units))
WORD_IDS = PROCESSOR.tokenizer.convert_tokens_to_ids(WORDS)
START, BEGIN, END, PAD = (
    PROCESSOR.speech_token_start,
    PROCESSOR.begin_of_speech_id,
    PROCESSOR.end_of_speech_id,
    PROCESSOR.speech_pad_id,
)


def stream(streamer: DeepTalkStreamer, prompt: list[int], ids: list[int], cuts: list[int]) -> list:
    """Feed `prompt` then `ids` cut at `cuts` as `generate` would, and collect the events."""
    streamer.put(torch.tensor([prompt]))
    bounds = [0, *sorted({c % (len(ids) + 1) for c in cuts}), len(ids)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            streamer.put(torch.tensor(ids[a:b]))
    streamer.end()
    return list(streamer)


def check_matches_decode(events: list, ids: list[int]) -> None:
    decoded = PROCESSOR.decode(ids, skip_special_tokens=True)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == decoded.text
    chunks = [e for e in events if isinstance(e, SpeechChunk)]
    assert [c.segment for c in chunks] == sorted(c.segment for c in chunks)
    streamed = {}
    for chunk in chunks:
        streamed.setdefault(chunk.segment, []).extend(chunk.units)
    assert streamed == {i: units for i, units in enumerate(decoded.speech_units) if units}


tokens = st.one_of(
    st.sampled_from(WORD_IDS),
    st.integers(START, START + PROCESSOR.num_speech_units - 1),
    st.sampled_from([BEGIN, END, PAD]),
)


@given(ids=st.lists(tokens, max_size=60), cuts=st.lists(st.integers(0, 100), max_size=20))
def test_streamed_text_and_speech_concatenate_to_the_decode(ids, cuts):
    streamer = DeepTalkStreamer(PROCESSOR)
    events = stream(streamer, [WORD_IDS[0], BEGIN], ids, cuts)
    check_matches_decode(events, ids)
    # `end` leaves it ready for the next `generate` call, as transformers' streamers are.
    check_matches_decode(stream(streamer, [WORD_IDS[1]], ids[::-1], cuts), ids[::-1])


def test_decode_kwargs_given_to_the_streamer_override_its_defaults():
    """`skip_special_tokens=False` keeps special tokens in the streamed text, as `decode` with the same kwargs does."""
    im_start = PROCESSOR.tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = [im_start, WORD_IDS[0], BEGIN, START + 3, END, im_start, WORD_IDS[1]]
    events = stream(DeepTalkStreamer(PROCESSOR, skip_special_tokens=False), [WORD_IDS[2]], ids, [1, 4])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == PROCESSOR.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).text
    assert text.count("<|im_start|>") == 2


def test_the_prompt_is_streamed_only_when_asked():
    prompt = [WORD_IDS[0], BEGIN, START + 1, END]
    assert stream(DeepTalkStreamer(PROCESSOR), prompt, [], []) == []
    events = stream(DeepTalkStreamer(PROCESSOR, skip_prompt=False), prompt, [WORD_IDS[1]], [])
    assert events == [TextDelta(WORDS[0]), SpeechChunk(0, [1]), TextDelta(" " + WORDS[1])]


@st.composite
def speech_streams(draw, codec):
    """Valid unit streams: segments of whole frames (plus maybe a partial one) between words, and cut points."""
    ids, units_per_segment = [], []
    for _ in range(draw(st.integers(1, 3))):
        frames = draw(st.integers(0, 5))
        codes = [
            torch.tensor(
                draw(st.lists(st.integers(0, codec.codebook_size - 1), min_size=n, max_size=n)), dtype=torch.long
            )
            for n in (frames * codec.frame_levels.count(level) for level in range(codec.num_codebooks))
        ]
        units = codec.to_units(codes).tolist() + draw(
            st.sampled_from([[], codec.to_units([c[:0] for c in codes]).tolist()])
        )
        ids += [draw(st.sampled_from(WORD_IDS)), BEGIN] + [START + u for u in units] + [END]
        units_per_segment.append(units)
    return ids, draw(st.lists(st.integers(0, 100), max_size=10))


@given(data=st.data(), chunk_frames=st.integers(1, 3), context=st.integers(0, 2))
def test_audio_chunks_come_as_soon_as_enough_frames_are_pending(data, chunk_frames, context):
    ids, cuts = data.draw(speech_streams(MIMI))
    streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=chunk_frames, context_frames=context)
    events = stream(streamer, [WORD_IDS[0]], ids, cuts)
    check_matches_decode(events, ids)
    per_frame, samples = MIMI.units_per_frame, MIMI.samples_per_frame
    units, voiced = {}, {}
    for event, after in zip(events, [*events[1:], None], strict=True):
        if isinstance(event, SpeechChunk):
            units.setdefault(event.segment, []).extend(event.units)
            pending = len(units[event.segment]) // per_frame - voiced.get(event.segment, 0)
            if pending >= chunk_frames:  # enough frames: the very next event is their audio
                assert isinstance(after, AudioChunk) and after.segment == event.segment
        if isinstance(event, AudioChunk):
            assert event.sampling_rate == MIMI.sampling_rate and event.waveform.shape[0] % samples == 0
            voiced[event.segment] = voiced.get(event.segment, 0) + event.waveform.shape[0] // samples
    # every whole frame of every segment became audio, once
    assert voiced == {s: len(u) // per_frame for s, u in units.items() if len(u) >= per_frame}


def test_audio_with_full_context_is_the_decode_of_the_segment():
    """With every earlier frame as context, Mimi (causal) decodes each chunk as the whole segment's decode would: the
    chunks concatenate to it. Without the context, chunk boundaries differ."""
    generator = torch.Generator().manual_seed(0)
    codes = [
        torch.randint(0, MIMI.codebook_size, (6 * MIMI.frame_levels.count(level),), generator=generator)
        for level in range(MIMI.num_codebooks)
    ]
    units = MIMI.to_units(codes).tolist()
    ids = [WORD_IDS[1], BEGIN] + [START + u for u in units] + [END]
    full = MIMI.decode(MIMI.from_units(units))
    for context, same in [(6, True), (0, False)]:
        streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=1, context_frames=context)
        events = stream(streamer, [WORD_IDS[0]], ids, [3, 7, 11])
        waveform = torch.cat([e.waveform for e in events if isinstance(e, AudioChunk)])
        assert waveform.shape == full.shape
        assert ((waveform - full).abs().max() <= 1e-5) == same


def test_end_flushes_a_cut_segment_and_held_back_text():
    """A generation cut inside a speech segment (max_new_tokens) still voices its last whole frames, and text that ends
    in an incomplete character (held back while more could follow) is sent at the end."""
    units = MIMI.to_units(
        [torch.zeros(3 * MIMI.frame_levels.count(level), dtype=torch.long) for level in range(MIMI.num_codebooks)]
    )
    units = units.tolist()
    streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=2, context_frames=0)
    cuts = [1 + frame * MIMI.units_per_frame for frame in range(3)]  # a frame per step
    events = stream(streamer, [WORD_IDS[0]], [BEGIN] + [START + u for u in units], cuts)
    voiced = sum(e.waveform.shape[0] for e in events if isinstance(e, AudioChunk))
    assert voiced == 3 * MIMI.samples_per_frame

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["\ufffd"])
    add_speech_tokens(tokenizer, 4)
    processor = DeepTalkProcessor(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["hello", "\ufffd"])
    events = stream(DeepTalkStreamer(processor), [ids[0]], ids, [])
    assert "".join(e.text for e in events) == processor.decode(ids, skip_special_tokens=True).text
    assert events[-1].text.endswith("\ufffd")


def byte_fallback_processor() -> DeepTalkProcessor:
    """A sentencepiece-style tokenizer (Llama 2, Mistral, Gemma): characters outside its vocabulary are spelled in
    `<0xNN>` byte tokens, which its decoder joins run by run."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "\u2581hi": 259}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    add_speech_tokens(tokenizer, 4)
    return DeepTalkProcessor(tokenizer)


BYTE_FALLBACK = byte_fallback_processor()


@given(
    pieces=st.lists(
        st.one_of(
            st.text(max_size=3), st.binary(min_size=1, max_size=3), st.just(b"\xf0\x9f"), st.sampled_from([1, 2])
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(0, 100), max_size=10),
)
@example(pieces=["\U0001f600", b"\xf0\x9f"], cuts=[])  # cut inside a character after one spelled in bytes
@example(pieces=["\u20ac", 1, b"\x80", "x"], cuts=list(range(12)))  # a skipped <s> inside a run joins its two sides
def test_byte_fallback_runs_are_streamed_once_settled(pieces, cuts):
    """A run of byte tokens that is not valid UTF-8 as a whole decodes to U+FFFD for every byte, a whole character
    earlier in the run included (special tokens the decode skips join the runs on their sides): the streamer waits
    for the run to end, so sent text is never taken back."""
    ids = []
    for piece in pieces:
        if isinstance(piece, int):  # <s> or </s>
            ids.append(piece)
        elif isinstance(piece, str):
            ids += [259] + [3 + byte for byte in piece.encode()]  # "▁hi", then the text in byte tokens
        else:
            ids += [3 + byte for byte in piece]
    events = stream(DeepTalkStreamer(BYTE_FALLBACK), [1], ids, cuts)
    expected = BYTE_FALLBACK.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).text
    assert "".join(e.text for e in events) == expected


def byte_level_processor() -> DeepTalkProcessor:
    """A byte-level BPE tokenizer (GPT-2, Qwen) without merges: every UTF-8 byte is a token of its own, so a character
    of 2 to 4 bytes spans as many tokens and decodes to U+FFFD until its last byte."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    add_speech_tokens(tokenizer, 4)
    return DeepTalkProcessor(tokenizer)


BYTE_LEVEL = byte_level_processor()


@given(text=st.text(max_size=6), cut_off=st.integers(0, 3), cuts=st.lists(st.integers(0, 100), max_size=10))
@example(text="h\u00e9llo", cut_off=0, cuts=list(range(8)))
def test_byte_level_characters_are_streamed_once_whole(text, cut_off, cuts):
    """A character split over tokens is sent once its last byte came (the text of an answer cut inside one ends in
    U+FFFD, as its decode does): the joined deltas are the decode, with no U+FFFD sent in between."""
    ids = BYTE_LEVEL.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[: len(ids) - cut_off] if cut_off < len(ids) else ids
    events = stream(DeepTalkStreamer(BYTE_LEVEL), ids[:1], ids, cuts)
    assert "".join(e.text for e in events) == BYTE_LEVEL.decode(ids, skip_special_tokens=True).text


def test_streamed_text_is_not_rewritten_by_a_tokenizer_clean_up():
    """A clean-up (`" ' "` becomes `"'"`) rewrites text already sent, so the streamer decodes without it."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["'"])
    tokenizer.clean_up_tokenization_spaces = True
    add_speech_tokens(tokenizer, 4)
    processor = DeepTalkProcessor(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(["hello", "'", "world"])
    assert processor.decode(ids).text == "hello'world"  # the clean-up, which would have streamed "hello 'orld"
    events = stream(DeepTalkStreamer(processor), [ids[0]], ids, [1, 2])
    expected = processor.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).text
    assert "".join(e.text for e in events) == expected == "hello ' world"
    with pytest.raises(ValueError, match="clean_up_tokenization_spaces=True rewrites text already streamed"):
        DeepTalkStreamer(processor, clean_up_tokenization_spaces=True)


def test_streamer_refuses_batches_and_bad_chunking():
    streamer = DeepTalkStreamer(PROCESSOR, skip_prompt=False, timeout=5)
    streamer.put(torch.tensor([[WORD_IDS[2], BEGIN, START + 1]]))  # a call that fails midway
    with pytest.raises(ValueError, match="streams one sequence, got 2 rows"):
        streamer.put(torch.zeros(2, 3, dtype=torch.long))
    events = [next(streamer), next(streamer)]
    with pytest.raises(ValueError, match="got 2 rows"):  # the consumer (another thread) gets it too, not a hang
        next(streamer)
    assert events == [TextDelta(WORDS[2]), SpeechChunk(0, [1])]
    ids = [WORD_IDS[1], BEGIN, START + 2]  # and the streamer serves the next call as a fresh one would
    fresh = DeepTalkStreamer(PROCESSOR, skip_prompt=False)
    assert stream(streamer, [WORD_IDS[0]], ids, []) == stream(fresh, [WORD_IDS[0]], ids, [])
    for frames in (0, 1.5, True):  # 1.5 was taken, and chunks came at fractional frame counts
        with pytest.raises(ValueError, match=f"audio_chunk_frames={frames!r} must be an integer >= 1"):
            DeepTalkStreamer(PROCESSOR, audio_chunk_frames=frames)
    with pytest.raises(ValueError, match=r"context_frames=2\.0 an integer >= 0"):
        DeepTalkStreamer(PROCESSOR, context_frames=2.0)
    with pytest.raises(ValueError, match="the codec makes 128 distinct units but the tokenizer has 8"):
        DeepTalkStreamer(tiny_processor(8), MIMI)  # as the logits processor says, not a misplaced unit mid-generation


def test_an_error_at_the_end_reaches_the_consumer_and_resets_the_streamer():
    """The last pending frames are decoded in `end`: a failure there (a unit of another level) reaches the consumer
    as a failure in `put` does, instead of leaving it waiting, and the next call starts fresh."""
    streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=2, timeout=5)
    wrong = START + 3 * MIMI.codebook_size  # a last-level unit where a frame's first unit belongs
    streamer.put(torch.tensor([[WORD_IDS[0]]]))
    streamer.put(torch.tensor([BEGIN] + [wrong] * MIMI.units_per_frame))  # one frame: pending until the end
    with pytest.raises(ValueError, match="not a level-0 unit"):
        streamer.end()
    with pytest.raises(ValueError, match="not a level-0 unit"):
        list(streamer)
    ids = [WORD_IDS[1], BEGIN, START + 2]
    fresh = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=2)
    assert stream(streamer, [WORD_IDS[0]], ids, []) == stream(fresh, [WORD_IDS[0]], ids, [])


def test_an_answer_continuing_the_prompts_speech_voices_the_frames_it_completes():
    """`continue_final_message` with a prompt ending inside a speech segment, mid-frame: the answer's units complete
    the prompt's frame, and with full context the audio is the decode of the segment's frames from the first one the
    prompt did not finish (before: the answer's units were decoded as a frame of their own and failed). A marker
    before any answer unit ends the continuation."""
    generator = torch.Generator().manual_seed(1)
    codes = [
        torch.randint(0, MIMI.codebook_size, (4 * MIMI.frame_levels.count(level),), generator=generator)
        for level in range(MIMI.num_codebooks)
    ]
    units = MIMI.to_units(codes).tolist()
    split = MIMI.units_per_frame + 2  # the prompt holds one whole frame and half of the next
    prompt = [WORD_IDS[0], BEGIN] + [START + u for u in units[:split]]
    answer = [START + u for u in units[split:]] + [END]
    streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=1, context_frames=8)
    events = stream(streamer, prompt, answer, [1, 5])
    assert sum((e.units for e in events if isinstance(e, SpeechChunk)), []) == units[split:]
    waveform = torch.cat([e.waveform for e in events if isinstance(e, AudioChunk)])
    full = MIMI.decode(MIMI.from_units(units))[MIMI.samples_per_frame :]
    assert waveform.shape == full.shape and (waveform - full).abs().max() <= 1e-5
    restart = [END, BEGIN] + [START + u for u in units[: MIMI.units_per_frame]]  # the prompt's segment left unfinished
    events = stream(streamer, prompt, restart, [])
    assert sum(e.waveform.shape[0] for e in events if isinstance(e, AudioChunk)) == MIMI.samples_per_frame


def test_a_segments_last_audio_goes_out_at_its_end_before_what_follows():
    """`<|end_of_speech|>` voices the frames still pending (fewer than `audio_chunk_frames`) right away: a player
    gets all of a segment's audio before the text or speech that follows it, not at the next segment or the end."""
    units = MIMI.to_units(
        [torch.zeros(3 * MIMI.frame_levels.count(level), dtype=torch.long) for level in range(MIMI.num_codebooks)]
    ).tolist()
    per_frame = MIMI.units_per_frame
    ids = [BEGIN] + [START + u for u in units] + [END, WORD_IDS[1], BEGIN] + [START + u for u in units[:per_frame]]
    cuts = [1 + per_frame * frame for frame in range(4)] + [2 + 3 * per_frame]  # a frame a step, the end, the word
    streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=2, context_frames=0)
    events = stream(streamer, [WORD_IDS[0]], ids, cuts)
    text = next(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    first = [i for i, e in enumerate(events) if isinstance(e, AudioChunk) and e.segment == 0]
    assert sum(events[i].waveform.shape[0] for i in first) == 3 * MIMI.samples_per_frame
    assert max(first) < text


def continued_prompt_units() -> list[int]:
    generator = torch.Generator().manual_seed(1)
    codes = [
        torch.randint(0, MIMI.codebook_size, (4 * MIMI.frame_levels.count(level),), generator=generator)
        for level in range(MIMI.num_codebooks)
    ]
    return MIMI.to_units(codes).tolist()


@pytest.mark.parametrize("closed", [False, True], ids=["begin-after-an-open-segment", "units-after-a-closed-segment"])
def test_an_answer_that_opens_a_new_segment_does_not_continue_the_prompts(closed):
    """The answer's speech continues the prompt's segment only while that is open and no marker came: a new segment
    (opened by `<|begin_of_speech|>`, or by a unit after the prompt's segment was closed) is voiced from its own
    frames alone, with none of the prompt's as context."""
    units, per_frame = continued_prompt_units(), MIMI.units_per_frame
    split = 2 * per_frame if closed else per_frame + 2  # a closed segment of whole frames, or an open mid-frame
    prompt = [WORD_IDS[0], BEGIN] + [START + u for u in units[:split]] + ([END] if closed else [])
    own = units[2 * per_frame :]
    answer = ([] if closed else [BEGIN]) + [START + u for u in own] + [END]
    streamer = DeepTalkStreamer(PROCESSOR, MIMI, audio_chunk_frames=1, context_frames=8)
    events = stream(streamer, prompt, answer, [3])
    assert sum((e.units for e in events if isinstance(e, SpeechChunk)), []) == own
    waveform = torch.cat([e.waveform for e in events if isinstance(e, AudioChunk)])
    full = MIMI.decode(MIMI.from_units(own))
    assert waveform.shape == full.shape and (waveform - full).abs().max() <= 1e-5


# ---- the logits processor ----------------------------------------------------------------------------------------


def test_logits_processor_asks_for_the_level_of_each_frame_position():
    processor = SpeechUnitsLogitsProcessor(PROCESSOR, MIMI)
    size, width = MIMI.codebook_size, len(PROCESSOR.tokenizer)
    scores = torch.zeros(5, width)
    rows = [
        [WORD_IDS[0], WORD_IDS[1]],  # outside any segment: a unit would open one, so it must be a frame's first
        [WORD_IDS[0], BEGIN],  # start of a segment: level 0 or the end marker
        [BEGIN, START + 0, START + size + 1, START + 2 * size],  # fourth position: level 3
        [BEGIN, START + 1, END],  # closed: as outside
        [BEGIN, START + 1, END, START + 2],  # a unit after the end opened a segment (as `decode` reads it): level 1
    ]
    width_in = max(map(len, rows))
    input_ids = torch.tensor([[WORD_IDS[2]] * (width_in - len(r)) + r for r in rows])
    out = processor(input_ids, scores.clone())
    allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]
    assert allowed[0] == allowed[3] == set(range(width)) - set(range(START + size, START + PROCESSOR.num_speech_units))
    assert allowed[1] == set(range(START, START + size)) | {END}
    assert allowed[2] == set(range(START + 3 * size, START + 4 * size))
    assert allowed[4] == set(range(START + size, START + 2 * size))
    with_text = SpeechUnitsLogitsProcessor(PROCESSOR, MIMI, allow_text=True)(input_ids, scores.clone())
    assert set(torch.isfinite(with_text[2]).nonzero().flatten().tolist()) == allowed[2] | set(range(START))


def test_logits_processor_refuses_a_codec_larger_than_the_vocabulary():
    with pytest.raises(ValueError, match="distinct units but the tokenizer has 64"):
        SpeechUnitsLogitsProcessor(tiny_processor(64), MIMI)


# ---- through the model -------------------------------------------------------------------------------------------


def test_streaming_a_sampled_generation_matches_its_decode():
    model = tiny_model(PROCESSOR)
    inputs = PROCESSOR(text="hello <|speech|> world", speech_units=[[1, 2, 3]], return_tensors="pt")
    streamer = DeepTalkStreamer(PROCESSOR)
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, max_new_tokens=40, streamer=streamer, pad_token_id=0)
    generated = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert any(t >= START for t in generated) and any(t < START for t in generated)  # a real mix
    check_matches_decode(list(streamer), generated)


@pytest.mark.parametrize("name", [pytest.param("snac", marks=needs_snac), "mimi"])
def test_end_to_end_spoken_question_to_spoken_answer(name):
    codec = {"snac": SNAC, "mimi": MIMI}[name]
    processor = tiny_processor(codec.num_units, codec=codec)
    model = tiny_model(processor)
    question = 0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": question, "sampling_rate": 16000}]}]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        speech_answer=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert inputs["modality_ids"].sum() == len(processor.decode(inputs["input_ids"][0]).speech_units[0]) + 3
    frames = 3
    streamer = DeepTalkStreamer(processor, codec, audio_chunk_frames=1)
    out = model.generate(
        **inputs,
        max_new_tokens=frames * codec.units_per_frame,
        logits_processor=[SpeechUnitsLogitsProcessor(processor, codec)],
        suppress_tokens=[processor.end_of_speech_id],
        streamer=streamer,
        pad_token_id=0,
    )
    answer = processor.decode(out[0]).speech_units[-1]
    assert len(answer) == frames * codec.units_per_frame
    waveform = codec.decode(codec.from_units(answer))
    assert waveform.shape == (frames * codec.samples_per_frame,) and torch.isfinite(waveform).all()
    audio = [e for e in streamer if isinstance(e, AudioChunk)]
    assert len(audio) == frames and sum(a.waveform.shape[0] for a in audio) == waveform.shape[0]


@needs_snac
def test_speech_roundtrip_example_writes_the_answer_wav(tmp_path):
    """`examples/speech_roundtrip.py` runs offline (random SNAC 24 kHz and LLM) and writes whole SNAC frames."""
    out = tmp_path / "answer.wav"
    script = Path(__file__).resolve().parents[1] / "examples" / "speech_roundtrip.py"
    command = [sys.executable, str(script), "--answer-seconds", "0.5", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with wave.open(str(out), "rb") as file:
        assert (file.getframerate(), file.getnchannels(), file.getsampwidth()) == (24000, 1, 2)
        assert file.getnframes() == math.ceil(0.5 * 24000 / 2048) * 2048


def test_speech_roundtrip_example_without_snac_says_what_to_install(tmp_path):
    """Without the `audio` extra the example exits naming it, not with a bare ModuleNotFoundError."""
    script = Path(__file__).resolve().parents[1] / "examples" / "speech_roundtrip.py"
    code = "import runpy, sys; sys.modules['snac'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    command = [sys.executable, "-c", code, str(script), "--out", str(tmp_path / "answer.wav")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "pip install 'deeptalk-hf[audio]'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "answer.wav").exists()
    # A length it cannot generate is a usage error naming the option (it failed inside generate).
    command = [sys.executable, str(script), "--answer-seconds", "-1", "--out", str(tmp_path / "answer.wav")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--answer-seconds must be positive" in result.stderr, result.stderr


def test_a_codec_with_one_unit_more_than_the_tokenizer_is_refused():
    """A codec unit beyond the tokenizer's last speech unit would become `<|begin_of_speech|>`'s id: a codec making
    `num_speech_units + 1` distinct units is refused (the boundary; exactly `num_speech_units` is taken)."""
    from types import SimpleNamespace

    units = PROCESSOR.num_speech_units
    DeepTalkStreamer(PROCESSOR, SimpleNamespace(num_units=units))
    with pytest.raises(ValueError, match=f"the codec makes {units + 1} distinct units"):
        DeepTalkStreamer(PROCESSOR, SimpleNamespace(num_units=units + 1))
