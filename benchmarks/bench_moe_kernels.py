"""Benchmark one MoE experts layer: transformers' `eager`, `batched_mm`, `grouped_mm` against `deeptalk_triton`.

Forward and forward+backward (gradients for hidden states, both expert weights and the routing weights) at the
experts shapes of Qwen3-30B-A3B, DeepSeek-V2-Lite and Mixtral-8x7B, for several token counts, all backends in the
same run on the same weights and routing. Prints milliseconds, TFLOP/s (useful work only: `6*H*I` FLOPs per routed
(token, slot) pair forward, three times that forward+backward) and the ratio to `grouped_mm`, to `batched_mm` and to
the fastest transformers backend measured on the same problem (`eager` included), and
writes `benchmarks/results/moe_kernels_<device>_<dtype>.{json,md}`.

    python benchmarks/bench_moe_kernels.py                       # everything (CUDA)
    python benchmarks/bench_moe_kernels.py --shapes qwen3_30b_a3b --tokens 16384 --modes fwd+bwd

Needs a CUDA GPU for meaningful figures. Without one it runs a tiny smoke configuration on CPU (Triton interpreter)
that only checks the script end to end, and says so.
"""

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from run_info import check_output, versions  # noqa: E402
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

import deeptalk_hf  # noqa: E402,F401  (registers "deeptalk_triton")
from deeptalk_hf.upcycling import atomic_output_file  # noqa: E402

# name: (hidden, moe_intermediate, experts, top_k)
SHAPES = {
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "deepseek_v2_lite": (2048, 1408, 64, 6),
    "mixtral_8x7b": (4096, 14336, 8, 2),
}
TOKENS = [1, 16, 256, 4096, 16384]
CPU_SHAPES = {"tiny": (64, 32, 8, 2)}
CPU_TOKENS = [1, 16, 64]
BACKENDS = ["eager", "batched_mm", "grouped_mm", "deeptalk_triton"]
MODES = ["fwd", "fwd+bwd"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_problem(hidden: int, inter: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype, device):
    """An experts module (backend switched through its config) and routing from a random softmax router."""
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts)
    module = Qwen3MoeExperts(config).to(device, dtype)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, inter**-0.5)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    router = torch.randn(tokens, experts, device=device, dtype=torch.float32)
    weights, index = torch.topk(router.softmax(-1), top_k, dim=-1)
    return module, x, index, weights.to(dtype)


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds per call (CUDA: Triton's `do_bench`, which flushes L2 between calls)."""
    if HAS_CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=iters, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def batched_mm_bytes(hidden: int, inter: int, tokens: int, top_k: int, dtype: torch.dtype) -> int:
    """`batched_mm` gathers both weight matrices once per (token, slot) pair."""
    return tokens * top_k * 3 * hidden * inter * torch.finfo(dtype).bits // 8


def make_step(module, x, index, weights, backend: str, mode: str) -> Callable[[], object]:
    """One call of the layer with `backend`: a forward without autograd, or a forward+backward that computes the
    gradients of the hidden states, both expert weights and the routing weights."""
    module.config._experts_implementation = backend
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return module(x, index, weights)

        return step
    leaves = [x.detach().requires_grad_(), module.gate_up_proj, module.down_proj, weights.detach().requires_grad_()]
    grad_out = torch.randn_like(x)

    def step():
        return torch.autograd.grad(module(leaves[0], index, leaves[3]), leaves, grad_out)

    return step


def deviation(module, x, index, weights, mode: str) -> float:
    """`deeptalk_triton`'s largest deviation from `grouped_mm` over what `mode` computes (the output, or the four
    gradients for one output gradient), each relative to that tensor's largest magnitude."""
    computed = []
    for backend in ("grouped_mm", "deeptalk_triton"):
        torch.manual_seed(1)  # the same output gradient for both
        out = make_step(module, x, index, weights, backend, mode)()
        computed.append([out] if mode == "fwd" else list(out))
    return max(
        ((b.float() - a.float()).abs().max() / a.float().abs().max().clamp_min(1e-12)).item()
        for a, b in zip(*computed, strict=True)
    )


def bench_one(module, x, index, weights, backend: str, mode: str, warmup: int, iters: int) -> float:
    step = make_step(module, x, index, weights, backend, mode)
    step()  # compile / autotune outside the timing
    return time_ms(step, warmup, iters)


def run(args, save: Callable[[list[dict], bool], None]) -> list[dict]:
    """Every problem's rows; `save(results, complete)` writes them after each problem (a run cut short keeps them)."""
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = DTYPES[args.dtype]
    shapes = SHAPES if HAS_CUDA else CPU_SHAPES
    results = []
    free = torch.cuda.mem_get_info()[0] if HAS_CUDA else None
    for shape in (args.shapes if HAS_CUDA else None) or list(shapes):
        hidden, inter, experts, top_k = shapes[shape]
        for tokens in args.tokens:
            torch.manual_seed(0)
            module, x, index, weights = make_problem(hidden, inter, experts, top_k, tokens, dtype, device)
            flops = 6 * hidden * inter * tokens * top_k
            for mode in args.modes:
                group = len(results)  # this problem's rows, printed once all are timed (the ratios need them all)
                for backend in args.backends:
                    row = dict(shape=shape, tokens=tokens, mode=mode, backend=backend, ms=None, tflops=None, note="")
                    if backend == "batched_mm" and free is not None:
                        needed = batched_mm_bytes(hidden, inter, tokens, top_k, dtype) * (1 if mode == "fwd" else 3)
                        if needed > 0.8 * free:
                            row["note"] = f"skipped: needs ~{needed / 2**30:.0f} GiB"
                            results.append(row)
                            continue
                    try:
                        ms = bench_one(module, x, index, weights, backend, mode, args.warmup, args.iters)
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "out of memory"
                    else:
                        row.update(ms=ms, tflops=flops * (1 if mode == "fwd" else 3) / ms / 1e9)
                    if backend == "deeptalk_triton" and row["ms"] is not None:
                        what = "output" if mode == "fwd" else "gradient"
                        checked = deviation(module, x, index, weights, mode)
                        row["note"] = f"max deviation from grouped_mm: {checked:.1e} of the max {what}"
                    results.append(row)
                    if HAS_CUDA:
                        torch.cuda.empty_cache()
                for row in results[group:]:
                    print(format_row(row, results), flush=True)
                save(results, False)
            del module, x, index, weights
    return results


def ratio(row: dict, results: list[dict], baseline: str) -> str:
    """`baseline`'s time over `row`'s on the same problem; `baseline="fastest"`: the fastest transformers backend
    measured there (so a ratio is never only against a weaker baseline), named."""
    same = [
        r
        for r in results
        if (r["shape"], r["tokens"], r["mode"]) == (row["shape"], row["tokens"], row["mode"]) and r["ms"] is not None
    ]
    if baseline == "fastest":
        base = min((r for r in same if r["backend"] != "deeptalk_triton"), key=lambda r: r["ms"], default=None)
    else:
        base = next((r for r in same if r["backend"] == baseline), None)
    if base is None or row["ms"] is None:
        return "-"
    return f"{base['ms'] / row['ms']:.2f}x" + (f" ({base['backend']})" if baseline == "fastest" else "")


def format_row(row: dict, results: list[dict]) -> str:
    ms = f"{row['ms']:.3f}" if row["ms"] is not None else "-"
    tflops = f"{row['tflops']:.1f}" if row["tflops"] is not None else "-"
    return (
        f"| {row['shape']} | {row['tokens']} | {row['mode']} | {row['backend']} | {ms} | {tflops} | "
        f"{ratio(row, results, 'grouped_mm')} | {ratio(row, results, 'batched_mm')} | "
        f"{ratio(row, results, 'fastest')} | {row['note']} |"
    )


HEADER = (
    "| shape | T | mode | backend | ms | TFLOP/s | speed-up vs grouped_mm | speed-up vs batched_mm "
    "| speed-up vs fastest transformers backend | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def write(path: Path, text: str) -> None:
    """The whole of `text`, or the file as it was: a run stopped while writing leaves no half a file."""
    with atomic_output_file(path) as partial:
        partial.write_text(text, encoding="utf-8")


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of a device name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else f"CPU ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        help="subset of the model shapes (CUDA; the CPU smoke run has one)",
    )
    parser.add_argument(
        "--tokens", nargs="+", type=int, help=f"token counts (default {TOKENS} on CUDA, {CPU_TOKENS} on CPU)"
    )
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS, help="experts backends to time")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES, help="forward, forward+backward or both")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement, ms (CUDA)")
    parser.add_argument("--iters", type=int, default=100, help="measurement time per measurement, ms (CUDA)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="folder for moe_kernels_<device>_<dtype>.{json,md} (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    for option in ("shapes", "tokens", "backends", "modes"):  # a repeat would be ratioed against the first run's rows
        if getattr(args, option):
            setattr(args, option, list(dict.fromkeys(getattr(args, option))))
    args.dtype = args.dtype or ("bf16" if HAS_CUDA else "fp32")  # the interpreter's bf16 products are not faithful
    args.tokens = args.tokens or (TOKENS if HAS_CUDA else CPU_TOKENS)  # recorded with the results
    if min(args.tokens) < 1:
        parser.error("--tokens must be positive")
    check_output(parser, "--out", args.out, folder=True)
    if not HAS_CUDA:
        print(
            "No CUDA device: running a tiny smoke configuration on CPU (deeptalk_triton under the Triton interpreter)."
            "\nThese timings say nothing about GPU performance; run on a CUDA GPU for real figures.\n"
        )
    name = device_name()
    print(f"device: {name}, dtype: {args.dtype}, torch {torch.__version__}\n\n{HEADER}")
    stem = args.out / f"moe_kernels_{slug(name)}_{args.dtype}"
    meta = dict(
        device=name,
        dtype=args.dtype,
        torch=torch.__version__,
        cuda=HAS_CUDA,
        date=time.strftime("%Y-%m-%d"),
        versions=versions(),
        args={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
    )

    def save(results: list[dict], complete: bool) -> None:
        table = "\n".join(format_row(row, results) for row in results)
        cut = "" if complete else "**Incomplete: the run stopped before its last problem.**\n\n"
        write(stem.with_suffix(".json"), json.dumps(dict(meta, complete=complete, results=results), indent=1))
        write(
            stem.with_suffix(".md"),
            f"# MoE experts layer benchmark\n\n{name}, {args.dtype}, {meta['date']}; "
            + ", ".join(f"{package} {number}" for package, number in meta["versions"].items())
            + f"\n\n{cut}"
            "TFLOP/s count useful work only (6·H·I FLOPs per routed pair forward, 3x that forward+backward).\n\n"
            f"{HEADER}\n{table}\n",
        )

    save(run(args, save), True)
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
