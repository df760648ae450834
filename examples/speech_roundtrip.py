"""Spoken question in, spoken answer out: speak a sentence, encode it with SNAC, run DeepTalk, write the answer WAV.

    python examples/speech_roundtrip.py                                   # random demo model and codec, offline
    python examples/speech_roundtrip.py --model path/to/deeptalk --codec hubertsiuzdak/snac_24khz

The question is spoken by espeak-ng when it is installed, else it is a synthetic voiced signal. Without `--model` the
LLM and codec have random weights: the pipeline runs end to end and the answer is noise-like audio. Needs the `snac`
package (the `audio` extra: `pip install 'deeptalk-hf[audio]'`).
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoProcessor, PreTrainedTokenizerFast

from deeptalk_hf import (
    DeepTalkConfig,
    DeepTalkForCausalLM,
    DeepTalkProcessor,
    SnacCodec,
    SpeechUnitsLogitsProcessor,
    add_speech_tokens,
    fit_speech_vocab,
)


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Mono float samples of a 16-bit PCM WAV file (stdlib `wave`)."""
    with wave.open(str(path), "rb") as file:
        rate, channels, width = file.getframerate(), file.getnchannels(), file.getsampwidth()
        if width != 2:
            raise ValueError(f"{path} has {8 * width}-bit samples; expected 16-bit PCM")
        pcm = torch.frombuffer(bytearray(file.readframes(file.getnframes())), dtype=torch.int16)
    return pcm.reshape(-1, channels).float().mean(1) / 32768, rate


def write_wav(path: Path, waveform: torch.Tensor, rate: int) -> None:
    pcm = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(pcm.numpy().tobytes())


def speak(sentence: str) -> tuple[torch.Tensor, int]:
    """The sentence spoken by espeak-ng, or (without it) a voiced signal with one syllable-like burst per word."""
    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "question.wav"
            subprocess.run(["espeak-ng", "-w", str(path), sentence], check=True)
            return read_wav(path)
    rate, syllable = 16000, 0.25
    t = torch.arange(int(rate * syllable)) / rate
    envelope = torch.sin(torch.pi * t / syllable) ** 2
    bursts = []
    for i, _ in enumerate(sentence.split()):
        pitch = 120 + 15 * math.sin(i)
        voice = sum(torch.sin(2 * torch.pi * pitch * k * t) / k for k in range(1, 8))
        bursts += [0.3 * envelope * voice, torch.zeros(rate // 20)]
    return torch.cat(bursts), rate


def random_demo(codec: SnacCodec) -> tuple[DeepTalkProcessor, DeepTalkForCausalLM]:
    """A word-level tokenizer and a small random DeepTalk MoE whose speech block fits the codec."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(["user assistant hello how are you"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    speech_tokens = add_speech_tokens(tokenizer, codec.num_units, text_vocab_size=64)
    torch.manual_seed(0)
    config = DeepTalkConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_speech_experts=2,
        max_position_embeddings=4096,
    )
    model = DeepTalkForCausalLM(config)
    fit_speech_vocab(model, speech_tokens)
    return DeepTalkProcessor(tokenizer, codec=codec), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentence", default="What is the weather like today in the city?")
    parser.add_argument("--model", help="a saved DeepTalk model and processor (random demo without it)")
    parser.add_argument("--codec", default="random", help="SNAC hub id or folder; 'random' for SNAC 24 kHz shapes")
    parser.add_argument("--answer-seconds", type=float, default=2.0, help="length of the spoken answer (> 0)")
    parser.add_argument("--out", type=Path, default=Path("answer.wav"))
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args()
    if not args.answer_seconds > 0:
        parser.error(f"--answer-seconds must be positive, got {args.answer_seconds}")

    try:
        from snac import SNAC
    except ImportError:
        raise SystemExit("speech_roundtrip.py needs the `snac` package: pip install 'deeptalk-hf[audio]'") from None
    if args.codec == "random":
        torch.manual_seed(0)
        codec = SnacCodec(
            SNAC(
                sampling_rate=24000,
                encoder_rates=[2, 4, 8, 8],
                decoder_rates=[8, 8, 4, 2],
                encoder_dim=48,
                decoder_dim=1024,
                attn_window_size=None,
                vq_strides=[4, 2, 1],
            )
        )
    else:
        codec = SnacCodec.from_pretrained(args.codec)
    if args.model:
        processor = AutoProcessor.from_pretrained(args.model, codec=codec)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        processor, model = random_demo(codec)
    processor.check_config(model.config)

    question, rate = speak(args.sentence)
    print(f"question: {question.shape[0] / rate:.2f} s at {rate} Hz")
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": question, "sampling_rate": rate}]}]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        speech_answer=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    print(f"prompt: {inputs['input_ids'].shape[1]} ids, {int(inputs['modality_ids'].sum())} of them speech")

    frames = math.ceil(args.answer_seconds * codec.frame_rate)
    torch.manual_seed(args.seed)
    output = model.generate(
        **inputs,
        max_new_tokens=frames * codec.units_per_frame + 1,
        logits_processor=[SpeechUnitsLogitsProcessor(processor, codec)],
        do_sample=True,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    answer = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    units = answer.speech_units[0] if answer.speech_units else []
    units = units[: len(units) // codec.units_per_frame * codec.units_per_frame]
    print(f"answer: text {answer.text!r}, {len(units)} speech units")
    if not units:
        raise SystemExit("the model answered without speech")
    waveform = codec.decode(codec.from_units(units)).cpu()
    write_wav(args.out, waveform, codec.sampling_rate)
    print(f"wrote {args.out}: {waveform.shape[0] / codec.sampling_rate:.2f} s at {codec.sampling_rate} Hz")


if __name__ == "__main__":
    main()
