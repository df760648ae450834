"""The benchmark scripts run end to end on CPU at tiny sizes (the kernel ones in smoke mode: Triton interpreter) and
write their results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the deeptalk_triton backend needs Triton (Linux)")


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def assert_records_its_run(record: dict) -> None:
    """A results file names the versions that produced it (torch alone does not say which transformers it timed)."""
    assert {"python", "torch", "transformers", "deeptalk-hf"} <= set(record["versions"])


def test_bench_moe_kernels_writes_every_backend_and_mode(tmp_path):
    """A repeated option is run once (a repeat's ratios were against the first run's rows)."""
    backends = ["grouped_mm", "deeptalk_triton", "grouped_mm"]
    run("bench_moe_kernels.py", "--tokens", "16", "16", "--backends", *backends, "--out", str(tmp_path))
    (result,) = tmp_path.glob("moe_kernels_*_fp32.json")
    record = json.loads(result.read_text())
    assert_records_its_run(record)
    assert record["args"]["tokens"] == [16] and record["args"]["backends"] == backends[:2] and record["complete"]
    rows = record["results"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (backend, mode) for backend in ("grouped_mm", "deeptalk_triton") for mode in ("fwd", "fwd+bwd")
    }
    assert all(r["ms"] > 0 for r in rows)
    # The triton rows carry their deviation from grouped_mm on the same problem (fp32 interpreter: tiny), over the
    # output forward and over the gradients forward+backward.
    for mode, what in (("fwd", "output"), ("fwd+bwd", "gradient")):
        note = next(r for r in rows if r["backend"] == "deeptalk_triton" and r["mode"] == mode)["note"]
        assert float(note.split(": ")[1].split()[0]) < 1e-4 and note.endswith(f"of the max {what}")
    assert result.with_suffix(".md").read_text().count("| tiny | 16 |") == 4


def test_profile_moe_kernels_writes_one_table_per_backend_and_mode(tmp_path):
    run("profile_moe_kernels.py", "--steps", "1", "--modes", "fwd", "fwd+bwd", "--out", str(tmp_path))
    (result,) = tmp_path.glob("moe_profile_*_tiny_64.txt")
    text = result.read_text()
    assert "torch 2." in text.splitlines()[0] and "transformers " in text.splitlines()[0]
    for backend in ("grouped_mm", "deeptalk_triton"):
        for mode in ("fwd", "fwd+bwd"):
            assert f"=== {backend} {mode} (1 steps) ===" in text


def test_bench_model_writes_its_ratios(tmp_path):
    out = tmp_path / "model.json"
    arguments = ["--hidden", "64", "--expert-size", "32", "--experts", "2", "--layers", "1", "--vocab", "256"]
    run("bench_model.py", *arguments, "--seq-len", "32", "--decode-tokens", "2", "--repeats", "1", "--out", str(out))
    record = json.loads(out.read_text())
    assert set(record["ratio_deeptalk_over_qwen3_moe"]) == {"train_tokens_per_s", "decode_tokens_per_s"}
    assert record["args"]["out"] == str(out)
    assert_records_its_run(record)


def test_bench_upcycle_writes_its_ratios(tmp_path):
    out = tmp_path / "upcycle.json"
    run(
        "bench_upcycle.py",
        "--size",
        "tiny",
        "--repeats",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--output",
        str(out),
    )
    record = json.loads(out.read_text())
    assert record["size"] == "tiny" and record["args"]["repeats"] == 1
    assert_records_its_run(record)
    for case in ("upcycle g4 4x1/4", "upcycle g4 8+4 k4"):
        result = record["results"][case]
        assert result["time_vs_baseline"] > 0 and result["rss_vs_largest_output_plus_input_shard"] > 0
        assert result["output_bytes"] > 0


def test_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path):
    """A run of minutes (forgetting: eleven) must not end by failing to write its results."""
    (tmp_path / "a_file").write_text("")
    for script, option in (("forgetting.py", "--out"), ("bench_model.py", "--out"), ("bench_upcycle.py", "--output")):
        target = tmp_path / "a_file" / "results"
        done = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), option, str(target)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2 and "a_file is a file, not a folder" in done.stderr, (script, done.stderr[-500:])


def test_bench_moe_kernels_times_only_the_backends_asked_for(tmp_path):
    """bf16 under the interpreter is refused by deeptalk_triton: left out, it must not run (it ran for its deviation)."""
    arguments = ["--tokens", "4", "--dtype", "bf16", "--backends", "grouped_mm", "eager", "--modes", "fwd"]
    run("bench_moe_kernels.py", *arguments, "--out", str(tmp_path))
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {row["backend"] for row in record["results"]} == {"grouped_mm", "eager"}


def test_bench_upcycle_refuses_a_workdir_of_the_users(tmp_path):
    """It replaces the `dense*`/`out*` folders it writes: a folder with other files was not made by it."""
    (tmp_path / "out0").mkdir()
    (tmp_path / "out0" / "notes.txt").write_text("mine")
    command = [sys.executable, str(BENCHMARKS / "bench_upcycle.py"), "--size", "tiny", "--workdir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2 and "holds other files" in done.stderr
    assert (tmp_path / "out0" / "notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("mine")
    command[-1] = str(tmp_path / "a_file")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2 and "is a file; name a new or empty folder" in done.stderr
    # bench_latency's counts are usage errors too, before any model is built.
    for option, value in (("--audio-chunk-frames", "0"), ("--num-layers", "-1")):
        command = [sys.executable, str(BENCHMARKS / "bench_latency.py"), option, value, "--out", str(tmp_path)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        assert (
            done.returncode == 2 and "--audio-chunk-frames must be at least 1, --num-layers at least 0" in done.stderr
        )


def test_bench_latency_writes_every_mode(tmp_path):
    arguments = ["--question-seconds", "0.2", "--units", "7", "--text-tokens", "1", "--audio-chunk-frames", "1"]
    run("bench_latency.py", *arguments, "--runs", "1", "--decode-steps", "1", "--parallel", "--out", str(tmp_path))
    record = json.loads((tmp_path / "latency_cpu_tiny_text_then_speech_parallel.json").read_text())
    assert record["median_of_runs"]["first_audio_s"] > 0
    assert_records_its_run(record)
    assert set(record["parallel"]["median_of_runs"]) == {"parallel", "parallel_batch_parallel"}
    assert all(m["first_audio_s"] > 0 for m in record["parallel"]["median_of_runs"].values())


def test_bench_latency_refuses_units_that_are_not_whole_frames():
    script = [sys.executable, str(BENCHMARKS / "bench_latency.py"), "--units", "8"]
    done = subprocess.run(script, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 2 and "--units must be a positive multiple of 7" in done.stderr


def test_bench_moe_kernels_checks_the_gradients_it_times_and_keeps_a_cut_run(monkeypatch, tmp_path):
    """A backward that doubles every gradient shows in the deviation (it checked the forward output alone); a run
    stopped after its first problem leaves that problem's rows, marked incomplete (it left no file)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_moe_kernels

    class Doubled(torch.autograd.Function):
        forward = staticmethod(lambda ctx, x: x.view_as(x))
        backward = staticmethod(lambda ctx, grad: 2 * grad)

    def doubled_backward(module, x, *args, **kwargs):
        return grouped_mm_experts_forward(module, Doubled.apply(x), *args, **kwargs)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "deeptalk_triton", doubled_backward)
    problem = bench_moe_kernels.make_problem(64, 32, 8, 2, 16, torch.float32, torch.device("cpu"))
    assert bench_moe_kernels.deviation(*problem, "fwd") < 1e-6
    assert bench_moe_kernels.deviation(*problem, "fwd+bwd") > 0.5  # the input gradient, doubled

    timed = []

    def bench_one(*args, **kwargs):
        timed.append(args[0])
        if len(timed) > 1:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(bench_moe_kernels, "bench_one", bench_one)
    options = ["--tokens", "4", "8", "--backends", "grouped_mm", "--modes", "fwd", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench_moe_kernels.main(options)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert not record["complete"] and [row["tokens"] for row in record["results"]] == [4]
    assert "Incomplete" in next(tmp_path.glob("*.md")).read_text()
    assert not list(tmp_path.glob(".*"))  # no partial file left


def test_bench_moe_kernels_ratio_is_also_against_the_fastest_baseline(monkeypatch):
    """Where `eager` beats `grouped_mm` and `batched_mm` (Mixtral's few large experts come close on an H200), the table
    still gives deeptalk_triton's ratio to the strongest baseline of the run, not only to weaker ones."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_moe_kernels

    rows = [
        dict(shape="s", tokens=16, mode="fwd", backend=backend, ms=ms, tflops=1.0, note="")
        for backend, ms in (("eager", 1.0), ("batched_mm", 4.0), ("grouped_mm", 2.0), ("deeptalk_triton", 1.6))
    ]
    line = bench_moe_kernels.format_row(rows[-1], rows)
    assert "| 1.25x | 2.50x | 0.62x (eager) |" in line
    assert bench_moe_kernels.HEADER.splitlines()[0].count("|") == line.count("|")


@pytest.mark.parametrize(
    "script",
    [
        "bench_model.py",
        "bench_moe_kernels.py",
        "profile_moe_kernels.py",
        "bench_upcycle.py",
        "bench_latency.py",
        "forgetting.py",
    ],
)
def test_help_describes_every_option(script):
    """`--help` says what each option does (what `--out` is, a file or a folder; what `--repeats` reports), not only
    its name."""
    lines = run(script, "--help").split("options:\n", 1)[1].splitlines()
    undescribed = []
    for number, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        invocation, _, described = line.strip().partition("  ")
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if not described.strip() and not (following.startswith("      ") and not following.strip().startswith("-")):
            undescribed.append(invocation)
    assert not undescribed, f"{script} --help describes none of {undescribed}"
