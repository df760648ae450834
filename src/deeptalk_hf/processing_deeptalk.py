"""DeepTalk processor: text and speech (units, or audio through a codec) to model inputs, generated ids back to both.

Vocabulary layout (DESIGN.md): the speech block is the last `speech_vocab_size` ids of the vocabulary. It holds the
speech units `<|speech_0|>` … `<|speech_{N-1}|>` followed by the markers `<|begin_of_speech|>`, `<|end_of_speech|>`
and `<|speech_pad|>`. In text, `<|speech|>` is a placeholder (not a token) that the processor replaces by one speech
segment, `<|begin_of_speech|> units <|end_of_speech|>`.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from queue import Queue
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import AddedToken
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.generation import LogitsProcessor
from transformers.generation.streamers import BaseStreamer
from transformers.processing_utils import _MARKED_RE, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import LARGE_INTEGER, PreTrainedTokenizerBase, TruncationStrategy

from .audio_codecs import has_integer_dtype
from .configuration_deeptalk import is_whole
from .feature_extraction_deeptalk import PROCESSOR_AUDIO_OPTIONS, expand_audio_placeholders, extract_audio_features
from .generation_deeptalk import (
    AudioStreamReader,
    audio_codes_per_stream,
    build_delay_pattern,
    stream_id_outside,
    text_pad_token_id,
)

if TYPE_CHECKING:
    from .audio_codecs import AudioCodec
    from .configuration_deeptalk import DeepTalkAudioConfig, DeepTalkConfig
    from .modeling_deeptalk import DeepTalkForCausalLM
    from .modeling_deeptalk_audio import DeepTalkForConditionalGeneration

SPEECH_UNIT_TOKEN = "<|speech_{}|>"
BEGIN_OF_SPEECH = "<|begin_of_speech|>"
END_OF_SPEECH = "<|end_of_speech|>"
SPEECH_PAD = "<|speech_pad|>"
SPEECH_MARKERS = (BEGIN_OF_SPEECH, END_OF_SPEECH, SPEECH_PAD)
SPEECH_PLACEHOLDER = "<|speech|>"
AUDIO_PLACEHOLDER = "<|audio|>"
TEXT_PAD_TOKEN = "<|text_pad_{}|>"
INTERLEAVE_POLICIES = ("speech_only", "text_then_speech", "interleaved")


_TEMPLATE_FLAG = "_deeptalk_processor"


def _chat_template(audio_placeholder: str) -> str:
    """ChatML turns (the Qwen family DeepTalk models start from). Speech blocks become `<|speech|>` placeholders, audio
    blocks `audio_placeholder`; `speech_answer=True` opens a speech segment after the assistant header so the model
    answers in speech. An assistant turn's content and `<|im_end|>` sit in `{% generation %}` markers, from which
    `apply_chat_template(..., return_assistant_tokens_mask=True)` masks the answers (e.g. TRL's assistant-only loss).

    Only the processor fills `<|speech|>` with units: rendered by the tokenizer alone (which loads the saved template
    too, e.g. in transformers' text-generation pipeline) a block that becomes one raises, rather than leaving the
    placeholder's text in the prompt without its units. What it cannot render (other blocks, tools, documents, tool
    calls) raises too, rather than leaving it out of the prompt."""
    needs_processor = (
        f"{{%- if not {_TEMPLATE_FLAG} -%}}{{{{ raise_exception('a ' + block['type'] + ' block needs "
        "DeepTalkProcessor.apply_chat_template, which puts its speech units in the prompt; the tokenizer alone cannot') "
        "}}{%- endif -%}"
    )
    audio_check = needs_processor if audio_placeholder == SPEECH_PLACEHOLDER else ""
    return (
        "{%- macro content(message) -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for block in message['content'] -%}"
        "{%- if block['type'] == 'text' -%}"
        "{%- if block['text'] is not string -%}{{ raise_exception('a text block needs its \"text\" string (got the "
        "keys ' + (block | list | join(', ')) + ')') }}{%- endif -%}{{ block['text'] }}"
        f"{{%- elif block['type'] == 'speech' -%}}{needs_processor}{{{{ '<|speech|>' }}}}"
        f"{{%- elif block['type'] == 'audio' -%}}{audio_check}{{{{ '{audio_placeholder}' }}}}"
        "{%- else -%}{{ raise_exception('the DeepTalk chat template renders text, speech and audio blocks, not ' "
        "+ block['type'] + ' blocks') }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if tools or documents -%}{{ raise_exception('the DeepTalk chat template renders no tools or documents: "
        "pass a chat_template that does') }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['tool_calls'] -%}{{ raise_exception('the DeepTalk chat template renders no tool calls: pass "
        "a chat_template that does') }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{ content(message) + '<|im_end|>' }}{%- endgeneration -%}"
        "{%- else -%}{{ content(message) + '<|im_end|>' }}{%- endif -%}"
        "{{ '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
        "{%- if speech_answer -%}{{ '<|begin_of_speech|>' }}{%- endif -%}{%- endif -%}"
    )


# The codec path encodes audio blocks into speech units; the audio-encoder path feeds them to the encoder.
DEFAULT_CHAT_TEMPLATE = _chat_template(SPEECH_PLACEHOLDER)
AUDIO_CHAT_TEMPLATE = _chat_template(AUDIO_PLACEHOLDER)


def _speech_blocks(conversations: list[list[dict]], audio_loading_params: dict) -> list[list[tuple[str, Any]]]:
    """Per conversation, its speech and audio blocks in order: `("speech", units)` for `{"type": "speech", "units":
    [...]}`, `("audio", (waveform, sampling_rate))` for `{"type": "audio", ...}` (an `"audio"` array with its
    `"sampling_rate"`, or a file, `"path"`/`"url"`/`"audio"`, loaded at `audio_loading_params`' rate)."""
    from transformers.audio_utils import load_audio

    batch = []
    for conversation in conversations:
        blocks = []
        for message in conversation:
            content = message.get("content")
            for block in [] if isinstance(content, str) or not content else content:
                if block["type"] == "speech":
                    if "units" not in block:
                        raise ValueError(
                            f'a {{"type": "speech"}} block needs its "units" (got the keys {list(block)})'
                        )
                    blocks.append(("speech", block["units"]))
                elif (
                    block["type"] == "audio" and block.get("audio") is not None and not isinstance(block["audio"], str)
                ):
                    if block.get("sampling_rate") is None:
                        raise ValueError(
                            'an {"type": "audio"} block holding samples needs its "sampling_rate" (a call\'s '
                            "sampling_rate= is the rate audio files are loaded at)"
                        )
                    blocks.append(("audio", (block["audio"], block["sampling_rate"])))
                elif block["type"] == "audio":  # a file: "path", "url", or (transformers' chat format) "audio"
                    # The first one set: a `datasets` table gives every block every key, unset ones None.
                    source = next((block[key] for key in ("path", "url", "audio") if block.get(key) is not None), None)
                    if source is None:
                        raise ValueError(
                            'an {"type": "audio"} block needs its "audio" samples (with "sampling_rate") or a file in '
                            f'"path", "url" or "audio" (got the keys {list(block)})'
                        )
                    waveform = load_audio(source, **audio_loading_params)
                    blocks.append(("audio", (waveform, audio_loading_params["sampling_rate"])))
        batch.append(blocks)
    return batch


# The flag `apply_chat_template` hands `__call__` beside the conversations' speech segments: each must fill a
# placeholder of the rendered template; unlike `speech_units=` beside a plain text, none is a transcript to lay out.
_FROM_CONVERSATION = "_speech_from_conversation"
_OPEN_END = "_speech_prompt_left_open"  # a chat prompt for generation: no tokens the tokenizer appends (an EOS)


def _speech_block(tokenizer: PreTrainedTokenizerBase) -> range | None:
    """The tokenizer's speech block, `None` if it has no speech tokens; a `ValueError` if they are laid out wrongly."""
    added = tokenizer.get_added_vocab()
    first = added.get(SPEECH_UNIT_TOKEN.format(0))
    if first is None:
        return None
    begin, end, pad = (added.get(marker) for marker in SPEECH_MARKERS)
    if begin is None or end != begin + 1 or pad != begin + 2:
        raise ValueError(
            f"the tokenizer's speech markers {SPEECH_MARKERS} have ids {(begin, end, pad)}: they must follow the "
            "speech units contiguously"
        )
    misplaced = [i for i in range(begin - first) if added.get(SPEECH_UNIT_TOKEN.format(i)) != first + i]
    if misplaced:
        raise ValueError(
            f"the tokenizer's speech unit tokens are not contiguous from id {first} (first bad unit: {misplaced[0]})"
        )
    block = range(first, pad + 1)
    if len(tokenizer) != block.stop:
        raise ValueError(
            f"the tokenizer's speech block {block} is not at the end of its vocabulary (len(tokenizer)={len(tokenizer)})"
        )
    return block


def add_speech_tokens(
    tokenizer: PreTrainedTokenizerBase, num_units: int, *, text_vocab_size: int | None = None
) -> range:
    """Give `tokenizer` a speech block of `num_units` units and the speech markers, as the last ids of its vocabulary.

    `text_vocab_size` is the text model's vocabulary size (its embedding rows, often padded beyond the tokenizer):
    the tokenizer is first padded to it with placeholder tokens, so that the speech ids line up with
    `config.speech_token_start`. Returns the whole speech block (units and markers); calling it again with the same
    arguments returns the existing block.
    """
    if not is_whole(num_units) or not (text_vocab_size is None or is_whole(text_vocab_size)):
        raise ValueError(
            f"num_units={num_units!r} must be an integer >= 1, and text_vocab_size={text_vocab_size!r} one or None"
        )
    existing = _speech_block(tokenizer)
    if existing is not None:
        if len(existing) != num_units + len(SPEECH_MARKERS) or text_vocab_size not in (None, existing.start):
            raise ValueError(
                f"the tokenizer already has a speech block {existing} ({len(existing) - len(SPEECH_MARKERS)} units); "
                f"it does not match num_units={num_units}, text_vocab_size={text_vocab_size}"
            )
        return existing
    start, vocab = len(tokenizer), tokenizer.get_vocab()
    if max(vocab.values(), default=-1) + 1 != start:  # new tokens would take ids that tokens already have
        raise ValueError(
            f"the tokenizer's ids have gaps: it has {start} tokens but ids up to {max(vocab.values())}; the speech "
            "block's ids would be ids its tokens already have"
        )
    if text_vocab_size is not None:
        if text_vocab_size < start:
            raise ValueError(f"the tokenizer has {start} tokens, more than text_vocab_size={text_vocab_size}")
        start = text_vocab_size
    names = [TEXT_PAD_TOKEN.format(i) for i in range(len(tokenizer), start)]
    names += [SPEECH_UNIT_TOKEN.format(i) for i in range(num_units)] + list(SPEECH_MARKERS)
    taken = sorted(set(names) & set(vocab))
    if taken:  # checked first: the tokenizer is left as it was
        raise ValueError(
            f"the tokenizer already has {len(taken)} of the speech block's tokens ({', '.join(taken[:3])}) without a "
            "whole speech block at its end; start from a tokenizer without them"
        )
    tokenizer.add_tokens([AddedToken(name, special=True, normalized=False) for name in names], special_tokens=True)
    block = range(start, start + num_units + len(SPEECH_MARKERS))
    if _speech_block(tokenizer) != block:
        raise ValueError(f"the speech tokens did not get the ids {block}; does the tokenizer have gaps in its ids?")
    return block


def _written(text: str, encode: dict) -> str:
    """`text` as the chat template wrote it: without the user's control tokens that `sanitize_control_tokens` marked
    (encoded as text, they are no speech markers or placeholders)."""
    return _MARKED_RE.sub("", text) if encode.get("sanitize_control_tokens") else text


def fit_speech_vocab(model: DeepTalkForCausalLM | DeepTalkForConditionalGeneration, speech_tokens: range) -> None:
    """Size `model`'s speech embedding and output rows to the speech block `speech_tokens` (`add_speech_tokens`'s
    result); new rows start at the mean of the text rows (`DeepTalkForCausalLM.resize_speech_vocab`).

    A block of another size is taken to end with the markers, as `add_speech_tokens` lays it out: their rows move to
    the new end with them, and the units keep theirs."""
    llm = getattr(model, "language_model", model)  # the audio model resizes through its own method (its tie map)
    start = llm.config.speech_token_start
    if not isinstance(speech_tokens, range) or speech_tokens.step != 1 or len(speech_tokens) <= len(SPEECH_MARKERS):
        raise ValueError(
            f"speech_tokens={speech_tokens!r} is not a speech block: add_speech_tokens' result, consecutive ids of at "
            f"least one unit and the {len(SPEECH_MARKERS)} markers"
        )
    if speech_tokens.start != start:
        raise ValueError(
            f"the speech block starts at id {speech_tokens.start} but the model's text vocabulary has {start} ids; "
            f"call add_speech_tokens(tokenizer, num_units, text_vocab_size={start}) on the tokenizer as loaded, "
            "without speech tokens (reload it: one that has a speech block keeps its ids)"
        )
    old, new, markers = llm.config.speech_vocab_size, len(speech_tokens), len(SPEECH_MARKERS)

    def tables() -> list[torch.Tensor]:
        return [llm.model.speech_embed_tokens.weight, llm.speech_lm_head.weight]

    moved = [table[-markers:].detach().clone() for table in tables()] if markers <= old and old != new else None
    if moved is not None:
        model.resize_speech_vocab(old - markers)  # the units alone; the rows after them start afresh below
    model.resize_speech_vocab(new)
    if moved is not None and new >= markers:
        with torch.no_grad():
            for table, rows in zip(tables(), moved, strict=True):
                table[-markers:] = rows


@dataclass
class ParallelSpeechOutput:
    """A parallel-stream answer: the text stream's text, the audio streams' codes per codec level (whole frames only)
    and their waveform."""

    text: str
    codes: list[torch.LongTensor]
    waveform: torch.Tensor


@dataclass
class SpeechTextOutput:
    """What a sequence of ids says: its text, and the units of each speech segment in order."""

    text: str
    speech_units: list[list[int]] = field(default_factory=list)


def _check_not_parallel(ids: Any, caller: str) -> None:
    """A `ValueError` for ids of three dimensions, read along their first items: a parallel-stream answer."""
    dims = 0
    while isinstance(ids, (list, tuple)) and ids:
        dims, ids = dims + 1, ids[0]
    if dims + getattr(ids, "ndim", 0) > 2:
        raise ValueError(
            f"{caller} takes ids of one or two dimensions; a parallel-stream answer `[batch, 1 + S, steps]` decodes "
            "with decode_parallel(answer, config)"
        )


class _SpeechSplitter:
    """Sorts ids one at a time into text ids and speech segments (shared by `decode` and the streamer).

    `<|begin_of_speech|>` opens a segment and `<|end_of_speech|>` closes it; a unit outside any segment opens one;
    text ids inside a segment (interleaved answers) go to the text; `<|speech_pad|>` is dropped.
    """

    def __init__(self, speech_token_start: int, num_units: int):
        self.start = speech_token_start
        self.num_units = num_units
        self.text_ids: list[int] = []
        self.segments: list[list[int]] = []
        self.is_open = False

    def push(self, token_id: int) -> str:
        """Consume one id; returns its kind: `"text"`, `"unit"`, `"begin"`, `"end"` or `"pad"`."""
        if token_id < 0:
            raise ValueError(f"id {token_id} is negative (labels' -100 padding is not an id: drop it before decoding)")
        offset = token_id - self.start
        if offset < 0:
            self.text_ids.append(token_id)
            return "text"
        if offset < self.num_units:
            if not self.is_open:
                self.segments.append([])
                self.is_open = True
            self.segments[-1].append(offset)
            return "unit"
        marker = offset - self.num_units
        if marker == 0:
            self.segments.append([])
            self.is_open = True
            return "begin"
        if marker == 1:
            self.is_open = False
            return "end"
        if marker == 2:
            return "pad"
        raise ValueError(
            f"id {token_id} is beyond the vocabulary (the speech block's last id is {self.start + self.num_units + 2})"
        )


def _surrounding(ids: list[int], own: list[int]) -> tuple[int, int] | None:
    """How many ids come before and after `own` (non-empty) inside `ids`; `None` if it is not there."""
    extra = len(ids) - len(own)
    before = next((start for start in range(extra + 1) if ids[start : start + len(own)] == own), None)
    return None if before is None else (before, extra - before)


def _frame_groups(streams: list[torch.LongTensor]) -> torch.LongTensor:
    """Per-stream codes cut to whole frames, `[S, frames]`: a frame is complete once every stream has its code."""
    frames = min(len(codes) for codes in streams)
    return torch.stack([codes[:frames] for codes in streams])


def _pad_like(rows: list[list], padded_ids: list[list[int]], side: str, value: Any = 0) -> list[list]:
    """Per-token values padded with `value` to the padded ids' lengths, on the tokenizer's padding side."""
    result = []
    for row, ids in zip(rows, padded_ids, strict=True):
        pad = [value] * (len(ids) - len(row))
        result.append(pad + row if side == "left" else row + pad)
    return result


def _placeholder_replacements(text: str) -> list[dict[str, Any]]:
    """Where the tokenized text differs from `text`: each `<|speech|>` is tokenized as `<|begin_of_speech|>`, in the
    form `apply_chat_template` reads (`span` in `text`, `new_span` in the tokenized text) to place the assistant
    masks' character spans."""
    replacements, gained = [], 0
    for match in re.finditer(re.escape(SPEECH_PLACEHOLDER), text):
        start, end = match.span()
        new_start = start + gained
        replacements.append({"span": (start, end), "new_span": (new_start, new_start + len(BEGIN_OF_SPEECH))})
        gained += len(BEGIN_OF_SPEECH) - len(SPEECH_PLACEHOLDER)
    return replacements


def _is_unit_segment(value: Any) -> bool:
    """A non-empty 1-D sequence of integers (list, tuple, tensor or array)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim == 1 and len(value) > 0 and has_integer_dtype(value)
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(u, (int, np.integer)) and not isinstance(u, bool) for u in value)
    )


def _is_waveform(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _integer_ids(values: Any, error: str) -> list[int]:
    """`values` (a list, tuple, 1-D tensor or array of integers; maybe empty) as a list of ints, else `error`."""
    if len(values) and not _is_unit_segment(values):
        raise ValueError(error)
    return values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else [int(v) for v in values]


def _describe(value: Any) -> str:
    """A value's type, with its shape or length, for error messages."""
    kind = type(value).__name__
    kind = f"{'an' if kind[0].lower() in 'aeiou' else 'a'} {kind}"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{kind} of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{kind} of {len(value)} entries ({sorted({type(v).__name__ for v in value})})"
    return kind


_SEGMENT_KINDS = {
    "speech_units": "a segment (a non-empty 1-D sequence of integer ids)",
    "audio": "a waveform (a 1-D or [channels, samples] tensor or array: samples in a list go in torch.tensor(...))",
}


def _per_sample(spec: Any, batch_size: int, single: bool, is_leaf: Callable[[Any], bool], name: str) -> list[list]:
    """One list of segments per sample. A sample takes `None`, one segment, or a list of segments; a batch takes
    `None` (no speech) or a list with one such entry per text. A single text also accepts a one-sample batch (as
    `apply_chat_template` passes it)."""

    def segments(entry: Any, where: str) -> list:
        if entry is None or (isinstance(entry, (list, tuple)) and len(entry) == 0):
            return []
        if is_leaf(entry):
            return [entry]
        if isinstance(entry, (list, tuple)) and all(is_leaf(e) or isinstance(e, (list, tuple)) for e in entry):
            return list(entry)
        raise ValueError(
            f"{name}{where} must be {_SEGMENT_KINDS[name]} or a list of them, got {_describe(entry)}"
            + (" (a batch of texts takes one such entry per text)" if where else "")
        )

    if single:
        # A one-sample batch: `[[]]` (no speech, what apply_chat_template passes for a text-only conversation) or
        # `[[segment, ...]]`; an empty segment would be an error anyway.
        if (
            isinstance(spec, (list, tuple))
            and len(spec) == 1
            and isinstance(spec[0], (list, tuple))
            and (len(spec[0]) == 0 or not is_leaf(spec[0]))
        ):
            spec = spec[0]
        return [segments(spec, "")]
    if spec is None:
        return [[] for _ in range(batch_size)]
    given = spec
    if isinstance(spec, (torch.Tensor, np.ndarray)) and spec.ndim >= 2:  # a stacked batch: one entry per row
        spec = list(spec)
    if not isinstance(spec, (list, tuple)) or len(spec) != batch_size:
        raise ValueError(f"{name} must have one entry per text ({batch_size} texts), got {_describe(given)}")
    return [segments(entry, f"[{i}]") for i, entry in enumerate(spec)]


class DeepTalkProcessorKwargs(ProcessingKwargs, total=False):
    interleave: str
    text_speech_ratio: tuple[int, int] | list[int]


_SUPPORTED_TEXT_KWARGS = {
    "add_special_tokens",
    "sanitize_control_tokens",
    "padding",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "padding_side",
    "return_attention_mask",
    "return_tensors",
    "return_offsets_mapping",
    "return_text_replacement_offsets",
}


class DeepTalkProcessor(ProcessorMixin):
    r"""
    Turns text with speech into DeepTalk inputs and generated ids back into text and speech units.

    Speech comes in as units (`speech_units=`) or as waveforms (`audio=`, encoded by `codec` into units). In text,
    each `<|speech|>` placeholder takes the next speech segment of its sample. A text without placeholders and with
    one segment is that segment's transcript, laid out by the `interleave` policy:

    - `"speech_only"`: `<bos> units <eos>` (the transcript is not part of the sequence);
    - `"text_then_speech"`: `text <bos> units <eos>`;
    - `"interleaved"`: `text_speech_ratio` (default GLM-4-Voice's 13:26) chunks,
      `t[:13] <bos> u[:26] t[13:26] u[26:52] … <eos>`, with the rest of the longer part at its end.

    Args:
        tokenizer: a tokenizer with a speech block (`add_speech_tokens`).
        chat_template: Jinja template; the default renders ChatML turns with speech placeholders.
        interleave: default layout policy, one of `INTERLEAVE_POLICIES`.
        text_speech_ratio: `(text_tokens, speech_units)` per chunk for `"interleaved"`.
        codec: an `AudioCodec` for `audio=`; a model, so it is not saved with the processor (pass it again to
            `from_pretrained(..., codec=...)`).
    """

    valid_processor_kwargs = DeepTalkProcessorKwargs
    audio_becomes_units = True  # `audio=` is speech, encoded by the codec (so not beside `speech_units=`)

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        interleave: str = "text_then_speech",
        text_speech_ratio: Sequence[int] = (13, 26),
        codec: AudioCodec | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            tokenizer, chat_template=DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template, **kwargs
        )
        block = _speech_block(tokenizer)
        if block is None:
            raise ValueError(
                "the tokenizer has no speech tokens: call add_speech_tokens(tokenizer, num_units, text_vocab_size=...) "
                f"(for a DeepTalk model: num_units=config.speech_vocab_size - {len(SPEECH_MARKERS)} markers, "
                "text_vocab_size=config.speech_token_start)"
            )
        ratio = self._check_policy(interleave, text_speech_ratio)
        self.speech_tokens = block
        # plain ints: `save_pretrained` writes them as JSON, which has no numpy integers
        self.interleave, self.text_speech_ratio = interleave, tuple(map(int, ratio))
        self.codec = codec

    @staticmethod
    def _check_policy(interleave: str, ratio: Sequence[int]) -> tuple[int, int]:
        """The policy checked; returns the ratio as a tuple."""
        if interleave not in INTERLEAVE_POLICIES:
            raise ValueError(f"interleave={interleave!r} is unknown; expected one of {INTERLEAVE_POLICIES}")
        pair = tuple(ratio) if isinstance(ratio, Iterable) else ()
        if len(pair) != 2 or not all(map(is_whole, pair)):
            raise ValueError(f"text_speech_ratio={ratio!r} must be two positive integers (text tokens, speech units)")
        return pair

    @property
    def speech_token_start(self) -> int:
        return self.speech_tokens.start

    @property
    def num_speech_units(self) -> int:
        return len(self.speech_tokens) - len(SPEECH_MARKERS)

    @property
    def begin_of_speech_id(self) -> int:
        return self.speech_tokens.start + self.num_speech_units

    @property
    def end_of_speech_id(self) -> int:
        return self.begin_of_speech_id + 1

    @property
    def speech_pad_id(self) -> int:
        return self.begin_of_speech_id + 2

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "modality_ids"]

    def check_config(self, config: DeepTalkConfig | DeepTalkAudioConfig) -> None:
        """`ValueError` unless the tokenizer's speech block is exactly the config's (the LLM's, for the audio model's
        config)."""
        config = config.get_text_config()
        if (config.speech_token_start, config.vocab_size) != (self.speech_tokens.start, self.speech_tokens.stop):
            raise ValueError(
                f"the tokenizer's speech block is ids {self.speech_tokens.start}..{self.speech_tokens.stop - 1} "
                f"({len(self.speech_tokens)} ids) but the config has speech_token_start={config.speech_token_start}, "
                f"speech_vocab_size={config.speech_vocab_size}, vocab_size={config.vocab_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The codec is a model: it is neither deep-copied nor written to `processor_config.json`. Read from a shallow
        copy without it, so `self` is never left without its codec (another thread may be using it meanwhile)."""
        view = copy.copy(self)
        del view.__dict__["codec"]
        return super(DeepTalkProcessor, view).to_dict()

    def __call__(
        self,
        text: str | list[str] | None = None,
        speech_units: Any = None,
        audio: Any = None,
        **kwargs: Unpack[DeepTalkProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            text: one text or a batch; `None` for speech only (one sample of one segment: more segments need a
                text with `<|speech|>` placeholders).
            speech_units: per sample `None`, one segment (`list[int]` or 1-D tensor of unit indices in
                `[0, num_speech_units)`) or a list of segments; for a batch, a list with one such entry per text.
            audio: like `speech_units`, with waveforms (1-D, or `[channels, samples]` mixed down) that the codec
                encodes into units; needs `sampling_rate=`.
            interleave, text_speech_ratio: override the processor's layout policy for this call.
            Text kwargs (`padding`, `padding_side`, `truncation`, `max_length`, `pad_to_multiple_of`,
            `add_special_tokens`, `return_attention_mask`, `return_tensors`) work as for the tokenizer;
            `return_offsets_mapping` and `return_text_replacement_offsets` (what `apply_chat_template` asks for to
            build assistant masks) too, for speech given in `<|speech|>` placeholders.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and `modality_ids` (1 on speech-block ids), and
            `offset_mapping` / `text_replacement_offsets` when asked for.
        """
        from_conversation = kwargs.pop(_FROM_CONVERSATION, False)
        open_end = kwargs.pop(_OPEN_END, False)
        for unused in ("images", "videos"):  # as transformers' processors take them
            if kwargs.pop(unused, None) is not None:
                raise ValueError(f"{type(self).__name__} takes no {unused}")
        merged = self._merge_kwargs(
            DeepTalkProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        # None: the processor's own, as in `interleave_ids`
        interleave = self.interleave if merged["interleave"] is None else merged["interleave"]
        given = merged["text_speech_ratio"]
        ratio = self._check_policy(interleave, self.text_speech_ratio if given is None else given)
        text_kwargs = merged["text_kwargs"]
        unsupported = sorted(k for k, v in text_kwargs.items() if k not in _SUPPORTED_TEXT_KWARGS and v)
        if unsupported:
            raise ValueError(f"{type(self).__name__} does not support {unsupported}")
        # What `apply_chat_template(..., return_assistant_tokens_mask=True)` asks for: each id's character span (a
        # spliced speech unit or audio position takes its placeholder's) and where the tokenized text differs.
        offsets_wanted = bool(text_kwargs.get("return_offsets_mapping"))
        replacements_wanted = bool(
            text_kwargs.get("return_text_replacement_offsets") or merged.get("return_text_replacement_offsets")
        )

        single = text is None or isinstance(text, str)
        if not single and not (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
            raise ValueError(f"text= must be a string or a list of strings, got {_describe(text)}")
        texts = [text or ""] if single else list(text)
        if not texts:
            raise ValueError("text= is an empty batch")
        if speech_units is not None and audio is not None and self.audio_becomes_units:
            raise ValueError("pass speech as speech_units= or as audio=, not both")
        audio_features = None
        if audio is not None:
            audio_units, audio_features = self._read_audio(audio, merged["audio_kwargs"], len(texts), single)
            speech_units = speech_units if audio_units is None else audio_units
        samples = _per_sample(speech_units, len(texts), single, _is_unit_segment, "speech_units")
        samples = [
            [self._checked_units(units, f"[{i}][{j}]") for j, units in enumerate(segments)]
            for i, segments in enumerate(samples)
        ]

        # `apply_chat_template(..., sanitize_control_tokens=True)` marked the control tokens of the user's strings: the
        # tokenizer encodes them as text, and what the template wrote (its markers and placeholders) is read without
        # them. Character offsets do not go with it (transformers' assistant masks do not either).
        encode = {"sanitize_control_tokens": True} if text_kwargs.get("sanitize_control_tokens") else {}
        if encode and (offsets_wanted or replacements_wanted):
            raise ValueError("sanitize_control_tokens=True gives no character offsets (nor assistant masks)")
        tokenized = [t.replace(SPEECH_PLACEHOLDER, BEGIN_OF_SPEECH) for t in texts]
        encoding = self.tokenizer(
            tokenized,
            add_special_tokens=text_kwargs.get("add_special_tokens", True),
            return_offsets_mapping=offsets_wanted,
            **encode,
        )
        encoded = [
            self._checked_markers(i, _written(text, encode), ids)
            for i, (text, ids) in enumerate(zip(tokenized, encoding["input_ids"], strict=True))
        ]
        if open_end:
            encoded = [self._without_appended(ids, text, encode) for ids, text in zip(encoded, tokenized, strict=True)]
        filled = [
            self._with_speech(i, sample_text, ids, segments, interleave, ratio, from_conversation, encode)
            for i, (sample_text, ids, segments) in enumerate(zip(texts, encoded, samples, strict=True))
        ]
        rows = [row for row, _ in filled]
        if offsets_wanted and any(origin is None for _, origin in filled):
            raise ValueError(
                "return_offsets_mapping needs the speech in <|speech|> placeholders (a conversation's speech blocks): "
                "a transcript's speech_units= are laid out by the interleaving policy and have no characters"
            )
        origins = [origin or [] for _, origin in filled]  # per id, the tokenizer token it comes from
        modality_rows = [[int(token >= self.speech_token_start) for token in row] for row in rows]
        if audio_features is None and isinstance(self, DeepTalkAudioProcessor):  # the model would fail on it later
            audio_id = self.audio_model_config.audio_token_id
            if unheard := [i for i, row in enumerate(rows) if audio_id in row]:
                raise ValueError(
                    f"text[{unheard[0]}] has an audio placeholder (audio_token_id={audio_id}) but no audio= was given"
                )
        if audio_features is not None:  # the audio-encoder path: one <|audio|> becomes the audio's positions
            expanded = expand_audio_placeholders(
                rows,
                audio_features.pop("num_audio_tokens"),
                self.audio_model_config,
                audio_features.pop("audios_per_sequence"),
            )
            rows, modality_rows = expanded["input_ids"], expanded["modality_ids"]
            if offsets_wanted:
                origins = [
                    [row[p] for p in sources] for row, sources in zip(origins, expanded["positions"], strict=True)
                ]

        truncation, max_length = text_kwargs.get("truncation"), text_kwargs.get("max_length")
        if truncation is None and max_length is not None and text_kwargs.get("padding", False) is False:
            truncation = True  # as the tokenizer: `max_length` alone truncates
        if not isinstance(truncation, (bool, type(None))):  # a strategy: the tokenizer's names, checked as it does
            truncation = TruncationStrategy(truncation)
            if truncation is TruncationStrategy.ONLY_SECOND:
                raise ValueError(
                    f"truncation='only_second' truncates the second text of pairs: {type(self).__name__} "
                    "takes single texts"
                )
        truncating = truncation not in (None, False, TruncationStrategy.DO_NOT_TRUNCATE)
        if truncating:
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            multiple = text_kwargs.get("pad_to_multiple_of")
            bounded = max_length is not None or limit <= LARGE_INTEGER  # else the tokenizer does not truncate at all
            padding = text_kwargs.get("padding") not in (None, False, "do_not_pad")
            if multiple and padding and bounded and limit % multiple:
                # the tokenizer's own check, which its `pad` below cannot make: it no longer sees `max_length`
                raise ValueError(
                    f"Truncation and padding are both activated but truncation length ({limit}) is not a multiple of "
                    f"pad_to_multiple_of ({multiple})."
                )
            kept = [
                self._kept_positions(len(row), self._added_special_tokens(ids, text, encode), limit)
                if len(row) > limit
                else range(len(row))
                for row, ids, text in zip(rows, encoded, tokenized, strict=True)
            ]
            if audio_features is not None:
                audio_id = self.audio_model_config.audio_token_id
                for i, (row, positions) in enumerate(zip(rows, kept, strict=True)):
                    cut = row.count(audio_id) - sum(row[p] == audio_id for p in positions)
                    if cut:
                        raise ValueError(
                            f"truncating text[{i}] to {limit} ids would cut {cut} of its audio positions (the audio "
                            "must fill all of its placeholders): raise max_length or shorten the audio"
                        )
            rows = [[row[p] for p in positions] for row, positions in zip(rows, kept, strict=True)]
            modality_rows = [[row[p] for p in positions] for row, positions in zip(modality_rows, kept, strict=True)]
            if offsets_wanted:
                origins = [[row[p] for p in positions] for row, positions in zip(origins, kept, strict=True)]
        padded = self.tokenizer.pad(
            {"input_ids": rows},
            padding=text_kwargs.get("padding", False),
            # after truncation, only padding to `max_length` reads it: `pad` would warn that it is ignored
            max_length=max_length if text_kwargs.get("padding") == "max_length" or not truncating else None,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=text_kwargs.get("padding_side"),
            return_attention_mask=text_kwargs.get("return_attention_mask"),
        )
        data = dict(padded)
        side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        data["modality_ids"] = _pad_like(modality_rows, data["input_ids"], side)
        if offsets_wanted:
            spans = [[tuple(encoding["offset_mapping"][i][o]) for o in origin] for i, origin in enumerate(origins)]
            data["offset_mapping"] = _pad_like(spans, data["input_ids"], side, value=(0, 0))
        if replacements_wanted:
            data["text_replacement_offsets"] = [_placeholder_replacements(text) for text in texts]
        if audio_features is not None:
            data.update(audio_features)
        if text_kwargs.get("return_tensors") and not any(data["input_ids"]):  # ids, not an empty list's floats
            for key in ("input_ids", "attention_mask", "modality_ids"):
                if key in data:
                    data[key] = np.zeros((len(rows), 0), dtype=np.int64)
        return BatchFeature(data, tensor_type=text_kwargs.get("return_tensors"))

    def _with_speech(
        self,
        i: int,
        text: str,
        ids: list[int],
        segments: list[list[int]],
        interleave: str,
        ratio: tuple[int, int],
        from_conversation: bool,
        encode: dict,
    ) -> tuple[list[int], list[int] | None]:
        """Text `i`'s ids (`ids`) with its speech: a segment per placeholder, or a transcript's one segment laid out by
        the interleaving policy between the tokens the tokenizer added at the ends (never for a conversation's
        segments, which a template without placeholders, such as a text model's own, would drop). Also returns, per
        id, the index in `ids` of the token it comes from (`None` for a laid-out transcript). `encode`: how `ids` were
        encoded from `text` (`sanitize_control_tokens`)."""
        placeholders = text.count(SPEECH_PLACEHOLDER)
        if placeholders:
            if placeholders != len(segments):
                raise ValueError(
                    f"text[{i}] has {placeholders} {SPEECH_PLACEHOLDER} placeholders but {len(segments)} speech segments"
                )
            return self._fill_placeholders(_written(text, encode), ids, segments)
        if from_conversation and segments:
            raise ValueError(
                f"conversation {i} has {len(segments)} speech blocks but the chat template does not render speech "
                f"blocks as {SPEECH_PLACEHOLDER} (a text model's own template?): build the processor with "
                "DeepTalkProcessor(tokenizer), whose default template does, or pass a chat_template= that does"
            )
        if len(segments) > 1:
            raise ValueError(
                f"text[{i}] has no {SPEECH_PLACEHOLDER} placeholder for its {len(segments)} speech segments: a text "
                f"without placeholders (or text=None) takes one segment; mark where each goes with {SPEECH_PLACEHOLDER}"
            )
        if not segments:
            return ids, list(range(len(ids)))
        before, after = self._added_special_tokens(ids, text, encode)
        body = self._interleave(ids[before : len(ids) - after], segments[0], interleave, ratio)
        return ids[:before] + body + ids[len(ids) - after :], None

    def _checked_units(self, units: Any, where: str) -> list[int]:
        if len(units) == 0:
            raise ValueError(f"speech_units{where} is empty: a speech segment needs at least one unit")
        units = _integer_ids(units, f"speech_units{where} must hold integer unit ids")
        low, high = min(units), max(units)
        if low < 0 or high >= self.num_speech_units:
            bad = next(u for u in units if not 0 <= u < self.num_speech_units)
            raise ValueError(
                f"speech_units{where} has unit {bad} at position {units.index(bad)}, out of range "
                f"[0, {self.num_speech_units}) (the tokenizer's speech units)"
            )
        return units

    def _read_audio(
        self, audio: Any, audio_kwargs: dict, batch_size: int, single: bool
    ) -> tuple[list[list] | None, BatchFeature | None]:
        """`audio=` as `(speech_units, encoder_features)`: here the codec path, each waveform's units;
        `DeepTalkAudioProcessor` overrides it with the audio-encoder path (`audio_kwargs`: the feature extractor's).
        A codec takes no options: feature-extractor ones (e.g. `do_normalize`) are refused rather than ignored."""
        unsupported = sorted(k for k, v in audio_kwargs.items() if v and k not in PROCESSOR_AUDIO_OPTIONS)
        if unsupported:
            raise ValueError(f"{type(self).__name__} encodes audio with its codec, which takes no {unsupported}")
        samples = _per_sample(audio, batch_size, single, _is_waveform, "audio")
        rate = audio_kwargs.get("sampling_rate")
        return [[self._encode_audio(waveform, rate) for waveform in segments] for segments in samples], None

    def _require_codec(self) -> AudioCodec:
        if self.codec is None:
            raise ValueError(
                "audio= needs an audio codec: DeepTalkProcessor(..., codec=SnacCodec.from_pretrained(...))"
            )
        return self.codec

    def _encode_audio(self, waveform: Any, sampling_rate: int | None) -> list[int]:
        codec = self._require_codec()
        if sampling_rate is None:
            raise ValueError(
                "audio needs its sampling rate (sampling_rate= beside audio=, or an audio block's 'sampling_rate'; "
                "the codec resamples to its own)"
            )
        self._check_codec_units(codec)
        return codec.to_units(codec.encode(torch.as_tensor(waveform), sampling_rate)).tolist()

    def _check_codec_units(self, codec: AudioCodec) -> None:
        """Every unit the codec makes must be one of the tokenizer's speech units."""
        if codec.num_units > self.num_speech_units:
            raise ValueError(
                f"the codec makes {codec.num_units} distinct units but the tokenizer has {self.num_speech_units}"
            )

    def _fill_placeholders(self, text: str, ids: list[int], segments: list[list[int]]) -> tuple[list[int], list[int]]:
        """`ids` were tokenized with each placeholder as a begin-of-speech marker; the segments go after those.
        Returns the ids and, per id, the index in `ids` of its token (a segment's units and end marker: the begin
        marker's)."""
        pattern = f"{re.escape(SPEECH_PLACEHOLDER)}|{re.escape(BEGIN_OF_SPEECH)}"
        markers = [m.group() == SPEECH_PLACEHOLDER for m in re.finditer(pattern, text)]
        begin, start = self.begin_of_speech_id, self.speech_token_start
        from_placeholder, pending = iter(markers), iter(segments)
        out: list[int] = []
        origin: list[int] = []
        for index, token in enumerate(ids):
            out.append(token)
            if token == begin and next(from_placeholder):
                out.extend(start + unit for unit in next(pending))
                out.append(self.end_of_speech_id)
            origin.extend([index] * (len(out) - len(origin)))
        return out, origin

    def _checked_markers(self, i: int, text: str, ids: list[int]) -> list[int]:
        """`ids`, the tokenization of `text`, once each speech marker in it came out as one token."""
        if ids.count(self.begin_of_speech_id) != text.count(BEGIN_OF_SPEECH):
            raise ValueError(
                f"the tokenizer did not keep {BEGIN_OF_SPEECH} as one token in text[{i}] (a tokenizer with "
                "split_special_tokens=True splits it)"
            )
        return ids

    def _without_appended(self, ids: list[int], text: str, encode: dict | None = None) -> list[int]:
        """`ids` without the tokens the tokenizer appended after `text` (an EOS): a prompt the model continues."""
        return ids[: len(ids) - self._added_special_tokens(ids, text, encode)[1]]

    def _kept_positions(self, length: int, specials: tuple[int, int], limit: int) -> range | list[int]:
        """Positions of a row that truncation to `limit` keeps: as the tokenizer truncates, the special tokens it
        added at the ends (`specials`: how many before and after) stay, and the body is cut on `truncation_side`."""
        before, after = specials
        if before + after > limit:  # no room for the special tokens: the tokenizer leaves such a row as it is
            return range(length)
        body = limit - before - after
        start, end = before, length - after
        kept = range(end - body, end) if self.tokenizer.truncation_side == "left" else range(start, start + body)
        return [*range(before), *kept, *range(end, length)]

    def _added_special_tokens(self, ids: list[int], text: str, encode: dict | None = None) -> tuple[int, int]:
        """How many of `ids`, the tokenizer's encoding of `text` (with the options `encode`), are tokens it added before
        and after the text's own (a BOS, an EOS): they stay at the ends, and the interleaving policies lay out the
        text's own ids only."""
        own = self.tokenizer(text, add_special_tokens=False, **(encode or {}))["input_ids"]
        extra = len(ids) - len(own)
        if extra <= 0:
            return 0, 0
        # Split them as the tokenizer does around a text: finding `own` inside `ids` alone misplaces them where the
        # text's own ids are added tokens too (a text "<s>"), and finds nothing for an empty text.
        probe, probe_own = (self.tokenizer("a", add_special_tokens=add)["input_ids"] for add in (True, False))
        split = _surrounding(probe, probe_own) if probe_own else None
        if split is not None and sum(split) == extra and ids[split[0] : len(ids) - split[1]] == own:
            return split
        if not own:
            before = int(ids[0] == self.tokenizer.bos_token_id)
            return before, extra - before
        return _surrounding(ids, own) or (0, 0)

    def interleave_ids(
        self, text_ids: list[int], units: list[int], interleave: str | None = None, ratio: Sequence[int] | None = None
    ) -> list[int]:
        """Lay out a transcript's ids and its speech units (unit indices) by an interleaving policy."""
        interleave = self.interleave if interleave is None else interleave
        ratio = self._check_policy(interleave, self.text_speech_ratio if ratio is None else ratio)
        text_ids = _integer_ids(
            text_ids,
            f"text_ids must be integer ids (a list, or 1-D integer ids in a tensor), got {_describe(text_ids)}",
        )
        outside = [t for t in text_ids if not 0 <= t < self.speech_token_start]
        if outside:
            raise ValueError(f"text_ids has {outside[0]}, not a text id (text ids are [0, {self.speech_token_start}))")
        return self._interleave(text_ids, self._checked_units(units, ""), interleave, ratio)

    def _interleave(self, text_ids: list[int], units: list[int], interleave: str, ratio: tuple[int, int]) -> list[int]:
        """`interleave_ids` on arguments already checked (`__call__` checks them once per call)."""
        n_text, n_speech = ratio
        speech = [self.speech_token_start + unit for unit in units]
        begin, end = [self.begin_of_speech_id], [self.end_of_speech_id]
        if interleave == "speech_only":
            return begin + speech + end
        if interleave == "text_then_speech":
            return list(text_ids) + begin + speech + end
        out, taken = list(text_ids[:n_text]) + begin, n_text
        for chunk in range(0, len(speech), n_speech):
            out += speech[chunk : chunk + n_speech]
            if chunk + n_speech < len(speech):
                out += text_ids[taken : taken + n_text]
                taken += n_text
        return out + end + list(text_ids[taken:])

    def decode(self, token_ids: Any, **kwargs: Any) -> SpeechTextOutput:
        """Text (through the tokenizer's `decode`, with `kwargs`) and the speech segments' units of one sequence."""
        _check_not_parallel(token_ids, "decode")
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            if token_ids.reshape(-1).shape[0] and not has_integer_dtype(token_ids):  # an empty row may be float
                raise ValueError(f"decode takes integer ids, got a {type(token_ids).__name__} of {token_ids.dtype}")
            token_ids = token_ids.tolist()
        if not isinstance(token_ids, (list, tuple)):  # one id, as the tokenizer's `decode` takes it
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):  # `generate`'s `[1, length]` output
            if len(token_ids) != 1:
                raise ValueError(f"decode takes one sequence, got {len(token_ids)}: use batch_decode")
            token_ids = token_ids[0]
        splitter = _SpeechSplitter(self.speech_token_start, self.num_speech_units)
        for token in token_ids:
            splitter.push(operator.index(token))  # a float id is corrupt, not an id to round
        return SpeechTextOutput(self.tokenizer.decode(splitter.text_ids, **kwargs), splitter.segments)

    def batch_decode(self, sequences: Any, **kwargs: Any) -> list[SpeechTextOutput]:
        """`decode` for each sequence of a batch."""
        _check_not_parallel(sequences, "batch_decode")
        return [self.decode(sequence, **kwargs) for sequence in sequences]

    def parallel_prompt(
        self, text: str | list[str], config: DeepTalkConfig, audio: Any = None, sampling_rate: int | None = None
    ) -> BatchFeature:
        r"""A prompt for parallel-stream generation (`config.num_audio_streams` > 0): `input_ids` `[batch, 1 + S, seq]`
        (left-padded) and `attention_mask` `[batch, seq]`.

        Text ids (e.g. a rendered chat template, tokenized as `apply_chat_template` tokenizes a generation prompt) go
        to the text stream over audio pad. Each `<|speech|>` placeholder
        takes the sample's next waveform from `audio` (as for `__call__`): the codec encodes it, `to_streams` gives one
        stream per frame position and `build_delay_pattern` delays them, over text pad. The answer's speech is not
        opened here: `generate(..., speech_answer=True)` does that in the audio streams.
        """
        codec = self._stream_codec(self.codec, config)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts:
            raise ValueError("text= is an empty batch")
        samples = _per_sample(audio, len(texts), single, _is_waveform, "audio")
        # As `apply_chat_template` tokenizes a rendered chat: no BOS before one the text has, nothing after the text.
        tokenized = [t.replace(SPEECH_PLACEHOLDER, BEGIN_OF_SPEECH) for t in texts]
        bos = self.tokenizer.bos_token
        tokens = [  # each text by its own start (a batch mixing both would gain or lose a BOS)
            self.tokenizer(t, add_special_tokens=not (bos and t.startswith(bos)))["input_ids"] for t in tokenized
        ]
        encoded = [
            self._without_appended(self._checked_markers(i, t, row), t)
            for i, (row, t) in enumerate(zip(tokens, tokenized, strict=True))
        ]
        text_pad = text_pad_token_id(config)
        pad = torch.tensor([text_pad] + [config.audio_pad_token_id] * config.num_audio_streams)[:, None]
        rows = []
        for i, (sample_text, ids, waveforms) in enumerate(zip(texts, encoded, samples, strict=True)):
            placeholders = sample_text.count(SPEECH_PLACEHOLDER)
            if placeholders != len(waveforms) or ids.count(self.begin_of_speech_id) != placeholders:
                raise ValueError(
                    f"text[{i}] needs one {SPEECH_PLACEHOLDER} placeholder per waveform ({len(waveforms)}) and no "
                    f"{BEGIN_OF_SPEECH} (generate(..., speech_answer=True) opens the answer's speech)"
                )
            columns, pending = [], iter(waveforms)
            for token in ids:
                if token == self.begin_of_speech_id:
                    codes = codec.to_streams(codec.encode(next(pending), sampling_rate))
                    audio_streams = build_delay_pattern(codes[None], config)[0]
                    columns.append(torch.cat([pad[:1].expand(1, audio_streams.shape[1]), audio_streams]))
                else:
                    columns.append(torch.cat([torch.tensor([[token]]), pad[1:]]))
            if not columns:  # a tokenizer without BOS makes no token of ""
                raise ValueError(f"text[{i}] gives no token: a prompt needs at least one")
            rows.append(torch.cat(columns, dim=1))
        length = max(row.shape[1] for row in rows)
        input_ids = torch.stack([torch.cat([pad.expand(-1, length - row.shape[1]), row], dim=1) for row in rows])
        attention_mask = torch.stack([(torch.arange(length) >= length - row.shape[1]).long() for row in rows])
        return BatchFeature({"input_ids": input_ids, "attention_mask": attention_mask})

    def decode_parallel(
        self, answer: torch.LongTensor, config: DeepTalkConfig, **decode_kwargs: Any
    ) -> list[ParallelSpeechOutput]:
        """Text, codes per level and waveform of each item of a parallel-stream answer `[batch, 1 + S, steps]`: the
        generated part of `generate`'s result (the prompt's streams would be read as the answer's)."""
        codec = self._stream_codec(self.codec, config)
        decode_kwargs = {"skip_special_tokens": True, **decode_kwargs}
        per_stream = audio_codes_per_stream(answer[:, 1:], config)  # (checks the layout)
        # The reader skips ids that are no code, so a corrupt one would shift its stream's later codes into other
        # frames, silently; the tokenizer fails on a negative text id in its own words.
        if outside := stream_id_outside(answer, config):
            raise ValueError(f"the answer: {outside} (labels' -100 padding is not an id: drop it before decoding)")
        outputs = []
        for item, streams in zip(answer, per_stream, strict=True):
            codes = codec.from_streams(_frame_groups(streams))
            waveform = codec.decode(codes) if codes[0].numel() else torch.zeros(0)
            text = self.tokenizer.decode(self._text_ids(item[0].tolist()), **decode_kwargs)
            outputs.append(ParallelSpeechOutput(text, codes, waveform))
        return outputs

    def _text_ids(self, ids: list[int]) -> list[int]:
        """The text block's ids of a text stream (its head also scores the speech block, which carries no text)."""
        return [token for token in ids if token < self.speech_token_start]

    @staticmethod
    def _stream_codec(codec: AudioCodec | None, config: DeepTalkConfig) -> AudioCodec:
        """`codec`, if its frames are the config's parallel audio streams (one per frame position, same codebook)."""
        if codec is None:
            raise ValueError("parallel streams carry a codec's frames: give the processor (or streamer) its codec")
        if (codec.units_per_frame, codec.codebook_size) != (config.num_audio_streams, config.audio_codebook_size):
            raise ValueError(
                f"the codec has {codec.units_per_frame} codes per frame from a codebook of {codec.codebook_size}; the "
                f"config has num_audio_streams={config.num_audio_streams}, "
                f"audio_codebook_size={config.audio_codebook_size}"
            )
        return codec

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' `apply_chat_template`. With `continue_final_message=True`, a final message that ends in a
        speech block is continued inside that segment: the prompt ends with its units, without `<|end_of_speech|>`, so
        the model goes on speaking (transformers continues a message's last text block only). Image and video blocks are
        refused (the template would drop them)."""
        # As transformers will read them (message objects as dicts, OpenAI image blocks as image blocks), checked so.
        conversations, batched = (
            self._normalize_conversations(conversation) if conversation else ([conversation], False)
        )
        conversation = conversations if batched else conversations[0]
        # The flag that lets the default template render speech blocks (the tokenizer alone must not); passed only to
        # a template that reads it, as transformers hands any other keyword to `__call__`, with warnings.
        ours = _TEMPLATE_FLAG in self._resolve_chat_template(kwargs.get("chat_template", args[0] if args else None))
        for i, messages in enumerate(conversations):
            if not messages:  # transformers fails on it with an IndexError
                raise ValueError(f"conversation {i} has no messages")
            for j, message in enumerate(messages):
                if not isinstance(message, dict) or "role" not in message:  # else a template's or a KeyError
                    raise ValueError(f"conversation {i}, message {j} is not a dict with a 'role': {message!r:.80}")
                content = message.get("content")
                # Else the default template's TypeError, or (no content, e.g. {"role": "user", "text": ...}) an empty
                # turn; transformers drops a None content, so only a turn that calls tools goes without one. (Other
                # templates may render other content, a tool result's dict, or other keys, a reasoning_content.)
                if ours and not isinstance(content, (str, list, tuple)) and not message.get("tool_calls"):
                    got = "no content" if content is None else _describe(content)
                    raise ValueError(
                        f"conversation {i}, message {j}: content must be a string or a list of content blocks, got "
                        f"{got}"
                    )
                for k, block in enumerate(content if isinstance(content, (list, tuple)) else []):
                    if not isinstance(block, dict) or "type" not in block:
                        raise ValueError(
                            f"conversation {i}, message {j}: content block {k} is not a dict with a 'type' (e.g. "
                            f'{{"type": "text", "text": ...}}): {block!r:.80}'
                        )
                    if block["type"] in ("image", "video"):  # the template drops them
                        raise ValueError(
                            f"conversation {i} has an {block['type']} block: DeepTalk processors take text, speech "
                            "and audio blocks"
                        )
        speech_answer = ours and kwargs.get("speech_answer")
        if kwargs.get("continue_final_message"):
            opened = [self._open_final_speech(messages, i) for i, messages in enumerate(conversations)]
            conversation = opened if batched else opened[0]
            text = [i for i, (new, old) in enumerate(zip(opened, conversations, strict=True)) if new is old]
            if speech_answer and text:  # a continued text block stays text
                raise ValueError(
                    f"speech_answer=True with continue_final_message continues a final speech block, and conversation "
                    f"{text[0]} ends in text: pass add_generation_prompt=True for a new answer in speech"
                )
        if ours:
            kwargs[_TEMPLATE_FLAG] = True
        opens = kwargs.get("add_generation_prompt") or kwargs.get("continue_final_message")
        if speech_answer and not opens:
            raise ValueError(
                "speech_answer=True opens the assistant's answer with <|begin_of_speech|>, which only the generation "
                "prompt has: pass add_generation_prompt=True (a continued final speech block is open already)"
            )
        if opens:
            kwargs["processor_kwargs"] = {**(kwargs.get("processor_kwargs") or {}), _OPEN_END: True}
        return super().apply_chat_template(conversation, *args, **kwargs)

    def _open_final_speech(self, messages: Any, i: int) -> Any:
        """`messages` with a final speech block (or, with a codec, audio block) written out as the text of its open
        segment (`<|begin_of_speech|>` and its unit tokens), which transformers then continues as the final text."""
        last = messages[-1] if isinstance(messages, (list, tuple)) and messages else None
        content = last.get("content") if isinstance(last, dict) else None
        if not isinstance(content, (list, tuple)) or not content or not isinstance(content[-1], dict):
            return messages
        kind = content[-1].get("type")
        if kind == "audio" and not self.audio_becomes_units:
            raise ValueError(
                f"continue_final_message: conversation {i} ends in an audio block, which feeds the audio encoder and "
                "cannot be continued (a final speech block can)"
            )
        if kind == "audio":  # the codec's units of it, continued as a speech block's
            rate = self._require_codec().sampling_rate  # a path is loaded at the codec's rate
            ((_, audio),) = _speech_blocks([[{"content": [content[-1]]}]], {"sampling_rate": rate})[0]
            units = self._encode_audio(*audio)
        elif kind == "speech":
            units = self._checked_units(content[-1]["units"], f" of conversation {i}'s final speech block")
        else:
            return messages
        text = BEGIN_OF_SPEECH + "".join(SPEECH_UNIT_TOKEN.format(unit) for unit in units)
        return [*messages[:-1], {**messages[-1], "content": [*content[:-1], {"type": "text", "text": text}]}]

    def _resolve_audio_loading_params(self, processor_kwargs: dict) -> dict:
        """transformers' choice, except that audio files become units at the codec's rate unless a rate is given (its
        default, without a feature extractor, is 16 kHz)."""
        params = super()._resolve_audio_loading_params(processor_kwargs)
        given = processor_kwargs.get("sampling_rate", processor_kwargs.get("audio_kwargs", {}).get("sampling_rate"))
        if self.audio_becomes_units and self.codec is not None and given is None:
            params["sampling_rate"] = self.codec.sampling_rate
        return params

    def _multimodal_inputs_from_conversations(
        self, conversations: list[list[dict]], audio_loading_params: dict, load_audio_from_video: bool = False
    ):
        """Speech turns for `apply_chat_template`: `{"type": "speech", "units": [...]}` and `{"type": "audio", ...}`
        blocks (`"audio"` array with `"sampling_rate"`, or `"path"`/`"url"`), in conversation order, become the speech
        segments that fill the template's `<|speech|>` placeholders."""
        batch = [
            [block if kind == "speech" else self._encode_audio(*block) for kind, block in blocks]
            for blocks in _speech_blocks(conversations, audio_loading_params)
        ]
        empty = [[] for _ in conversations]
        return empty, empty, [], {"speech_units": batch, _FROM_CONVERSATION: True}


class _NoAudioModelConfig(ValueError):
    """`DeepTalkAudioProcessor` built without the model's config."""


class DeepTalkAudioProcessor(DeepTalkProcessor):
    r"""
    The processor of `DeepTalkForConditionalGeneration`: `DeepTalkProcessor` plus the audio encoder's feature
    extractor. `audio=` waveforms become the encoder's `input_features` / `input_features_mask`, and each `<|audio|>`
    in the text becomes as many placeholders as its audio fills (`audio_model_config` says how many), marked as
    speech in `modality_ids`; speech units still come in through `speech_units=`.

    Args:
        tokenizer: as for `DeepTalkProcessor`, with a `<|audio|>` token whose id is `audio_model_config.audio_token_id`.
        feature_extractor: the audio encoder's transformers feature extractor (e.g. `WhisperFeatureExtractor`).
        audio_model_config: the `DeepTalkAudioConfig` (or its dict) of the model the inputs are for.
        chat_template: as for `DeepTalkProcessor`; by default the ChatML template with audio and speech blocks.
    """

    audio_becomes_units = False  # `audio=` feeds the encoder, beside any `speech_units=`

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        feature_extractor: SequenceFeatureExtractor | None = None,
        audio_model_config: DeepTalkAudioConfig | dict | None = None,
        interleave: str = "text_then_speech",
        text_speech_ratio: Sequence[int] = (13, 26),
        chat_template: str | dict[str, str] | None = None,
        **kwargs: Any,
    ):
        # `interleave`, `text_speech_ratio` and `chat_template` are named here (not left in kwargs) so that
        # `save_pretrained`, which writes the parameters of `__init__`, keeps them, and `from_pretrained` passes them.
        from .configuration_deeptalk import DeepTalkAudioConfig

        if isinstance(audio_model_config, dict):
            audio_model_config = DeepTalkAudioConfig(**audio_model_config)
        if audio_model_config is None:  # `from_pretrained` then reads the checkpoint's own config
            raise _NoAudioModelConfig("audio_model_config= must be the model's DeepTalkAudioConfig (or its dict)")
        if not isinstance(audio_model_config, DeepTalkAudioConfig):
            raise ValueError("audio_model_config= must be the model's DeepTalkAudioConfig (or its dict)")
        chat_template = chat_template or AUDIO_CHAT_TEMPLATE
        super().__init__(
            tokenizer,
            chat_template,
            interleave,
            text_speech_ratio,
            feature_extractor=feature_extractor,
            **kwargs,
        )
        self.audio_model_config = audio_model_config
        audio_id = audio_model_config.audio_token_id
        if self.tokenizer.convert_ids_to_tokens(audio_id) != AUDIO_PLACEHOLDER:
            raise ValueError(
                f"the tokenizer's id {audio_id} (audio_token_id) is {self.tokenizer.convert_ids_to_tokens(audio_id)!r}, "
                f"not {AUDIO_PLACEHOLDER!r}"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> DeepTalkAudioProcessor:
        """transformers' `from_pretrained`; a folder where no processor was saved (a checkpoint: `config.json`,
        tokenizer and feature extractor files) takes the `DeepTalkAudioConfig` of its `config.json`."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except _NoAudioModelConfig:
            from transformers import AutoConfig

            from .configuration_deeptalk import DeepTalkAudioConfig

            loading = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            try:
                config = AutoConfig.from_pretrained(
                    pretrained_model_name_or_path, **{k: kwargs[k] for k in loading if k in kwargs}
                )
            except (OSError, ValueError):
                config = None
            if "audio_model_config" in kwargs or not isinstance(config, DeepTalkAudioConfig):
                raise _NoAudioModelConfig(
                    f"{pretrained_model_name_or_path} has no saved DeepTalkAudioProcessor (processor_config.json) nor "
                    "a DeepTalkAudioConfig in config.json: pass audio_model_config= (the model's config)"
                ) from None
            return super().from_pretrained(pretrained_model_name_or_path, *args, audio_model_config=config, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + ["input_features", "input_features_mask"]

    def _multimodal_inputs_from_conversations(
        self, conversations: list[list[dict]], audio_loading_params: dict, load_audio_from_video: bool = False
    ):
        """Speech blocks fill the template's `<|speech|>` placeholders as units; audio blocks, resampled to the
        loading rate (the feature extractor's), go to the audio encoder through its `<|audio|>` placeholders."""
        from .audio_codecs import resample

        rate = audio_loading_params["sampling_rate"]

        def at_rate(waveform: Any, given: int) -> Any:
            if given == rate:  # as given: `extract_audio_features` checks the samples
                return waveform
            return resample(torch.as_tensor(waveform), given, rate)  # which refuses integer samples

        units, audio = [], []
        for blocks in _speech_blocks(conversations, audio_loading_params):
            units.append([block for kind, block in blocks if kind == "speech"])
            audio.append([at_rate(*block) for kind, block in blocks if kind == "audio"])
        empty = [[] for _ in conversations]
        return empty, empty, audio if any(audio) else [], {"speech_units": units, _FROM_CONVERSATION: True}

    def _read_audio(
        self, audio: Any, audio_kwargs: dict, batch_size: int, single: bool
    ) -> tuple[list[list] | None, BatchFeature | None]:
        samples = _per_sample(audio, batch_size, single, _is_waveform, "audio")
        waveforms = [waveform for segments in samples for waveform in segments]  # reading order
        if not waveforms:  # `[None, None]`: text only, as `audio=None`
            return None, None
        sampling_rate = audio_kwargs.get("sampling_rate")
        if sampling_rate is None:
            raise ValueError("audio= needs sampling_rate= (the waveforms' rate)")
        features = extract_audio_features(
            waveforms, sampling_rate, self.feature_extractor, self.audio_model_config, audio_kwargs
        )
        features["audios_per_sequence"] = [len(segments) for segments in samples]  # checked against the placeholders
        return None, features


@dataclass
class TextDelta:
    """New text since the previous delta."""

    text: str


@dataclass
class SpeechChunk:
    """New units of speech segment `segment` (0-based, in generation order)."""

    segment: int
    units: list[int]


@dataclass
class AudioChunk:
    """The next stretch of speech segment `segment`'s waveform."""

    segment: int
    waveform: torch.Tensor
    sampling_rate: int


class DeepTalkStreamer(BaseStreamer):
    """Streams `generate` as `TextDelta`, `SpeechChunk` and, with a codec, `AudioChunk` events, in generation order.

    Iterate over it while `generate` runs in another thread (as with `TextIteratorStreamer`), or after it returns.
    Per segment, the speech chunks concatenate to `processor.decode(...).speech_units`; the text deltas concatenate to
    its text under the same `decode_kwargs` (by default `skip_special_tokens=True`, as `TextIteratorStreamer`'s users
    usually pass) and `clean_up_tokenization_spaces=False` (a clean-up would rewrite text already sent). An audio
    chunk is decoded as soon as `audio_chunk_frames` whole frames are pending (and at the end of a segment), from
    those frames plus up to `context_frames` earlier ones whose samples are dropped, which smooths chunk boundaries
    for codecs that look backwards.
    """

    def __init__(
        self,
        processor: DeepTalkProcessor,
        codec: AudioCodec | None = None,
        *,
        skip_prompt: bool = True,
        audio_chunk_frames: int = 2,
        context_frames: int = 2,
        timeout: float | None = None,
        **decode_kwargs: Any,
    ):
        if not is_whole(audio_chunk_frames) or not is_whole(context_frames, 0):
            raise ValueError(
                f"audio_chunk_frames={audio_chunk_frames!r} must be an integer >= 1, context_frames={context_frames!r} "
                "an integer >= 0"
            )
        if decode_kwargs.get("clean_up_tokenization_spaces"):
            raise ValueError(
                "clean_up_tokenization_spaces=True rewrites text already streamed (' ,' becomes ','): the streamer "
                "decodes without it"
            )
        self.processor, self.codec = processor, self._checked_codec(processor, codec)
        self.skip_prompt, self.timeout = skip_prompt, timeout
        self.audio_chunk_frames, self.context_frames = audio_chunk_frames, context_frames
        self.decode_kwargs = {"skip_special_tokens": True, **decode_kwargs, "clean_up_tokenization_spaces": False}
        # Byte-fallback tokens (`<0xF0>`, sentencepiece vocabularies): their decoder joins a whole run of them, so a
        # run is not settled until another token follows (an invalid run turns every byte in it into U+FFFD).
        # Special tokens the decode skips join the runs on their two sides, so they are held back with them.
        tokenizer = processor.tokenizer
        byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in range(256)])
        self._held_ids = {i for i in byte_ids if i is not None and i != tokenizer.unk_token_id}
        if self._held_ids and self.decode_kwargs["skip_special_tokens"]:
            self._held_ids |= set(tokenizer.all_special_ids)
        self.queue: Queue = Queue()
        self._reset()

    def _checked_codec(self, processor: DeepTalkProcessor, codec: AudioCodec | None) -> AudioCodec | None:
        """`codec`, if its units are the tokenizer's (as `SpeechUnitsLogitsProcessor` checks), not found mid-stream."""
        if codec is not None:
            processor._check_codec_units(codec)
        return codec

    def _reset(self) -> None:
        """The state of one `generate` call; `end` resets it, so one streamer can serve call after call."""
        self._splitter = _SpeechSplitter(self.processor.speech_token_start, self.processor.num_speech_units)
        self._seen_prompt = False
        self._text_length = 0  # characters of text already sent
        self._voiced_frames: dict[int, int] = {}  # per segment, frames already sent as audio
        # The units of a skipped prompt's open speech segment (`continue_final_message`), which the answer's first
        # segment continues unless a marker comes first: its frames start in the prompt.
        self._continued: list[int] = []

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run `step`; an error also goes to the consumer, which would otherwise wait forever in another thread, and
        resets the streamer for the next call."""
        try:
            step()
        except Exception as error:
            self._reset()
            self.queue.put(error, timeout=self.timeout)
            raise

    def put(self, value: torch.Tensor) -> None:
        self._guarded(lambda: self._put(value))

    def _put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError(
                f"DeepTalkStreamer streams one sequence, got {value.shape[0]} rows (batch size x num_return_sequences "
                "or num_beams; a parallel-stream model's rows are its streams: use DeepTalkParallelStreamer)"
            )
        if self.skip_prompt and not self._seen_prompt:
            self._seen_prompt = True
            prompt = _SpeechSplitter(self.processor.speech_token_start, self.processor.num_speech_units)
            for token in value.reshape(-1).tolist():
                prompt.push(token)
            self._continued = prompt.segments[-1] if prompt.is_open else []
            return
        self._seen_prompt = True
        splitter, units, segment = self._splitter, [], None
        for token in value.reshape(-1).tolist():
            kind = splitter.push(token)
            if self._continued and kind in ("begin", "end") and len(splitter.segments) == (kind == "begin"):
                self._continued = []  # the prompt's segment closed, or a new one opened, before any answer unit
            if kind == "unit":
                segment = len(splitter.segments) - 1
                units.append(splitter.segments[-1][-1])
            elif kind != "pad":  # text or a marker: the units so far go out first (one chunk, one segment)
                self._send_units(segment, units)
                units = []
                if kind == "text":
                    self._send_text(final=False)
                else:
                    self._finish_segments(keep_open=kind == "begin")
        self._send_units(segment, units)

    def end(self) -> None:
        def flush() -> None:
            self._send_text(final=True)
            self._finish_segments(keep_open=False)

        self._guarded(flush)
        self._reset()
        self.queue.put(None, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> TextDelta | SpeechChunk | AudioChunk:
        event = self.queue.get(timeout=self.timeout)
        if event is None:
            raise StopIteration
        if isinstance(event, Exception):  # `put` failed in the generating thread
            raise event
        return event

    def _send_text(self, final: bool) -> None:
        ids = self._splitter.text_ids
        settled = len(ids)
        while not final and settled and ids[settled - 1] in self._held_ids:
            settled -= 1
        text = self.processor.tokenizer.decode(ids[:settled], **self.decode_kwargs)
        if not final and text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        if len(text) > self._text_length:
            self.queue.put(TextDelta(text[self._text_length :]), timeout=self.timeout)
            self._text_length = len(text)

    def _send_units(self, segment: int | None, units: list[int]) -> None:
        if not units:
            return
        self.queue.put(SpeechChunk(segment, units), timeout=self.timeout)
        self._send_audio(segment, final=False)

    def _finish_segments(self, keep_open: bool) -> None:
        """Send the rest of the audio of every segment but (if `keep_open`) the one just opened."""
        last = len(self._splitter.segments) - (1 if keep_open else 0)
        for segment in [s for s in self._voiced_frames if s < last]:
            self._send_audio(segment, final=True)
            del self._voiced_frames[segment]

    def _send_audio(self, segment: int, final: bool) -> None:
        codec = self.codec
        if codec is None:
            return
        per_frame = codec.units_per_frame
        units = self._splitter.segments[segment]
        prompt = self._continued if segment == 0 else []
        if prompt:  # a copy only where the answer continues the prompt's segment
            units = prompt + units
        done, ready = self._voiced_frames.setdefault(segment, len(prompt) // per_frame), len(units) // per_frame
        if ready == done or (ready - done < self.audio_chunk_frames and not final):
            return
        first = max(0, done - self.context_frames)
        waveform = codec.decode(codec.from_units(units[first * per_frame : ready * per_frame]))
        waveform = waveform[(done - first) * codec.samples_per_frame :]
        self.queue.put(AudioChunk(segment, waveform, codec.sampling_rate), timeout=self.timeout)
        self._voiced_frames[segment] = ready


class DeepTalkParallelStreamer(DeepTalkStreamer):
    """Streams parallel-stream `generate` (`config.num_audio_streams` > 0) as the same events as `DeepTalkStreamer`.

    `generate` hands the streamer one row per stream (`[1 + S]` per step, `[2 * (1 + S)]` with `batch_parallel=True`,
    whose text-only copy's text stream is the answer's text). Text deltas come from the text stream; the speech
    answer is segment 0, and a frame's units (the codec's, as `SpeechChunk.units` always are) go out as soon as its
    frame group is complete, i.e. every audio stream has emitted its code for it, and audio once `audio_chunk_frames`
    whole frames are pending (as in `DeepTalkStreamer`). Concatenated, the text deltas and speech chunks give
    `processor.decode_parallel`'s text and codes (as units) of the returned answer, and the audio chunks a waveform of
    its length (decoded chunk by chunk, so not necessarily its samples). The prompt is never streamed.
    """

    def __init__(
        self,
        processor: DeepTalkProcessor,
        codec: AudioCodec,
        config: DeepTalkConfig,
        *,
        batch_parallel: bool = False,
        audio_chunk_frames: int = 2,
        context_frames: int = 2,
        timeout: float | None = None,
        **decode_kwargs: Any,
    ):
        self.config = config  # before `__init__`'s `_reset` and `_checked_codec`, which read it
        super().__init__(
            processor,
            codec,
            audio_chunk_frames=audio_chunk_frames,
            context_frames=context_frames,
            timeout=timeout,
            **decode_kwargs,
        )
        self.rows = (2 if batch_parallel else 1) * (config.num_audio_streams + 1)
        self.text_row = self.rows - config.num_audio_streams - 1  # the text-only copy's text stream, if any

    def _checked_codec(self, processor: DeepTalkProcessor, codec: AudioCodec | None) -> AudioCodec:
        """`codec`, if its frames are the config's audio streams (the text vocabulary needs no units here)."""
        return processor._stream_codec(codec, self.config)

    def _reset(self) -> None:
        super()._reset()
        self._audio = AudioStreamReader(self.config)  # the speech answer's audio streams so far
        self._splitter.segments.append([])

    def _put(self, value: torch.Tensor) -> None:
        if value.shape[0] != self.rows:
            raise ValueError(
                f"expected {self.rows} rows (one item's streams{', and its text-only copy' if self.text_row else ''}),"
                f" got {value.shape[0]}: generate one item, with batch_parallel as given to the streamer"
            )
        if not self._seen_prompt:
            half = self.rows // 2
            if self.text_row and not torch.equal(value[:half], value[half:]):  # `generate` duplicates the item
                raise ValueError(
                    "batch_parallel=True streams one item and its text-only copy, whose prompts are the same: these "
                    "rows are two items (generate one item, with batch_parallel as given to the streamer)"
                )
            self._seen_prompt = True
            return
        streams, answer = self.config.num_audio_streams + 1, self._splitter.segments[0]
        text_pad = text_pad_token_id(self.config)
        for step in value.reshape(self.rows, -1).T.cpu():
            token = int(step[self.text_row])
            text_ids = self.processor._text_ids([token])
            if text_ids:
                self._splitter.text_ids += text_ids
                if token != text_pad:  # what the text stream emits once it ended: no new text (re-decoding cost grew)
                    self._send_text(final=False)
            self._audio.push(step[1:streams].tolist())
            done, frames = len(answer) // self.codec.units_per_frame, min(map(len, self._audio.codes))
            if frames > done:  # every stream has its code of these frames
                new = torch.tensor([codes[done:frames] for codes in self._audio.codes])
                units = self.codec.to_units(self.codec.from_streams(new)).tolist()
                answer += units
                self._send_units(0, units)


class SpeechUnitsLogitsProcessor(LogitsProcessor):
    """Keeps generated speech decodable by `codec`: inside a segment the next unit must have the codebook level that
    the codec's frame layout puts at that position, and `<|end_of_speech|>` may only close whole frames. Text stays
    allowed inside segments only with `allow_text=True` (interleaved answers). Segments are read as `decode` reads
    them: `<|begin_of_speech|>` opens one, and so does a unit outside any (which must then be a frame's first);
    nothing else changes outside segments. Useful for models in training and for random-weight pipelines."""

    def __init__(self, processor: DeepTalkProcessor, codec: AudioCodec, *, allow_text: bool = False):
        processor._check_codec_units(codec)
        self.start, self.num_units = processor.speech_token_start, processor.num_speech_units
        self.begin, self.end = processor.begin_of_speech_id, processor.end_of_speech_id
        self.levels = torch.tensor(codec.frame_levels)
        self.codebook_size = codec.codebook_size
        self.allow_text = allow_text

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        is_marker = (input_ids == self.begin) | (input_ids == self.end)
        last_marker = torch.where(is_marker, positions, -1).max(dim=1).values
        opened = (last_marker >= 0) & (input_ids.gather(1, last_marker.clamp(min=0)[:, None])[:, 0] == self.begin)
        is_unit = (input_ids >= self.start) & (input_ids < self.start + self.num_units)
        count = (is_unit & (positions > last_marker[:, None])).sum(1)
        inside = opened | (count > 0)  # a unit after the last end (or before any marker) opened a segment
        low = self.start + self.levels.to(input_ids.device)[count % len(self.levels)] * self.codebook_size
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        right_unit = (vocab >= low[:, None]) & (vocab < low[:, None] + self.codebook_size)
        allowed = right_unit | (vocab == self.end) & (count % len(self.levels) == 0)[:, None]
        if self.allow_text:
            allowed |= vocab < self.start
        # Outside a segment only units are constrained: one would open a segment, so it must be a frame's first.
        any_unit = (vocab >= self.start) & (vocab < self.start + self.num_units)
        refused = torch.where(inside[:, None], ~allowed, any_unit & ~right_unit)
        return scores.masked_fill(refused, -float("inf"))


__all__ = [
    "AUDIO_PLACEHOLDER",
    "AudioChunk",
    "DeepTalkAudioProcessor",
    "DeepTalkParallelStreamer",
    "DeepTalkProcessor",
    "DeepTalkStreamer",
    "INTERLEAVE_POLICIES",
    "ParallelSpeechOutput",
    "SpeechChunk",
    "SpeechTextOutput",
    "SpeechUnitsLogitsProcessor",
    "TextDelta",
    "add_speech_tokens",
    "fit_speech_vocab",
]
