"""DeepTalkProcessor: speech vocabulary layout, text+units → ids → text+units for every policy, batching, the chat
template, saving, and the errors bad input must raise."""

import copy
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from tokenizers import AddedToken, Tokenizer, models, normalizers, processors
from transformers import AutoProcessor, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import TruncationStrategy

from deeptalk_hf import DeepTalkConfig, DeepTalkProcessor, add_speech_tokens, fit_speech_vocab
from deeptalk_hf.processing_deeptalk import INTERLEAVE_POLICIES, SPEECH_MARKERS, SPEECH_UNIT_TOKEN

from .speech_fixtures import TEXT_VOCAB_SIZE, WORDS, tiny_model, tiny_processor, tiny_tokenizer

NUM_UNITS = 64
PROCESSOR = tiny_processor(NUM_UNITS)


# ---- vocabulary layout -------------------------------------------------------------------------------------------


def test_speech_block_is_the_end_of_the_vocabulary_after_text_padding():
    tokenizer = tiny_tokenizer()
    text_size = len(tokenizer)
    block = add_speech_tokens(tokenizer, 10, text_vocab_size=TEXT_VOCAB_SIZE)
    assert block == range(TEXT_VOCAB_SIZE, TEXT_VOCAB_SIZE + 10 + 3)
    assert len(tokenizer) == block.stop
    assert tokenizer.convert_ids_to_tokens(list(block)) == [f"<|speech_{i}|>" for i in range(10)] + list(
        SPEECH_MARKERS
    )
    # placeholder rows fill the gap between the tokenizer and the text model; the text ids are unchanged
    assert all(
        t.startswith("<|text_pad_") for t in tokenizer.convert_ids_to_tokens(list(range(text_size, block.start)))
    )
    assert tokenizer("hello world")["input_ids"] == tiny_tokenizer()("hello world")["input_ids"]
    # the same call again finds the block; a different one is refused
    assert add_speech_tokens(tokenizer, 10, text_vocab_size=TEXT_VOCAB_SIZE) == block
    for other in (dict(num_units=11), dict(num_units=10, text_vocab_size=block.stop)):
        with pytest.raises(ValueError, match="already has a speech block"):
            add_speech_tokens(tokenizer, **other)


@pytest.mark.parametrize(
    "layout, problem",
    [
        (["u0", "u1", "u2", "begin", "end", "stray", "pad"], "must follow the speech units contiguously"),
        (["u0", "u1", "stray", "u2", "begin", "end", "pad"], "not contiguous from id"),
        (["u0", "u1", "stray", "begin", "end", "pad"], "not contiguous from id"),  # the last unit is checked too
    ],
)
def test_a_speech_block_laid_out_wrongly_is_refused(layout, problem):
    """Tokens added by hand (or by another tool) with a gap: the unit and marker ids would not be the block's."""
    tokenizer = tiny_tokenizer()
    names = {f"u{i}": SPEECH_UNIT_TOKEN.format(i) for i in range(3)}
    names.update(zip(("begin", "end", "pad"), SPEECH_MARKERS, strict=True), stray="<|other|>")
    for name in layout:
        tokenizer.add_tokens([names[name]], special_tokens=True)
    with pytest.raises(ValueError, match=problem):
        add_speech_tokens(tokenizer, 3)


def test_add_speech_tokens_without_text_vocab_size_starts_at_the_tokenizer_end():
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    assert add_speech_tokens(tokenizer, 5) == range(size, size + 8)


def test_add_speech_tokens_refuses_a_vocabulary_with_gaps_in_its_ids():
    """New tokens get ids from len(tokenizer) on: with a gap in the ids they would take a token's id ("c" here)."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 9}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    for text_vocab_size in (None, 12):
        with pytest.raises(ValueError, match="has 4 tokens but ids up to 9"):
            add_speech_tokens(tokenizer, 4, text_vocab_size=text_vocab_size)
        assert len(tokenizer) == 4


def test_add_speech_tokens_with_text_vocab_size_equal_to_the_tokenizer_pads_nothing():
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    assert add_speech_tokens(tokenizer, 4, text_vocab_size=size) == range(size, size + 7)
    assert len(tokenizer) == size + 7


def test_add_speech_tokens_rejects_a_text_model_smaller_than_the_tokenizer():
    tokenizer = tiny_tokenizer()
    size = len(tokenizer)
    for smaller in (3, size - 1):  # refused before the tokenizer changes
        with pytest.raises(ValueError, match=f"has {size} tokens, more than text_vocab_size={smaller}"):
            add_speech_tokens(tokenizer, 5, text_vocab_size=smaller)
        assert len(tokenizer) == size
    for units in (0, True, 2.0):  # True made a one-unit block
        with pytest.raises(ValueError, match=f"num_units={units!r} must be an integer >= 1"):
            add_speech_tokens(tokenizer, units)
    with pytest.raises(ValueError, match="text_vocab_size=64.0 one or None"):
        add_speech_tokens(tokenizer, 4, text_vocab_size=64.0)
    assert len(tokenizer) == size


def test_model_speech_tensors_are_sized_from_the_tokenizer_and_checked_against_the_config():
    model = tiny_model(PROCESSOR)
    config = model.config
    assert (config.speech_token_start, config.vocab_size) == (
        PROCESSOR.speech_tokens.start,
        PROCESSOR.speech_tokens.stop,
    )
    assert model.model.speech_embed_tokens.weight.shape[0] == len(PROCESSOR.speech_tokens)
    assert model.speech_lm_head.weight.shape[0] == len(PROCESSOR.speech_tokens)
    text_mean = model.model.embed_tokens.weight.mean(0)
    torch.testing.assert_close(model.model.speech_embed_tokens.weight[0], text_mean)
    # a config whose speech block is elsewhere is refused, naming both layouts
    other = DeepTalkConfig(
        vocab_size=TEXT_VOCAB_SIZE + 8 + len(PROCESSOR.speech_tokens), speech_vocab_size=len(PROCESSOR.speech_tokens)
    )
    with pytest.raises(ValueError, match=r"speech_token_start=56"):
        PROCESSOR.check_config(other)
    smaller = DeepTalkConfig(vocab_size=TEXT_VOCAB_SIZE + 10, speech_vocab_size=10)
    with pytest.raises(ValueError, match="speech_vocab_size=10"):
        PROCESSOR.check_config(smaller)


def test_fit_speech_vocab_refuses_a_tokenizer_padded_to_another_text_size():
    tokenizer = tiny_tokenizer()
    block = add_speech_tokens(tokenizer, 4)  # not padded to the model's 48 text rows
    model = tiny_model(PROCESSOR)
    with pytest.raises(ValueError, match=f"text_vocab_size={model.config.speech_token_start}.*reload"):
        fit_speech_vocab(model, block)
    with pytest.raises(ValueError, match="already has a speech block"):  # why the advice names a reloaded tokenizer
        add_speech_tokens(tokenizer, 4, text_vocab_size=model.config.speech_token_start)
    fit_speech_vocab(model, add_speech_tokens(tiny_tokenizer(), 4, text_vocab_size=model.config.speech_token_start))
    assert model.config.speech_token_start == 48 and model.config.speech_vocab_size == 7


@pytest.mark.parametrize("tied", [False, True])
def test_fit_speech_vocab_moves_the_markers_with_the_end_of_the_block(tied):
    """Units keep their rows and the markers (the block's last ids) theirs, growing or shrinking the block."""
    model = tiny_model(tiny_processor(4), tie_word_embeddings=tied)
    with torch.no_grad():
        for table in (model.model.speech_embed_tokens.weight, model.speech_lm_head.weight):
            table.copy_(torch.arange(7.0)[:, None].expand_as(table))  # row i holds i: units 0-3, markers 4-6
    text_mean = [model.model.embed_tokens.weight.mean(0), model.lm_head.weight.mean(0)]
    fit_speech_vocab(model, tiny_processor(8).speech_tokens)
    for table, mean in zip((model.model.speech_embed_tokens.weight, model.speech_lm_head.weight), text_mean):
        assert table[:4, 0].tolist() == [0, 1, 2, 3] and table[8:, 0].tolist() == [4, 5, 6]
        assert torch.equal(table[4:8], mean.expand(4, -1))
    fit_speech_vocab(model, tiny_processor(2).speech_tokens)
    for table in (model.model.speech_embed_tokens.weight, model.speech_lm_head.weight):
        assert table[:, 0].tolist() == [0, 1, 4, 5, 6]
    # Not a speech block (no unit, or not consecutive ids): refused, not taken as one that drops the markers' rows.
    start = model.config.speech_token_start
    for block in (range(start, start + 3), range(start, start + 10, 2), list(range(start, start + 5))):
        with pytest.raises(ValueError, match="is not a speech block"):
            fit_speech_vocab(model, block)
    assert model.config.speech_vocab_size == 5


def test_decode_takes_generates_one_row_batch_and_refuses_more():
    ids = PROCESSOR(text="hello world", speech_units=[3, 4])["input_ids"][0]
    expected = PROCESSOR.decode(ids)
    assert PROCESSOR.decode(torch.tensor([ids])) == PROCESSOR.decode([ids]) == expected
    with pytest.raises(ValueError, match="decode takes one sequence, got 2: use batch_decode"):
        PROCESSOR.decode(torch.tensor([ids, ids]))
    assert PROCESSOR.batch_decode(torch.tensor([ids, ids])) == PROCESSOR.batch_decode([ids, torch.tensor(ids)])
    # A parallel-stream answer `[batch, 1 + S, steps]` (here S = 2) is named, as a tensor or as lists, in either call.
    parallel = torch.tensor([[ids] * 3])
    for answer in (parallel, parallel.tolist(), [parallel[0]]):
        for decode in (PROCESSOR.decode, PROCESSOR.batch_decode):
            with pytest.raises(ValueError, match=r"a parallel-stream answer .* decode_parallel\(answer, config\)"):
                decode(answer)


def test_decode_takes_one_id_as_the_tokenizer_does():
    expected = PROCESSOR.decode([10])
    assert expected.text == PROCESSOR.tokenizer.decode(10)
    for one in (10, torch.tensor(10), np.int64(10)):
        assert PROCESSOR.decode(one) == expected
    assert PROCESSOR.decode(PROCESSOR.speech_token_start + 3).speech_units == [[3]]


def test_decode_refuses_negative_and_non_integer_ids():
    """-100 label padding or a float id is not an id: a clear error, not an OverflowError or a truncated id."""
    with pytest.raises(ValueError, match="id -100 is negative"):
        PROCESSOR.decode([5, -100])
    for ids in (torch.tensor([10.7]), [10.7]):
        with pytest.raises((ValueError, TypeError), match="integer"):
            PROCESSOR.decode(ids)


def test_add_speech_tokens_leaves_the_tokenizer_as_it_was_when_it_refuses():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([SPEECH_MARKERS[1]], special_tokens=True)
    vocabulary = tokenizer.get_vocab()
    with pytest.raises(
        ValueError, match=re.escape(f"already has 1 of the speech block's tokens ({SPEECH_MARKERS[1]})")
    ):
        add_speech_tokens(tokenizer, 4)
    assert tokenizer.get_vocab() == vocabulary


def test_interleave_ids_checks_policy_ratio_and_units():
    text_ids = PROCESSOR.tokenizer("hello world")["input_ids"]
    for arguments, message in [
        (dict(interleave="speech-only"), "interleave='speech-only' is unknown"),
        (dict(ratio=(-1, 2)), "two positive integers"),
        (dict(ratio=(2, 0)), "two positive integers"),
        (dict(units=[NUM_UNITS]), "unit 64 at position 0, out of range"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            PROCESSOR.interleave_ids(text_ids, **({"units": [1, 2]} | arguments))
    # a call's None is the processor's own policy, as in interleave_ids; a ratio that is no pair is named
    expected = PROCESSOR(text="hello world", speech_units=[1, 2])["input_ids"]
    for none in ("interleave", "text_speech_ratio"):
        assert PROCESSOR(text="hello world", speech_units=[1, 2], **{none: None})["input_ids"] == expected
    for call in (
        lambda: PROCESSOR(text="hello world", speech_units=[1, 2], text_speech_ratio=2),
        lambda: DeepTalkProcessor(PROCESSOR.tokenizer, text_speech_ratio=None),
    ):
        with pytest.raises(ValueError, match="must be two positive integers"):
            call()


def test_interleave_ids_takes_tensors_and_arrays_and_refuses_non_text_ids():
    text_ids = PROCESSOR.tokenizer("hello world")["input_ids"]
    expected = PROCESSOR.interleave_ids(text_ids, [1, 2])
    for ids in (torch.tensor(text_ids), np.array(text_ids), tuple(text_ids)):
        laid_out = PROCESSOR.interleave_ids(ids, [1, 2])
        assert laid_out == expected and all(type(token) is int for token in laid_out)
    for bad, message in [
        ([*text_ids, PROCESSOR.speech_token_start], f"text_ids has {PROCESSOR.speech_token_start}, not a text id"),
        ([-1], "text_ids has -1, not a text id"),
        (torch.tensor([1.0]), "1-D integer ids"),
        ([1.0], "must be integer ids"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            PROCESSOR.interleave_ids(bad, [1, 2])
    with pytest.raises(ValueError, match="interleave='' is unknown"):
        PROCESSOR.interleave_ids(text_ids, [1, 2], "")


def test_a_stacked_batch_of_units_is_one_segment_per_text():
    texts = ["hello <|speech|>", "world <|speech|>"]
    expected = PROCESSOR(text=texts, speech_units=[[1, 2], [3, 4]])
    for stacked in (torch.tensor([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]])):
        assert PROCESSOR(text=texts, speech_units=stacked) == expected


def test_truncation_padding_to_a_multiple_is_checked_as_by_the_tokenizer():
    texts = ["hello world what the weather", "the"]
    for padding in (True, "max_length"):
        options = dict(truncation=True, max_length=4, padding=padding, pad_to_multiple_of=3)
        with pytest.raises(ValueError, match=r"truncation length \(4\) is not a multiple of pad_to_multiple_of \(3\)"):
            PROCESSOR.tokenizer(texts, **options)
        with pytest.raises(ValueError, match=r"truncation length \(4\) is not a multiple of pad_to_multiple_of \(3\)"):
            PROCESSOR(text=texts, **options)
        options["max_length"] = 6
        assert PROCESSOR(text=texts, **options)["input_ids"] == PROCESSOR.tokenizer(texts, **options)["input_ids"]
        del options["max_length"]  # truncation to a tokenizer without a length limit: none, as the tokenizer does
        if padding is True:
            assert PROCESSOR(text=texts, **options)["input_ids"] == PROCESSOR.tokenizer(texts, **options)["input_ids"]


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_empty_texts_give_integer_tensors_as_the_tokenizer(return_tensors):
    for texts in ("", ["", ""]):
        out = PROCESSOR(text=texts, return_tensors=return_tensors)
        reference = PROCESSOR.tokenizer(texts if isinstance(texts, list) else [texts], return_tensors=return_tensors)
        for key in ("input_ids", "attention_mask", "modality_ids"):
            assert out[key].shape == reference["input_ids"].shape and out[key].dtype == reference["input_ids"].dtype


def test_max_length_alone_truncates_as_the_tokenizer_does():
    for text, units in [("hello world hello world", None), ("hello world", list(range(6)))]:
        encoded = PROCESSOR(text=text, speech_units=units, max_length=3)["input_ids"][0]
        assert encoded == PROCESSOR(text=text, speech_units=units, max_length=3, truncation=True)["input_ids"][0]
        assert len(encoded) == 3
    assert (
        PROCESSOR(text="hello world hello", max_length=2)["input_ids"][0]
        == PROCESSOR.tokenizer("hello world hello", max_length=2)["input_ids"]
    )


def test_truncation_strategies_are_the_tokenizers():
    """Its strategy names truncate as the tokenizer does; a name it refuses and the pair-only strategy are refused
    (they truncated as `True` does)."""
    text = "hello world hello world"
    for truncation in ("only_first", "longest_first", "do_not_truncate", TruncationStrategy.LONGEST_FIRST):
        expected = PROCESSOR.tokenizer(text, truncation=truncation, max_length=2)["input_ids"]
        assert PROCESSOR(text=text, truncation=truncation, max_length=2)["input_ids"][0] == expected
    for truncation, message in [("longest", "not a valid TruncationStrategy"), ("only_second", "pairs")]:
        with pytest.raises(ValueError, match=message):
            PROCESSOR(text=text, truncation=truncation, max_length=2)


def test_truncating_and_padding_to_the_longest_warns_as_little_as_the_tokenizer():
    """`max_length` truncated the rows: padding them must not warn that it is ignored, which the tokenizer does not."""
    texts = ["hello world how", "the sun"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoded = PROCESSOR(text=texts, padding=True, truncation=True, max_length=2)
    assert encoded["input_ids"] == PROCESSOR.tokenizer(texts, padding=True, truncation=True, max_length=2)["input_ids"]


def test_empty_text_keeps_an_eos_that_is_also_the_bos_at_the_end():
    """A tokenizer whose BOS and EOS are one token, appended after the text: with no text, it is still the EOS."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>"})
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    add_speech_tokens(tokenizer, NUM_UNITS, text_vocab_size=TEXT_VOCAB_SIZE)
    processor = DeepTalkProcessor(tokenizer)
    for text in ("", None, "hello"):
        ids = processor(text=text, speech_units=[1, 2])["input_ids"][0]
        assert ids[-1] == eos and ids.count(eos) == 1, (text, ids)


@pytest.mark.parametrize("template", ["<s> $A </s>", "$A </s>"])
def test_empty_text_keeps_the_added_tokens_at_the_ends_when_the_tokenizer_erases_the_probe(template):
    """With no text, the processor finds where the tokenizer puts its BOS/EOS by encoding "a"; a tokenizer that erases
    "a" leaves it the ids themselves: a leading BOS stays first, the rest stays last."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("a", "")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    assert tokenizer("a", add_special_tokens=False)["input_ids"] == []
    add_speech_tokens(tokenizer, NUM_UNITS, text_vocab_size=TEXT_VOCAB_SIZE)
    processor = DeepTalkProcessor(tokenizer)
    before = [bos] if template.startswith("<s>") else []
    speech = [processor.begin_of_speech_id, processor.speech_token_start + 3, processor.end_of_speech_id]
    for policy in INTERLEAVE_POLICIES:
        ids = processor(text="", speech_units=[3], interleave=policy)["input_ids"][0]
        assert ids == [*before, *speech, eos], (policy, ids)


def test_processor_refuses_tokenizers_without_a_proper_speech_block():
    with pytest.raises(ValueError, match="no speech tokens"):
        DeepTalkProcessor(tiny_tokenizer())
    tokenizer = tiny_tokenizer()
    add_speech_tokens(tokenizer, 4)
    tokenizer.add_tokens(["<|extra|>"], special_tokens=True)
    with pytest.raises(ValueError, match="not at the end of its vocabulary"):
        DeepTalkProcessor(tokenizer)


# ---- round trips -------------------------------------------------------------------------------------------------

texts = st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join)
segments = st.lists(st.integers(0, NUM_UNITS - 1), min_size=1, max_size=90)
ratios = st.tuples(st.integers(1, 6), st.integers(1, 9))


@given(text=texts, units=segments, policy=st.sampled_from(INTERLEAVE_POLICIES), ratio=ratios)
def test_text_and_units_round_trip_for_every_policy(text, units, policy, ratio):
    encoded = PROCESSOR(text=text, speech_units=units, interleave=policy, text_speech_ratio=ratio)
    ids, modality = encoded["input_ids"][0], encoded["modality_ids"][0]
    decoded = PROCESSOR.decode(ids)
    assert decoded.speech_units == [units]
    assert decoded.text == ("" if policy == "speech_only" else text)
    # speech ids are exactly the units and the two markers, all inside the speech block, and marked as speech
    block = PROCESSOR.speech_tokens
    speech_ids = [i for i in ids if i >= block.start]
    assert all(i < block.stop for i in ids)
    assert sorted(speech_ids) == sorted(
        [block.start + u for u in units] + [PROCESSOR.begin_of_speech_id, PROCESSOR.end_of_speech_id]
    )
    assert modality == [int(i in block) for i in ids]


WRAPPING = tiny_processor(NUM_UNITS, wrap=True)


@given(text=texts, units=segments, policy=st.sampled_from(INTERLEAVE_POLICIES), ratio=ratios)
def test_tokens_the_tokenizer_adds_stay_at_the_ends_for_every_policy(text, units, policy, ratio):
    """The policies lay out the text's own ids: a BOS stays first and an EOS last, never inside the speech."""
    options = dict(speech_units=units, interleave=policy, text_speech_ratio=ratio)
    bos, eos = WRAPPING.tokenizer.bos_token_id, WRAPPING.tokenizer.eos_token_id
    bare = WRAPPING(text=text, add_special_tokens=False, **options)["input_ids"][0]
    assert WRAPPING(text=text, **options)["input_ids"][0] == [bos, *bare, eos]


@pytest.mark.parametrize("text", ["<s>", "<s><s>", "</s>"])
@pytest.mark.parametrize("policy", INTERLEAVE_POLICIES)
def test_a_text_made_of_added_tokens_keeps_the_tokenizers_at_the_ends(text, policy):
    """The text's own ids are BOS/EOS tokens too: the tokenizer's own additions are still told apart (the first
    matching place was taken, which put the speech before the real BOS)."""
    bos, eos = WRAPPING.tokenizer.bos_token_id, WRAPPING.tokenizer.eos_token_id
    options = dict(speech_units=[0, 1], interleave=policy)
    bare = WRAPPING(text=text, add_special_tokens=False, **options)["input_ids"][0]
    assert WRAPPING(text=text, **options)["input_ids"][0] == [bos, *bare, eos]


@given(text=texts, units=segments, limit=st.integers(1, 12), left=st.booleans())
def test_truncation_keeps_the_tokens_the_tokenizer_adds_as_the_tokenizer_does(text, units, limit, left):
    """On text the processor truncates exactly as the tokenizer; with speech, the BOS/EOS stay and the body is cut."""
    tokenizer = WRAPPING.tokenizer
    tokenizer.truncation_side = "left" if left else "right"
    try:
        alone = WRAPPING(text=text, truncation=True, max_length=limit)["input_ids"][0]
        assert alone == tokenizer(text, truncation=True, max_length=limit)["input_ids"]
        full = WRAPPING(text=text, speech_units=units)["input_ids"][0]
        cut = WRAPPING(text=text, speech_units=units, truncation=True, max_length=limit)
    finally:
        tokenizer.truncation_side = "right"
    ids = cut["input_ids"][0]
    inner = full[1:-1]
    body = inner[len(inner) - (limit - 2) :] if left else inner[: limit - 2]
    assert ids == (full if len(full) <= limit or limit < 2 else [full[0], *body, full[-1]])
    assert cut["modality_ids"][0] == [int(i >= WRAPPING.speech_token_start) for i in ids]


@given(text=texts, units=segments, ratio=ratios)
def test_interleaved_layout_follows_the_ratio(text, units, ratio):
    """The k-th unit is preceded by exactly min(len(text), n_text * (k // n_speech + 1)) text tokens."""
    n_text, n_speech = ratio
    ids = PROCESSOR(text=text, speech_units=units, interleave="interleaved", text_speech_ratio=ratio)["input_ids"][0]
    num_text = len(PROCESSOR.tokenizer(text)["input_ids"])
    unit_positions = [p for p, i in enumerate(ids) if PROCESSOR.speech_token_start <= i < PROCESSOR.begin_of_speech_id]
    for k, position in enumerate(unit_positions):
        text_before = sum(1 for i in ids[:position] if i < PROCESSOR.speech_token_start)
        assert text_before == min(num_text, n_text * (k // n_speech + 1))
    assert ids.index(PROCESSOR.begin_of_speech_id) == min(num_text, n_text)


@given(text=texts, units=segments, ratio=ratios)
@example(text="hello world how are you today", units=list(range(6)), ratio=(2, 3))  # units fill whole chunks
@example(text="hello world", units=list(range(4)), ratio=(1, 2))
def test_interleaved_layout_is_the_chunk_by_chunk_closed_form(text, units, ratio):
    """GLM-4-Voice's layout: `t[:n] <bos> u[:m] t[n:2n] u[m:2m] ... <eos>` and then the text left over, with a text
    chunk only *between* two speech chunks (never after the last one, also when the units fill whole chunks)."""
    n_text, n_speech = ratio
    own = PROCESSOR.tokenizer(text)["input_ids"]
    speech = [PROCESSOR.speech_token_start + unit for unit in units]
    chunks = math.ceil(len(speech) / n_speech)
    expected = own[:n_text] + [PROCESSOR.begin_of_speech_id]
    for j in range(chunks):
        expected += own[j * n_text : (j + 1) * n_text] if j else []
        expected += speech[j * n_speech : (j + 1) * n_speech]
    expected += [PROCESSOR.end_of_speech_id] + own[chunks * n_text :]
    encoded = PROCESSOR(text=text, speech_units=units, interleave="interleaved", text_speech_ratio=ratio)
    assert encoded["input_ids"][0] == expected
    assert PROCESSOR.interleave_ids(own, units, "interleaved", ratio) == expected


@st.composite
def prompts_with_speech(draw):
    """A prompt with one `<|speech|>` placeholder per segment, between word sequences."""
    units = draw(st.lists(segments, max_size=3))
    pieces = draw(st.lists(texts, min_size=len(units) + 1, max_size=len(units) + 1))
    return pieces[0] + "".join(" <|speech|> " + piece for piece in pieces[1:]), units


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_without_padding_side_follows_the_tokenizers(side):
    """With no `padding_side=`, the ids and `modality_ids` are padded on the tokenizer's side alike."""
    processor = tiny_processor(NUM_UNITS)
    processor.tokenizer.padding_side = side
    prompts, units = ["hello <|speech|>", "hello world how are you <|speech|> today"], [[1, 2], [3]]
    encoded = processor(text=prompts, speech_units=units, padding=True)
    assert encoded == processor(text=prompts, speech_units=units, padding=True, padding_side=side)
    short_mask = encoded["attention_mask"][0]
    assert short_mask[0 if side == "left" else -1] == 0
    for ids, mask, modality in zip(
        encoded["input_ids"], encoded["attention_mask"], encoded["modality_ids"], strict=True
    ):
        assert modality == [int(on and i in processor.speech_tokens) for i, on in zip(ids, mask, strict=True)]


@given(batch=st.lists(prompts_with_speech(), min_size=1, max_size=4), side=st.sampled_from(["left", "right"]))
def test_batches_with_placeholders_pad_and_round_trip(batch, side):
    prompts, speech = [prompt for prompt, _ in batch], [units for _, units in batch]
    encoded = PROCESSOR(text=prompts, speech_units=speech, padding=True, padding_side=side, return_tensors="pt")
    ids, mask, modality = encoded["input_ids"], encoded["attention_mask"], encoded["modality_ids"]
    assert ids.shape == mask.shape == modality.shape
    width = ids.shape[1]
    for row, row_mask, prompt, units in zip(ids, mask, prompts, speech, strict=True):
        pads = (row_mask == 0).nonzero().flatten().tolist()
        assert pads == (list(range(len(pads))) if side == "left" else list(range(width - len(pads), width)))
        decoded = PROCESSOR.decode(row[row_mask.bool()])
        assert decoded.speech_units == units
        assert decoded.text == " ".join(prompt.replace("<|speech|>", " ").split())
    assert modality.tolist() == (ids >= PROCESSOR.speech_token_start).long().tolist()


@given(
    batch=st.lists(st.tuples(texts, st.one_of(st.none(), segments)), min_size=1, max_size=4),
    policy=st.sampled_from(INTERLEAVE_POLICIES),
    limit=st.integers(2, 14),
    side=st.sampled_from(["left", "right"]),
    cut_left=st.booleans(),
)
def test_truncated_padded_batches_keep_bos_and_eos_and_mask_padding(batch, policy, limit, side, cut_left):
    """Each row is `<s> body </s>`, its body cut to `limit` on the truncation side, then padded on the padding side
    with mask 0 and modality 0: the same rows as each sample alone, whatever the other rows' lengths."""
    tokenizer = WRAPPING.tokenizer
    options = dict(interleave=policy, truncation=True, max_length=limit)
    tokenizer.truncation_side = "left" if cut_left else "right"
    try:
        rows = [WRAPPING(text=text, speech_units=units, **options)["input_ids"][0] for text, units in batch]
        encoded = WRAPPING(
            text=[text for text, _ in batch],
            speech_units=[units for _, units in batch],
            padding=True,
            padding_side=side,
            **options,
        )
    finally:
        tokenizer.truncation_side = "right"
    width = max(map(len, rows))
    for row, ids, mask, modality in zip(rows, *(encoded[k] for k in ("input_ids", "attention_mask", "modality_ids"))):
        assert len(row) <= limit and (row[0], row[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        pad = width - len(row)
        filler = [tokenizer.pad_token_id] * pad
        assert ids == (filler + row if side == "left" else row + filler)
        kept = [1] * len(row)
        assert mask == ([0] * pad + kept if side == "left" else kept + [0] * pad)
        assert modality == [int(i >= WRAPPING.speech_token_start) * m for i, m in zip(ids, mask, strict=True)]


def test_a_batch_of_texts_needs_no_speech():
    encoded = PROCESSOR(text=["hello world", "how are you today"], padding=True)
    assert [PROCESSOR.decode(row, skip_special_tokens=True).text for row in encoded["input_ids"]] == [
        "hello world",
        "how are you today",
    ]


def test_truncation_keeps_the_configured_side():
    units = list(range(10))
    full = PROCESSOR(text="hello world", speech_units=units)["input_ids"][0]
    right = PROCESSOR(text="hello world", speech_units=units, truncation=True, max_length=5)["input_ids"][0]
    assert right == full[:5]
    PROCESSOR.tokenizer.truncation_side = "left"
    try:
        left = PROCESSOR(text="hello world", speech_units=units, truncation=True, max_length=5)["input_ids"][0]
    finally:
        PROCESSOR.tokenizer.truncation_side = "right"
    assert left == full[-5:]


def test_speech_only_call_and_tensor_units():
    encoded = PROCESSOR(speech_units=torch.tensor([3, 4, 5]), interleave="speech_only", return_tensors="pt")
    start = PROCESSOR.speech_token_start
    expected = [PROCESSOR.begin_of_speech_id, start + 3, start + 4, start + 5, PROCESSOR.end_of_speech_id]
    assert encoded["input_ids"].tolist() == [expected]
    assert encoded["modality_ids"].tolist() == [[1] * 5]


def test_decode_handles_generated_streams():
    """Units without a begin marker open a segment; pads are dropped; each begin marker starts a new segment."""
    s, b, e, p = (
        PROCESSOR.speech_token_start,
        PROCESSOR.begin_of_speech_id,
        PROCESSOR.end_of_speech_id,
        PROCESSOR.speech_pad_id,
    )
    hello, world = PROCESSOR.tokenizer.convert_tokens_to_ids(["hello", "world"])
    decoded = PROCESSOR.decode(torch.tensor([s + 1, s + 2, e, hello, b, s + 3, p, world, s + 4, b, s + 5]))
    assert decoded.text == "hello world"
    assert decoded.speech_units == [[1, 2], [3, 4], [5]]
    assert [d.speech_units for d in PROCESSOR.batch_decode([[b, e], [hello]])] == [[[]], []]
    block = PROCESSOR.speech_tokens
    with pytest.raises(ValueError, match=f"id {block.stop} is beyond the vocabulary .*last id is {block.stop - 1}"):
        PROCESSOR.decode([hello, block.stop])


# ---- chat template, saving ---------------------------------------------------------------------------------------


def test_continuing_a_final_message_that_ends_in_speech_leaves_its_segment_open():
    """`continue_final_message=True` on a final message ending in speech continues inside that segment: the prompt is
    the whole conversation's ids up to that segment's `<|end_of_speech|>` (transformers alone continues the last text
    block, which dropped the trailing speech, and refuses a message without text)."""
    question = {"role": "user", "content": [{"type": "speech", "units": [1]}, {"type": "text", "text": "how are you"}]}
    options = dict(tokenize=True, return_dict=True)
    for answer in (
        [{"type": "text", "text": "hello"}, {"type": "speech", "units": [3, 4]}],
        [{"type": "speech", "units": [3, 4]}],
    ):
        conversation = [question, {"role": "assistant", "content": answer}]
        opened = PROCESSOR.apply_chat_template(conversation, continue_final_message=True, **options)["input_ids"][0]
        whole = PROCESSOR.apply_chat_template(conversation, **options)["input_ids"][0]
        assert whole[: len(opened)] == opened and whole[len(opened)] == PROCESSOR.end_of_speech_id
        assert opened[-3:] == [
            PROCESSOR.begin_of_speech_id,
            PROCESSOR.speech_token_start + 3,
            PROCESSOR.speech_token_start + 4,
        ]
        assert PROCESSOR.decode(opened).speech_units == [[1], [3, 4]]
    batch = PROCESSOR.apply_chat_template(
        [conversation, [question, {"role": "assistant", "content": "hello"}]],
        continue_final_message=True,
        processor_kwargs={"padding": True},
        **options,
    )
    assert [PROCESSOR.decode(ids).speech_units for ids in batch["input_ids"]] == [[[1], [3, 4]], [[1]]]
    conversation[-1]["content"] = [{"type": "speech", "units": [NUM_UNITS]}]
    with pytest.raises(ValueError, match=f"final speech block has unit {NUM_UNITS}"):
        PROCESSOR.apply_chat_template(conversation, continue_final_message=True)
    conversation[-1]["content"] = None  # only a turn that calls tools goes without content (else an empty turn)
    with pytest.raises(ValueError, match="message 1: content must be a string or a list of content blocks"):
        PROCESSOR.apply_chat_template(conversation, tokenize=True)
    conversation[-1]["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": {}}}]
    with pytest.raises(TemplateError, match="renders no tool calls"):  # the default template's refusal, not ours
        PROCESSOR.apply_chat_template(conversation, tokenize=True)
    del conversation[-1]["tool_calls"]
    conversation[-1]["content"] = [{"type": "speech", "text": "hi"}]
    with pytest.raises(ValueError, match=r'block needs its "units" \(got the keys \['):
        PROCESSOR.apply_chat_template(conversation, tokenize=True)


def answer_positions(ids: list[int], attention: list[int]) -> list[int]:
    """1 on each assistant turn from the token after its role through its `<|im_end|>`, read from the ids alone."""
    start, end = PROCESSOR.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assistant = PROCESSOR.tokenizer.convert_tokens_to_ids("assistant")
    expected, inside = [], False
    for position, token in enumerate(ids):
        expected.append(int(inside and bool(attention[position])))
        if position and ids[position - 1] == start and token == assistant:
            inside = True
        elif token == end:
            inside = False
    return expected


TURN = st.tuples(
    st.lists(st.sampled_from(WORDS), max_size=3),
    st.lists(st.lists(st.integers(0, NUM_UNITS - 1), min_size=1, max_size=4), max_size=2),
)


@given(
    conversations=st.lists(st.lists(TURN, min_size=1, max_size=4), min_size=1, max_size=3),
    padding_side=st.sampled_from(["left", "right"]),
)
@example(  # a left-padded batch of unequal lengths: the shorter row's mask moves with its padding
    conversations=[
        [(["hello"], []), (["hello", "world"], [])],
        [(["hello", "world", "hello", "world"], []), (["hello"], [[1, 2, 3]])],
    ],
    padding_side="left",
)
def test_assistant_tokens_mask_is_exactly_the_answers(conversations, padding_side):
    """`return_assistant_tokens_mask=True` (TRL's assistant-only loss) marks each assistant turn's content, its
    spliced speech units and markers included, and its `<|im_end|>`; the user's turns, speech included, and padding
    stay out, whatever the placeholders before them shift."""
    batch = []
    for turns in conversations:
        messages = []
        for number, (words, segments) in enumerate(turns):
            content = [{"type": "text", "text": " ".join(words)}] if words else []
            content += [{"type": "speech", "units": units} for units in segments]
            messages.append({"role": ("user", "assistant")[number % 2], "content": content or "hello"})
        batch.append(messages)
    out = PROCESSOR.apply_chat_template(
        batch,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": padding_side},
    )
    for ids, mask, attention in zip(out["input_ids"], out["assistant_masks"], out["attention_mask"], strict=True):
        assert mask == answer_positions(ids, attention)


@pytest.mark.parametrize("side", ["left", "right"])
def test_assistant_tokens_mask_follows_truncation(side):
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "hello world"}, {"type": "speech", "units": [1, 2]}]},
        {"role": "assistant", "content": [{"type": "speech", "units": [3, 4, 5]}, {"type": "text", "text": "ok"}]},
    ]
    options = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    full = PROCESSOR.apply_chat_template(conversation, **options)
    limit = len(full["input_ids"][0]) - 4
    tokenizer = PROCESSOR.tokenizer
    previous, tokenizer.truncation_side = tokenizer.truncation_side, side
    try:
        cut = PROCESSOR.apply_chat_template(
            conversation, **options, processor_kwargs={"truncation": True, "max_length": limit}
        )
    finally:
        tokenizer.truncation_side = previous
    kept = slice(-limit, None) if side == "left" else slice(0, limit)
    assert cut["input_ids"][0] == full["input_ids"][0][kept]
    assert cut["assistant_masks"][0] == full["assistant_masks"][0][kept]
    assert sum(full["assistant_masks"][0]) == 3 + 2 + 1 + 1  # units, markers, "ok", <|im_end|>


def test_chat_template_refuses_what_it_would_drop_or_ignore():
    """A text block without its "text" (e.g. "content" for "text") rendered as nothing: the user's words were gone
    without a word; `speech_answer=True` without a generation prompt gave a text prompt."""
    for block in ({"type": "text", "content": "hello"}, {"type": "text", "text": None}):
        with pytest.raises(TemplateError, match=r'a text block needs its "text" string \(got the keys type, '):
            PROCESSOR.apply_chat_template([{"role": "user", "content": [block]}])
    with pytest.raises(ValueError, match="conversation 0 has no messages"):  # an IndexError in transformers
        PROCESSOR.apply_chat_template([])
    with pytest.raises(
        ValueError, match="message 0: content must be a string or a list of content blocks, got an int"
    ):
        PROCESSOR.apply_chat_template([{"role": "user", "content": 5}])
    with pytest.raises(ValueError, match="content must be a string or a list of content blocks, got no content"):
        PROCESSOR.apply_chat_template([{"role": "user", "text": "hello"}])  # an empty turn, silently
    # Another template renders what it renders (a tool result's dict as JSON, a reasoning_content), as transformers does.
    own = "{% for m in messages %}{{ m['content'] | tojson if m['content'] is defined else m['reasoning_content'] }}{% endfor %}"
    other = [{"role": "tool", "content": {"temperature": 22}}, {"role": "assistant", "reasoning_content": "four"}]
    assert PROCESSOR.apply_chat_template(other, chat_template=own) == '{"temperature": 22}four'
    conversation = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(ValueError, match="pass add_generation_prompt=True"):
        PROCESSOR.apply_chat_template(conversation, speech_answer=True)
    # A continued final message is open already: speech_answer changes nothing there, as before.
    answer = [*conversation, {"role": "assistant", "content": [{"type": "speech", "units": [3]}]}]
    continued = PROCESSOR.apply_chat_template(answer, continue_final_message=True, tokenize=True)
    assert (
        PROCESSOR.apply_chat_template(answer, continue_final_message=True, speech_answer=True, tokenize=True)
        == continued
    )
    text_answer = [*conversation, {"role": "assistant", "content": "Sure,"}]  # continued as text: no speech opens
    with pytest.raises(ValueError, match="continues a final speech block, and conversation 0 ends in text"):
        PROCESSOR.apply_chat_template(text_answer, continue_final_message=True, speech_answer=True)
    assert PROCESSOR.apply_chat_template(conversation) == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_renders_speech_turns_and_a_speech_answer_prompt():
    conversation = [
        {"role": "user", "content": [{"type": "speech", "units": [7, 8, 9]}, {"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "world"}, {"type": "speech", "units": [1]}]},
    ]
    prompt = PROCESSOR.apply_chat_template(conversation, add_generation_prompt=True, speech_answer=True)
    assert prompt.count("<|speech|>") == 2 and prompt.endswith("<|im_start|>assistant\n<|begin_of_speech|>")
    encoded = PROCESSOR.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        speech_answer=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert encoded["input_ids"].tolist() == PROCESSOR(text=prompt, speech_units=[[7, 8, 9], [1]])["input_ids"]
    assert encoded["input_ids"][0, -1] == PROCESSOR.begin_of_speech_id
    assert PROCESSOR.decode(encoded["input_ids"][0]).speech_units == [[7, 8, 9], [1], []]
    # a batch of conversations, each with its own speech blocks
    batch = PROCESSOR.apply_chat_template(
        [conversation[:1], [{"role": "user", "content": [{"type": "speech", "units": [4]}]}]],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    assert [d.speech_units for d in PROCESSOR.batch_decode(batch["input_ids"])] == [[[7, 8, 9]], [[4]]]
    # a text-only conversation (transformers passes the one-sample batch `speech_units=[[]]`)
    for content in ("hello", [{"type": "text", "text": "hello"}]):
        text_only = [{"role": "user", "content": content}]
        encoded = PROCESSOR.apply_chat_template(text_only, add_generation_prompt=True, tokenize=True, return_dict=True)
        rendered = PROCESSOR.apply_chat_template(text_only, add_generation_prompt=True)
        assert encoded["input_ids"] == PROCESSOR(text=rendered)["input_ids"]


def test_a_prompt_for_generation_ends_where_the_template_leaves_it():
    """A tokenizer that appends an end token must not close a prompt the model continues: it keeps its BOS and ends
    at `<|begin_of_speech|>` or the continued units; a whole chat keeps the end token (transformers' processors add
    the tokenizer's special tokens to a rendered chat)."""
    bos, eos, start = WRAPPING.tokenizer.bos_token_id, WRAPPING.tokenizer.eos_token_id, WRAPPING.speech_token_start
    options = dict(tokenize=True, return_dict=True)
    chat = [{"role": "user", "content": "hello"}]
    for speech_answer in (False, True):
        ids = WRAPPING.apply_chat_template(chat, add_generation_prompt=True, speech_answer=speech_answer, **options)
        rendered = WRAPPING.apply_chat_template(chat, add_generation_prompt=True, speech_answer=speech_answer)
        assert ids["input_ids"][0] == WRAPPING(text=rendered)["input_ids"][0][:-1]
        assert ids["input_ids"][0][0] == bos and eos not in ids["input_ids"][0]
        assert ids["modality_ids"][0] == [int(i >= start) for i in ids["input_ids"][0]]
    assert ids["input_ids"][0][-1] == WRAPPING.begin_of_speech_id
    chat.append({"role": "assistant", "content": [{"type": "speech", "units": [1, 2, 3]}]})
    ids = WRAPPING.apply_chat_template(chat, continue_final_message=True, **options)["input_ids"][0]
    assert ids[0] == bos and ids[-4:] == [WRAPPING.begin_of_speech_id, start + 1, start + 2, start + 3]
    assert WRAPPING.apply_chat_template(chat, **options)["input_ids"][0][-1] == eos


def test_a_tokenizer_that_splits_the_speech_markers_is_refused():
    """`split_special_tokens=True` breaks `<|begin_of_speech|>` into pieces: an opened answer or a continued segment
    would silently be text."""
    processor = tiny_processor(NUM_UNITS)
    processor.tokenizer.split_special_tokens = True
    chat = [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="did not keep <\\|begin_of_speech\\|> as one token in text\\[0\\]"):
        processor.apply_chat_template(chat, add_generation_prompt=True, speech_answer=True, tokenize=True)
    chat.append({"role": "assistant", "content": [{"type": "speech", "units": [1, 2]}]})
    with pytest.raises(ValueError, match="split_special_tokens=True"):
        processor.apply_chat_template(chat, continue_final_message=True, tokenize=True)
    with pytest.raises(ValueError, match="split_special_tokens=True"):
        processor(text="hello <|speech|>", speech_units=[1, 2])


@dataclass
class Message:  # transformers 5 takes message objects (dataclasses, pydantic models) beside dicts
    role: str
    content: list


@pytest.mark.parametrize("kind", ["image", "video"])
def test_image_and_video_blocks_are_refused_not_dropped(kind):
    """Checked as transformers reads the conversation: OpenAI `image_url` blocks and message objects too."""
    blocks = [{"type": "text", "text": "hello"}, {"type": kind, "url": "x"}]
    openai_image = [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}}]
    conversations = [[{"role": "user", "content": blocks}], [Message("user", blocks)]]
    conversations += [[{"role": "user", "content": openai_image}]] if kind == "image" else []
    for conversation in conversations:
        for tokenize in (False, True):
            with pytest.raises(ValueError, match=f"conversation 0 has an {kind} block"):
                PROCESSOR.apply_chat_template(conversation, tokenize=tokenize)


def test_malformed_messages_and_blocks_are_refused_naming_them():
    """Not a template's `UndefinedError`, nor a `KeyError` from the speech-block scan when tokenizing."""
    cases = [
        ([{"role": "user", "content": [{"text": "hi"}]}], "content block 0 is not a dict with a 'type'"),
        ([{"role": "user", "content": ["hi"]}], "content block 0 is not a dict with a 'type'"),
        (
            [{"role": "user", "content": "a"}, {"content": "hi"}],
            "conversation 0, message 1 is not a dict with a 'role'",
        ),
    ]
    for conversation, message in cases:
        for tokenize in (False, True):
            with pytest.raises(ValueError, match=message):
                PROCESSOR.apply_chat_template(conversation, tokenize=tokenize)


@pytest.mark.parametrize("prompt", [False, True])
def test_sanitized_control_tokens_of_user_text_are_text_and_speech_blocks_stay_speech(prompt):
    """`sanitize_control_tokens=True`: the speech tokens a user's text spells are encoded as text (the tokenizer's
    sanitized encoding of that text), the speech blocks' units are speech as without the text."""
    typed = "say <|begin_of_speech|><|speech_3|><|end_of_speech|> hello"
    speech = {"type": "speech", "units": [1, 2]}
    options = dict(tokenize=True, return_dict=True, add_generation_prompt=prompt)

    def chat(text):
        conversation = [{"role": "user", "content": [{"type": "text", "text": text}, speech]}]
        return PROCESSOR.apply_chat_template(conversation, sanitize_control_tokens=True, **options)

    out, plain = chat(typed), chat("hello")
    start = PROCESSOR.speech_token_start
    speech_ids = [i for i in out["input_ids"][0] if i >= start]
    assert speech_ids == [i for i in plain["input_ids"][0] if i >= start]
    assert speech_ids == [PROCESSOR.begin_of_speech_id, start + 1, start + 2, PROCESSOR.end_of_speech_id]
    assert out["modality_ids"][0] == [int(i >= start) for i in out["input_ids"][0]]
    text_only = [{"role": "user", "content": typed}]
    expected = PROCESSOR.tokenizer.apply_chat_template(
        text_only, chat_template=PROCESSOR.chat_template, sanitize_control_tokens=True, **options
    )
    reference = PROCESSOR.apply_chat_template(text_only, sanitize_control_tokens=True, **options)
    assert reference["input_ids"][0] == expected["input_ids"] and not any(reference["modality_ids"][0])
    unsanitized = PROCESSOR.apply_chat_template(text_only, **options)["input_ids"][0]
    assert start + 3 in unsanitized and start + 3 not in reference["input_ids"][0]  # what sanitizing changed
    with pytest.raises(ValueError, match="2 <\\|speech\\|> placeholders but 1 speech segments"):
        chat("<|speech|>")  # the placeholder is no token to mark: refused, not filled with the block's units
    for wanted in ("return_offsets_mapping", "return_text_replacement_offsets"):
        with pytest.raises(ValueError, match="gives no character offsets"):
            PROCESSOR(text="hello", sanitize_control_tokens=True, **{wanted: True})


def test_what_the_default_template_cannot_render_is_refused_not_dropped():
    hello = {"type": "text", "text": "hello"}
    for block in (
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        {"type": "speach", "units": [1]},
    ):
        with pytest.raises(TemplateError, match=f"renders text, speech and audio blocks, not {block['type']} blocks"):
            PROCESSOR.apply_chat_template([{"role": "user", "content": [hello, block]}])
    user = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    for extra in ({"tools": [tool]}, {"documents": [{"title": "a", "text": "b"}]}):
        with pytest.raises(TemplateError, match="renders no tools or documents"):
            PROCESSOR.apply_chat_template(user, **extra)
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    with pytest.raises(TemplateError, match="renders no tool calls"):
        PROCESSOR.apply_chat_template([*user, call])


def test_named_templates_and_message_objects_render_speech_turns():
    """A template chosen by name is the processor's own (the flag that lets it render speech is read from it), and a
    final speech block of a message object is continued as a dict's is."""
    processor = copy.copy(PROCESSOR)
    processor.chat_template = {"default": PROCESSOR.chat_template, "other": PROCESSOR.chat_template}
    speech = [{"type": "text", "text": "hello"}, {"type": "speech", "units": [1, 2]}]
    expected = PROCESSOR.apply_chat_template([{"role": "user", "content": speech}], tokenize=True)
    for name in ("default", "other"):
        assert processor.apply_chat_template([Message("user", speech)], chat_template=name, tokenize=True) == expected
    opened = PROCESSOR.apply_chat_template([{"role": "assistant", "content": speech}], continue_final_message=True)
    assert PROCESSOR.apply_chat_template([Message("assistant", speech)], continue_final_message=True) == opened
    assert opened.endswith("<|begin_of_speech|><|speech_1|><|speech_2|>")


def test_a_chat_template_without_speech_placeholders_is_refused():
    """A text model's own template (copied with its tokenizer) renders no `<|speech|>`: the units must not silently
    become a transcript appended after the prompt."""
    text_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    conversation = [{"role": "user", "content": [{"type": "speech", "units": [7, 8, 9]}]}]
    with pytest.raises(ValueError, match="the chat template does not render speech blocks"):
        PROCESSOR.apply_chat_template(conversation, chat_template=text_template, tokenize=True)


def test_save_and_load_round_trip(tmp_path):
    processor = tiny_processor(NUM_UNITS, interleave="interleaved", text_speech_ratio=(2, 3))
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "chat_template.jinja").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, DeepTalkProcessor)
    assert (loaded.interleave, loaded.text_speech_ratio, loaded.speech_tokens) == (
        "interleaved",
        (2, 3),
        processor.speech_tokens,
    )
    assert loaded.chat_template == processor.chat_template
    sample = {"text": ["hello world how are you", "the sun"], "speech_units": [[1, 2, 3, 4, 5], [6]]}
    assert loaded(**sample)["input_ids"] == processor(**sample)["input_ids"]


def test_the_saved_template_refuses_speech_through_the_tokenizer_alone(tmp_path):
    """The tokenizer loads the saved template too (transformers' text-generation pipeline renders chats with it), but
    only the processor puts units behind `<|speech|>`: through the tokenizer a speech block raises (its units were
    lost, the placeholder's text tokenized, and generation went on); text chats render as through the processor."""
    from transformers import AutoTokenizer

    tiny_processor(NUM_UNITS).save_pretrained(tmp_path)
    tokenizer, processor = AutoTokenizer.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    speech = [{"role": "user", "content": [{"type": "speech", "units": [1, 2, 3]}]}]
    with pytest.raises(TemplateError, match="a speech block needs DeepTalkProcessor.apply_chat_template"):
        tokenizer.apply_chat_template(speech, add_generation_prompt=True)
    ids = processor.apply_chat_template(speech, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ][0]
    assert processor.decode(ids).speech_units == [[1, 2, 3]]
    text = [{"role": "user", "content": "hello world"}]
    rendered = processor.apply_chat_template(text, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(text, add_generation_prompt=True, tokenize=False) == rendered


def test_a_custom_template_gets_no_flag_it_does_not_read(caplog):
    """The processor's flag goes only to templates that read it: transformers hands any other keyword to `__call__`
    and warns (on every call with a custom or previously saved template)."""
    template = (
        "{% for m in messages %}[{{ m['role'] }}]{% for b in m['content'] %}{% if b['type'] == 'text' %}{{ b['text'] }}"
        "{% else %}<|speech|>{% endif %}{% endfor %}\n{% endfor %}"
    )
    conversation = [{"role": "user", "content": [{"type": "speech", "units": [7, 8]}, {"type": "text", "text": "hi"}]}]
    with caplog.at_level("WARNING"):
        assert PROCESSOR.apply_chat_template(conversation, chat_template=template).strip() == "[user]<|speech|>hi"
        ids = PROCESSOR.apply_chat_template(conversation, chat_template=template, tokenize=True, return_dict=True)
    assert PROCESSOR.decode(ids["input_ids"][0]).speech_units == [[7, 8]]
    assert not caplog.records, [record.getMessage() for record in caplog.records]


def test_numpy_integer_ratio_saves_and_loads(tmp_path):
    """The ratio accepts numpy integers (a config read with numpy): it is kept as ints, so it can be written as JSON."""
    processor = tiny_processor(NUM_UNITS, interleave="interleaved", text_speech_ratio=np.array([2, 3]))
    processor.save_pretrained(tmp_path)
    assert AutoProcessor.from_pretrained(tmp_path).text_speech_ratio == (2, 3)


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": "hello", "speech_units": [1, -2]}, "unit -2 at position 1, out of range [0, 64)"),
        ({"text": "hello", "speech_units": [NUM_UNITS]}, "unit 64 at position 0"),
        ({"text": "hello <|speech|> <|speech|>", "speech_units": [[5], []]}, "speech_units[0][1] is empty"),
        ({"text": "hello <|speech|>", "speech_units": [[]]}, "1 <|speech|> placeholders but 0 speech segments"),
        ({"text": []}, "text= is an empty batch"),
        ({"text": 5}, "text= must be a string or a list of strings, got an int"),
        ({"text": ["hello", None]}, "text= must be a string or a list of strings, got a list of 2 entries"),
        ({"text": [["hello", "world"]]}, "text= must be a string or a list of strings"),
        ({"text": ["a", "b"], "speech_units": torch.tensor([[1, 2]])}, "got a Tensor of shape (1, 2)"),
        (
            {"text": "hello <|speech|> <|speech|>", "speech_units": [1]},
            "2 <|speech|> placeholders but 1 speech segments",
        ),
        ({"text": "hello", "speech_units": [[1], [2]]}, "no <|speech|> placeholder for its 2 speech segments"),
        ({"speech_units": [[1], [2]]}, "(or text=None) takes one segment; mark where each goes with <|speech|>"),
        ({"text": ["a", "b"], "speech_units": [[1]]}, "one entry per text"),
        ({"text": "hello", "speech_units": [1.5]}, "must be a segment (a non-empty 1-D sequence of integer ids)"),
        ({"text": "hello", "speech_units": [1.0, 2.0]}, "got a list of 2 entries (['float'])"),
        ({"text": "hello <|speech|>", "speech_units": torch.tensor([[1, 2]])}, "got a Tensor of shape (1, 2)"),
        ({"text": ["a", "b"], "speech_units": [1, 2]}, "speech_units[0] must be a segment"),
        ({"text": ["a", "b"], "speech_units": [1, 2]}, "got an int (a batch of texts takes one such entry per text)"),
        (
            {"text": "a <|speech|> <|speech|>", "speech_units": [[1], [1.5]]},
            "speech_units[0][1] must hold integer unit ids",
        ),
        ({"text": "hello", "speech_units": torch.tensor([1.0, 2.0])}, "got a Tensor of shape (2,)"),
        ({"text": "hello", "speech_units": torch.tensor([True, False])}, "must be a segment"),
        ({"text": "hello", "speech_units": [1], "interleave": "zigzag"}, "interleave='zigzag' is unknown"),
        ({"text": "hello", "speech_units": [1], "text_speech_ratio": (0, 2)}, "two positive integers"),
        ({"text": "hello", "speech_units": [1], "text_speech_ratio": (1.5, 2)}, "two positive integers"),
        ({"text": "hello", "speech_units": [1], "audio": torch.zeros(10)}, "not both"),
        ({"text": "hello <|speech|>", "audio": torch.zeros(10), "sampling_rate": 16000}, "needs an audio codec"),
        ({"text": "hello", "return_overflowing_tokens": True}, "does not support"),
        ({"text": "hello", "speech_units": [1], "return_offsets_mapping": True}, "needs the speech in <|speech|>"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PROCESSOR(**kwargs)


def test_chat_template_renders_chatml_with_a_newline_after_each_turn():
    """The default template is ChatML as the Qwen models were trained on it: each turn ends `<|im_end|>\\n`. The
    word-level test tokenizer drops whitespace, so the rendered text (what a real BPE tokenizer sees) is checked."""
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    rendered = PROCESSOR.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_default_template_refuses_an_audio_block_through_the_tokenizer_alone():
    """With the codec path's template an audio block becomes `<|speech|>`, which only the processor fills with the
    codec's units: rendered by the tokenizer alone (e.g. a text-generation pipeline) it raises, as a speech block does,
    instead of leaving the placeholder's text in the prompt without the audio."""
    chat = [{"role": "user", "content": [{"type": "audio", "path": "question.wav"}]}]
    with pytest.raises(TemplateError, match="a audio block needs DeepTalkProcessor.apply_chat_template"):
        PROCESSOR.tokenizer.apply_chat_template(chat, chat_template=PROCESSOR.chat_template, tokenize=False)


def test_a_unit_after_a_closed_segment_opens_a_new_segment():
    """`<|end_of_speech|>` closes a segment: a unit after it (no begin marker) starts the next segment rather than
    being appended to the closed one, in `decode` as in the streamer."""
    p = PROCESSOR
    unit = lambda u: p.speech_token_start + u  # noqa: E731
    ids = [p.begin_of_speech_id, unit(1), unit(2), p.end_of_speech_id, unit(3), unit(4)]
    assert p.decode(ids).speech_units == [[1, 2], [3, 4]]
    ids = [p.begin_of_speech_id, unit(1), p.end_of_speech_id, unit(5), p.end_of_speech_id, unit(6)]
    assert p.decode(ids).speech_units == [[1], [5], [6]]


def bos_only_processor(**kwargs) -> DeepTalkProcessor:
    """A Llama-style tokenizer that adds a BOS only (no EOS)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    add_speech_tokens(tokenizer, 64, text_vocab_size=TEXT_VOCAB_SIZE)
    return DeepTalkProcessor(tokenizer, **kwargs)


@pytest.mark.parametrize("interleave", ["speech_only", "interleaved"])
def test_a_bos_only_tokenizer_keeps_its_bos_first_under_every_layout(interleave):
    """A tokenizer that adds only a BOS (Llama's default): the BOS stays the sequence's first id and is not laid out
    as a transcript token (speech_only would drop it, interleaved would count it in the first text chunk)."""
    processor = bos_only_processor(interleave=interleave, text_speech_ratio=(1, 2))
    bos = processor.tokenizer.bos_token_id
    text_ids = processor.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    ids = processor(text="hello world", speech_units=[1, 2, 3])["input_ids"][0]
    assert ids == [bos] + processor.interleave_ids(text_ids, [1, 2, 3])


def test_the_default_layout_is_text_then_speech_and_interleaving_is_glm4_voices_13_to_26():
    """The documented defaults: a transcript goes `text <bos> units <eos>`, and `"interleaved"` takes 13 text tokens
    per 26 units (GLM-4-Voice), which trained checkpoints depend on."""
    p = PROCESSOR
    assert (p.interleave, p.text_speech_ratio) == ("text_then_speech", (13, 26))
    text = " ".join(["hello", "world"] * 10)  # 20 text tokens
    units = list(range(30))
    text_ids = p.tokenizer(text, add_special_tokens=False)["input_ids"]
    speech = [p.speech_token_start + u for u in units]
    begin, end = p.begin_of_speech_id, p.end_of_speech_id
    assert p(text=text, speech_units=units)["input_ids"][0] == text_ids + [begin, *speech, end]
    interleaved = p(text=text, speech_units=units, interleave="interleaved")["input_ids"][0]
    assert interleaved == text_ids[:13] + [begin] + speech[:26] + text_ids[13:] + speech[26:] + [end]


@pytest.mark.parametrize("template", ["<s> $A", "$A </s>", "<s> $A </s>"])
def test_a_prompt_for_generation_loses_only_the_end_token_the_tokenizer_appends(template):
    """A generation prompt is the rendered chat's own ids after any BOS: a token the tokenizer appends (an EOS) is
    dropped, and with a BOS-only tokenizer (Llama's default) nothing is cut from the end (the last token would be
    `<|begin_of_speech|>` or the assistant header's)."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    add_speech_tokens(tokenizer, NUM_UNITS, text_vocab_size=TEXT_VOCAB_SIZE)
    processor = DeepTalkProcessor(tokenizer)
    chat = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "speech", "units": [1, 2]}]}]
    for speech_answer in (False, True):
        options = dict(add_generation_prompt=True, speech_answer=speech_answer)
        ids = processor.apply_chat_template(chat, tokenize=True, return_dict=True, **options)["input_ids"][0]
        rendered = processor.apply_chat_template(chat, **options)
        body = processor(text=rendered, speech_units=[1, 2], add_special_tokens=False)["input_ids"][0]
        assert ids == [bos] * template.startswith("<s>") + body
        assert body[-1] == (
            processor.begin_of_speech_id if speech_answer else tokenizer.convert_tokens_to_ids("assistant")
        )


def test_a_custom_chat_template_is_rendered_and_kept_through_save_and_load(tmp_path):
    """`chat_template=` given at construction is the processor's template, and the saved one comes back at load (the
    default template must not replace it)."""
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    processor = tiny_processor(NUM_UNITS, chat_template=template)
    chat = [{"role": "user", "content": "hello"}]
    assert processor.chat_template == template and processor.apply_chat_template(chat) == "[user]hello\n"
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == template and loaded.apply_chat_template(chat) == "[user]hello\n"


def test_assistant_tokens_mask_leaves_out_the_newlines_around_an_answer():
    """With a tokenizer that keeps "\n" as a token (Qwen's do; the word-level test tokenizer drops it), the assistant
    mask covers the answer and its `<|im_end|>`, not the header's newline before it nor the turn's newline after it."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("\n", normalized=False)])
    add_speech_tokens(tokenizer, NUM_UNITS, text_vocab_size=TEXT_VOCAB_SIZE)
    processor = DeepTalkProcessor(tokenizer)
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "speech", "units": [1, 2]}, {"type": "text", "text": "world"}]},
        {"role": "user", "content": "hello"},
    ]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    start, end, newline, user, assistant, hello, world = tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "\n", "user", "assistant", "hello", "world"]
    )
    speech = [processor.speech_token_start + 1, processor.speech_token_start + 2]
    question = [start, user, newline, hello, end, newline]
    header = [start, assistant, newline]
    answer = [processor.begin_of_speech_id, *speech, processor.end_of_speech_id, world, end]
    assert out["input_ids"][0] == question + header + answer + [newline] + question
    assert out["assistant_masks"][0] == [0] * 9 + [1] * len(answer) + [0] * 7


def test_batch_decode_passes_the_tokenizers_options_on():
    """`batch_decode(ids, skip_special_tokens=True)` (docs/processor.md's example) decodes every row with the option,
    as `decode` does."""
    hello, pad = PROCESSOR.tokenizer.convert_tokens_to_ids(["hello", "[PAD]"])
    rows = [[hello, pad, PROCESSOR.speech_token_start + 1], [pad, hello]]
    decoded = PROCESSOR.batch_decode(rows, skip_special_tokens=True)
    assert [(d.text, d.speech_units) for d in decoded] == [("hello", [[1]]), ("hello", [])]
    assert all("[PAD]" in d.text for d in PROCESSOR.batch_decode(rows))


def test_return_attention_mask_false_leaves_the_mask_out_as_the_tokenizer_does():
    options = dict(padding=True, return_attention_mask=False)
    out = PROCESSOR(text=["hello <|speech|>", "world"], speech_units=[[1, 2], None], **options)
    assert set(out) == {"input_ids", "modality_ids"}
    assert "attention_mask" not in PROCESSOR.tokenizer(["hello", "world"], **options)
