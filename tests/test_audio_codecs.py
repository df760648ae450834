"""Audio codecs: torch resampling, the flat unit layouts (SNAC in Mini-Omni order, Mimi interleaved), audio round trips
through randomly initialised SNAC and Mimi models, loading from a folder, the processor's `audio=` path, bad input."""

import json
import math
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, ProcessorMixin

from deeptalk_hf.audio_codecs import AudioCodec, FlatUnitCodec, MimiCodec, SnacCodec, _snac_frame_levels, resample

from .speech_fixtures import HAVE_SNAC, needs_snac, tiny_mimi, tiny_processor, tiny_snac

SNAC = SnacCodec(tiny_snac()) if HAVE_SNAC else None
MIMI = MimiCodec(tiny_mimi(), num_codebooks=4)
CODECS = {"snac": SNAC, "mimi": MIMI}
BOTH = [pytest.param("snac", marks=needs_snac), "mimi"]


# ---- resampling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orig", "new"), [(16000, 24000), (44100, 24000), (24000, 16000), (8000, 24000), (22050, 24000)]
)
def test_resample_matches_the_analytic_sine(orig, new):
    seconds = torch.arange(orig // 2, dtype=torch.float64) / orig
    out = resample(torch.sin(2 * math.pi * 440 * seconds), orig, new)
    assert out.shape[-1] == math.ceil(len(seconds) * new / orig)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(out.shape[-1], dtype=torch.float64) / new)
    inner = slice(out.shape[-1] // 10, -out.shape[-1] // 10)
    torch.testing.assert_close(out[inner], expected[inner], atol=2e-3, rtol=0)


def test_resample_removes_what_the_new_rate_cannot_hold():
    """A 10 kHz tone is above 8 kHz's Nyquist frequency: resampling 24 kHz → 16 kHz must filter it out."""
    seconds = torch.arange(24000) / 24000
    out = resample(torch.sin(2 * math.pi * 10000 * seconds), 24000, 16000)
    assert out[1000:-1000].abs().max() < 0.02


def windowed_sinc(waveform: np.ndarray, orig: int, new: int, zeros: int = 16, rolloff: float = 0.95) -> np.ndarray:
    """The direct sum `resample` computes polyphase: output n, at input time n * orig / new, is the input weighted by
    a sinc low-passed at `rolloff` times the lower Nyquist frequency, under a Hann window `zeros` crossings wide."""
    cutoff = rolloff * min(orig, new) / orig / 2  # cycles per input sample
    width = zeros / (2 * cutoff)
    t = np.arange(len(waveform))[None, :] - (np.arange(math.ceil(len(waveform) * new / orig)) * orig / new)[:, None]
    window = np.where(np.abs(t) <= width, np.cos(np.pi * t / (2 * width)) ** 2, 0.0)
    return (2 * cutoff * np.sinc(2 * cutoff * t) * window) @ waveform


@given(
    length=st.integers(1, 400),
    rates=st.sampled_from([(16000, 24000), (24000, 16000), (44100, 24000), (8000, 24000), (48000, 24000)]),
    seed=st.integers(0, 2**16),
)
def test_resample_is_the_direct_hann_windowed_sinc_sum(length, rates, seed):
    waveform = np.random.default_rng(seed).standard_normal(length)
    out = resample(torch.from_numpy(waveform), *rates)
    np.testing.assert_allclose(out.numpy(), windowed_sinc(waveform, *rates), rtol=0, atol=1e-9)


@given(length=st.integers(1, 3000), rates=st.sampled_from([(16000, 24000), (48000, 24000), (24000, 24000)]))
def test_resample_keeps_leading_shape_and_length(length, rates):
    waveform = torch.randn(2, 3, length)
    out = resample(waveform, *rates)
    assert out.shape == (2, 3, math.ceil(length * rates[1] / rates[0]))
    torch.testing.assert_close(out[1, 2], resample(waveform[1, 2], *rates))


def test_resample_refuses_what_it_would_get_wrong():
    """Integer samples would go through an integer kernel (all zeros); rates must be whole positive Hz."""
    for waveform in (torch.full((100,), 10000, dtype=torch.int16), torch.zeros(100).numpy()):
        with pytest.raises(ValueError, match="floating-point torch tensor"):
            resample(waveform, 16000, 24000)
    for rates in [(16000.5, 24000), (0, 24000), (16000, -1)]:
        with pytest.raises(ValueError, match="positive integers"):
            resample(torch.zeros(100), *rates)
    assert resample(torch.ones(8), np.int64(16000), 16000).shape == (8,)  # numpy integers are whole Hz too
    for waveform in (torch.zeros(()), torch.zeros(2, 0)):
        with pytest.raises(ValueError, match="with samples"):
            resample(waveform, 16000, 24000)
    # Coprime rates would need a 4800-phase kernel of gigabytes: refused by name, before any memory is taken.
    with pytest.raises(ValueError, match="4001 -> 4800 Hz reduces to 4800/4001"):
        resample(torch.zeros(400), 4001, 4800)
    # zeros=0 gave NaNs, a rolloff above 1 an aliased signal of twice the amplitude
    for options in (dict(zeros=0), dict(zeros=-3), dict(zeros=2.5), dict(rolloff=0.0), dict(rolloff=2.0)):
        with pytest.raises(ValueError, match="zeros=.* must be a positive integer and rolloff=.* in \\(0, 1\\]"):
            resample(torch.zeros(100), 16000, 24000, **options)


# ---- unit layouts ------------------------------------------------------------------------------------------------


@needs_snac
def test_snac_frame_is_mini_omnis_depth_first_order():
    assert _snac_frame_levels([4, 2, 1]) == (0, 1, 2, 2, 1, 2, 2)
    assert _snac_frame_levels([8, 4, 2, 1]) == (0, 1, 2, 3, 3, 2, 3, 3, 1, 2, 3, 3, 2, 3, 3)
    size = SNAC.codebook_size
    c0, c1, c2 = torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8, 9, 10, 11, 12, 13, 14])
    units = SNAC.to_units([c0, c1, c2]).tolist()
    first_frame = [1, size + 3, 2 * size + 7, 2 * size + 8, size + 4, 2 * size + 9, 2 * size + 10]
    assert units[:7] == first_frame
    assert units[7:] == [2, size + 5, 2 * size + 11, 2 * size + 12, size + 6, 2 * size + 13, 2 * size + 14]


def test_mimi_frames_interleave_the_codebooks():
    codes = [torch.tensor([level, 10 + level]) for level in range(4)]
    size = MIMI.codebook_size
    assert MIMI.to_units(codes).tolist() == [lv * size + lv for lv in range(4)] + [
        lv * size + 10 + lv for lv in range(4)
    ]


@pytest.mark.parametrize("name", BOTH)
@given(frames=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_units_round_trip_codes(name, frames, seed):
    codec = CODECS[name]
    generator = torch.Generator().manual_seed(seed)
    codes = [
        torch.randint(0, codec.codebook_size, (frames * codec.frame_levels.count(level),), generator=generator)
        for level in range(codec.num_codebooks)
    ]
    units = codec.to_units(codes)
    assert units.shape == (frames * codec.units_per_frame,)
    assert units.numel() == 0 or 0 <= int(units.min()) <= int(units.max()) < codec.num_units
    assert all(torch.equal(a, b) for a, b in zip(codec.from_units(units), codes, strict=True))


@needs_snac
@pytest.mark.parametrize(
    ("units", "message"),
    [
        ([0] * 6, "6 units are not whole frames of 7"),
        ([0, 64, 128, 128, 64, 128, 64], "unit 64 at position 6 is not a level-2 unit (range [128, 192))"),
        ([-1, 64, 128, 128, 64, 128, 128], "unit -1 at position 0 is not a level-0 unit"),
        ([64, 64, 128, 128, 64, 128, 128], "unit 64 at position 0 is not a level-0 unit"),
    ],
)
def test_from_units_names_the_misplaced_unit(units, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SNAC.from_units(units)


@pytest.mark.parametrize("name", BOTH)
def test_codes_units_and_streams_must_be_integers(name):
    """A float code is corrupt: refused, not truncated to a valid-looking one."""
    codec = CODECS[name]
    units = codec.to_units([torch.zeros(n, dtype=torch.long) for n in codec._codes_per_frame])
    for call, value in [
        (codec.from_units, units.double() + 0.9),
        (codec.from_units, (units.double() + 0.9).tolist()),
        (codec.from_streams, codec.to_streams(codec.from_units(units)).double()),
        (codec.to_units, [torch.zeros(n) for n in codec._codes_per_frame]),
    ]:
        with pytest.raises(ValueError, match="must be integers"):
            call(value)


def test_from_units_takes_one_stream_not_a_batch_or_a_list_of_segments():
    """`SpeechTextOutput.speech_units` is a list of segments and `generate` gives rows: two of them were concatenated
    into one audio (equal lengths) or failed in torch's words (unequal)."""
    units = MIMI.to_units([torch.arange(2) for _ in range(MIMI.num_codebooks)])  # 2 frames
    frame = MIMI.units_per_frame
    assert all(torch.equal(a, b) for a, b in zip(MIMI.from_units(units[None]), MIMI.from_units(units), strict=True))
    for value in (units.reshape(2, frame), units.reshape(2, frame).tolist()):
        with pytest.raises(ValueError, match=r"units must be one unit stream, got shape \(2, "):
            MIMI.from_units(value)
    with pytest.raises(ValueError, match="units must be integers in one rectangular sequence"):
        MIMI.from_units([units.tolist(), units[:frame].tolist()])


@needs_snac
def test_to_units_checks_the_codes():
    with pytest.raises(ValueError, match="codes for 3 codebook levels, got 2"):
        SNAC.to_units([torch.tensor([1]), torch.tensor([1, 2])])
    with pytest.raises(ValueError, match=r"level 2 has codes of shape \(3,\); expected \[4\]"):
        SNAC.to_units([torch.tensor([1]), torch.tensor([1, 2]), torch.tensor([1, 2, 3])])
    with pytest.raises(ValueError, match=r"level 0 has codes outside \[0, 64\)"):
        SNAC.to_units([torch.tensor([64]), torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4])])


@pytest.mark.parametrize("name", BOTH)
def test_codes_may_be_lists_or_arrays(name):
    """As `from_units` takes a list: the codes `encode` gives, as lists or arrays, decode and flatten the same."""
    codec = CODECS[name]
    codes = codec.encode(0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0)), 24000)
    for convert in (torch.Tensor.tolist, torch.Tensor.numpy):
        assert torch.equal(codec.to_units([convert(c) for c in codes]), codec.to_units(codes))
        waveforms = []
        for as_given in ([convert(c) for c in codes], codes):
            torch.manual_seed(0)  # SNAC's decoder adds noise
            waveforms.append(codec.decode(as_given))
        assert torch.equal(*waveforms)


# ---- audio round trips through random-weight codecs --------------------------------------------------------------


@pytest.mark.parametrize("name", BOTH)
@pytest.mark.parametrize(("rate", "samples"), [(16000, 5000), (24000, 4000), (44100, 9000)])
def test_audio_round_trip_shapes_frames_and_rates(name, rate, samples):
    codec = CODECS[name]
    assert isinstance(codec, AudioCodec) and codec.sampling_rate == 24000
    waveform = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(0))
    codes = codec.encode(waveform, rate)
    frames = math.ceil(math.ceil(samples * 24000 / rate) / codec.samples_per_frame)
    assert [c.shape for c in codes] == [(frames * codec.frame_levels.count(lv),) for lv in range(codec.num_codebooks)]
    assert all(c.dtype == torch.long and 0 <= int(c.min()) and int(c.max()) < codec.codebook_size for c in codes)
    units = codec.to_units(codes)
    assert units.shape == (frames * codec.units_per_frame,)
    audio = codec.decode(codec.from_units(units))
    assert audio.shape == (frames * codec.samples_per_frame,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()
    assert codec.samples_per_frame == codec.sampling_rate / codec.frame_rate


@needs_snac
class FrameMeanCodec(FlatUnitCodec):
    """A transparent one-level codec: each frame of 4 samples is its mean quantised to 16 codes, so (unlike a tiny
    random SNAC, whose codes hardly depend on the audio) different waveforms give different codes."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.sampling_rate, self.frame_rate, self.num_codebooks, self.codebook_size = 8000, 2000.0, 1, 16
        self.frame_levels = (0,)

    def _encode(self, waveform):
        frames = waveform[: len(waveform) // 4 * 4].reshape(-1, 4).mean(1)
        return [((frames.clamp(-1, 1) + 1) * 7.5).round().long()]


def test_stereo_is_mixed_down_to_the_mean_of_its_channels():
    codec = FrameMeanCodec()
    ramp = torch.linspace(-0.9, 0.9, 64)
    stereo = torch.stack([ramp, -ramp.flip(0) * 0.2])
    (mixed,) = codec.encode(stereo, 8000)
    assert torch.equal(mixed, codec.encode(stereo.mean(0), 8000)[0])
    assert not torch.equal(mixed, codec.encode(stereo[0], 8000)[0])
    assert not torch.equal(mixed, codec.encode(stereo[1], 8000)[0])


def test_stereo_is_mixed_down_and_numpy_inputs_work():
    stereo = 0.1 * torch.randn(2, 3000, generator=torch.Generator().manual_seed(1))
    expected = SNAC.encode(stereo.mean(0), 24000)
    for got in (SNAC.encode(stereo, 24000), SNAC.encode(stereo.numpy(), np.int64(24000))):
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(
    ("waveform", "rate", "message"),
    [
        (torch.zeros(100), 0, "sampling_rate=0 must be a positive integer"),
        (torch.zeros(100), -16000, "sampling_rate=-16000"),
        (torch.zeros(100), 16000.0, "sampling_rate=16000.0"),
        (torch.zeros(0), 16000, "the waveform is empty"),
        (torch.zeros(2, 0), 16000, "the waveform is empty"),
        (torch.zeros(0, 100), 16000, "no channel"),
        (torch.zeros(100, dtype=torch.int16), 16000, "floating-point samples"),
        (torch.full((100,), float("nan")), 16000, "NaN or infinite"),
        (torch.zeros(1, 1, 100), 16000, "[samples] or [channels, samples]"),
        (torch.zeros(3000, 2), 16000, "more channels than samples, so probably [samples, channels]"),
    ],
)
@pytest.mark.parametrize("name", BOTH)
def test_bad_audio_raises(name, waveform, rate, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CODECS[name].encode(waveform, rate)


@needs_snac
@pytest.mark.parametrize("vq_strides", [[4, 2, 1], [8, 4, 2, 1]])
def test_a_snac_with_local_attention_decodes_any_number_of_frames(vq_strides):
    """SNAC 32/44 kHz attend within windows of latent steps: a streamed chunk or an answer of a few frames must
    decode too, to `samples_per_frame` samples per frame, and the encoder's own window-sized output as SNAC does."""
    # decoder_dim 64: one attention head; noise=False: decoding is deterministic, so comparable
    model = tiny_snac(decoder_dim=64, attn_window_size=16, codebook_size=16, vq_strides=vq_strides, noise=False)
    codec = SnacCodec(model)
    waveform = 0.1 * torch.randn(9000, generator=torch.Generator().manual_seed(0))
    units = codec.to_units(codec.encode(waveform, 24000))
    with torch.inference_mode():
        codes = [c[0] for c in model.encode(waveform[None, None])]  # whole windows, as SNAC decodes them
        torch.testing.assert_close(codec.decode(codes), model.decode([c[None] for c in codes])[0, 0])
    for frames in (1, 2, 3):
        audio = codec.decode(codec.from_units(units[: frames * codec.units_per_frame]))
        assert audio.shape == (frames * codec.samples_per_frame,) and torch.isfinite(audio).all()
    # Encoding keeps the frames the audio fills (SNAC pads it to whole windows: 4 frames at strides 8/4/2/1, whose
    # extra frames would be units of padding), each as SNAC codes it.
    for samples in (1, codec.samples_per_frame, codec.samples_per_frame + 1, 5 * codec.samples_per_frame - 7):
        waveform = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(samples))
        codes = codec.encode(waveform, 24000)
        frames = -(-samples // codec.samples_per_frame)
        with torch.inference_mode():
            full = model.encode(waveform[None, None])
        assert len(codes[0]) == frames * codec._codes_per_frame[0]
        for ours, theirs in zip(codes, full, strict=True):
            assert torch.equal(ours, theirs[0, : ours.numel()])


@pytest.mark.parametrize("name", BOTH)
def test_codes_and_audio_are_ordinary_tensors_and_the_codec_still_trains(name):
    """Codes may be training labels and audio a loss target; the codec model itself (Mimi caches its codebook at the
    first call) must still train after encoding: no inference-mode tensors anywhere."""
    model, options = (tiny_mimi(), {"num_codebooks": MIMI.num_codebooks}) if name == "mimi" else (tiny_snac(), {})
    codec = type(CODECS[name])(model, **options)
    codes = codec.encode(0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0)), 16000)
    audio = codec.decode(codes)
    assert not any(t.is_inference() for t in (*codes, audio))
    logits = torch.randn(codes[0].numel(), codec.codebook_size, requires_grad=True)
    torch.nn.functional.cross_entropy(logits, codes[0]).backward()
    audio.mul_(0.5)
    waveform = 0.1 * torch.randn(1, 1, 4000)
    decoded = model(waveform, num_quantizers=MIMI.num_codebooks).audio_values if name == "mimi" else model(waveform)[0]
    decoded.sum().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())


@pytest.mark.parametrize("name", BOTH)
def test_a_half_precision_codec_encodes_and_decodes(name):
    """A codec model in bfloat16 (as on a GPU) gets its waveform in bfloat16; zero frames are refused by name."""
    # A fresh model: a used Mimi caches its codebooks in float32 outside what `.to` converts.
    model, options = (tiny_mimi(), {"num_codebooks": MIMI.num_codebooks}) if name == "mimi" else (tiny_snac(), {})
    codec = type(CODECS[name])(model.to(torch.bfloat16), **options)
    codes = codec.encode(0.1 * torch.randn(4000, generator=torch.Generator().manual_seed(0)), 16000)
    assert [c.shape for c in codes] == [c.shape for c in CODECS[name].encode(torch.zeros(4000), 16000)]
    assert codec.decode(codes).dtype == torch.float32
    with pytest.raises(ValueError, match="no frame"):
        codec.decode([c[:0] for c in codes])


@needs_snac
def test_codecs_load_from_a_folder(tmp_path):
    snac_dir, mimi_dir = tmp_path / "snac", tmp_path / "mimi"
    snac_dir.mkdir()
    model = SNAC.model
    config = {
        key: getattr(model, key)
        for key in ("sampling_rate", "encoder_dim", "encoder_rates", "decoder_dim", "codebook_size", "codebook_dim")
    }
    config.update(decoder_rates=[8, 8, 4, 2], attn_window_size=None, vq_strides=[4, 2, 1])
    (snac_dir / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), snac_dir / "pytorch_model.bin")
    MIMI.model.save_pretrained(mimi_dir)
    waveform = 0.1 * torch.randn(3000, generator=torch.Generator().manual_seed(2))
    for original, loaded in (
        (SNAC, SnacCodec.from_pretrained(str(snac_dir))),
        (MIMI, MimiCodec.from_pretrained(mimi_dir, 4)),
    ):
        assert all(
            torch.equal(a, b)
            for a, b in zip(loaded.encode(waveform, 24000), original.encode(waveform, 24000), strict=True)
        )


def test_a_mimi_checkpoint_missing_weights_is_refused(tmp_path):
    """transformers leaves a missing weight random (a logged report only): the codec would make noise of units."""
    MIMI.model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["decoder.layers.0.conv.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold every weight of MimiModel: missing .*decoder"):
        MimiCodec.from_pretrained(tmp_path, 4)


def test_mimi_codebook_count_is_checked():
    with pytest.raises(ValueError, match=r"num_codebooks=9 must be in \[1, 8\]"):
        MimiCodec(MIMI.model, num_codebooks=9)
    with pytest.raises(ValueError, match=r"num_codebooks=0 must be in \[1, 8\]"):
        MimiCodec(MIMI.model, num_codebooks=0)
    for flag_or_fraction in (True, 2.0):  # True made a one-codebook codec; 2.0 failed later in a bare TypeError
        with pytest.raises(ValueError, match=f"num_codebooks={flag_or_fraction} must be"):
            MimiCodec(MIMI.model, num_codebooks=flag_or_fraction)


# ---- the processor's audio= path ---------------------------------------------------------------------------------


@needs_snac
def test_processor_encodes_audio_into_speech_segments():
    processor = tiny_processor(SNAC.num_units, codec=SNAC)
    question, answer = (0.1 * torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (3000, 5000))
    encoded = processor(text=["hello <|speech|> world", "<|speech|>"], audio=[question, [answer]], sampling_rate=16000)
    expected = [SNAC.to_units(SNAC.encode(w, 16000)).tolist() for w in (question, answer)]
    assert [processor.decode(ids).speech_units for ids in encoded["input_ids"]] == [[expected[0]], [expected[1]]]
    # through the chat template: an audio block with its rate, then a speech-units block
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": question, "sampling_rate": 16000},
                {"type": "speech", "units": [5]},
            ],
        }
    ]
    ids = processor.apply_chat_template(conversation, tokenize=True)[0]
    assert processor.decode(ids).speech_units == [expected[0], [5]]
    with pytest.raises(ValueError, match="needs its sampling rate"):
        processor(text="<|speech|>", audio=question)
    # A feature extractor's option means nothing to a codec: refused, not ignored (the text's padding is not one).
    with pytest.raises(ValueError, match=r"encodes audio with its codec, which takes no \['do_normalize'\]"):
        processor(text="<|speech|>", audio=question, sampling_rate=16000, audio_kwargs={"do_normalize": True})
    padded = processor(text=["<|speech|>", "hello"], audio=[[question], []], sampling_rate=16000, padding=True)
    assert processor.decode(padded["input_ids"][0]).speech_units == [expected[0]]
    # Samples in a list are told how to pass them, not that they must be integer ids (the speech units' wording).
    with pytest.raises(ValueError, match=r"audio must be a waveform .* torch\.tensor\(\.\.\.\)\) or a list of them"):
        processor(text="<|speech|>", audio=question.tolist(), sampling_rate=16000)


@needs_snac
def test_processor_refuses_a_codec_with_more_units_than_the_tokenizer():
    processor = tiny_processor(SNAC.num_units - 1, codec=SNAC)
    with pytest.raises(
        ValueError, match=f"makes {SNAC.num_units} distinct units but the tokenizer has {SNAC.num_units - 1}"
    ):
        processor(text="<|speech|>", audio=torch.zeros(100), sampling_rate=24000)


def test_snac_loading_names_the_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "snac", None)  # as if the package were not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'deeptalk-hf[audio]'")):
        SnacCodec.from_pretrained("hubertsiuzdak/snac_24khz")


def test_continuing_a_final_audio_block_continues_its_units():
    """With a codec an audio block is its units: a final one is continued as the same speech block would be."""
    processor = tiny_processor(MIMI.num_units, codec=MIMI)
    waveform = 0.1 * torch.randn(3000, generator=torch.Generator().manual_seed(4))
    units = MIMI.to_units(MIMI.encode(waveform, 16000)).tolist()
    question = {"role": "user", "content": "hello"}
    opened = []
    for block in ({"type": "audio", "audio": waveform, "sampling_rate": 16000}, {"type": "speech", "units": units}):
        conversation = [question, {"role": "assistant", "content": [{"type": "text", "text": "how"}, block]}]
        opened.append(processor.apply_chat_template(conversation, continue_final_message=True, tokenize=True)[0])
    assert opened[0] == opened[1] and processor.decode(opened[0]).speech_units == [units]
    assert opened[0][-1] == processor.speech_token_start + units[-1]  # the segment stays open
    conversation[-1]["content"][-1] = {"type": "audio", "audio": waveform}
    with pytest.raises(ValueError, match='holding samples needs its "sampling_rate"'):
        processor.apply_chat_template(conversation, continue_final_message=True)
    # The call's rate is the one files are loaded at; an array's own rate goes in its block (the error said to pass
    # sampling_rate=, which the call had).
    with pytest.raises(ValueError, match=re.escape("a call's sampling_rate= is the rate audio files are loaded at")):
        processor.apply_chat_template([conversation[-1]], sampling_rate=16000, tokenize=True)


def test_the_codec_is_not_saved_with_the_processor_but_can_be_passed_back(tmp_path):
    processor = tiny_processor(MIMI.num_units, codec=MIMI)
    processor.save_pretrained(tmp_path)
    assert "codec" not in json.loads((tmp_path / "processor_config.json").read_text())
    assert processor.codec is MIMI  # saving leaves it in place
    assert AutoProcessor.from_pretrained(tmp_path).codec is None
    loaded = AutoProcessor.from_pretrained(tmp_path, codec=MIMI)
    waveform = 0.1 * torch.randn(3000, generator=torch.Generator().manual_seed(3))
    sample = {"text": "hello <|speech|>", "audio": waveform, "sampling_rate": 24000}
    assert loaded(**sample)["input_ids"] == processor(**sample)["input_ids"]


def test_serializing_the_processor_never_takes_its_codec_away(monkeypatch):
    """`to_dict` (`repr`, `save_pretrained`) leaves the codec out of the copy without taking it off the processor:
    a thread encoding audio meanwhile found none (AttributeError)."""
    processor = tiny_processor(MIMI.num_units, codec=MIMI)
    seen = []
    serialize = ProcessorMixin.to_dict

    def spy(self):
        seen.append(processor.__dict__.get("codec"))
        return serialize(self)

    monkeypatch.setattr(ProcessorMixin, "to_dict", spy)
    assert "codec" not in processor.to_dict() and "codec" not in repr(processor).split("\n\n", 1)[1]
    assert len(seen) == 2 and all(codec is MIMI for codec in seen) and processor.codec is MIMI


def test_resampling_to_the_same_rate_returns_the_waveform_unchanged():
    """Audio already at the codec's rate is encoded as given: the low-pass (rolloff 0.95 of Nyquist) must not run
    when the rates are equal, or every same-rate input would lose its top band."""
    from deeptalk_hf.audio_codecs import resample

    torch.manual_seed(0)
    waveform = torch.randn(2, 400)
    assert torch.equal(resample(waveform, 24000, 24000), waveform)


def test_audio_files_in_a_chat_are_loaded_at_the_codecs_rate(monkeypatch):
    """transformers loads chat audio at 16 kHz by default (its rate without a feature extractor): a 24 kHz codec would
    get audio without its top band, and a file continued as the final block (loaded at the codec's rate) other units.
    A file may also come as transformers' chat format gives it, in `"audio"`; a given `sampling_rate` wins."""
    import transformers.audio_utils

    asked = []

    def load_audio(source: str, sampling_rate: int = 16000, **_) -> np.ndarray:
        asked.append((source, sampling_rate))
        return np.sin(np.arange(sampling_rate // 10, dtype=np.float32))

    monkeypatch.setattr(transformers.audio_utils, "load_audio", load_audio)
    processor = tiny_processor(MIMI.num_units, codec=MIMI)
    for block in ({"type": "audio", "path": "q.wav"}, {"type": "audio", "audio": "q.wav"}):
        processor.apply_chat_template([{"role": "user", "content": [block]}], tokenize=True)
    processor.apply_chat_template([{"role": "user", "content": [block]}], tokenize=True, sampling_rate=16000)
    # A `datasets` table gives every block every key, the unset ones None: the file is the one that is set (such a
    # block was taken for one holding samples).
    unset = dict.fromkeys(("text", "units", "audio", "path", "url", "sampling_rate"))
    for key in ("path", "url", "audio"):
        block = {**unset, "type": "audio", key: f"{key}.wav"}
        processor.apply_chat_template([{"role": "user", "content": [block]}], tokenize=True)
    with pytest.raises(ValueError, match=r'needs its "audio" samples .* or a file in "path", "url" or "audio" \(got'):
        processor.apply_chat_template([{"role": "user", "content": [{**unset, "type": "audio"}]}], tokenize=True)
    assert asked == [("q.wav", 24000), ("q.wav", 24000), ("q.wav", 16000)] + [
        (f"{key}.wav", 24000) for key in ("path", "url", "audio")
    ]


def test_mimi_levels_are_the_models_codebooks_in_order():
    """Level l of MimiCodec's codes is the model's codebook l (Moshi's order, the semantic codebook first), in encoding
    and decoding alike: a round trip alone would not see the levels swapped consistently, or decoded in another
    order. (The tiny Mimi's codebooks start at zero, so every code is 0: they are drawn at random here.)"""
    model, generator = tiny_mimi(), torch.Generator().manual_seed(0)
    for name, buffer in model.named_buffers():
        if name.endswith("codebook.embed_sum"):
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    codec = MimiCodec(model, num_codebooks=4)
    waveform = 0.1 * torch.randn(8000, generator=generator)
    codes = codec.encode(waveform, codec.sampling_rate)
    with torch.no_grad():
        direct = model.encode(waveform[None, None], num_quantizers=4).audio_codes[0]
        reference = model.decode(direct[None]).audio_values[0, 0]
    assert len({tuple(level.tolist()) for level in direct}) == 4  # levels the test can tell apart
    assert all(torch.equal(level, model_level) for level, model_level in zip(codes, direct, strict=True))
    assert torch.allclose(codec.decode(codes), reference)
