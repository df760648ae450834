"""Audio codecs behind one small protocol: waveform ↔ codes per codebook level ↔ the flat unit stream the LLM sees.

A codec's frame is the smallest stretch of audio that every codebook level covers with whole codes. The LLM sees each
frame as `units_per_frame` consecutive units in a fixed order (`frame_levels`, the level of each position), and a
unit is `level * codebook_size + code`, so every level has its own ids and a position's level can be checked:

- SNAC (Mini-Omni, DeepTalk): levels at strides 4/2/1 give 1 + 2 + 4 = 7 codes per frame, in the depth-first order
  Mini-Omni uses, `c0[i], c1[2i], c2[4i], c2[4i+1], c1[2i+1], c2[4i+2], c2[4i+3]`;
- Mimi (Moshi): one code per level per 12.5 Hz frame, the levels interleaved `q0[t], q1[t], …`.

Parallel decoding (DeepTalk, Mini-Omni) reads the same frames as `units_per_frame` streams instead: stream s carries
frame position s of every frame as a raw code in `[0, codebook_size)` (`to_streams` / `from_streams`).

Resampling is plain torch (a windowed-sinc filter), so no torchaudio is needed.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_deeptalk import is_whole


@runtime_checkable
class AudioCodec(Protocol):
    """What the processor, the streamer and the speech-unit logits processor need from a codec."""

    sampling_rate: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    frame_levels: tuple[int, ...]

    @property
    def num_units(self) -> int: ...

    @property
    def units_per_frame(self) -> int: ...

    @property
    def samples_per_frame(self) -> int: ...

    def encode(self, waveform: torch.Tensor, sampling_rate: int) -> list[torch.LongTensor]: ...

    def to_units(self, codes: list[torch.LongTensor]) -> torch.LongTensor: ...

    def from_units(self, units: torch.LongTensor) -> list[torch.LongTensor]: ...

    def to_streams(self, codes: list[torch.LongTensor]) -> torch.LongTensor: ...

    def from_streams(self, streams: torch.LongTensor) -> list[torch.LongTensor]: ...

    def decode(self, codes: list[torch.LongTensor]) -> torch.Tensor: ...


def _cutoff(up: int, down: int, rolloff: float) -> float:
    """The low-pass cutoff in cycles per input sample: below the lower of the two Nyquist frequencies."""
    return rolloff * min(1.0, up / down) / 2


@lru_cache(maxsize=16)
def _sinc_kernel(up: int, down: int, zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """One low-pass interpolation kernel per output phase, `[up, 1, taps]`, and the taps' half-width."""
    cutoff = _cutoff(up, down, rolloff)
    width = zeros / (2 * cutoff)  # half-width in input samples: `zeros` zero crossings of the sinc
    half = math.ceil(width)
    offsets = torch.arange(-half, half + down, dtype=torch.float64)  # input offsets from frame start m * down
    phases = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # where output phase p sits in the frame
    t = offsets[None, :] - phases
    window = torch.cos(torch.pi * t.clamp(-width, width) / (2 * width)) ** 2
    kernel = 2 * cutoff * torch.sinc(2 * cutoff * t) * window
    return kernel[:, None, :], half


def has_integer_dtype(value: torch.Tensor | np.ndarray) -> bool:
    """Integer ids or codes (booleans are flags, floats a corrupt value: neither is an id)."""
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return np.issubdtype(value.dtype, np.integer)


def _integer_tensor(values: object, name: str) -> torch.Tensor:
    """`values` as a long tensor: a float or boolean code is corrupt, so it is refused rather than truncated."""
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError) as error:  # nested lists of unequal lengths, or of other objects
        raise ValueError(f"{name} must be integers in one rectangular sequence: {error}") from error
    if tensor.numel() and not has_integer_dtype(tensor):
        raise ValueError(f"{name} must be integers, got {tensor.dtype}")
    return tensor.long()


# Largest polyphase kernel `resample` builds (float64 elements, 32 MiB): rates whose ratio only reduces to large
# coprime numbers (4001 -> 4800 Hz) would need gigabytes.
_MAX_KERNEL_ELEMENTS = 1 << 22


def resample(
    waveform: torch.Tensor, orig_sampling_rate: int, new_sampling_rate: int, *, zeros: int = 16, rolloff: float = 0.95
) -> torch.Tensor:
    """Band-limited resampling of `[..., samples]` with a Hann-windowed sinc (polyphase, one strided convolution).

    The rate ratio is reduced to `up / down`; output phase `p` of frame `m` reads the input around `m * down + p *
    down / up` through its own kernel, low-passed below the lower of the two Nyquist frequencies (times `rolloff`).
    """
    rates = (orig_sampling_rate, new_sampling_rate)
    if not all(map(is_whole, rates)):
        raise ValueError(f"sampling rates must be positive integers (Hz), got {rates}")
    orig_sampling_rate, new_sampling_rate = map(int, rates)
    if not is_whole(zeros) or not 0 < rolloff <= 1:
        # zeros=0 gave NaNs, a rolloff above 1 a cutoff above Nyquist (aliasing, doubled amplitude)
        raise ValueError(f"zeros={zeros!r} must be a positive integer and rolloff={rolloff!r} in (0, 1]")
    if not isinstance(waveform, torch.Tensor) or not waveform.is_floating_point():
        kind = waveform.dtype if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ValueError(f"resample takes a floating-point torch tensor, got {kind}")
    if waveform.dim() == 0 or waveform.shape[-1] == 0:
        raise ValueError(f"resample takes a waveform [..., samples] with samples, got shape {tuple(waveform.shape)}")
    if orig_sampling_rate == new_sampling_rate:
        return waveform
    common = math.gcd(orig_sampling_rate, new_sampling_rate)
    up, down = new_sampling_rate // common, orig_sampling_rate // common
    taps = 2 * math.ceil(zeros / (2 * _cutoff(up, down, rolloff))) + down  # `_sinc_kernel`'s width
    if up * taps > _MAX_KERNEL_ELEMENTS:
        raise ValueError(
            f"resampling {orig_sampling_rate} -> {new_sampling_rate} Hz reduces to {up}/{down} and needs a "
            f"{up} x {taps} kernel; resample through a rate sharing a larger factor with both (e.g. a multiple of 100)"
        )
    kernel, half = _sinc_kernel(up, down, zeros, rolloff)
    shape, length = waveform.shape[:-1], waveform.shape[-1]
    frames = math.ceil(length / down)
    signal = F.pad(waveform.reshape(-1, 1, length), (half, frames * down + half - length))
    out = F.conv1d(signal, kernel.to(device=waveform.device, dtype=waveform.dtype), stride=down)  # [batch, up, frames]
    out = out.transpose(1, 2).reshape(*shape, frames * up)
    return out[..., : math.ceil(length * up / down)]


class FlatUnitCodec:
    """Shared part of the adapters: input checks, mono mix-down and resampling, and the unit stream's layout.

    Subclasses set `model`, `sampling_rate`, `frame_rate`, `num_codebooks`, `codebook_size`, `frame_levels` and
    implement `_encode(waveform [samples] at sampling_rate) -> list[LongTensor]` and `_decode(codes) -> Tensor[samples]`.
    """

    model: torch.nn.Module
    sampling_rate: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    frame_levels: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        """The codec model's device (read each time: the model may have moved since)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The codec model's floating-point type: encode feeds it waveforms of this type."""
        return next(self.model.parameters()).dtype

    @property
    def num_units(self) -> int:
        """Distinct units: each level has its own `codebook_size` ids."""
        return self.num_codebooks * self.codebook_size

    @property
    def units_per_frame(self) -> int:
        return len(self.frame_levels)

    @property
    def samples_per_frame(self) -> int:
        return round(self.sampling_rate / self.frame_rate)

    @property
    def _codes_per_frame(self) -> list[int]:
        return [self.frame_levels.count(level) for level in range(self.num_codebooks)]

    @property
    def _frame_order(self) -> torch.Tensor:
        """Column of each frame position in the level-major `[frames, units_per_frame]` table: its rank in a stable
        sort by level."""
        return torch.argsort(torch.argsort(torch.tensor(self.frame_levels), stable=True))

    def encode(self, waveform: torch.Tensor, sampling_rate: int) -> list[torch.LongTensor]:
        """Codes per level (1-D each) of a mono `[samples]` or `[channels, samples]` waveform at `sampling_rate`."""
        if not is_whole(sampling_rate):
            raise ValueError(f"sampling_rate={sampling_rate!r} must be a positive integer number of Hz")
        sampling_rate = int(sampling_rate)
        waveform = torch.as_tensor(waveform)
        if not waveform.is_floating_point():
            raise ValueError(f"the waveform must hold floating-point samples in [-1, 1], got {waveform.dtype}")
        if waveform.dim() == 2 and waveform.shape[0] > waveform.shape[1] > 0:
            raise ValueError(
                f"the waveform has shape {tuple(waveform.shape)}: more channels than samples, so probably "
                "[samples, channels] (as soundfile reads it); pass [channels, samples] (transpose it)"
            )
        if waveform.dim() == 2 and waveform.shape[0] == 0:
            raise ValueError(f"the waveform has shape {tuple(waveform.shape)}: no channel")
        if waveform.dim() == 2:
            waveform = waveform.mean(0)
        if waveform.dim() != 1:
            raise ValueError(
                f"the waveform must be [samples] or [channels, samples], got shape {tuple(waveform.shape)}"
            )
        if waveform.numel() == 0:
            raise ValueError("the waveform is empty")
        if not torch.isfinite(waveform).all():
            raise ValueError("the waveform has NaN or infinite samples")
        waveform = resample(waveform.float(), sampling_rate, self.sampling_rate).to(self.device, self.dtype)
        # no_grad, not inference_mode: the codes may be labels, and Mimi caches its codebook at the first call (an
        # inference tensor there would stop the codec itself from training later)
        with torch.no_grad():
            return [codes.long() for codes in self._encode(waveform)]

    def decode(self, codes: list[torch.LongTensor]) -> torch.Tensor:
        """The waveform `[samples]` at `sampling_rate`, `samples_per_frame` samples per frame."""
        levels, frames = self._checked_codes(codes)
        if not frames:
            raise ValueError("the codes hold no frame: nothing to decode")
        with torch.no_grad():
            return self._decode([c.to(self.device) for c in levels]).float()

    def _checked_codes(self, codes: list[torch.LongTensor]) -> tuple[list[torch.Tensor], int]:
        """`codes` as long tensors (lists and arrays too) and their number of frames."""
        if len(codes) != self.num_codebooks:
            raise ValueError(f"expected codes for {self.num_codebooks} codebook levels, got {len(codes)}")
        levels = [_integer_tensor(level_codes, f"level {level}'s codes") for level, level_codes in enumerate(codes)]
        frames = levels[0].numel() // self._codes_per_frame[0]
        for level, (level_codes, per_frame) in enumerate(zip(levels, self._codes_per_frame, strict=True)):
            if level_codes.dim() != 1 or level_codes.numel() != frames * per_frame:
                raise ValueError(
                    f"level {level} has codes of shape {tuple(level_codes.shape)}; expected [{frames * per_frame}] "
                    f"({per_frame} per frame, {frames} frames)"
                )
            if level_codes.numel() and not 0 <= int(level_codes.min()) <= int(level_codes.max()) < self.codebook_size:
                raise ValueError(f"level {level} has codes outside [0, {self.codebook_size})")
        return levels, frames

    def to_units(self, codes: list[torch.LongTensor]) -> torch.LongTensor:
        """The flat unit stream: frame after frame, `frame_levels` order within a frame, `level * codebook_size + code`."""
        levels, frames = self._checked_codes(codes)
        table = torch.cat(
            [
                c.reshape(frames, per_frame).cpu() + level * self.codebook_size
                for level, (c, per_frame) in enumerate(zip(levels, self._codes_per_frame, strict=True))
            ],
            dim=1,
        )
        return table[:, self._frame_order].reshape(-1)

    def from_units(self, units: torch.LongTensor | list[int]) -> list[torch.LongTensor]:
        """Codes per level from one unit stream of whole frames (`[units]`, or `generate`'s `[1, units]`); a
        `ValueError` names the first misplaced unit."""
        units = _integer_tensor(units, "units")
        if units.shape[:-1].numel() != 1:  # a batch, or a list of segments: each is an audio of its own
            raise ValueError(f"units must be one unit stream, got shape {tuple(units.shape)}: decode each on its own")
        units = units.reshape(-1)
        if units.numel() % self.units_per_frame:
            raise ValueError(f"{units.numel()} units are not whole frames of {self.units_per_frame} units")
        levels = units.div(self.codebook_size, rounding_mode="floor")
        expected = torch.tensor(self.frame_levels, device=units.device).repeat(units.numel() // self.units_per_frame)
        wrong = ((units < 0) | (levels != expected)).nonzero()
        if wrong.numel():
            position = int(wrong[0])
            raise ValueError(
                f"unit {int(units[position])} at position {position} is not a level-{int(expected[position])} unit "
                f"(range [{int(expected[position]) * self.codebook_size}, "
                f"{(int(expected[position]) + 1) * self.codebook_size}))"
            )
        table = (units - levels * self.codebook_size).reshape(-1, self.units_per_frame)
        table = table[:, torch.argsort(self._frame_order)]
        return [part.reshape(-1) for part in table.split(self._codes_per_frame, dim=1)]

    def to_streams(self, codes: list[torch.LongTensor]) -> torch.LongTensor:
        """The parallel audio streams `[units_per_frame, frames]` of codes per level: stream s is frame position s (of
        level `frame_levels[s]`) of every frame, as a raw code, which is what a model's audio stream s predicts."""
        units = self.to_units(codes).reshape(-1, self.units_per_frame)
        return (units - self._level_offsets).T.contiguous()

    def from_streams(self, streams: torch.LongTensor) -> list[torch.LongTensor]:
        """Codes per level from parallel audio streams `[units_per_frame, frames]` (inverse of `to_streams`)."""
        streams = _integer_tensor(streams, "streams").cpu()
        if streams.dim() != 2 or streams.shape[0] != self.units_per_frame:
            raise ValueError(f"streams must have shape [{self.units_per_frame}, frames], got {tuple(streams.shape)}")
        if streams.numel() and not 0 <= int(streams.min()) <= int(streams.max()) < self.codebook_size:
            raise ValueError(f"stream codes must lie in [0, {self.codebook_size})")
        return self.from_units((streams.T + self._level_offsets).reshape(-1))

    @property
    def _level_offsets(self) -> torch.Tensor:
        """Unit offset `level * codebook_size` of each frame position."""
        return torch.tensor(self.frame_levels) * self.codebook_size

    def _encode(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def _decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def _snac_frame_levels(vq_strides: list[int]) -> tuple[int, ...]:
    """Depth-first order of one coarse frame's code tree (level l+1 has stride[l] / stride[l+1] codes per code)."""
    levels: list[int] = []

    def visit(level: int) -> None:
        levels.append(level)
        if level + 1 < len(vq_strides):
            for _ in range(vq_strides[level] // vq_strides[level + 1]):
                visit(level + 1)

    visit(0)
    return tuple(levels)


class SnacCodec(FlatUnitCodec):
    """SNAC (`snac` package, `pip install deeptalk-hf[audio]`): multi-scale codes, Mini-Omni's 7-per-frame order."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        strides = list(model.vq_strides)
        self.sampling_rate = int(model.sampling_rate)
        self.num_codebooks = len(strides)
        self.codebook_size = int(model.codebook_size)
        self.frame_levels = _snac_frame_levels(strides)
        self.frame_rate = self.sampling_rate / (int(model.hop_length) * strides[0])

    @classmethod
    def from_pretrained(cls, name_or_path: str = "hubertsiuzdak/snac_24khz", **kwargs) -> SnacCodec:
        """Load SNAC weights from a hub id or a local folder (`config.json` and `pytorch_model.bin`)."""
        try:
            from snac import SNAC
        except ImportError as error:
            raise ImportError("SnacCodec needs the `snac` package: pip install 'deeptalk-hf[audio]'") from error
        return cls(SNAC.from_pretrained(name_or_path, **kwargs))

    def _encode(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """`SNAC.encode`, without the frames that encode only padding: the 32/44 kHz models pad the audio to whole
        attention windows (up to 3 frames more than it fills), and those frames would be units of silence."""
        frames = -(-waveform.shape[-1] // self.samples_per_frame)
        codes = self.model.encode(waveform[None, None])
        return [level[0, : frames * per_frame] for level, per_frame in zip(codes, self._codes_per_frame, strict=True)]

    def _decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """`SNAC.decode`, for any number of frames: the 32/44 kHz models' local attention reads whole windows of
        latent steps (fewer fail), so the latent is zero-padded to whole windows, as `SNAC.preprocess` pads the audio
        it encodes, and the padding's samples are dropped."""
        latent = self.model.quantizer.from_codes([c[None] for c in codes])
        window = self.model.attn_window_size or 1
        audio = self.model.decoder(F.pad(latent, (0, -latent.shape[-1] % window)))
        return audio[0, 0, : codes[0].numel() * self.samples_per_frame]


class MimiCodec(FlatUnitCodec):
    """transformers' `MimiModel` (Moshi's codec): 12.5 Hz frames, the first `num_codebooks` levels interleaved."""

    def __init__(self, model: torch.nn.Module, num_codebooks: int | None = None):
        config = model.config
        self.model = model.eval()
        self.num_codebooks = config.num_quantizers if num_codebooks is None else num_codebooks
        if not is_whole(self.num_codebooks) or not (
            config.num_semantic_quantizers <= self.num_codebooks <= config.num_quantizers
        ):
            raise ValueError(
                f"num_codebooks={self.num_codebooks} must be in [{config.num_semantic_quantizers}, "
                f"{config.num_quantizers}] for this Mimi model"
            )
        self.sampling_rate = int(config.sampling_rate)
        self.codebook_size = int(config.codebook_size)
        self.frame_levels = tuple(range(self.num_codebooks))
        self.frame_rate = float(config.frame_rate)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "kyutai/mimi", num_codebooks: int | None = 8, **kwargs) -> MimiCodec:
        """Load a `MimiModel` from a hub id or a local folder; Moshi uses its first 8 codebooks. A checkpoint that leaves
        weights missing is refused (transformers would leave them random: units and audio would be noise)."""
        from transformers import MimiModel

        from .modeling_deeptalk_audio import _load_complete

        return cls(_load_complete(MimiModel, name_or_path, **kwargs), num_codebooks)

    def _encode(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        codes = self.model.encode(waveform[None, None], num_quantizers=self.num_codebooks).audio_codes
        return list(codes[0])

    def _decode(self, codes: list[torch.Tensor]) -> torch.Tensor:
        return self.model.decode(torch.stack(codes)[None]).audio_values[0, 0]


__all__ = ["AudioCodec", "FlatUnitCodec", "MimiCodec", "SnacCodec", "resample"]
