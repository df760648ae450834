"""Latency of a spoken question → spoken answer: time to the first text token, first speech unit and first audio chunk
through processor (codec encode + chat template) → DeepTalkForCausalLM.generate → DeepTalkStreamer → codec decode.

Weights are random (nothing is downloaded), so the answer's layout is scripted from the interleaving policy (which
modality each step emits) and speech units are kept decodable by `SpeechUnitsLogitsProcessor`: the timings are those
of the real computation, not of a trained model's choices. The paper's bar is < 0.5 s end to end.

    python benchmarks/bench_latency.py                                  # tiny MoE on CPU, SNAC 24 kHz shapes
    python benchmarks/bench_latency.py --size v2-lite --device cuda     # DeepSeek-V2-Lite shapes (2.4B active)
    python benchmarks/bench_latency.py --codec hubertsiuzdak/snac_24khz # real codec weights, if reachable
    python benchmarks/bench_latency.py --parallel                       # + parallel streams, same run

With `--parallel`, the same turn is also answered in parallel streams (text and 7 delayed SNAC streams, the same
shapes plus the stream embeddings and heads), with and without batch parallel decoding, through
`processor.parallel_prompt` → `generate` → `DeepTalkParallelStreamer`; the modes take turns run by run, so that the
machine's load falls on all of them alike.

Writes `benchmarks/results/latency_<device>_<size>_<policy>.json` (`..._<policy>_parallel.json` with `--parallel`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from functools import partial
from pathlib import Path

import torch
from run_info import check_output, versions
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

from deeptalk_hf import (
    AudioChunk,
    DeepTalkConfig,
    DeepTalkForCausalLM,
    DeepTalkParallelStreamer,
    DeepTalkProcessor,
    DeepTalkStreamer,
    SnacCodec,
    SpeechChunk,
    SpeechUnitsLogitsProcessor,
    TextDelta,
    add_speech_tokens,
    fit_speech_vocab,
)
from deeptalk_hf.processing_deeptalk import INTERLEAVE_POLICIES

SIZES = {
    # a small MoE that runs anywhere
    "tiny": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=6,
        num_speech_experts=2,
        num_experts_per_tok=2,
    ),
    # DeepSeek-V2-Lite's shapes (64 routed experts, 6 active, 2 shared, first layer dense; GQA stands in for MLA),
    # its experts split 48 text / 16 speech as DeepTalk does
    "v2-lite": dict(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        first_k_dense_replace=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=128,
        num_experts=48,
        num_speech_experts=16,
        num_experts_per_tok=6,
        shared_expert_intermediate_size=2816,
    ),
}
SNAC_24KHZ = dict(  # hubertsiuzdak/snac_24khz's architecture
    sampling_rate=24000,
    encoder_dim=48,
    encoder_rates=[2, 4, 8, 8],
    decoder_dim=1024,
    decoder_rates=[8, 8, 4, 2],
    attn_window_size=None,
    codebook_size=4096,
    codebook_dim=8,
    vq_strides=[4, 2, 1],
)
WORDS = "what is the weather like today in the city please tell me about the sun and the rain".split()


class ScriptedAnswer(LogitsProcessor):
    """Random weights choose nothing useful: at each step, allow only the modality the policy's layout puts there
    (words, a unit, or the marker), so every run emits the same text/speech schedule."""

    def __init__(self, processor: DeepTalkProcessor, policy: str, text_tokens: int, units: int, prompt_length: int):
        tokenizer = processor.tokenizer
        self.words = torch.tensor(tokenizer.convert_tokens_to_ids(WORDS))
        # A text id marks a text slot (markers and units lie in the speech block).
        self.layout = processor.interleave_ids([0] * text_tokens, [0] * units, policy)
        self.unit_range = (processor.speech_token_start, processor.begin_of_speech_id)
        self.prompt_length = prompt_length

    def __len__(self) -> int:
        return len(self.layout)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        slot = self.layout[min(input_ids.shape[1] - self.prompt_length, len(self.layout) - 1)]
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        if slot < self.unit_range[0]:
            allowed[self.words.to(scores.device)] = True
        elif self.unit_range[0] <= slot < self.unit_range[1]:
            allowed[self.unit_range[0] : self.unit_range[1]] = True
        else:
            allowed[slot] = True
        return scores.masked_fill(~allowed, -float("inf"))


class ScriptedParallelAnswer(LogitsProcessor):
    """The parallel streams' script for random weights: the text stream says `text_tokens` words then ends, and each
    audio stream emits `frames` codes then ends (`DelayPatternLogitsProcessor` adds the pads and begin codes)."""

    def __init__(
        self, processor: DeepTalkProcessor, config: DeepTalkConfig, text_tokens: int, frames: int, prompt_length: int
    ):
        self.words = torch.tensor(processor.tokenizer.convert_tokens_to_ids(WORDS))
        self.config, self.text_tokens, self.prompt_length = config, text_tokens, prompt_length
        self.audio_ends = torch.tensor([0, *config.audio_stream_delays]) + frames  # per stream, the step of its end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        config, device = self.config, scores.device
        step = input_ids.shape[1] - self.prompt_length
        stream = torch.arange(scores.shape[0], device=device) % (config.num_audio_streams + 1)
        vocab = torch.arange(scores.shape[-1], device=device)
        text = torch.isin(vocab, self.words.to(device)) if step < self.text_tokens else vocab == config.eos_token_id
        ending = (step >= self.audio_ends.to(device)[stream])[:, None]
        audio = torch.where(ending, vocab == config.audio_eos_token_id, vocab < config.audio_codebook_size)
        allowed = torch.where((stream == 0)[:, None], text, audio)
        return scores.masked_fill(~allowed, -float("inf"))


def build(args: argparse.Namespace) -> tuple[DeepTalkProcessor, DeepTalkForCausalLM, SnacCodec]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.codec == "random":
        from snac import SNAC

        codec = SnacCodec(SNAC(**SNAC_24KHZ).to(device))
    else:
        codec = SnacCodec.from_pretrained(args.codec)
        codec = SnacCodec(codec.model.to(device))

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(
        [" ".join(WORDS + ["user", "assistant"])],
        trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    add_speech_tokens(tokenizer, codec.num_units, text_vocab_size=SIZES[args.size]["vocab_size"])
    processor = DeepTalkProcessor(tokenizer, codec=codec, interleave=args.policy)
    return processor, new_model(args, processor), codec


def new_model(args: argparse.Namespace, processor: DeepTalkProcessor, **fields) -> DeepTalkForCausalLM:
    """A random `--size` model whose speech block is the processor's; `fields`: more config fields."""
    device = torch.device(args.device)
    size = dict(SIZES[args.size], max_position_embeddings=4096, pad_token_id=0, **fields)
    if args.num_layers:
        size["num_hidden_layers"] = args.num_layers
    with torch.device(device):
        model = DeepTalkForCausalLM._from_config(
            DeepTalkConfig(**size), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
        )
    fit_speech_vocab(model, processor.speech_tokens)
    if args.experts_implementation:
        model.set_experts_implementation(args.experts_implementation)
    processor.check_config(model.config)
    return model.eval()


def new_parallel_model(
    args: argparse.Namespace, processor: DeepTalkProcessor, codec: SnacCodec
) -> DeepTalkForCausalLM:
    """The same shapes with one audio stream per SNAC frame position; the text stream ends at `<|im_end|>`."""
    return new_model(
        args,
        processor,
        num_audio_streams=codec.units_per_frame,
        audio_codebook_size=codec.codebook_size,
        eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )


def timed(fn, device: torch.device, repeats: int = 1) -> tuple[object, float]:
    """`fn()`'s result and its median wall time over `repeats` calls."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def spoken_question(args) -> list[dict]:
    """The user's turn: `--question-seconds` of noise at 16 kHz (what it says does not change the timings)."""
    question = 0.1 * torch.randn(int(args.question_seconds * 16000), generator=torch.Generator().manual_seed(0))
    return [{"role": "user", "content": [{"type": "audio", "audio": question, "sampling_rate": 16000}]}]


def stream_answer(model, streamer, start: float, prepared: float, **generate_kwargs) -> dict[str, float]:
    """Run `generate` in a thread and time the streamer's first event of each kind, all from `start`."""
    failures: list[BaseException] = []

    def generate() -> None:
        try:
            model.generate(streamer=streamer, do_sample=False, **generate_kwargs)
        except BaseException as error:  # raised here below, not left to the thread (the stream would wait for it)
            failures.append(error)
            streamer.end()

    generation = threading.Thread(target=generate)
    generation.start()
    firsts: dict[str, float] = {}
    for event in streamer:
        kind = {TextDelta: "first_text_s", SpeechChunk: "first_unit_s", AudioChunk: "first_audio_s"}[type(event)]
        firsts.setdefault(kind, time.perf_counter() - start)
    generation.join()
    if failures:
        raise failures[0]
    timings = {"prepare_s": prepared - start, **firsts, "answer_total_s": time.perf_counter() - start}
    if "first_audio_s" in firsts:  # the generation side alone: codec encoding of the question dominates `prepare_s`
        timings["prompt_to_first_audio_s"] = firsts["first_audio_s"] - timings["prepare_s"]
    return timings


def run_once(args, processor, model, codec) -> dict[str, float]:
    """One spoken turn, timed from the moment the question's waveform is available."""
    conversation = spoken_question(args)
    start = time.perf_counter()
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    prepared = time.perf_counter()
    prompt_length = inputs["input_ids"].shape[1]
    script = ScriptedAnswer(processor, args.policy, args.text_tokens, args.units, prompt_length)
    # a timeout, so that an error in the generation thread ends the benchmark instead of hanging it
    streamer = DeepTalkStreamer(processor, codec, audio_chunk_frames=args.audio_chunk_frames, timeout=600)
    timings = stream_answer(
        model,
        streamer,
        start,
        prepared,
        **inputs,
        max_new_tokens=len(script),
        logits_processor=LogitsProcessorList([script, SpeechUnitsLogitsProcessor(processor, codec, allow_text=True)]),
        pad_token_id=0,
    )
    return {**timings, "prompt_tokens": prompt_length, "answer_tokens": len(script)}


def run_parallel_once(args, processor, model, codec, batch_parallel: bool) -> dict[str, float]:
    """The same turn answered in parallel streams: the question's SNAC codes in the delayed audio streams, the answer's
    text and frames side by side (`answer_tokens` counts steps, each of 1 + 7 rows, twice that with batch parallel)."""
    config = model.config
    conversation = spoken_question(args)
    start = time.perf_counter()
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    question = conversation[0]["content"][0]["audio"]
    inputs = processor.parallel_prompt(text, config, audio=[question], sampling_rate=16000).to(model.device)
    prepared = time.perf_counter()
    prompt_length = inputs["input_ids"].shape[-1]
    frames = args.units // codec.units_per_frame
    steps = max(max(config.audio_stream_delays) + frames + 1, args.text_tokens + 1)
    streamer = DeepTalkParallelStreamer(
        processor,
        codec,
        config,
        batch_parallel=batch_parallel,
        audio_chunk_frames=args.audio_chunk_frames,
        timeout=600,
    )
    timings = stream_answer(
        model,
        streamer,
        start,
        prepared,
        **inputs,
        max_new_tokens=steps,
        logits_processor=LogitsProcessorList(
            [ScriptedParallelAnswer(processor, config, args.text_tokens, frames, prompt_length)]
        ),
        batch_parallel=batch_parallel,
    )
    return {**timings, "prompt_tokens": prompt_length, "answer_tokens": steps}


def breakdown(args, processor, model, codec) -> dict[str, float]:
    """Where the time goes: each stage alone (median of `--runs` calls; decode steps: of `--decode-steps`)."""
    device, repeats = model.device, args.runs
    question = spoken_question(args)[0]["content"][0]["audio"]
    stages = {}
    codes, stages["codec_encode_question_s"] = timed(lambda: codec.encode(question, 16000), device, repeats)
    units = codec.to_units(codes).tolist()
    inputs, stages["template_and_tokenize_s"] = timed(
        lambda: processor(
            text="<|im_start|>user\n<|speech|><|im_end|>\n<|im_start|>assistant\n",
            speech_units=[units],
            return_tensors="pt",
        ).to(device),
        device,
        repeats,
    )
    with torch.inference_mode():
        out, stages["prefill_s"] = timed(lambda: model(**inputs, use_cache=True), device, repeats)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(args.decode_steps):
            out, seconds = timed(partial(model, input_ids=token, cache=cache, use_cache=True), device)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            steps.append(seconds)
    stages["decode_step_s"] = statistics.median(steps)
    chunk = [c[: args.audio_chunk_frames * codec.frame_levels.count(level)] for level, c in enumerate(codes)]
    _, stages["codec_decode_chunk_s"] = timed(lambda: codec.decode(chunk), device, repeats)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shapes (random weights)")
    parser.add_argument("--num-layers", type=int, default=0, help="override the layer count (e.g. v2-lite on CPU)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda if available, else cpu"
    )
    parser.add_argument("--codec", default="random", help="'random' (SNAC 24 kHz shapes) or a SNAC hub id / folder")
    parser.add_argument("--experts-implementation", default=None, help="e.g. grouped_mm, deeptalk_triton")
    parser.add_argument(
        "--policy", choices=INTERLEAVE_POLICIES, default="text_then_speech", help="single-stream answer layout"
    )
    parser.add_argument("--question-seconds", type=float, default=2.0, help="length of the spoken question")
    parser.add_argument("--text-tokens", type=int, default=13, help="text tokens in the answer (0 for none)")
    parser.add_argument("--units", type=int, default=7 * 8, help="speech units in the answer (whole frames of 7)")
    parser.add_argument("--audio-chunk-frames", type=int, default=2, help="codec frames per streamed audio chunk")
    parser.add_argument("--decode-steps", type=int, default=20, help="decode steps timed alone (their median)")
    parser.add_argument(
        "--runs", type=int, default=3, help="timed runs after one warm-up, modes taking turns; medians reported"
    )
    parser.add_argument(
        "--parallel", action="store_true", help="also time parallel streams, with and without batch parallel decoding"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="folder for latency_<device>_<size>_<policy>[_parallel].json (default: benchmarks/results)",
    )
    args = parser.parse_args()

    if min(args.runs, args.decode_steps, args.audio_chunk_frames) < 1 or args.num_layers < 0:
        parser.error("--runs, --decode-steps and --audio-chunk-frames must be at least 1, --num-layers at least 0")
    if not args.question_seconds > 0 or args.text_tokens < 0:
        parser.error("--question-seconds must be positive and --text-tokens at least 0")
    check_output(parser, "--out", args.out, folder=True)
    processor, model, codec = build(args)
    if args.units < 1 or args.units % codec.units_per_frame:  # both modes answer in whole codec frames
        parser.error(f"--units must be a positive multiple of {codec.units_per_frame} (whole SNAC frames)")
    modes = {args.policy: partial(run_once, args, processor, model, codec)}
    if args.parallel:
        parallel_model = new_parallel_model(args, processor, codec)
        modes["parallel"] = partial(run_parallel_once, args, processor, parallel_model, codec, False)
        modes["parallel_batch_parallel"] = partial(run_parallel_once, args, processor, parallel_model, codec, True)
    for run in modes.values():
        run()  # warm-up: kernels, allocator, lazy init
    by_mode = {name: [] for name in modes}
    for _ in range(args.runs):  # the modes take turns, so that a change in the machine's load hits all of them
        for name, run in modes.items():
            by_mode[name].append(run())
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for name, runs in by_mode.items()
    }
    runs, median = by_mode[args.policy], medians[args.policy]
    stages = breakdown(args, processor, model, codec)
    device_name = (
        torch.cuda.get_device_name() if model.device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    report = {
        "device": device_name,
        "load_average": os.getloadavg(),  # other work on the machine shows up in CPU timings
        "versions": versions(),
        "size": args.size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "codec": f"SNAC ({args.codec}), {codec.frame_rate:.2f} frames/s, {codec.units_per_frame} units/frame",
        "policy": args.policy,
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "median_of_runs": median,
        "stages": stages,
        "runs": runs,
    }
    if args.parallel:
        report["parallel"] = {
            "parameters": sum(p.numel() for p in parallel_model.parameters()),
            "audio_stream_delays": parallel_model.config.audio_stream_delays,
            "median_of_runs": {name: medians[name] for name in modes if name != args.policy},
            "runs": {name: by_mode[name] for name in modes if name != args.policy},
        }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_parallel" if args.parallel else ""
    path = args.out / f"latency_{model.device.type}_{args.size}_{args.policy}{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(
        f"{device_name} | {args.size} ({report['parameters'] / 1e6:.1f}M params) | {args.policy} | {report['codec']}"
    )
    print(
        f"  prompt {int(median['prompt_tokens'])} tokens ({args.question_seconds:.1f} s question), "
        f"answer {int(median['answer_tokens'])} tokens"
    )
    for key in (
        "prepare_s",
        "first_text_s",
        "first_unit_s",
        "first_audio_s",
        "prompt_to_first_audio_s",
        "answer_total_s",
    ):
        if key in median:
            print(f"  {key:<28}{median[key] * 1000:9.1f} ms")
    print("  where the time goes:")
    for key, seconds in stages.items():
        print(f"    {key:<26}{seconds * 1000:9.1f} ms")
    if args.parallel:
        print(
            f"  {'mode':<26}{'steps':>6}{'prepare':>10}{'1st text':>10}{'1st audio':>10}{'prompt→audio':>13}{'total':>9}"
        )
        for name, m in medians.items():
            print(
                f"  {name:<26}{int(m['answer_tokens']):>6}{m['prepare_s'] * 1000:>8.0f}ms"
                f"{m.get('first_text_s', float('nan')) * 1000:>8.0f}ms{m['first_audio_s'] * 1000:>8.0f}ms"
                f"{m['prompt_to_first_audio_s'] * 1000:>11.0f}ms{m['answer_total_s'] * 1000:>7.0f}ms"
            )
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
