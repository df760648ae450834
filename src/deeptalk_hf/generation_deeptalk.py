"""Parallel text-speech decoding: the delay pattern of the audio streams and the generation rules that keep it.

With `config.num_audio_streams = S`, a sequence is `[batch, 1 + S, seq]`: stream 0 carries text, stream s carries the
s-th code of each codec frame (`AudioCodec.to_streams`), delayed `audio_stream_delays[s]` positions behind the text (Mini-Omni / DeepTalk). An answer
of N audio frames lays each audio stream out as `pad * (d - 1), begin, code_0 ... code_{N-1}, end, pad ...`.

For `generate`, each stream becomes a row of the batch (as transformers' MusicGen flattens its codebooks), so every
stream is sampled from its own logits by the usual processors; `DelayPatternLogitsProcessor` forces the pattern's
fixed tokens and `ParallelStreamsStoppingCriteria` ends an item when its speech (or, text-only, its text) has ended.
"""

import torch
from transformers.generation import LogitsProcessor, StoppingCriteria

from .configuration_deeptalk import DeepTalkConfig


def _check_stream_count(name: str, tensor: torch.Tensor, config: DeepTalkConfig) -> None:
    """Stream s is read with the config's delay s: another count would pair streams with the wrong delays (the text
    stream left in, `out[:, :, prompt:]` for `out[:, 1:, prompt:]`, would be read as audio)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a tensor [batch, {config.num_audio_streams} streams, length], got {shape}")
    if tensor.shape[1] != config.num_audio_streams:
        raise ValueError(f"{name} have {tensor.shape[1]} streams but the config has {config.num_audio_streams}")


def text_pad_token_id(config: DeepTalkConfig) -> int:
    """The text stream's pad (a prompt's left padding, and every step after the text ends): `pad_token_id`, else the
    first text end id, as transformers' `generate` falls back, so that `skip_special_tokens` drops it from the answer
    (a fixed id such as 0 is an ordinary token in most vocabularies)."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    eos = config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(
            "parallel streams need pad_token_id (or eos_token_id) in the config: the text stream pads with it once "
            "it ends"
        )
    return eos


def build_delay_pattern(codes: torch.LongTensor, config: DeepTalkConfig) -> torch.LongTensor:
    """Aligned codes `[batch, S, frames]` -> delayed audio streams `[batch, S, frames + max_delay + 1]`."""
    _check_stream_count("codes", codes, config)
    batch, num_streams, frames = codes.shape
    if codes.numel() and (codes.min() < 0 or codes.max() >= config.audio_codebook_size):
        raise ValueError(f"audio codes must lie in [0, {config.audio_codebook_size})")
    delays = config.audio_stream_delays
    length = frames + max(delays) + 1
    streams = codes.new_full((batch, num_streams, length), config.audio_pad_token_id)
    for s, delay in enumerate(delays):
        streams[:, s, delay - 1] = config.audio_bos_token_id
        streams[:, s, delay : delay + frames] = codes[:, s]
        streams[:, s, delay + frames] = config.audio_eos_token_id
    return streams


def revert_delay_pattern(streams: torch.LongTensor, config: DeepTalkConfig) -> torch.LongTensor:
    """Inverse of `build_delay_pattern`: delayed streams `[batch, S, length]` -> aligned codes `[batch, S, frames]`."""
    _check_stream_count("streams", streams, config)
    delays = config.audio_stream_delays
    frames = streams.shape[-1] - max(delays) - 1
    if frames < 0:
        raise ValueError(f"{streams.shape[-1]} positions are too few for the delays {delays}")
    return torch.stack([streams[:, s, delay : delay + frames] for s, delay in enumerate(delays)], dim=1)


def stream_id_outside(ids: torch.LongTensor, config: DeepTalkConfig, ignored: int | None = None) -> str | None:
    """Where `ids` (`[batch, 1 + S, seq]`) first holds an id outside its stream's vocabulary (the text stream's: the
    whole vocabulary; an audio stream's: its codes and the pad/bos/eos ids after them), `ignored` aside; None where
    every id fits. A host sync."""
    sizes = torch.full((ids.shape[1], 1), config.audio_stream_vocab_size, device=ids.device)
    sizes[0] = config.vocab_size
    outside = (ids < 0) | (ids >= sizes)
    if ignored is not None:
        outside &= ids != ignored
    if not outside.any():
        return None
    item, stream, position = outside.nonzero()[0].tolist()
    name = "the text stream" if stream == 0 else f"audio stream {stream}"
    return f"{name} holds {ids[item, stream, position].item()}, outside [0, {sizes[stream].item()})"


def audio_codes_per_stream(streams: torch.LongTensor, config: DeepTalkConfig) -> list[list[torch.LongTensor]]:
    """The codes each generated audio stream carries between its begin and end codes (or the sequence end).

    Returns one list per batch item with one 1D tensor per stream; streams of an item may differ in length when
    generation stopped early."""
    _check_stream_count("streams", streams, config)
    result = []
    for item in streams:
        reader = AudioStreamReader(config)
        for step in item.T.tolist():
            reader.push(step)
        result.append([torch.tensor(codes, dtype=item.dtype, device=item.device) for codes in reader.codes])
    return result


class AudioStreamReader:
    """The codes of one item's audio streams, read a step at a time (for streaming; `audio_codes_per_stream` reads a
    whole answer with it): each step costs one look at each stream's new code.

    `codes[s]` holds stream s's codes so far: those after its first begin code (all of them while none came), up to
    its first end code after that point, without pad or other non-code ids."""

    def __init__(self, config: DeepTalkConfig):
        self.config = config
        self.codes: list[list[int]] = [[] for _ in range(config.num_audio_streams)]
        self._begun = [False] * config.num_audio_streams
        self._ended = [False] * config.num_audio_streams

    def push(self, step: list[int]) -> None:
        """One step's ids, one per audio stream."""
        config = self.config
        for s, code in enumerate(step):
            if code == config.audio_bos_token_id and not self._begun[s]:
                # The first begin code starts the stream afresh (what came before it, an end code included, is dropped).
                self._begun[s], self._ended[s], self.codes[s] = True, False, []
            elif code == config.audio_eos_token_id:
                self._ended[s] = True
            elif 0 <= code < config.audio_codebook_size and not self._ended[s]:
                self.codes[s].append(code)


def _ends(token_ids: torch.Tensor | int | list[int] | None, row: torch.Tensor) -> torch.Tensor:
    """Whether each row of `row` `[rows, steps]` contains one of the end ids."""
    if token_ids is None:
        return torch.zeros(row.shape[0], dtype=torch.bool, device=row.device)
    ids = torch.as_tensor(token_ids, device=row.device).reshape(-1)
    return torch.isin(row, ids).any(dim=-1)


class _ParallelStreamsRule:
    """What the delay pattern and the stopping criteria read: the prompt length (generated steps follow it), the
    config, which items answer in speech (`speech_answer`, `[items]` bool) and the text stream's end ids."""

    def __init__(
        self,
        prompt_length: int,
        config: DeepTalkConfig,
        speech_answer: torch.Tensor,
        eos_token_id: int | list[int] | None,
    ):
        self.prompt_length = prompt_length
        self.config = config
        self.speech_answer = speech_answer
        # Not `eos_token_id`: transformers takes a criterion with that attribute for its own end check and overwrites a
        # finished item's rows with the text pad id, audio streams included (they must keep the audio pad).
        self.text_eos_token_id = eos_token_id


class DelayPatternLogitsProcessor(_ParallelStreamsRule, LogitsProcessor):
    """Forces the delay pattern on flattened parallel streams (row `b * (1 + S) + s` is stream s of item b).

    Audio stream s of a speech answer emits pad for its first `delay - 1` steps, then its begin code, then free codes
    until it emits its end code, then pad. In a text-only answer (`speech_answer` False for the item) audio streams
    only emit pad. The text stream emits the text pad id once it has emitted a text end id (`eos_token_id`, one or a
    list), or once the item's speech answer has ended (an ended item only pads while the rest of the batch goes on).
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        config = self.config
        text_pad = text_pad_token_id(config)
        streams = config.num_audio_streams + 1
        generated = input_ids[:, self.prompt_length :]
        step = generated.shape[1]
        device = scores.device
        stream = torch.arange(input_ids.shape[0], device=device) % streams
        speech = self.speech_answer.to(device).repeat_interleave(streams)
        delay = torch.tensor([0, *config.audio_stream_delays], device=device)[stream]
        is_audio = stream > 0
        ended_audio = _ends(config.audio_eos_token_id, generated) & is_audio
        # A speech answer ends with its last audio stream; its text must not run on while the rest of the batch does.
        ended_speech = ended_audio.view(-1, streams)[:, 1:].all(dim=-1).repeat_interleave(streams)
        ended_text = (_ends(self.text_eos_token_id, generated) | ended_speech) & ~is_audio

        forced = torch.full_like(stream, -1)
        forced = torch.where(ended_text, text_pad, forced)
        audio_pad = is_audio & (~speech | (step < delay - 1) | ended_audio)
        forced = torch.where(audio_pad, config.audio_pad_token_id, forced)
        forced = torch.where(is_audio & speech & (step == delay - 1), config.audio_bos_token_id, forced)

        # A free audio row emits a code or its end code: any other id (pad, begin, or one between the codes and the
        # specials) would be dropped when reading the codes back, shifting the later frames.
        vocab = torch.arange(scores.shape[-1], device=device)
        not_code = (vocab >= config.audio_codebook_size) & (vocab != config.audio_eos_token_id)
        scores = scores.masked_fill((is_audio & (forced < 0))[:, None] & not_code, -float("inf"))
        rows = (forced >= 0).nonzero().squeeze(-1)
        scores[rows] = -float("inf")
        scores[rows, forced[rows]] = 0.0
        return scores


class ParallelStreamsStoppingCriteria(_ParallelStreamsRule, StoppingCriteria):
    """An item is done when all its audio streams emitted their end code (speech answer) or its text stream emitted a
    text end id (`eos_token_id`; text-only answer); all rows of an item stop together."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        config = self.config
        streams = config.num_audio_streams + 1
        generated = input_ids[:, self.prompt_length :].reshape(-1, streams, input_ids.shape[1] - self.prompt_length)
        text_done = _ends(self.text_eos_token_id, generated[:, 0])
        speech_done = torch.stack(
            [_ends(config.audio_eos_token_id, generated[:, s]) for s in range(1, streams)], dim=-1
        ).all(dim=-1)
        done = torch.where(self.speech_answer.to(input_ids.device), speech_done, text_done)
        return done.repeat_interleave(streams)


__all__ = [
    "AudioStreamReader",
    "DelayPatternLogitsProcessor",
    "ParallelStreamsStoppingCriteria",
    "audio_codes_per_stream",
    "build_delay_pattern",
    "revert_delay_pattern",
    "text_pad_token_id",
]
