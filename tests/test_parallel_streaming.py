"""Parallel streams on the processor side: codec codes ↔ audio streams, parallel prompts, decoding generated streams
into SNAC codes and audio, and DeepTalkParallelStreamer (events equal the final decode and come as soon as frames
complete), end to end with and without batch parallel decoding."""

import copy
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.generation import LogitsProcessor

from deeptalk_hf import (
    AudioChunk,
    DeepTalkConfig,
    DeepTalkParallelStreamer,
    MimiCodec,
    SnacCodec,
    SpeechChunk,
    TextDelta,
)
from deeptalk_hf.generation_deeptalk import audio_codes_per_stream, build_delay_pattern, revert_delay_pattern

from .speech_fixtures import tiny_mimi, tiny_model, tiny_processor, tiny_snac

pytest.importorskip("snac")
SNAC = SnacCodec(tiny_snac())
MIMI = MimiCodec(tiny_mimi(), num_codebooks=4)
PROCESSOR = tiny_processor(1, codec=SNAC)  # the parallel path needs no speech units in the text vocabulary
EOS = PROCESSOR.tokenizer.convert_tokens_to_ids("<|im_end|>")
MODEL = tiny_model(PROCESSOR, num_audio_streams=7, audio_codebook_size=SNAC.codebook_size, eos_token_id=EOS)
CONFIG = MODEL.config
QUESTION = 0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0))
# questions through the chat template: a spoken one renders as a <|speech|> placeholder
SPOKEN = PROCESSOR.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], add_generation_prompt=True)
TYPED = PROCESSOR.apply_chat_template([{"role": "user", "content": "hello how are you"}], add_generation_prompt=True)


def streams_config(codec) -> DeepTalkConfig:
    return DeepTalkConfig(num_audio_streams=codec.units_per_frame, audio_codebook_size=codec.codebook_size)


def random_codes(codec, frames: int, seed: int = 0) -> list[torch.LongTensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, codec.codebook_size, (frames * codec.frame_levels.count(level),), generator=generator)
        for level in range(codec.num_codebooks)
    ]


# ---- codes ↔ streams ---------------------------------------------------------------------------------------------


def test_snac_streams_follow_the_frame_positions():
    c0, c1, c2 = random_codes(SNAC, 3)
    expected = [c0, c1[0::2], c2[0::4], c2[1::4], c1[1::2], c2[2::4], c2[3::4]]  # Mini-Omni's 7 positions
    assert torch.equal(SNAC.to_streams([c0, c1, c2]), torch.stack(expected))


@given(frames=st.integers(0, 12), seed=st.integers(0, 2**16), name=st.sampled_from(["snac", "mimi"]))
def test_codes_to_delayed_streams_and_back(frames, seed, name):
    codec = {"snac": SNAC, "mimi": MIMI}[name]
    codes = random_codes(codec, frames, seed)
    streams = codec.to_streams(codes)
    assert streams.shape == (codec.units_per_frame, frames)
    assert all(torch.equal(a, b) for a, b in zip(codec.from_streams(streams), codes, strict=True))
    config = streams_config(codec)
    read = audio_codes_per_stream(build_delay_pattern(streams[None], config), config)[0]
    assert torch.equal(torch.stack(read), streams)


def test_from_streams_refuses_bad_streams():
    with pytest.raises(ValueError, match=r"shape \[7, frames\]"):
        SNAC.from_streams(torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        SNAC.from_streams(torch.full((7, 2), 64))


# ---- the processor -----------------------------------------------------------------------------------------------


def test_parallel_prompt_lays_out_text_and_a_spoken_question():
    batch = PROCESSOR.parallel_prompt([SPOKEN, TYPED], CONFIG, audio=[QUESTION, None], sampling_rate=16000)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text_pad, audio_pad = CONFIG.pad_token_id, CONFIG.audio_pad_token_id
    tokens = PROCESSOR.tokenizer([SPOKEN.replace("<|speech|>", ""), TYPED])["input_ids"]
    streams = SNAC.to_streams(SNAC.encode(QUESTION, 16000))
    block = streams.shape[1] + max(CONFIG.audio_stream_delays) + 1
    assert ids.shape == (2, 8, len(tokens[0]) + block) and ids.shape[-1] > len(tokens[1])
    # the spoken question: its delayed codes under text pad, between the template's text ids
    where = tokens[0].index(PROCESSOR.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    question = ids[0, :, where : where + block]
    assert (question[0] == text_pad).all()
    assert torch.equal(revert_delay_pattern(question[None, 1:], CONFIG)[0], streams)
    text = torch.cat([ids[0, :, :where], ids[0, :, where + block :]], dim=1)
    assert text[0].tolist() == tokens[0] and (text[1:] == audio_pad).all()
    # the typed question, left-padded
    padding = ids.shape[-1] - len(tokens[1])
    assert mask[0].all() and mask[1].tolist() == [0] * padding + [1] * len(tokens[1])
    assert ids[1, 0].tolist() == [text_pad] * padding + tokens[1] and (ids[1, 1:] == audio_pad).all()
    typed = PROCESSOR.parallel_prompt([TYPED, TYPED], CONFIG)["input_ids"]  # a batch without speech
    assert torch.equal(typed, ids[1:, :, padding:].expand(2, -1, -1))


def test_parallel_prompt_tokenizes_a_rendered_chat_as_apply_chat_template():
    """With a tokenizer that adds `<s> ... </s>`: one BOS (none added before a template's own) and no end token
    after the prompt, which the answer continues."""
    chat = [{"role": "user", "content": "hello how are you"}]
    templates = (PROCESSOR.chat_template, "{{ bos_token }}" + PROCESSOR.chat_template)
    for template in templates:
        processor = tiny_processor(1, wrap=True, codec=SNAC, chat_template=template)
        expected = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        rendered = processor.apply_chat_template(chat, add_generation_prompt=True)
        ids = processor.parallel_prompt(rendered, CONFIG)["input_ids"][0, 0].tolist()
        assert ids == expected["input_ids"][0] and ids.count(processor.tokenizer.bos_token_id) == 1
        assert processor.tokenizer.eos_token_id not in ids
    # In a batch each text is read by its own start (the first text's decided for all: a BOS lost or doubled).
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True, chat_template=t) for t in templates]
    for batch in (texts, texts[::-1]):
        prompt = processor.parallel_prompt(batch, CONFIG)
        for item, text in enumerate(batch):
            alone = processor.parallel_prompt(text, CONFIG)["input_ids"][0, 0].tolist()
            assert prompt["input_ids"][item, 0][prompt["attention_mask"][item].bool()].tolist() == alone


def test_parallel_helpers_check_their_inputs():
    with pytest.raises(ValueError, match="one <\\|speech\\|> placeholder per waveform"):
        PROCESSOR.parallel_prompt(SPOKEN, CONFIG)
    with pytest.raises(ValueError, match="no <\\|begin_of_speech\\|>"):
        PROCESSOR.parallel_prompt(TYPED + "<|begin_of_speech|>", CONFIG)
    with pytest.raises(ValueError, match="num_audio_streams=4"):
        PROCESSOR.decode_parallel(torch.zeros(1, 5, 3, dtype=torch.long), streams_config(MIMI))
    with pytest.raises(ValueError, match="give the processor"):
        tiny_processor(1).parallel_prompt(TYPED, CONFIG)
    wider = DeepTalkConfig(num_audio_streams=SNAC.units_per_frame, audio_codebook_size=2 * SNAC.codebook_size)
    for call in (lambda: PROCESSOR.parallel_prompt(TYPED, wider), lambda: PROCESSOR.decode_parallel(
        torch.zeros(1, 8, 3, dtype=torch.long), wider)):  # fmt: skip
        with pytest.raises(ValueError, match=f"from a codebook of {SNAC.codebook_size}; the config has"):
            call()
    with pytest.raises(ValueError, match="text= is an empty batch"):  # max() of nothing before
        PROCESSOR.parallel_prompt([], CONFIG)
    with pytest.raises(ValueError, match=r"text\[1\] gives no token"):  # torch.cat of nothing before
        PROCESSOR.parallel_prompt([TYPED, ""], CONFIG)
    splitting = tiny_processor(1, codec=SNAC)
    splitting.tokenizer.split_special_tokens = True  # the placeholder's marker in pieces: named as such
    with pytest.raises(ValueError, match="split_special_tokens=True"):
        splitting.parallel_prompt(SPOKEN, CONFIG, audio=QUESTION, sampling_rate=16000)


def test_decode_parallel_refuses_ids_outside_their_streams_vocabulary():
    """An audio id outside its stream's vocabulary was skipped, shifting the stream's later codes into other frames
    (other codes, silently); a text id of -100 (a label's padding) failed in the tokenizer (OverflowError), one beyond
    the vocabulary was dropped."""
    codes = random_codes(SNAC, 3, seed=2)
    audio = build_delay_pattern(SNAC.to_streams(codes)[None], CONFIG)[0]
    words = PROCESSOR.tokenizer("hello how are you today")["input_ids"]
    answer = torch.cat([torch.tensor([(words * audio.shape[1])[: audio.shape[1]]]), audio])[None]
    decoded = PROCESSOR.decode_parallel(answer, CONFIG)[0]
    assert all(torch.equal(a, b) for a, b in zip(decoded.codes, codes, strict=True))
    for stream, bad, named in [
        (0, -100, "text stream holds -100"),
        (0, CONFIG.vocab_size, f"text stream holds {CONFIG.vocab_size}"),
        (3, CONFIG.audio_stream_vocab_size, f"audio stream 3 holds {CONFIG.audio_stream_vocab_size}"),
        (5, -1, "audio stream 5 holds -1"),
    ]:
        wrong = answer.clone()
        wrong[0, stream, 4] = bad
        with pytest.raises(ValueError, match=f"{named}, outside"):
            PROCESSOR.decode_parallel(wrong, CONFIG)


def test_decode_parallel_takes_text_only_from_the_text_block():
    """The text stream's head also scores the speech block, whose ids carry no text: they are left out of the text
    even with `skip_special_tokens=False` (the speech block's first and last ids included); the audio streams give
    back the codes they carry."""
    codes = random_codes(SNAC, 3, seed=1)
    audio = build_delay_pattern(SNAC.to_streams(codes)[None], CONFIG)[0]
    words = PROCESSOR.tokenizer("hello how are you today")["input_ids"]
    block = PROCESSOR.speech_tokens
    pad = PROCESSOR.tokenizer.pad_token_id  # a special text token: kept under skip_special_tokens=False
    pattern = [words[0], block.start, words[1], block.stop - 1, pad, words[2], block.start + 1, words[3], words[4]]
    row = (pattern * audio.shape[1])[: audio.shape[1]]
    decoded = PROCESSOR.decode_parallel(
        torch.cat([torch.tensor([row]), audio])[None], CONFIG, skip_special_tokens=False
    )
    kept = [token for token in row if token not in block]
    assert decoded[0].text == PROCESSOR.tokenizer.decode(kept, skip_special_tokens=False)
    assert "speech" not in decoded[0].text and "[PAD]" in decoded[0].text
    assert all(torch.equal(a, b) for a, b in zip(decoded[0].codes, codes, strict=True))


# ---- generation → codes → audio ----------------------------------------------------------------------------------


class AudioEndsAfter(LogitsProcessor):
    """Random weights end the audio streams anywhere: keep each stream going for `frames` codes, then end it (or,
    with `frames=None`, never)."""

    def __init__(self, frames: int | None, prompt_length: int):
        self.frames, self.prompt_length = frames, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        streams = CONFIG.num_audio_streams + 1
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            stream = row % streams
            if stream:
                ended = self.frames is not None and step >= CONFIG.audio_stream_delays[stream - 1] + self.frames
                scores[row, CONFIG.audio_eos_token_id] = 1e4 if ended else -float("inf")
        return scores


def test_generated_streams_decode_into_valid_snac_codes():
    batch = PROCESSOR.parallel_prompt([SPOKEN, TYPED], CONFIG, audio=[QUESTION, None], sampling_rate=16000)
    prompt_length, steps = batch["input_ids"].shape[-1], 12
    out = MODEL.generate(
        **batch, max_new_tokens=steps, do_sample=False, logits_processor=[AudioEndsAfter(None, prompt_length)]
    )
    answer = out[:, :, prompt_length:]
    # Without its attention mask the spoken question is still heard (the mask is not read from the text row alone).
    alone = MODEL.generate(
        batch["input_ids"][:1],
        max_new_tokens=steps,
        do_sample=False,
        logits_processor=[AudioEndsAfter(None, prompt_length)],
    )
    with_mask = MODEL.generate(
        batch["input_ids"][:1], attention_mask=torch.ones_like(batch["input_ids"][:1, 0]), max_new_tokens=steps,
        do_sample=False, logits_processor=[AudioEndsAfter(None, prompt_length)],
    )  # fmt: skip
    assert torch.equal(alone, with_mask)
    frames = steps - max(CONFIG.audio_stream_delays)  # the later streams' last codes are still missing
    for item, decoded in enumerate(PROCESSOR.decode_parallel(answer, CONFIG)):
        assert [c.shape for c in decoded.codes] == [(frames,), (2 * frames,), (4 * frames,)]
        assert all(((c >= 0) & (c < SNAC.codebook_size)).all() for c in decoded.codes)
        streams = SNAC.to_streams(decoded.codes)
        for s, delay in enumerate(CONFIG.audio_stream_delays):  # frame k of stream s sits at delay + k
            assert torch.equal(streams[s], answer[item, s + 1, delay : delay + frames])
        assert decoded.waveform.shape == (frames * SNAC.samples_per_frame,) and torch.isfinite(decoded.waveform).all()
        special = {i for i, token in PROCESSOR.tokenizer.added_tokens_decoder.items() if token.special}
        words = [t for t in answer[item, 0].tolist() if t < CONFIG.speech_token_start and t not in special]
        assert decoded.text.split() == PROCESSOR.tokenizer.convert_ids_to_tokens(words)


class TextEndsAt(LogitsProcessor):
    """Ends the text stream (`EOS`) at generated step `step`."""

    def __init__(self, step: int, prompt_length: int):
        self.step, self.prompt_length = step, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step:
            scores = scores.clone()
            scores[:: CONFIG.num_audio_streams + 1, EOS] = 1e4
        return scores


def test_without_a_pad_id_the_text_stream_pads_with_its_end_id():
    """`pad_token_id=None` (DeepTalkConfig's default, and an upcycled Qwen's): the text stream pads with the first end
    id, as transformers' `generate` falls back, so `skip_special_tokens` drops the padding. It was id 0, which
    `decode_parallel` and the streamer kept as text: "!" in GPT-2's and Qwen's vocabularies."""
    model = copy.deepcopy(MODEL)
    config = model.config
    config.pad_token_id = None
    short = PROCESSOR.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    batch = PROCESSOR.parallel_prompt([TYPED, short], config)
    assert batch["attention_mask"][1, 0] == 0 and batch["input_ids"][1, 0, 0] == EOS  # left padding
    prompt_length, end = batch["input_ids"].shape[-1], 6
    out = model.generate(
        **batch,
        max_new_tokens=12,
        do_sample=False,
        speech_answer=[True, False],
        logits_processor=[AudioEndsAfter(2, prompt_length), TextEndsAt(end, prompt_length)],
    )
    answer = out[:, :, prompt_length:]
    speech_end = max(d + 2 for d in config.audio_stream_delays) + 1  # the step after the last audio end code
    for item, text_end in enumerate((min(end, speech_end), end)):
        assert (answer[item, 0, text_end:] == EOS).all() and (answer[item, 0, :text_end] != EOS).all()
        expected = PROCESSOR.tokenizer.decode(answer[item, 0, :text_end], skip_special_tokens=True)
        assert PROCESSOR.decode_parallel(answer, config)[item].text == expected
    config.eos_token_id = None
    with pytest.raises(ValueError, match=r"parallel streams need pad_token_id \(or eos_token_id\) in the config"):
        PROCESSOR.parallel_prompt(TYPED, config)


# ---- streaming ---------------------------------------------------------------------------------------------------


class StampedStreamer(DeepTalkParallelStreamer):
    """Records, for each event, how many generated steps the streamer had received when it queued the event."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.stamps = -1, []  # the first put is the prompt
        queue_put = self.queue.put

        def put(event, *a, **k):
            self.stamps.append(self.steps)
            queue_put(event, *a, **k)

        self.queue.put = put

    def put(self, value):
        self.steps += 1
        super().put(value)


@pytest.mark.parametrize(
    "text, batch_parallel, chunk_frames, answer_frames",
    [(SPOKEN, False, 1, 4), (SPOKEN, True, 2, 3), (TYPED, True, 1, None)],
    ids=["spoken", "spoken-batch-parallel", "typed-batch-parallel-unended"],
)
def test_end_to_end_streaming_equals_the_final_decode(text, batch_parallel, chunk_frames, answer_frames):
    """processor → generate (in a thread) → streamer → codec; the events concatenate to the decode of the returned
    streams, and every frame's units and audio go out at the step that completes its frame group."""
    audio = QUESTION if text == SPOKEN else None
    inputs = PROCESSOR.parallel_prompt(text, CONFIG, audio=audio, sampling_rate=16000)
    prompt_length = inputs["input_ids"].shape[-1]
    streamer = StampedStreamer(PROCESSOR, SNAC, CONFIG, batch_parallel=batch_parallel, audio_chunk_frames=chunk_frames)
    result = {}
    generation = threading.Thread(
        target=lambda: result.setdefault(
            "out",
            MODEL.generate(
                **inputs,
                max_new_tokens=12,
                do_sample=False,
                batch_parallel=batch_parallel,
                streamer=streamer,
                logits_processor=[AudioEndsAfter(answer_frames, prompt_length)],
            ),
        )
    )
    generation.start()
    events = list(streamer)
    generation.join()
    answer = result["out"][:, :, prompt_length:]
    decoded = PROCESSOR.decode_parallel(answer, CONFIG)[0]
    stamps = dict(zip(map(id, events), streamer.stamps[:-1], strict=True))  # the last: the end of the queue

    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == decoded.text != ""
    speech = [e for e in events if isinstance(e, SpeechChunk)]
    assert {e.segment for e in speech} == {0}
    assert sum((e.units for e in speech), []) == SNAC.to_units(decoded.codes).tolist()
    frames = len(decoded.codes[0])
    assert frames == (answer_frames or 12 - max(CONFIG.audio_stream_delays))
    # frame k is complete once the latest stream has emitted its code, at answer position max(delay) + k
    complete = [max(CONFIG.audio_stream_delays) + k + 1 for k in range(frames)]
    sent = 0
    for chunk in speech:
        assert len(chunk.units) == SNAC.units_per_frame and stamps[id(chunk)] == complete[sent]
        sent += 1
    voiced = 0
    for chunk in (e for e in events if isinstance(e, AudioChunk)):
        assert chunk.sampling_rate == SNAC.sampling_rate and chunk.waveform.shape[0] % SNAC.samples_per_frame == 0
        voiced += chunk.waveform.shape[0] // SNAC.samples_per_frame
        if voiced % chunk_frames == 0:  # a full chunk: right when its last frame completed
            assert stamps[id(chunk)] == complete[voiced - 1]
        else:  # the rest, when generation ends
            assert voiced == frames and stamps[id(chunk)] == answer.shape[-1]
    assert voiced == frames and decoded.waveform.shape == (frames * SNAC.samples_per_frame,)


def test_the_text_pad_after_the_text_ended_decodes_no_text():
    """While the audio goes on, the ended text stream emits its pad each step: re-decoding the text for it made the
    streamer's cost per step grow with the answer."""
    streamer = DeepTalkParallelStreamer(PROCESSOR, SNAC, CONFIG)
    decodes = []
    send_text = streamer._send_text
    streamer._send_text = lambda final: (decodes.append(final), send_text(final))
    audio_pad = [CONFIG.audio_pad_token_id] * CONFIG.num_audio_streams
    streamer.put(torch.tensor([CONFIG.pad_token_id, *audio_pad])[:, None])  # the prompt
    word = PROCESSOR.tokenizer.convert_tokens_to_ids("hello")
    for text in (word, EOS, *[CONFIG.pad_token_id] * 20):
        streamer.put(torch.tensor([text, *audio_pad])[:, None])
    assert decodes == [False, False]


def test_a_streamer_serves_one_generate_call_after_another():
    inputs = PROCESSOR.parallel_prompt(SPOKEN, CONFIG, audio=QUESTION, sampling_rate=16000)

    def events(streamer) -> list:
        MODEL.generate(**inputs, max_new_tokens=8, do_sample=False, streamer=streamer)
        return [(type(e).__name__, getattr(e, "text", None), getattr(e, "units", None)) for e in streamer]

    reused = DeepTalkParallelStreamer(PROCESSOR, SNAC, CONFIG)
    first = events(reused)
    assert any(name == "SpeechChunk" for name, *_ in first)
    assert events(reused) == first == events(DeepTalkParallelStreamer(PROCESSOR, SNAC, CONFIG))


def test_streamer_checks_its_layout():
    streamer = DeepTalkParallelStreamer(PROCESSOR, SNAC, CONFIG, batch_parallel=True)
    with pytest.raises(ValueError, match="expected 16 rows"):
        streamer.put(torch.zeros(8, 3, dtype=torch.long))
    # two items generated without batch parallel decoding have as many rows: the second is no copy of the first
    two_items = PROCESSOR.parallel_prompt([TYPED, SPOKEN], CONFIG, audio=[None, QUESTION], sampling_rate=16000)
    with pytest.raises(ValueError, match="these rows are two items"):
        streamer.put(two_items["input_ids"].flatten(0, 1))
    with pytest.raises(ValueError, match="num_audio_streams=7"):
        DeepTalkParallelStreamer(PROCESSOR, MIMI, CONFIG)
