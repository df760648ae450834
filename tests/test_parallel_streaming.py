"""Parallel streams on the processor side: codec codes ↔ the parallel audio streams."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deeptalk_hf import DeepTalkConfig, MimiCodec, SnacCodec
from deeptalk_hf.generation_deeptalk import audio_codes_per_stream, build_delay_pattern

from .speech_fixtures import tiny_mimi, tiny_snac

pytest.importorskip("snac")
SNAC = SnacCodec(tiny_snac())
MIMI = MimiCodec(tiny_mimi(), num_codebooks=4)


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
