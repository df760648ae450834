"""Tiny speech recognition: a DeepTalk LLM learns to hear, from two existing checkpoints, no download needed.

A random tiny Whisper model and a random tiny DeepTalk LLM stand in for real checkpoints. They are composed into one
`DeepTalkForConditionalGeneration` (Whisper's encoder + a new speech connector + the LLM), which is trained in two
`set_training_stage` stages on four synthetic tones and their "transcripts": "align" (the connector, here with the
untrained stand-in encoder; the LLM frozen), then "joint" (everything but the encoder). The model then transcribes each tone with `generate`, and is saved and reloaded through
`AutoModelForMultimodalLM`.

    python examples/asr_tiny.py
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForMultimodalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

import deeptalk_hf  # noqa: F401  (registers DeepTalk with the Auto classes)
from deeptalk_hf import (
    DeepTalkConfig,
    DeepTalkForCausalLM,
    DeepTalkForConditionalGeneration,
    expand_audio_placeholders,
    extract_audio_features,
    set_training_stage,
)

SAMPLING_RATE = 16000
PAD, EOS, BOS, SEP = 0, 1, 2, 3


def tone(frequency: float, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE)


def make_checkpoints(root: Path) -> tuple[Path, Path]:
    """Stand-ins for an existing Whisper checkpoint and an existing DeepTalk (e.g. upcycled) LLM checkpoint."""
    whisper = WhisperConfig(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50,
        vocab_size=100, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    WhisperForConditionalGeneration(whisper).save_pretrained(root / "whisper")
    llm = DeepTalkConfig(
        vocab_size=80, speech_vocab_size=16, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, mlp_only_layers=[1], num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_speech_experts=3, num_experts_per_tok=2, norm_topk_prob=True,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
    )  # fmt: skip
    DeepTalkForCausalLM(llm).save_pretrained(root / "llm")
    return root / "whisper", root / "llm"


def batch_for(model, extractor, texts, audios, padding_side: str) -> dict[str, torch.Tensor]:
    """Features, expanded placeholders and padding: what `DeepTalkAudioProcessor` does."""
    features = extract_audio_features(audios, SAMPLING_RATE, extractor, model.config)
    expanded = expand_audio_placeholders(texts, features["num_audio_tokens"], model.config)
    width = max(len(ids) for ids in expanded["input_ids"])

    def pad(row: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if padding_side == "left" else row + fill

    return {
        "input_ids": torch.tensor([pad(ids, PAD) for ids in expanded["input_ids"]]),
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids in expanded["input_ids"]]),
        "input_features": features["input_features"],
        "input_features_mask": features["input_features_mask"],
    }


def train(model, batch, labels, steps: int) -> float:
    """AdamW on the tensors the current training stage leaves trainable; every other tensor stays bit-identical."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
    return loss.item()


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        whisper_path, llm_path = make_checkpoints(Path(tmp))
        model = DeepTalkForConditionalGeneration.from_parts(whisper_path, llm_path, stack_factor=5)
        audio_id = model.config.audio_token_id
        extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE, chunk_length=1)

        clips = [tone(300, 0.3), tone(1500, 0.3), tone(600, 0.6), tone(3000, 0.6)]
        transcripts = [[10, 20, 30], [40, 11, 21], [31, 41, 12], [22, 32, 42]]
        texts = [[BOS, audio_id, SEP, *t, EOS] for t in transcripts]
        batch = batch_for(model, extractor, texts, clips, padding_side="right")
        ids = batch["input_ids"]
        answer = ((ids == SEP).cumsum(-1) > 0) & (ids != SEP) & batch["attention_mask"].bool()
        labels = ids.masked_fill(~answer, -100)  # learn the transcript only

        # Stage "align" trains the connector with the LLM frozen. This stand-in encoder has never heard anything, so it
        # trains too here (with a real Whisper, keep it frozen or add `also=model.audio_encoder_top_layers(n)`); and a
        # random LLM can hardly be steered by its input alone, so here the loss falls in the joint stage.
        set_training_stage(model, "align", also=["audio_encoder.*"])
        print(f"stage align (LLM frozen): loss {train(model, batch, labels, steps=60):.3f}")
        set_training_stage(model, "joint")  # everything but the audio encoder
        print(f"stage joint (all but the encoder): loss {train(model, batch, labels, steps=60):.3f}")

        model.eval()
        model.save_pretrained(Path(tmp) / "deeptalk-asr")
        model = AutoModelForMultimodalLM.from_pretrained(Path(tmp) / "deeptalk-asr")
        print(f"reloaded as {type(model).__name__}")
        prompts = batch_for(model, extractor, [[BOS, audio_id, SEP]] * len(clips), clips, padding_side="left")
        out = model.generate(**prompts, max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        for expected, row in zip(transcripts, out[:, prompts["input_ids"].shape[1] :].tolist(), strict=True):
            heard = row[: row.index(EOS)] if EOS in row else row
            print(f"heard {heard}, expected {expected}: {'ok' if heard == expected else 'WRONG'}")


if __name__ == "__main__":
    main()
