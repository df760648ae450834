"""Offline builders shared by the processor, codec and streamer tests: a tiny word-level tokenizer, tiny SNAC/Mimi
codecs and a tiny DeepTalk model, all with random weights (nothing can be downloaded here)."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM, DeepTalkProcessor, add_speech_tokens, fit_speech_vocab

SENTENCES = [
    "hello world how are you today",
    "the weather is nice and the sun is warm",
    "what time is it in the city",
    "please say something kind to me",
    "user assistant system",
]
WORDS = sorted({word for sentence in SENTENCES for word in sentence.split()})
HAVE_SNAC = find_spec("snac") is not None
needs_snac = pytest.mark.skipif(not HAVE_SNAC, reason="needs the snac package: pip install 'deeptalk-hf[audio]'")
TEXT_VOCAB_SIZE = 48  # the text model's rows, padded beyond the tokenizer (as real checkpoints are)


def tiny_tokenizer(wrap: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose decode joins words by single spaces, so word sequences round-trip exactly.
    `wrap`: it wraps every text in `<s> ... </s>`, as Llama- and DeepSeek-style tokenizers add a BOS (and Llama's
    `add_eos_token=True`, T5's or BERT's an end token)."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    if wrap:
        tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
        bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
        )
    return tokenizer


def tiny_processor(num_units: int = 64, wrap: bool = False, **kwargs) -> DeepTalkProcessor:
    tokenizer = tiny_tokenizer(wrap)
    add_speech_tokens(tokenizer, num_units, text_vocab_size=TEXT_VOCAB_SIZE)
    return DeepTalkProcessor(tokenizer, **kwargs)


def tiny_model(processor: DeepTalkProcessor, seed: int = 0, **overrides) -> DeepTalkForCausalLM:
    """A 2-layer DeepTalk model whose speech block is sized from the processor's tokenizer (`overrides`: more config
    fields, e.g. parallel audio streams)."""
    torch.manual_seed(seed)
    config = DeepTalkConfig(
        vocab_size=TEXT_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_speech_experts=2,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        pad_token_id=processor.tokenizer.pad_token_id,
        **overrides,
    )
    model = DeepTalkForCausalLM(config).eval()
    fit_speech_vocab(model, processor.speech_tokens)
    processor.check_config(model.config)
    return model


def tiny_snac(**overrides):
    """A small SNAC with the 24 kHz model's structure (3 levels at strides 4/2/1, no local attention), or `overrides`."""
    from snac import SNAC

    torch.manual_seed(0)
    options = dict(
        sampling_rate=24000,
        encoder_dim=4,
        encoder_rates=[2, 4, 8, 8],
        decoder_dim=16,
        decoder_rates=[8, 8, 4, 2],
        attn_window_size=None,
        codebook_size=64,
        codebook_dim=4,
        vq_strides=[4, 2, 1],
    )
    return SNAC(**{**options, **overrides}).eval()


def tiny_mimi():
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    config = MimiConfig(
        hidden_size=32,
        num_filters=4,
        upsampling_ratios=[8, 6, 5, 4],
        codebook_size=32,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=8,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        upsample_groups=32,
    )
    return MimiModel(config).eval()
