"""Benchmark (not a test): upcycling a ~0.5B-parameter dense checkpoint disk to disk, against loading and saving the
same checkpoint with transformers.

    PYTHONPATH=src python benchmarks/bench_upcycle.py [--workdir DIR] [--repeats N] [--output PATH] [--size tiny]

The dense model is a random Qwen2-0.5B-shaped model (494M parameters, bf16, tied embeddings) saved in 500MB shards
(`--size tiny`: a 2-layer toy of the same family, which only checks the script end to end).
Every measured step runs in a fresh subprocess that reports its own wall time and peak RSS (`ru_maxrss`), so the
steps do not share memory or warm-up. Goal (issue 5): upcycling within 1.5x the time of transformers' load + save, and
peak memory within 1.5x the largest output shard plus one input shard (RSS includes the interpreter and libraries,
reported separately as the `import` step). Results go to benchmarks/results/bench_upcycle.json.
"""

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import check_output, versions

SHARD = "500MB"
DENSE = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)
SIZES = {
    "qwen2-0.5b": DENSE,
    "tiny": dict(
        DENSE, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
    ),
}
CASES = {
    # Same number of weights as the dense model: 4 quarter-size experts, all picked at step 0.
    "upcycle g4 4x1/4": dict(num_text_experts=4, num_speech_experts=0, num_experts_per_tok=4, granularity=4),
    # A DeepTalk layout: 8 text + 4 speech quarter-size experts, top-4 (3x the dense MLP weights).
    "upcycle g4 8+4 k4": dict(num_text_experts=8, num_speech_experts=4, num_experts_per_tok=4, granularity=4),
}


def child(step: str, source: str, destination: str, options: str) -> None:
    """One measured step in this process; prints a JSON line with its wall time and peak RSS."""
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    import deeptalk_hf

    imported = time.perf_counter()
    if step == "create":
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES[json.loads(options)["size"]], dtype="bfloat16"))
        model.save_pretrained(source, max_shard_size=SHARD)
        result = {}
    elif step == "baseline":
        model = AutoModelForCausalLM.from_pretrained(source)
        model.save_pretrained(destination, max_shard_size=SHARD)
        result = {}
    elif step == "upcycle":
        deeptalk_hf.upcycle_checkpoint(
            source, destination, max_shard_size=SHARD, progress=False, **json.loads(options)
        )
        result = {}
    else:  # "import": the interpreter and libraries alone
        result = {}
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"work_s": end - imported, "process_s": end - start, "peak_rss_bytes": peak, **result}))


def run(step: str, source: Path, destination: Path | None = None, options: dict | None = None) -> dict:
    if destination is not None and destination.exists():
        shutil.rmtree(destination)
    os.sync()  # flush earlier steps' dirty pages, so no step pays for another's writeback
    command = [sys.executable, __file__, "--child", step, str(source), str(destination), json.dumps(options or {})]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:  # its own error, not only its exit status
        raise RuntimeError(f"step {step!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shard_sizes(path: Path) -> list[int]:
    return sorted(f.stat().st_size for f in path.glob("*.safetensors"))


def dense_parameters(path: Path) -> int:
    """The checkpoint's parameter count (a one-shard checkpoint, `--size tiny`, has no index to read it from)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text(encoding="utf-8"))["metadata"]["total_parameters"]
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir",
        default=None,
        help="a new or empty folder for the checkpoints, kept for reruns (default: a temp dir)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per step; the fastest is reported (default: 5)")
    parser.add_argument(
        "--output",
        default=str(Path(__file__).parent / "results" / "bench_upcycle.json"),
        help="results file (default: benchmarks/results/bench_upcycle.json)",
    )
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="qwen2-0.5b",
        help="dense model: Qwen2-0.5B shapes, or a toy (smoke test)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    check_output(parser, "--output", args.output, folder=False)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_upcycle_"))
    # The script replaces the checkpoints it writes there: never a folder of the user's that has other files.
    marker = workdir / ".bench_upcycle"
    if workdir.exists() and not workdir.is_dir():
        parser.error(f"--workdir {workdir} is a file; name a new or empty folder")
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.exists():
        parser.error(f"--workdir {workdir} holds other files; name a new or empty folder (or one this script made)")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    source = workdir / ("dense" if args.size == "qwen2-0.5b" else f"dense_{args.size}")
    try:
        complete = source / ".created"  # a folder left by an interrupted creation is made anew
        if not complete.exists():
            shutil.rmtree(source, ignore_errors=True)
            run("create", source, options={"size": args.size})
            complete.touch()
        input_shards = shard_sizes(source)
        results = {"import": run("import", source)}
        steps = {"transformers load+save": ("baseline", None)} | {name: ("upcycle", o) for name, o in CASES.items()}
        destinations = {name: workdir / f"out{i}" for i, name in enumerate(steps)}
        # The steps take turns, so a change in the machine's state (load, page cache, writeback) hits them alike.
        runs = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, (step, options) in steps.items():
                runs[name].append(run(step, source, destinations[name], options))
        for name, (_, options) in steps.items():
            best = min(runs[name], key=lambda r: r["work_s"])
            output_shards = shard_sizes(destinations[name])
            best |= {
                "runs_work_s": [round(r["work_s"], 2) for r in runs[name]],
                "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in runs[name]),
                "output_bytes": sum(output_shards),
                "largest_output_shard_bytes": output_shards[-1],
                "options": options,
            }
            results[name] = best
        baseline = results["transformers load+save"]
        for name in CASES:
            case = results[name]
            case["time_vs_baseline"] = case["work_s"] / baseline["work_s"]
            budget = case["largest_output_shard_bytes"] + input_shards[-1]
            case["rss_vs_largest_output_plus_input_shard"] = case["peak_rss_bytes_max"] / budget
            case["rss_above_import_vs_shards"] = (
                case["peak_rss_bytes_max"] - results["import"]["peak_rss_bytes"]
            ) / budget
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "load_average_1_5_15min": os.getloadavg(),
            "versions": versions(),
            "args": {key: value for key, value in vars(args).items() if key != "child"},
            "size": args.size,
            "dense_parameters": dense_parameters(source),
            "input_bytes": sum(input_shards),
            "largest_input_shard_bytes": input_shards[-1],
            "shard_size": SHARD,
            "results": results,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        gib = 2**30
        print(f"dense: {report['dense_parameters']} parameters, {report['input_bytes'] / gib:.2f} GiB")
        print(f"{'step':28} {'work s':>8} {'peak RSS GiB':>13} {'output GiB':>11} {'x time':>7} {'x shards':>9}")
        for name, r in results.items():
            print(
                f"{name:28} {r['work_s']:8.2f} {r['peak_rss_bytes'] / gib:13.2f} "
                f"{r.get('output_bytes', 0) / gib:11.2f} {r.get('time_vs_baseline', float('nan')):7.2f} "
                f"{r.get('rss_vs_largest_output_plus_input_shard', float('nan')):9.2f}"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
