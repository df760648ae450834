"""DeepTalk vs transformers' Qwen3-MoE at equal active compute: forward+backward and cached-decode tokens/s.

DeepTalk runs hard modality routing on a mixed text/speech batch with E text + E speech experts per layer; Qwen3-MoE
has 2E experts, the same top-k, expert size, attention and vocabulary width, and the same experts backend. Both get
the same inputs. The goal is DeepTalk >= 0.95x Qwen3-MoE: modality routing should cost (almost) nothing.

    python benchmarks/bench_model.py [--backend grouped_mm] [--device cpu] [--out PATH (default: benchmarks/results/model.json)]
"""

import argparse
import json
import math
import os
import platform
import time
from functools import partial
from pathlib import Path

import torch
from run_info import check_output, versions
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM


def build(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    shared = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=math.gcd(args.hidden // 64, max(1, args.hidden // 256)),  # a divisor of the heads
        head_dim=64,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        experts_implementation=args.backend,
    )
    torch.manual_seed(0)
    deeptalk = DeepTalkForCausalLM(
        DeepTalkConfig(
            **shared, speech_vocab_size=args.vocab // 4, num_experts=args.experts, num_speech_experts=args.experts
        )
    )
    torch.manual_seed(0)
    qwen = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shared, num_experts=2 * args.experts))
    return {"deeptalk": deeptalk.to(args.device), "qwen3_moe": qwen.to(args.device)}


def timed(fns: dict[str, object], repeats: int, device: str) -> dict[str, float]:
    """Fastest wall time of each function, the functions taking turns (so a change in machine load hits all alike)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def mixed_batch(args: argparse.Namespace) -> torch.Tensor:
    """Half text ids, half speech ids (the speech block is the last quarter of the vocabulary), interleaved in runs."""
    generator = torch.Generator().manual_seed(1)
    speech_start = args.vocab - args.vocab // 4
    text = torch.randint(0, speech_start, (args.batch, args.seq_len), generator=generator)
    speech = torch.randint(speech_start, args.vocab, (args.batch, args.seq_len), generator=generator)
    runs = (torch.arange(args.seq_len) // 16) % 2 == 1
    return torch.where(runs, speech, text).to(args.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="grouped_mm", help="experts backend for both models")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda if available, else cpu"
    )
    parser.add_argument("--hidden", type=int, default=256, help="a multiple of 64 (heads of 64)")
    parser.add_argument("--expert-size", type=int, default=128, help="moe_intermediate_size of each expert")
    parser.add_argument("--experts", type=int, default=8, help="E: text experts = speech experts = E; Qwen3-MoE 2E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (both models)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, all MoE")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary; DeepTalk's last quarter is speech")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward+backward")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (forward+backward)")
    parser.add_argument(
        "--decode-tokens", type=int, default=64, help="greedy tokens generated after a 32-token prompt"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs after one warm-up; the fastest is reported, the models taking turns",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "model.json",
        help="results file (default: benchmarks/results/model.json)",
    )
    args = parser.parse_args()
    if args.hidden < 64 or args.hidden % 64:
        parser.error(f"--hidden {args.hidden} must be a positive multiple of 64 (attention heads of 64)")
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"--top-k {args.top_k} must be in [1, --experts {args.experts}] (DeepTalk routes within a group)")
    if min(args.repeats, args.decode_tokens) < 1:
        parser.error("--repeats and --decode-tokens must be at least 1")
    if min(args.layers, args.batch) < 1 or args.seq_len < 32 or args.vocab < 8:
        parser.error("--layers and --batch must be at least 1, --seq-len 32 (the decode prompt), --vocab 8")
    check_output(parser, "--out", args.out, folder=False)

    models = build(args)
    input_ids = mixed_batch(args)
    prompt = input_ids[:1, :32]

    def train_step(name: str) -> None:
        model = models[name]
        model.train()
        # Qwen3-MoE computes its balancing loss only when asked; DeepTalk always does in training, so ask.
        model.config.output_router_logits = name == "qwen3_moe"
        model.zero_grad(set_to_none=True)
        model(input_ids, labels=input_ids).loss.backward()

    def decode(name: str) -> None:
        model = models[name]
        model.eval()
        model.config.output_router_logits = False
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False
            )

    train_s = timed({name: partial(train_step, name) for name in models}, args.repeats, args.device)
    decode_s = timed({name: partial(decode, name) for name in models}, args.repeats, args.device)
    results = {
        name: {
            "train_tokens_per_s": input_ids.numel() / train_s[name],
            "decode_tokens_per_s": args.decode_tokens / decode_s[name],
        }
        for name in models
    }
    ratios = {
        metric: results["deeptalk"][metric] / results["qwen3_moe"][metric]
        for metric in ("train_tokens_per_s", "decode_tokens_per_s")
    }
    for name, figures in results.items():
        print(
            f"{name:10s} fwd+bwd {figures['train_tokens_per_s']:10.0f} tok/s   "
            f"decode {figures['decode_tokens_per_s']:8.1f} tok/s"
        )
    print(
        f"DeepTalk / Qwen3-MoE: fwd+bwd {ratios['train_tokens_per_s']:.3f}x   "
        f"decode {ratios['decode_tokens_per_s']:.3f}x   (goal >= 0.95x)"
    )
    record = {
        "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "load_average": os.getloadavg(),  # other work on the machine shows up in CPU timings
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "versions": versions(),
        "results": results,
        "ratio_deeptalk_over_qwen3_moe": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
