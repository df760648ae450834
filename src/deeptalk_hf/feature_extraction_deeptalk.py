"""Audio inputs for `DeepTalkForConditionalGeneration`: the encoder's features and the `<|audio|>` placeholders.

`extract_audio_features` runs the audio encoder's own transformers feature extractor (e.g. `WhisperFeatureExtractor`)
and says how many positions each audio fills; `expand_audio_placeholders` turns one `<|audio|>` per audio in token
id lists into that many placeholders, with the matching modality ids. A processor calls the two in that order.
"""

from collections.abc import Sequence
from numbers import Number

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

from .configuration_deeptalk import DeepTalkAudioConfig
from .modeling_deeptalk import speech_positions
from .modeling_deeptalk_audio import audio_token_lengths

# `audio_kwargs` a processor sets itself (rate, padding, output), not options of a feature extractor or codec: a
# processor's text options such as `padding=True` reach its audio_kwargs too
PROCESSOR_AUDIO_OPTIONS = {
    "sampling_rate",
    "padding",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "return_attention_mask",
    "return_tensors",
}


def extract_audio_features(
    audios: Sequence[np.ndarray | torch.Tensor | Sequence[float]],
    sampling_rate: int,
    feature_extractor: SequenceFeatureExtractor,
    config: DeepTalkAudioConfig,
    feature_kwargs: dict | None = None,
) -> BatchFeature:
    """Mono waveforms -> `input_features`, `input_features_mask` (one row per audio) and `num_audio_tokens`.

    A feature extractor with a fixed window (Whisper's `n_samples`) pads every audio to it, as its encoder requires,
    and refuses longer audio instead of cutting it; others pad to the longest audio. Raises `ValueError` for a
    sampling rate other than the extractor's, a mel-bin count or (Whisper) window other than the encoder's, integer or
    non-finite samples, an empty or multi-channel audio, or no audio at all. `feature_kwargs` (a processor's
    `audio_kwargs`, e.g. Whisper's `do_normalize=True`) go to the feature extractor, but for the padding, truncation
    and output options, which this function sets.
    """
    if sampling_rate != feature_extractor.sampling_rate:
        raise ValueError(
            f"audio sampled at {sampling_rate!r} Hz but the feature extractor expects "
            f"{feature_extractor.sampling_rate!r} Hz; "
            + ("resample it first" if isinstance(sampling_rate, Number) else "give the rate as a number")
        )
    mel_bins = getattr(config.audio_config, "num_mel_bins", None)  # a log-mel encoder (Whisper) takes its own count
    if mel_bins is not None and getattr(feature_extractor, "feature_size", mel_bins) != mel_bins:
        raise ValueError(
            f"the feature extractor makes {feature_extractor.feature_size} mel bins but the audio encoder takes "
            f"{mel_bins} (num_mel_bins): use the encoder checkpoint's own feature extractor"
        )
    # Whisper-style encoders take windows of 2 × max_source_positions frames (their second convolution halves them);
    # another extractor window would fail in the encoder, after the placeholders were counted for it.
    positions, frames = (
        getattr(config.audio_config, "max_source_positions", None),
        getattr(feature_extractor, "nb_max_frames", None),
    )
    if positions is not None and frames is not None and frames != 2 * positions:
        raise ValueError(
            f"the feature extractor makes windows of {frames} frames but the audio encoder takes {2 * positions} "
            f"(2 × max_source_positions): use the encoder checkpoint's own feature extractor (its chunk_length)"
        )
    if not len(audios):
        raise ValueError("no audio given")
    window = getattr(feature_extractor, "n_samples", None)
    waveforms = []
    for index, audio in enumerate(audios):
        if isinstance(audio, torch.Tensor):  # numpy has no bfloat16: widen floating tensors first
            audio = audio.float() if audio.is_floating_point() else audio
        waveform = audio.numpy(force=True) if isinstance(audio, torch.Tensor) else np.asarray(audio)
        if not np.issubdtype(waveform.dtype, np.floating):  # integer PCM would be read as huge amplitudes
            raise ValueError(f"audio {index} must hold floating-point samples in [-1, 1], got {waveform.dtype}")
        waveform = waveform.astype(np.float32)
        if not np.isfinite(waveform).all():
            raise ValueError(f"audio {index} has NaN or infinite samples")
        if waveform.ndim != 1:
            raise ValueError(f"audio {index} has shape {waveform.shape}; expected mono samples (one dimension)")
        if not waveform.size:
            raise ValueError(f"audio {index} is empty")
        if window is not None and waveform.size > window:
            raise ValueError(
                f"audio {index} has {waveform.size} samples, more than the feature extractor's window of {window}; "
                "split it into several audios"
            )
        waveforms.append(waveform)
    options = {
        key: value
        for key, value in (feature_kwargs or {}).items()
        if value is not None and key not in PROCESSOR_AUDIO_OPTIONS
    }
    options.update(sampling_rate=sampling_rate, return_attention_mask=True, return_tensors="pt")
    try:
        features = feature_extractor(waveforms, padding="max_length" if window is not None else "longest", **options)
    except ValueError as error:  # an fbank extractor (w2v-bert's) fails on an audio shorter than its window
        for index, waveform in enumerate(waveforms):
            try:
                feature_extractor([waveform], **options)
            except ValueError:
                raise ValueError(
                    f"audio {index} ({waveform.size} samples) is too short for the feature extractor "
                    f"({type(feature_extractor).__name__}: {error})"
                ) from error
        raise
    mask = features["attention_mask"]
    num_audio_tokens = audio_token_lengths(config, mask.sum(-1))
    if (num_audio_tokens < 1).any():  # its placeholder would silently vanish from the text
        short = int((num_audio_tokens < 1).nonzero()[0])
        raise ValueError(
            f"audio {short} ({len(waveforms[short])} samples) is too short for the encoder to make a frame"
        )
    return BatchFeature(
        {
            "input_features": features[feature_extractor.model_input_names[0]],
            "input_features_mask": mask,
            "num_audio_tokens": num_audio_tokens,
        }
    )


def expand_audio_placeholders(
    token_ids: Sequence[Sequence[int]],
    num_audio_tokens: Sequence[int] | torch.Tensor,
    config: DeepTalkAudioConfig,
    audios_per_sequence: Sequence[int] | None = None,
) -> dict[str, list[list[int]]]:
    """Each `<|audio|>` (`config.audio_token_id`) of `token_ids` becomes `num_audio_tokens[i]` placeholders, the i-th
    audio being the i-th placeholder in reading order over the batch.

    Returns `input_ids`, `modality_ids` (1 on the placeholders and speech-block ids, 0 elsewhere) and `positions`
    (each id's index in its sequence of `token_ids`) per sequence.
    Raises `ValueError` when the number of placeholders is not the number of audios, or, given
    `audios_per_sequence` (how many of the audios each sequence brought), not that number in some sequence.
    """
    counts = [int(n) for n in num_audio_tokens]
    if any(count < 1 for count in counts):
        raise ValueError(f"num_audio_tokens={counts}: every audio fills at least one position")
    audio_id = config.audio_token_id
    if audios_per_sequence is not None and len(audios_per_sequence) != len(token_ids):
        raise ValueError(
            f"audios_per_sequence has {len(audios_per_sequence)} entries for {len(token_ids)} sequences: give one each"
        )
    for i, (ids, count) in enumerate(zip(token_ids, [] if audios_per_sequence is None else audios_per_sequence)):
        if list(ids).count(audio_id) != count:
            raise ValueError(
                f"text[{i}] has {list(ids).count(audio_id)} audio placeholders (audio_token_id={audio_id}) but "
                f"{count} audios were given for it"
            )
    found = sum(list(ids).count(audio_id) for ids in token_ids)
    if found != len(counts):
        raise ValueError(
            f"the text has {found} audio placeholders (audio_token_id={audio_id}) but {len(counts)} audios were given"
        )
    remaining = iter(counts)
    input_ids, modality_ids, positions = [], [], []
    for ids in token_ids:
        sources = [p for p, token in enumerate(ids) for _ in range(next(remaining) if token == audio_id else 1)]
        expanded = [ids[p] for p in sources]
        row = torch.tensor([expanded], dtype=torch.long)
        speech = speech_positions(config.text_config, row, None, row.shape, row.device) | (row == audio_id)
        input_ids.append(expanded)
        modality_ids.append(speech[0].long().tolist())
        positions.append(sources)
    return {"input_ids": input_ids, "modality_ids": modality_ids, "positions": positions}
