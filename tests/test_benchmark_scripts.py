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


def test_bench_moe_kernels_fastest_baseline_is_never_deeptalk_triton_itself(monkeypatch):
    """Where `deeptalk_triton` is the fastest row of a problem, its ratio to the fastest transformers backend is still
    to a transformers backend (named), not 1.00x against itself."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_moe_kernels

    rows = [
        dict(shape="s", tokens=16, mode="fwd", backend=backend, ms=ms, tflops=1.0, note="")
        for backend, ms in (("eager", 3.0), ("batched_mm", 4.0), ("grouped_mm", 2.0), ("deeptalk_triton", 1.0))
    ]
    assert bench_moe_kernels.ratio(rows[-1], rows, "fastest") == "2.00x (grouped_mm)"
    # the baselines' own rows are ratioed against the fastest of them too (grouped_mm: 1.00x itself)
    assert bench_moe_kernels.ratio(rows[0], rows, "fastest") == "0.67x (grouped_mm)"
    # a baseline skipped or out of memory (no time) gives no ratio, and is never the fastest
    rows[2].update(ms=None, tflops=None, note="out of memory")
    assert bench_moe_kernels.ratio(rows[-1], rows, "grouped_mm") == "-"
    assert bench_moe_kernels.ratio(rows[-1], rows, "fastest") == "3.00x (eager)"
    assert "| out of memory |" in bench_moe_kernels.format_row(rows[2], rows)


def test_bench_moe_kernels_counts_the_useful_flops_of_each_mode(monkeypatch, tmp_path, capsys):
    """TFLOP/s = 6·H·I FLOPs per routed (token, slot) pair forward (gate_up 2·H·2I + down 2·I·H), three times that
    forward+backward, over the measured milliseconds; the forward+backward step computes the four gradients the
    docstring names (hidden states, both expert weights, routing weights)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_moe_kernels

    hidden, inter, experts, top_k = bench_moe_kernels.CPU_SHAPES["tiny"]
    problem = bench_moe_kernels.make_problem(hidden, inter, experts, top_k, 4, torch.float32, torch.device("cpu"))
    gradients = bench_moe_kernels.make_step(*problem, "grouped_mm", "fwd+bwd")()
    module, x, index, weights = problem
    assert index.shape == weights.shape == (4, top_k)  # the routed pairs the FLOPs count
    assert all(len(set(row)) == top_k for row in index.tolist())
    assert [g.shape for g in gradients] == [x.shape, module.gate_up_proj.shape, module.down_proj.shape, weights.shape]
    assert all(g.abs().sum() > 0 for g in gradients)

    with pytest.raises(SystemExit):  # no routed pairs, no FLOPs: refused before any problem is built
        bench_moe_kernels.main(["--tokens", "4", "0", "--out", str(tmp_path)])
    assert "--tokens must be positive" in capsys.readouterr().err
    monkeypatch.setattr(bench_moe_kernels, "bench_one", lambda *args, **kwargs: 2.0)  # 2 ms each
    bench_moe_kernels.main(["--tokens", "4", "--backends", "grouped_mm", "--out", str(tmp_path)])
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    flops = 6 * hidden * inter * 4 * top_k
    tflops = {row["mode"]: row["tflops"] for row in record["results"]}
    assert tflops["fwd"] == pytest.approx(flops / 2e-3 / 1e12)
    assert tflops["fwd+bwd"] == pytest.approx(3 * flops / 2e-3 / 1e12)


def test_bench_model_ratios_are_deeptalk_over_qwen3_moe_in_tokens_per_second(monkeypatch, tmp_path):
    """With the timings given (no clock): tokens/s = tokens processed / fastest seconds (batch x seq-len for fwd+bwd,
    the generated tokens for decode), and the recorded ratio is DeepTalk's over Qwen3-MoE's (> 1: DeepTalk faster);
    the two models get the same experts backend, Qwen3-MoE 2E experts, and a batch of text and speech runs; the load
    average is recorded (docs/benchmarks.md); the results file's folder is made."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_model

    timed = bench_model.timed
    seconds = iter([{"deeptalk": 0.5, "qwen3_moe": 1.0}, {"deeptalk": 4.0, "qwen3_moe": 2.0}])  # train, then decode
    balanced = {}  # the training step of each model computes its router balancing loss (the same work)
    for cls in (bench_model.DeepTalkForCausalLM, bench_model.Qwen3MoeForCausalLM):

        def forward(self, *args, real=cls.forward, **kwargs):
            out = real(self, *args, **kwargs)
            if self.training:
                balanced[type(self).__name__] = out.aux_loss is not None and out.loss.requires_grad
            return out

        monkeypatch.setattr(cls, "forward", forward)

    def fake_timed(fns, repeats, device):
        for fn in fns.values():  # each step runs once, untimed
            fn()
        return next(seconds)

    monkeypatch.setattr(bench_model, "timed", fake_timed)
    out = tmp_path / "new" / "model.json"
    arguments = ["--hidden", "64", "--expert-size", "32", "--experts", "2", "--layers", "1", "--vocab", "256"]
    arguments += ["--batch", "2", "--seq-len", "32", "--decode-tokens", "8", "--device", "cpu", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["bench_model.py", *arguments])
    bench_model.main()
    record = json.loads(out.read_text())
    assert record["results"]["deeptalk"] == {"train_tokens_per_s": 64 / 0.5, "decode_tokens_per_s": 8 / 4.0}
    assert record["results"]["qwen3_moe"] == {"train_tokens_per_s": 64 / 1.0, "decode_tokens_per_s": 8 / 2.0}
    assert record["ratio_deeptalk_over_qwen3_moe"] == {"train_tokens_per_s": 2.0, "decode_tokens_per_s": 0.5}
    assert len(record["load_average"]) == 3
    assert balanced == {"DeepTalkForCausalLM": True, "Qwen3MoeForCausalLM": True}

    # `timed` itself, on a fake clock: one untimed warm-up call each, then the functions take turns; the fastest counts
    from types import SimpleNamespace

    clock, calls = [0.0], []

    def step(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds.pop(0)

        return run

    monkeypatch.setattr(bench_model, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    fns = {"a": step("a", [0.5, 3.0, 1.0, 2.0]), "b": step("b", [0.1, 4.0, 5.0, 6.0])}
    assert timed(fns, 3, "cpu") == pytest.approx({"a": 1.0, "b": 4.0})
    assert calls == ["a", "b"] * 4

    args = bench_model.argparse.Namespace(
        vocab=256, hidden=64, expert_size=32, layers=1, top_k=2, experts=2, backend="eager", device="cpu"
    )
    models = bench_model.build(args)
    deeptalk, qwen = models["deeptalk"].config, models["qwen3_moe"].config
    assert qwen.num_experts == 2 * deeptalk.num_experts == 2 * deeptalk.num_speech_experts == 4
    assert deeptalk._experts_implementation == qwen._experts_implementation == "eager"
    batch = bench_model.mixed_batch(bench_model.argparse.Namespace(vocab=256, batch=2, seq_len=64, device="cpu"))
    is_speech = batch >= deeptalk.speech_token_start
    assert is_speech.float().mean() == 0.5 and not is_speech[:, :16].any() and is_speech[:, 16:32].all()


def test_bench_upcycle_ratios_from_the_steps_it_measured(monkeypatch, tmp_path):
    """With the steps' measurements given (no subprocess, no clock): each step reports its fastest run, the time ratio
    is upcycle / transformers' load+save (> 1: slower than the baseline), and the memory ratio is the largest peak RSS
    over the runs against the largest output shard plus the largest input shard (above the import's RSS in the
    second ratio)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_upcycle

    calls = {}

    def run(step, source, destination=None, options=None):
        if step == "create":
            source.mkdir(parents=True)
        count = calls[step, json.dumps(options)] = calls.get((step, json.dumps(options)), 0) + 1
        work = {"baseline": [2.0, 1.0], "upcycle": [1.5, 3.0]}.get(step, [0.0])[count - 1]
        rss = {"import": [100], "baseline": [400, 300]}.get(step, [500, 900])[count - 1]
        return {"work_s": work, "process_s": work + 1, "peak_rss_bytes": rss}

    monkeypatch.setattr(bench_upcycle, "run", run)
    monkeypatch.setattr(bench_upcycle, "shard_sizes", lambda path: [100, 300] if "dense" in path.name else [50, 200])
    monkeypatch.setattr(bench_upcycle, "dense_parameters", lambda path: 7)
    out = tmp_path / "upcycle.json"
    command = ["bench_upcycle.py", "--size", "tiny", "--repeats", "2", "--workdir", str(tmp_path / "w")]
    monkeypatch.setattr(sys, "argv", [*command, "--output", str(out)])
    bench_upcycle.main()
    record = json.loads(out.read_text())
    assert len(record["load_average_1_5_15min"]) == 3 and record["dense_parameters"] == 7
    results = record["results"]
    baseline = results["transformers load+save"]
    assert (baseline["work_s"], baseline["peak_rss_bytes"], baseline["peak_rss_bytes_max"]) == (1.0, 300, 400)
    for case in bench_upcycle.CASES:
        result = results[case]
        assert (result["work_s"], result["peak_rss_bytes"], result["peak_rss_bytes_max"]) == (1.5, 500, 900)
        assert result["time_vs_baseline"] == pytest.approx(1.5)
        assert result["largest_output_shard_bytes"] == 200 and result["output_bytes"] == 250
        assert result["rss_vs_largest_output_plus_input_shard"] == pytest.approx(900 / (200 + 300))
        assert result["rss_above_import_vs_shards"] == pytest.approx((900 - 100) / (200 + 300))

    # Without --workdir its temporary folder (GiBs of checkpoints at the default size) is removed at the end; a dense
    # checkpoint whose creation was cut short (no `.created`) is made anew.
    temporary = tmp_path / "temporary"
    monkeypatch.setattr(bench_upcycle.tempfile, "mkdtemp", lambda prefix: temporary.mkdir() or str(temporary))
    monkeypatch.setattr(sys, "argv", [*command[:-2], "--output", str(out)])
    calls.clear()
    bench_upcycle.main()
    assert not temporary.exists()
    (tmp_path / "w" / "dense_tiny" / ".created").unlink()
    (tmp_path / "w" / "dense_tiny" / "half_written.safetensors").write_text("")
    monkeypatch.setattr(sys, "argv", [*command, "--output", str(out)])
    calls.clear()
    bench_upcycle.main()
    assert ("create", json.dumps({"size": "tiny"})) in calls
    assert not (tmp_path / "w" / "dense_tiny" / "half_written.safetensors").exists()


def test_bench_latency_times_the_first_event_of_each_kind_and_reports_medians(monkeypatch, tmp_path):
    """On a clock that ticks once per reading: each `first_*_s` is the time of the first event of its kind (not the
    last), `prompt_to_first_audio_s` the part after the prompt was prepared; over `--runs` the file reports each key's
    median, after one warm-up run per mode that is not reported, the modes taking turns run by run."""
    from types import SimpleNamespace

    from deeptalk_hf import AudioChunk, SpeechChunk, TextDelta

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_latency

    ticks = iter(range(1, 100))
    monkeypatch.setattr(bench_latency, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    audio = AudioChunk(0, torch.zeros(1), 24000)
    events = [TextDelta("a"), TextDelta("b"), SpeechChunk(0, [1]), audio, SpeechChunk(0, [2]), audio]
    model = SimpleNamespace(generate=lambda **kwargs: None)
    timings = bench_latency.stream_answer(model, iter(events), 0.0, 0.5)
    assert timings == {
        "prepare_s": 0.5,
        "first_text_s": 1.0,
        "first_unit_s": 3.0,
        "first_audio_s": 4.0,
        "answer_total_s": 7.0,
        "prompt_to_first_audio_s": 3.5,
    }

    order = []
    fixed = {"prepare_s": 0.5, "answer_total_s": 9.0, "prompt_tokens": 10, "answer_tokens": 3}

    def fake_run(values, name):
        def run(*args):
            order.append(name)
            first = values.pop(0)
            return dict(fixed, first_audio_s=first, prompt_to_first_audio_s=first - 0.5)

        return run

    fake_model = SimpleNamespace(
        device=torch.device("cpu"), config=SimpleNamespace(num_hidden_layers=1, audio_stream_delays=[1]),
        parameters=lambda: [torch.zeros(3)],
    )  # fmt: skip
    codec = SimpleNamespace(units_per_frame=7, frame_rate=12.0)
    monkeypatch.setattr(bench_latency, "build", lambda args: (None, fake_model, codec))
    monkeypatch.setattr(bench_latency, "new_parallel_model", lambda *args: fake_model)
    monkeypatch.setattr(bench_latency, "breakdown", lambda *args: {"decode_step_s": 0.1})
    # runs 9, 2, 1 (after the warm-up's 100): median 2, mean 4
    monkeypatch.setattr(bench_latency, "run_once", fake_run([100.0, 9.0, 2.0, 1.0], "single"))
    monkeypatch.setattr(bench_latency, "run_parallel_once", lambda *args: fake_run([0.5], ("parallel", args[-1]))())
    monkeypatch.setattr(sys, "argv", ["bench_latency.py", "--runs", "3", "--parallel", "--out", str(tmp_path)])
    bench_latency.main()
    record = json.loads((tmp_path / "latency_cpu_tiny_text_then_speech_parallel.json").read_text())
    assert record["median_of_runs"] == dict(fixed, first_audio_s=2.0, prompt_to_first_audio_s=1.5)
    assert [run["first_audio_s"] for run in record["runs"]] == [9.0, 2.0, 1.0]
    assert order == ["single", ("parallel", False), ("parallel", True)] * 4
    parallel = record["parallel"]["median_of_runs"]
    assert set(parallel) == {"parallel", "parallel_batch_parallel"}
    assert all(m["first_audio_s"] == 0.5 for m in parallel.values())
    assert len(record["load_average"]) == 3


def test_results_name_the_commit_and_whether_it_had_uncommitted_changes(monkeypatch, tmp_path, capsys):
    """`versions()`'s commit is the checkout's short commit, `+dirty` once a tracked file changes (an untracked file
    is no change to the code that ran); and an output named as a file that is a folder, or as a folder that is a
    file, is refused before the run."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_info

    repo = tmp_path / "checkout"
    (repo / "deeptalk_hf").mkdir(parents=True)
    (repo / "deeptalk_hf" / "__init__.py").write_text("")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    spec = SimpleNamespace(origin=str(repo / "deeptalk_hf" / "__init__.py"))
    monkeypatch.setattr(run_info, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: spec)))
    found = run_info.versions()
    assert found["deeptalk-hf commit"] == commit
    if sys.platform == "linux":  # docs/benchmarks.md: the Triton version too, where installed
        from importlib.metadata import version

        assert found["triton"] == version("triton")
    (repo / "notes.txt").write_text("untracked")
    assert run_info.source_commit() == commit
    (repo / "deeptalk_hf" / "__init__.py").write_text("x = 1")
    assert run_info.source_commit() == commit + "+dirty"

    parser = run_info.argparse.ArgumentParser()
    for path, folder, message in ((tmp_path, False, "is a folder; name a file"), (spec.origin, True, "is a file")):
        with pytest.raises(SystemExit):
            run_info.check_output(parser, "--out", path, folder=folder)
        assert message in capsys.readouterr().err
    run_info.check_output(parser, "--out", tmp_path / "new" / "deeper", folder=True)  # made at the end
    run_info.check_output(parser, "--out", tmp_path / "new" / "file.json", folder=False)


def test_bench_moe_kernels_a_write_cut_short_leaves_the_previous_file(monkeypatch, tmp_path):
    """The results are rewritten after each problem: a run stopped while writing keeps the previous whole file, not
    half of the new one, and leaves no partial file beside it."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_moe_kernels

    path = tmp_path / "moe_kernels_cpu_fp32.json"
    path.write_text("previous")

    def cut(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        bench_moe_kernels.write(path, "the new results")
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_profile_moe_kernels_profiles_the_steps_asked_for_after_a_warm_up(monkeypatch, tmp_path):
    """`--steps` steps are profiled after one unprofiled warm-up step (autotuning stays out of the tables), and each
    table lists `--rows` kernels sorted by their own time."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_moe_kernels

    calls = []
    make_step = profile_moe_kernels.make_step

    def counted(*args):
        step = make_step(*args)

        def run():
            calls.append(profile_moe_kernels.torch.autograd.profiler._is_profiler_enabled)
            return step()

        return run

    monkeypatch.setattr(profile_moe_kernels, "make_step", counted)
    options = ["--backends", "grouped_mm", "--modes", "fwd", "--steps", "2", "--rows", "3", "--out", str(tmp_path)]
    profile_moe_kernels.main(options)
    assert calls == [False, True, True]
    lines = next(tmp_path.glob("moe_profile_*.txt")).read_text().splitlines()
    title = lines.index("=== grouped_mm fwd (2 steps) ===")
    rows = [line.split() for line in lines[title + 4 : title + 7]]
    assert lines[title + 7].startswith("-----") and lines[title + 2].split()[1:3] == ["Self", "CPU"]
    self_percent = [float(row[1].rstrip("%")) for row in rows]
    assert self_percent == sorted(self_percent, reverse=True)


def test_bench_latency_breakdown_times_one_decode_step_and_one_audio_chunk(monkeypatch):
    """Where the time goes: a decode step is the median of the `--decode-steps` steps timed alone (not their sum),
    and the codec decode is of one streamed chunk, `--audio-chunk-frames` frames of every SNAC level (not the whole
    question)."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_latency

    # `timed` itself, on a fake clock: the median of the calls (1, 3, 9 s: not the first, last, fastest or mean)
    clock, durations = [0.0], iter([1.0, 3.0, 9.0])

    def call():
        clock[0] += next(durations)
        return "result"

    monkeypatch.setattr(bench_latency, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert bench_latency.timed(call, torch.device("cpu"), repeats=3) == ("result", 3.0)

    step_seconds = [0.9, 0.1, 0.2]  # median 0.2 (mean 0.4, sum 1.2)
    decoded = []

    def timed(fn, device, repeats=1):
        result = fn()
        return result, step_seconds.pop(0) if isinstance(fn, bench_latency.partial) else 9.0

    out = SimpleNamespace(cache="cache", logits=torch.zeros(1, 1, 4))
    model = type("Model", (), {"device": torch.device("cpu"), "__call__": lambda self, **kwargs: out})()
    codes = [torch.arange(10), torch.arange(20), torch.arange(40)]  # SNAC's three levels: 1, 2 and 4 codes a frame
    codec = SimpleNamespace(
        encode=lambda audio, rate: codes,
        to_units=lambda codes: torch.zeros(7, dtype=torch.long),
        frame_levels=[0, 1, 2, 2, 1, 2, 2],
        decode=lambda chunk: decoded.append([len(c) for c in chunk]),
    )
    processor = lambda **kwargs: SimpleNamespace(to=lambda device: {"input_ids": torch.zeros(1, 3)})  # noqa: E731
    monkeypatch.setattr(bench_latency, "timed", timed)
    args = SimpleNamespace(runs=1, decode_steps=3, audio_chunk_frames=2, question_seconds=0.1)
    stages = bench_latency.breakdown(args, processor, model, codec)
    assert stages["decode_step_s"] == pytest.approx(0.2)
    assert decoded == [[2, 4, 8]]
