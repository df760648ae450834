"""Where one experts layer's time goes: per-kernel device times of a few steps, `deeptalk_triton` beside `grouped_mm`.

    python benchmarks/profile_moe_kernels.py                                  # Qwen3-30B-A3B experts, T=16384
    python benchmarks/profile_moe_kernels.py --shape mixtral_8x7b --tokens 4096 --modes fwd fwd+bwd

The benchmark (`bench_moe_kernels.py`) says how fast; this says which kernel to work on. It runs the same problem
(same weights and routing) under torch's profiler after a warm-up step (autotuning), prints the kernels sorted by
their own device time and writes the tables to `benchmarks/results/moe_profile_<device>_<shape>_<T>.txt`. Without
CUDA it profiles CPU time on a tiny problem under the Triton interpreter, which only checks the script.
"""

import argparse
from pathlib import Path

import torch
from bench_moe_kernels import (
    BACKENDS,
    CPU_SHAPES,
    DTYPES,
    HAS_CUDA,
    MODES,
    SHAPES,
    device_name,
    make_problem,
    make_step,
    slug,
)
from run_info import check_output, versions
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", default="qwen3_30b_a3b", choices=list(SHAPES), help="expert shape (CUDA; without it a tiny one)"
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens T (CUDA; without it 64)")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["grouped_mm", "deeptalk_triton"],
        choices=BACKENDS,
        help="experts backends to profile",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["fwd+bwd"], choices=MODES, help="forward and/or forward+backward"
    )
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per backend and mode")
    parser.add_argument("--rows", type=int, default=12, help="kernels listed per table")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="folder for moe_profile_<device>_<shape>_<T>.txt (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.tokens, args.rows) < 1:
        parser.error("--steps, --tokens and --rows must be at least 1")
    check_output(parser, "--out", args.out, folder=True)
    if HAS_CUDA:
        device, dtype, tokens, shape = "cuda", DTYPES["bf16"], args.tokens, SHAPES[args.shape]
        activity, key = ProfilerActivity.CUDA, "self_cuda_time_total"
    else:
        print("No CUDA device: profiling a tiny problem on CPU under the Triton interpreter (checks the script only).")
        device, dtype, tokens, shape = "cpu", DTYPES["fp32"], 64, CPU_SHAPES["tiny"]
        activity, key = ProfilerActivity.CPU, "self_cpu_time_total"
    hidden, inter, experts, top_k = shape
    torch.manual_seed(0)
    module, x, index, weights = make_problem(hidden, inter, experts, top_k, tokens, dtype, device)
    tables = [
        f"{device_name()}, {dtype}, {', '.join(f'{p} {v}' for p, v in versions().items())}; "
        f"H={hidden} I={inter} E={experts} k={top_k} T={tokens}, {args.steps} steps"
    ]
    for backend in args.backends:
        for mode in args.modes:
            step = make_step(module, x, index, weights, backend, mode)
            step()  # autotune and compile outside the profile
            with profile(activities=[activity]) as prof:
                for _ in range(args.steps):
                    step()
                if HAS_CUDA:
                    torch.cuda.synchronize()
            title = f"=== {backend} {mode} ({args.steps} steps) ==="
            tables.append(
                f"{title}\n{prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60)}"
            )
            print(tables[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"moe_profile_{slug(device_name())}_{args.shape if HAS_CUDA else 'tiny'}_{tokens}.txt"
    path.write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
