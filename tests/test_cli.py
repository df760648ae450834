"""The console scripts `deeptalk-upcycle` and `deeptalk-profile`: results, help, exit codes."""

import importlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import torch
from huggingface_hub import utils as hub_utils
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import deeptalk_hf  # noqa: F401  (registers the Auto classes)
from deeptalk_hf import (
    DeepTalkConfig,
    DeepTalkForCausalLM,
    DeepTalkForConditionalGeneration,
    ModalityLoad,
    assign_modality_experts,
    cli,
    profile_modality_load,
    upcycle_checkpoint,
    upcycle_dense,
)
from deeptalk_hf.cli import (
    EXIT_EXISTS,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_SOURCE,
    EXIT_USAGE,
    _run,
    profile_main,
    profile_parser,
    read_jsonl_batches,
    upcycle_main,
    upcycle_parser,
)
from deeptalk_hf.upcycling import atomic_output_dir

sys.path.insert(0, str(Path(__file__).parent))
from test_upcycling import (  # noqa: E402
    ARCHITECTURES,
    create_while_writing,
    dense_model,
    fake_hub,
    load_checked,
    max_diff,
    save_dense,
    text_ids,
)

from .test_audio_model import whisper_audio_config  # noqa: E402

ROOT = Path(__file__).parents[1]
TEXT_VOCAB, SPEECH_VOCAB = 64, 16


def test_console_scripts_are_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "deeptalk-upcycle": "deeptalk_hf.cli:upcycle_main",
        "deeptalk-profile": "deeptalk_hf.cli:profile_main",
    }
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("parser", [upcycle_parser(), profile_parser()], ids=["upcycle", "profile"])
def test_help_explains_every_option(parser, capsys):
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.dest
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes" in text and all(
        option in text for action in parser._actions for option in action.option_strings
    )


@pytest.mark.parametrize("granularity", [1, 2])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_cli_upcycled_checkpoint_is_the_dense_model(kind, granularity, tmp_path):
    dense = dense_model(kind)
    source = save_dense(dense, tmp_path / "dense")
    arguments = [str(source), str(tmp_path / "moe"), "--num-text-experts", str(4 * granularity)]
    arguments += ["--num-speech-experts", str(2 * granularity), "--top-k", str(2 * granularity)]
    arguments += ["--granularity", str(granularity), "--max-shard-size", "50KB", "--quiet"]
    assert upcycle_main(arguments) == EXIT_OK
    moe, info = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # every expert option reached the model (the expert counts do not show in text logits)
    mlp = moe.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.shape[0] == 4 * granularity and moe.config.num_experts_per_tok == 2 * granularity
    assert mlp.speech_experts.gate_up_proj.shape[0] == 2 * granularity
    ids = text_ids()
    with torch.no_grad():
        assert max_diff(moe(ids).logits, dense(ids).logits) <= 1e-5
    prompt = ids[:, :6]
    assert torch.equal(
        moe.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
        dense.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0),
    )


def test_cli_every_dense_option_reaches_the_upcycling(tmp_path):
    """Each option off its default gives what `upcycle_dense` gives with it (a dropped option would fall back to the
    function's default silently), and another seed gives other weights."""
    dense = dense_model("mistral")
    source = save_dense(dense, tmp_path / "dense")
    arguments = [str(source), str(tmp_path / "moe"), "--num-text-experts", "4", "--num-speech-experts", "2"]
    arguments += ["--top-k", "2", "--granularity", "3", "--shared-experts", "1", "--mlp-only-layers", "1"]
    arguments += ["--init-noise", "0.01", "--drop-fraction", "0.25", "--seed", "5", "--speech-vocab-size", "8"]
    assert upcycle_main([*arguments, "--quiet"]) == EXIT_OK
    streamed = load_checked(tmp_path / "moe").state_dict()
    options = dict(num_text_experts=4, num_speech_experts=2, num_experts_per_tok=2, granularity=3,
                   num_shared_experts=1, mlp_only_layers=[1], init_noise=0.01, drop_fraction=0.25,
                   speech_vocab_size=8)  # fmt: skip
    expected = upcycle_dense(dense, seed=5, **options).state_dict()
    assert streamed.keys() == expected.keys()
    for name in streamed:
        assert torch.equal(streamed[name], expected[name]), name
    other_seed = upcycle_dense(dense, seed=0, **options).state_dict()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(streamed[name], other_seed[name])


def test_cli_unexpected_error_exits_1_with_its_traceback(tmp_path, monkeypatch, capsys):
    """A failure that is not a usage or source error (a full disk, a bug) is not reported as bad arguments (2)."""
    source = save_dense(dense_model("llama"), tmp_path / "dense")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("deeptalk_hf.cli.upcycle_checkpoint", disk_full)
    arguments = [str(source), str(tmp_path / "moe"), "--num-text-experts", "2", "--top-k", "1", "--quiet"]
    assert upcycle_main(arguments) == EXIT_FAILURE
    error = capsys.readouterr().err
    assert "Traceback" in error and "deeptalk-upcycle: error: OSError: [Errno 28] No space left on device" in error


def test_cli_hub_source_converts_the_commit_it_checked(tmp_path, monkeypatch):
    """The weights and configs come from the snapshot whose config was checked, not from the branch asked for, which
    may have moved on since."""
    repo = save_dense(dense_model("llama"), tmp_path / "repo")
    calls = fake_hub(repo, tmp_path / "cache", monkeypatch)
    arguments = ["org/dense", str(tmp_path / "moe"), "--num-text-experts", "2", "--top-k", "1", "--revision", "main"]
    assert upcycle_main([*arguments, "--quiet"]) == EXIT_OK
    revisions = [revision for _, revision, _ in calls]
    assert revisions[0] == "main" and set(revisions[1:]) == {"0123abcd"}, calls
    assert (tmp_path / "moe" / "config.json").is_file()


def test_upcycle_exit_codes(tmp_path, capsys):
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    destination = tmp_path / "moe"
    base = ["--num-text-experts", "2", "--top-k", "1", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:  # a required option is missing (the usage line lists them all)
        upcycle_main([str(source), str(destination)])
    assert exit_info.value.code == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1].endswith("needs --num-text-experts and --top-k")
    with pytest.raises(SystemExit) as exit_info:  # --top-k alone missing: named alone
        upcycle_main([str(source), str(destination), "--num-text-experts", "2", "--quiet"])
    assert exit_info.value.code == EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1].endswith("upcycling it needs --top-k")
    assert upcycle_main([str(source), str(destination), *base, "--granularity", "5"]) == EXIT_USAGE
    assert "granularity=5" in capsys.readouterr().err
    for size in ("0KB", "-5KB", "5XB"):  # sizes as transformers reads them, positive
        with pytest.raises(SystemExit) as exit_info:
            upcycle_main([str(source), str(destination), *base, "--max-shard-size", size])
        assert exit_info.value.code == EXIT_USAGE and "argument --max-shard-size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_shard_size=0 must be a positive size"):
        upcycle_checkpoint(source, destination, num_text_experts=2, num_speech_experts=0, num_experts_per_tok=1,
                           max_shard_size=0)  # fmt: skip
    assert not destination.exists()
    layouts = {}
    for size in ("60000", "60KB", "40960", "40KiB"):  # a number of bytes, as the Python API takes it, or with a unit
        assert upcycle_main([str(source), str(destination), *base, "--max-shard-size", size]) == EXIT_OK
        layouts[size] = json.loads((destination / "model.safetensors.index.json").read_text())["weight_map"]
        shutil.rmtree(destination)
    assert layouts["60000"] == layouts["60KB"] != layouts["40960"] == layouts["40KiB"]
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)).save_pretrained(gpt2)
    assert upcycle_main([str(gpt2), str(destination), *base]) == EXIT_SOURCE
    assert "'gpt2'" in capsys.readouterr().err
    assert upcycle_main([str(tmp_path / "nowhere"), str(destination), *base]) == EXIT_SOURCE
    unknown = tmp_path / "unknown"
    shutil.copytree(source, unknown)
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    assert upcycle_main([str(unknown), str(destination), *base]) == EXIT_SOURCE
    # A config.json whose values transformers or the model refuses is a source that cannot be used (exit 3), not a
    # traceback (exit 1) nor a checkpoint that cannot be loaded again.
    config = json.loads((source / "config.json").read_text())
    for edit, message in [
        (None, "NoneType"),
        ({"hidden_size": "abc"}, "hidden_size"),
        ({"hidden_act": "nope"}, "hidden_act='nope'"),
        ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1.0}}, "rope_type='bogus'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1.0}}, "'factor'"),  # transformers: a KeyError
        ({"dtype": "int8"}, "dtype=torch.int8 is not a weights dtype"),
        ({"vocab_size": -5}, "{'vocab_size': -5} must be positive"),
        ({"hidden_size": 0, "num_hidden_layers": 0}, "{'hidden_size': 0, 'num_hidden_layers': 0} must be positive"),
        (
            {"num_attention_heads": -2, "num_key_value_heads": 0},
            "'num_attention_heads': -2, 'num_key_value_heads': 0}",
        ),
        ({"num_key_value_heads": 3}, "not a multiple of its num_key_value_heads=3"),
    ]:
        (unknown / "config.json").write_text(json.dumps(None if edit is None else config | edit))
        assert upcycle_main([str(unknown), str(destination), *base]) == EXIT_SOURCE, edit
        assert message in capsys.readouterr().err
    (tmp_path / "weights_only").mkdir()
    for weights in source.glob("model*.safetensors*"):
        shutil.copy(weights, tmp_path / "weights_only")
    assert upcycle_main([str(tmp_path / "weights_only"), str(destination), *base]) == EXIT_SOURCE
    assert "weights_only has no config.json" in capsys.readouterr().err
    assert not destination.exists()
    capsys.readouterr()
    assert upcycle_main([str(source), str(destination), *base]) == EXIT_OK
    assert "Converting" not in capsys.readouterr().err  # --quiet
    assert upcycle_main([str(source), str(destination), *base]) == EXIT_EXISTS
    assert "--overwrite" in capsys.readouterr().err
    assert upcycle_main([str(source), str(destination), *base, "--overwrite", "--dtype", "bfloat16"]) == EXIT_OK
    assert json.loads((destination / "config.json").read_text())["dtype"] == "bfloat16"
    shard = sorted(source.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert upcycle_main([str(source), str(tmp_path / "other"), *base]) == EXIT_SOURCE
    assert "truncated or corrupt" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_destination_created_while_the_cli_writes_is_kept_without_overwrite(tmp_path, monkeypatch, capsys):
    """DST is checked up front and again at the end: one that appears during the run (another job, a second
    invocation) is kept and the command exits 4 unless --overwrite was given, when it is replaced."""
    source = save_dense(dense_model("llama"), tmp_path / "dense")
    destination = tmp_path / "moe"
    create_while_writing(monkeypatch, destination, "config.json", "{}")
    arguments = [str(source), str(destination), "--num-text-experts", "2", "--top-k", "1", "--quiet"]
    assert upcycle_main(arguments) == EXIT_EXISTS
    assert "created while the output was written" in capsys.readouterr().err
    assert os.listdir(destination) == ["config.json"] and (destination / "config.json").read_text() == "{}"
    assert upcycle_main([*arguments, "--overwrite"]) == EXIT_OK
    assert DeepTalkConfig.from_pretrained(destination).num_experts == 2


def test_an_existing_destination_is_refused_before_a_hub_download(tmp_path, monkeypatch, capsys):
    def download(*args):
        raise AssertionError("downloaded before checking DST")

    monkeypatch.setattr("deeptalk_hf.cli._resolve_source", download)
    (tmp_path / "moe").mkdir()
    arguments = ["org/some-model", str(tmp_path / "moe"), "--num-text-experts", "2", "--top-k", "1", "--quiet"]
    assert upcycle_main(arguments) == EXIT_EXISTS
    assert "already exists" in capsys.readouterr().err


def test_sigterm_unwinds_and_removes_a_half_written_output(tmp_path):
    """`timeout`, Slurm and `docker stop` send SIGTERM: it must clean up like Ctrl-C, not leave a hidden partial."""

    def action():
        with atomic_output_dir(tmp_path / "out") as staging:
            (staging / "shard.safetensors").write_bytes(b"0" * 1024)
            os.kill(os.getpid(), signal.SIGTERM)

    def sentinel(signum, frame):  # the host's own handler, which the command must put back
        raise AssertionError("the command's handler should have run")

    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        with pytest.raises(SystemExit) as exit_info:
            _run("deeptalk-upcycle", action)
        assert exit_info.value.code == 128 + signal.SIGTERM
        assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is sentinel
    finally:
        signal.signal(signal.SIGTERM, previous)
    # From another thread (a job runner, a notebook) it runs, without the handler Python allows the main thread only.
    results = []
    worker = threading.Thread(target=lambda: results.append(_run("deeptalk-upcycle", lambda: None)))
    worker.start()
    worker.join()
    assert results == [EXIT_OK]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_a_hangup_unwinds_and_removes_a_half_written_output_unless_it_is_ignored(tmp_path):
    """A closed terminal or dropped ssh session sends SIGHUP, whose default ends the process on the spot: the hidden
    partial output (up to a whole model's size) stayed beside DST. Under `nohup` (SIGHUP ignored) the run goes on."""

    def action():
        with atomic_output_dir(tmp_path / "out") as staging:
            (staging / "shard.safetensors").write_bytes(b"0" * 1024)
            if signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:  # (else it would end the test run itself)
                os.kill(os.getpid(), signal.SIGHUP)

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as exit_info:
            _run("deeptalk-upcycle", action)
        assert exit_info.value.code == 128 + signal.SIGHUP
        assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        assert _run("deeptalk-upcycle", action) == EXIT_OK
        assert os.listdir(tmp_path) == ["out"] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_sigterm_handler_installed_outside_python_is_left_in_place(monkeypatch):
    """`getsignal` gives None for a handler Python did not install: replacing it could not be undone."""
    installed = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.append(handler))
    assert _run("deeptalk-upcycle", lambda: None) == EXIT_OK
    assert installed == []


@pytest.mark.filterwarnings("ignore:'deeptalk_hf.cli' found in sys.modules:RuntimeWarning")  # runpy's, re-running it
def test_running_the_module_points_to_the_commands():
    """`python -m deeptalk_hf.cli` has no command of its own: it names the two and fails, rather than exit 0."""
    with pytest.raises(SystemExit, match="deeptalk-upcycle and deeptalk-profile"):
        runpy.run_module("deeptalk_hf.cli", run_name="__main__")


def test_exit_code_reaches_the_shell(tmp_path):
    """As the console script runs it: `sys.exit(upcycle_main())`."""
    command = "import sys; from deeptalk_hf.cli import upcycle_main; sys.exit(upcycle_main())"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            command,
            str(tmp_path / "nowhere"),
            str(tmp_path / "out"),
            "--num-text-experts",
            "2",
            "--top-k",
            "1",
        ],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == EXIT_SOURCE, result.stderr
    assert "deeptalk-upcycle: error:" in result.stderr


# deeptalk-profile


@pytest.fixture(scope="module")
def deeptalk_checkpoint(tmp_path_factory):
    """A random DeepTalk model (distinct experts, working routers) saved as a checkpoint."""
    config = DeepTalkConfig(
        vocab_size=TEXT_VOCAB + SPEECH_VOCAB,
        speech_vocab_size=SPEECH_VOCAB,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_speech_experts=0,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        use_qk_norm=False,
    )
    model = DeepTalkForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.5 * noise)
    path = tmp_path_factory.mktemp("deeptalk")
    model.save_pretrained(path)
    return path


def write_data(path: Path, rows: int = 7) -> Path:
    generator = torch.Generator().manual_seed(3)
    lines = []
    for i in range(rows):
        text = torch.randint(0, TEXT_VOCAB, (4 + i,), generator=generator).tolist()
        speech = torch.randint(TEXT_VOCAB, TEXT_VOCAB + SPEECH_VOCAB, (3 + i % 3,), generator=generator).tolist()
        row = {"input_ids": text + speech}
        if i % 2:  # half the rows say their modality explicitly: here, the first text id counts as speech
            row["modality_ids"] = [1] + [0] * (len(text) - 1) + [1] * len(speech)
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_read_jsonl_batches(tmp_path):
    data = write_data(tmp_path / "data.jsonl")
    batches = list(read_jsonl_batches(data, batch_size=3, vocab_size=80, speech_token_start=TEXT_VOCAB, max_length=9))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    first = batches[0]
    assert first["attention_mask"].sum(1).tolist() == [7, 9, 9]  # lengths 7, 9 and 11 cut to 9
    assert first["modality_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0]  # from the id block
    assert first["modality_ids"][1, 0] == 1  # given explicitly
    rows = [json.loads(line) for line in data.read_text().split("\n") if line]
    assert first["input_ids"][1, :9].tolist() == rows[1]["input_ids"][:9]


@pytest.mark.parametrize("ids", ["[3, 80]", "[-1, 3]", "[3, 2.0]", "[true, 3]", "[]"])
def test_read_jsonl_batches_refuses_ids_outside_the_vocabulary(tmp_path, ids):
    """An id equal to the vocabulary size is the first outside it: corrupt data by line, not an embedding error; a
    boolean is not id 1, and an empty row is not a row."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f'{{"input_ids": {ids}}}\n{{"input_ids": [1, 2]}}\n')
    with pytest.raises(cli.DataError, match="bad.jsonl:1: "):
        list(read_jsonl_batches(bad, batch_size=1, vocab_size=80, speech_token_start=TEXT_VOCAB))


@pytest.mark.parametrize("modality", ["[[0], [1]]", '[0, {"a": 1}]', "[0, 2]", "[0, 1.0]", "[true, 0]"])
def test_read_jsonl_batches_refuses_modality_ids_that_are_not_0_or_1(tmp_path, modality):
    """Nested, float and boolean values are corrupt data (exit code 3), not a crash or a silent cast."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(f'{{"input_ids": [1, 2], "modality_ids": {modality}}}\n')
    with pytest.raises(cli.DataError, match="bad.jsonl:1: modality_ids must be 0/1 values"):
        list(read_jsonl_batches(bad, batch_size=1, vocab_size=80, speech_token_start=TEXT_VOCAB))


def test_small_cli_helpers():
    """A trailing comma in a list option is harmless; a host's disabled transformers bars stay disabled."""
    assert cli._int_list("2,3,") == [2, 3]
    hf_logging.disable_progress_bar()
    try:
        with cli._progress_bars(enabled=True):
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_profile_checks_its_outputs_before_profiling_and_counts_what_it_reads(
    deeptalk_checkpoint, tmp_path, capsys, monkeypatch
):
    """An existing -o folder or --assign-to folder is refused before the (long) profiling, nothing written; the
    progress bar counts every sequence read; --max-length 0 is refused."""
    data, split, load = write_data(tmp_path / "data.jsonl"), tmp_path / "split", tmp_path / "load.json"
    model = str(deeptalk_checkpoint)
    (tmp_path / "results").mkdir()
    assert profile_main([model, str(data), "-o", str(tmp_path / "results"), "--overwrite", "--quiet"]) == EXIT_USAGE
    assert "is a directory" in capsys.readouterr().err
    split.mkdir()
    arguments = [model, str(data), "-o", str(load), "--assign-to", str(split), "--num-speech-experts", "1", "--quiet"]
    assert profile_main(arguments) == EXIT_EXISTS and not load.exists()
    with pytest.raises(SystemExit) as exit_info:
        profile_main([model, str(data), "--max-length", "0"])
    assert exit_info.value.code == EXIT_USAGE
    bars, bar = [], cli.tqdm
    monkeypatch.setattr(cli, "tqdm", lambda *args, **kwargs: bars.append(bar(*args, **kwargs)) or bars[-1])
    assert profile_main([model, str(data), "--batch-size", "3"]) == EXIT_OK  # not --quiet: a disabled bar counts none
    lines = sum(1 for line in data.read_text().split("\n") if line)
    assert [(bar.n, bar.total) for bar in bars] == [(lines, lines)]


def test_profile_outputs_that_appear_while_profiling_are_kept_unless_overwrite(
    deeptalk_checkpoint, tmp_path, monkeypatch
):
    """-o and --plot files created by someone else during the (long) profiling are kept (exit 4) without --overwrite,
    and replaced with it."""
    pytest.importorskip("matplotlib")
    data, load, plot = write_data(tmp_path / "data.jsonl"), tmp_path / "load.json", tmp_path / "load.png"
    profile = cli.profile_modality_load

    def profile_while_others_write(model, batches):
        for path in (load, plot):
            path.write_text("theirs")
        return profile(model, batches)

    monkeypatch.setattr(cli, "profile_modality_load", profile_while_others_write)
    for target in (load, plot):
        for path in (load, plot):  # absent when the command checks its outputs, written while it profiles
            path.unlink(missing_ok=True)
        arguments = [str(deeptalk_checkpoint), str(data), "-o" if target is load else "--plot", str(target), "--quiet"]
        assert profile_main(arguments) == EXIT_EXISTS and target.read_text() == "theirs"
        assert profile_main([*arguments, "--overwrite"]) == EXIT_OK and target.read_bytes() != b"theirs"


def test_profile_seed_chooses_the_random_split(deeptalk_checkpoint, tmp_path):
    data, split, load = write_data(tmp_path / "data.jsonl"), tmp_path / "split", tmp_path / "load.json"
    arguments = [str(deeptalk_checkpoint), str(data), "-o", str(load), "--assign-to", str(split), "--quiet"]
    assert profile_main([*arguments, "--strategy", "random", "--seed", "3", "--num-speech-experts", "2"]) == EXIT_OK
    chosen = {}
    for seed in (3, 0):
        model = AutoModelForCausalLM.from_pretrained(deeptalk_checkpoint)
        assign_modality_experts(model, ModalityLoad.load(load), num_speech_experts=2, strategy="random", seed=seed)
        chosen[seed] = model.config.speech_expert_ids
    assert chosen[3] != chosen[0]  # the seed matters here
    assert AutoModelForCausalLM.from_pretrained(split).config.speech_expert_ids == chosen[3]


def test_profile_cli(deeptalk_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl")
    output, assigned = tmp_path / "load.json", tmp_path / "split"
    arguments = [str(deeptalk_checkpoint), str(data), "-o", str(output), "--batch-size", "3", "--quiet"]
    assert profile_main([*arguments, "--assign-to", str(assigned), "--num-speech-experts", "2,3"]) == EXIT_OK
    summary, errors = capsys.readouterr()
    assert "Loading weights" not in errors and "Writing model shards" not in errors  # --quiet: transformers' bars too
    assert hf_logging.is_progress_bar_enabled()  # and only while the command runs
    hub_utils.disable_progress_bars()  # a host's own setting survives the command
    try:
        assert profile_main([*arguments, "--overwrite"]) == EXIT_OK
        assert hub_utils.are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()
    finally:
        hub_utils.enable_progress_bars()
    assert "layer 0" in summary and "layer 1" in summary and "speech experts" in summary
    load = ModalityLoad.load(output)
    model = AutoModelForCausalLM.from_pretrained(deeptalk_checkpoint)
    batches = read_jsonl_batches(data, batch_size=3, vocab_size=80, speech_token_start=TEXT_VOCAB)
    expected = profile_modality_load(model, batches)
    for name in ("speech_counts", "text_counts"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(load, name), getattr(expected, name), strict=True))
    assert load.speech_tokens == expected.speech_tokens > 0
    for counts in load.speech_counts:
        assert counts.sum() == load.speech_tokens * 2
    split, info = AutoModelForCausalLM.from_pretrained(assigned, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert split.config.num_speech_experts == [2, 3] and split.config.num_experts == [4, 3]
    ids = text_ids()
    model.config.modality_routing = split.config.modality_routing = "none"
    with torch.no_grad():
        torch.testing.assert_close(split(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-4)

    # --speech-attention: the same split, plus speech attention projections equal to the text ones.
    with_attention = tmp_path / "split_attention"
    assert (
        profile_main(
            [
                *arguments[:2],
                "--quiet",
                "--assign-to",
                str(with_attention),
                "--num-speech-experts",
                "2,3",
                "--speech-attention",
            ]
        )
        == EXIT_OK
    )
    attended, info = AutoModelForCausalLM.from_pretrained(with_attention, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and attended.config.speech_attention
    assert attended.config.speech_expert_ids == split.config.speech_expert_ids
    weights = dict(attended.named_parameters())
    assert torch.equal(
        weights["model.layers.1.self_attn.speech_v_proj.weight"], weights["model.layers.1.self_attn.v_proj.weight"]
    )

    # A model that already has speech attention is refused before profiling, and nothing is written.
    again = tmp_path / "again"
    assert (
        profile_main([str(with_attention), str(data), "--assign-to", str(again), "--speech-attention"]) == EXIT_SOURCE
    )
    assert "already has speech attention" in capsys.readouterr().err and not again.exists()


def test_profile_assign_to_keeps_the_processor_settings(deeptalk_checkpoint, tmp_path):
    """A processor saved beside the model (its interleaving policy) comes along with the tokenizer files."""
    model = shutil.copytree(deeptalk_checkpoint, tmp_path / "model")
    settings = '{"interleave": "interleaved", "processor_class": "DeepTalkProcessor", "text_speech_ratio": [2, 4]}'
    (model / "processor_config.json").write_text(settings)
    data, split = write_data(tmp_path / "data.jsonl"), tmp_path / "split"
    arguments = [str(model), str(data), "--quiet", "--assign-to", str(split), "--num-speech-experts", "2"]
    assert profile_main(arguments) == EXIT_OK
    assert (split / "processor_config.json").read_text() == settings


def test_profile_in_another_dtype_saves_the_split_in_the_stored_one(deeptalk_checkpoint, tmp_path):
    """`--dtype` is what profiling runs in: the split model is the stored weights, moved, not a bf16 copy of them."""
    data, split, measured = write_data(tmp_path / "data.jsonl"), tmp_path / "split", tmp_path / "load.json"
    arguments = [str(deeptalk_checkpoint), str(data), "--quiet", "--assign-to", str(split), "-o", str(measured)]
    assert profile_main([*arguments, "--dtype", "bfloat16", "--num-speech-experts", "2"]) == EXIT_OK
    expected = AutoModelForCausalLM.from_pretrained(deeptalk_checkpoint)
    assign_modality_experts(expected, ModalityLoad.load(measured), num_speech_experts=2)
    saved = AutoModelForCausalLM.from_pretrained(split)
    assert saved.config.speech_expert_ids == expected.config.speech_expert_ids
    for (name, tensor), reference in zip(saved.state_dict().items(), expected.state_dict().values(), strict=True):
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference), name


def test_profile_in_another_dtype_reports_a_failed_second_load(deeptalk_checkpoint, tmp_path, monkeypatch, capsys):
    """The stored weights are loaded again to be split: a failure there is the same source error, nothing written."""
    data, split = write_data(tmp_path / "data.jsonl"), tmp_path / "split"
    load = AutoModelForCausalLM.from_pretrained
    dtypes = []

    def failing_second_load(*args, dtype, **kwargs):
        dtypes.append(dtype)
        if len(dtypes) == 2:
            raise OSError("disk gone")
        return load(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(cli.AutoModelForCausalLM, "from_pretrained", failing_second_load)
    arguments = [str(deeptalk_checkpoint), str(data), "--quiet", "--assign-to", str(split), "--dtype", "bfloat16"]
    assert profile_main([*arguments, "--num-speech-experts", "2"]) == EXIT_SOURCE
    assert dtypes == ["bfloat16", "auto"] and "disk gone" in capsys.readouterr().err
    assert not split.exists()


def test_profile_reads_and_counts_the_same_lines(deeptalk_checkpoint, tmp_path, monkeypatch, capsys):
    """The reader and the progress bar's total agree on a BOM, whitespace-only lines and any line ending."""
    totals = []
    bar = cli.tqdm

    def counting_bar(*args, total, **kwargs):
        totals.append(total)
        return bar(*args, total=total, **kwargs)

    monkeypatch.setattr(cli, "tqdm", counting_bar)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'\xef\xbb\xbf\r\n{"input_ids": [1, 2]}\r{"input_ids": [3, 70]}\r\n\xc2\xa0\n{"input_ids": [4]}')
    assert profile_main([str(deeptalk_checkpoint), str(data), "--quiet"]) == EXIT_OK
    assert totals == [3] and "tokens: 1 speech, 4 text" in capsys.readouterr().out


def test_profile_never_replaces_the_folder_a_model_of_symlinks_points_into(deeptalk_checkpoint, tmp_path, capsys):
    """MODEL as a folder of symlinks to files kept elsewhere: --assign-to that folder would leave MODEL's links
    pointing at the split model."""
    store = tmp_path / "store"
    shutil.copytree(deeptalk_checkpoint, store)
    view = tmp_path / "view"
    view.mkdir()
    for file in store.iterdir():
        (view / file.name).symlink_to(file)
    before = {file.name: file.read_bytes() for file in store.iterdir()}
    arguments = [str(view), str(write_data(tmp_path / "data.jsonl")), "--assign-to", str(store)]
    assert profile_main([*arguments, "--num-speech-experts", "1", "--overwrite", "--quiet"]) == EXIT_USAGE
    assert "holds the source" in capsys.readouterr().err
    assert {file.name: file.read_bytes() for file in store.iterdir()} == before


def test_profile_exit_codes(deeptalk_checkpoint, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl")
    model = str(deeptalk_checkpoint)
    DeepTalkForConditionalGeneration(whisper_audio_config()).save_pretrained(tmp_path / "audio")
    assert profile_main([str(tmp_path / "audio"), str(data), "--quiet"]) == EXIT_SOURCE
    assert "is a DeepTalk audio model; the command profiles DeepTalk LLM checkpoints" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n')
    assert profile_main([model, str(bad), "--quiet"]) == EXIT_SOURCE
    assert "bad.jsonl:2" in capsys.readouterr().err
    bad.write_text('{"input_ids": [1, 200]}\n')
    assert profile_main([model, str(bad), "--quiet"]) == EXIT_SOURCE
    assert "[0, 80)" in capsys.readouterr().err
    bad.write_text('{"input_ids": [1, 2], "modality_ids": [1]}\n')
    assert profile_main([model, str(bad), "--quiet"]) == EXIT_SOURCE
    bad.write_bytes(b'{"input_ids": [1, 2]}\n{"input_ids": [1, 2], "note": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert profile_main([model, str(bad), "--quiet"]) == EXIT_SOURCE
    assert "bad.jsonl:2: not UTF-8 text (byte 0xe9 at column 35)" in capsys.readouterr().err
    bad.write_bytes(b'\xef\xbb\xbf{"input_ids": [1, 2, 70]}\n')  # a BOM opens some editors' UTF-8 files
    assert profile_main([model, str(bad), "--quiet"]) == EXIT_OK
    capsys.readouterr()
    assert profile_main([model, str(tmp_path / "none.jsonl"), "--quiet"]) == EXIT_SOURCE
    assert "none.jsonl does not exist" in capsys.readouterr().err
    assert profile_main([model, str(tmp_path), "--quiet"]) == EXIT_SOURCE  # it is read twice: a file, not a pipe
    assert "is not a regular file" in capsys.readouterr().err
    bad.write_text('{"input_ids": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert profile_main([model, str(bad), "--quiet"]) == EXIT_SOURCE  # not a RecursionError traceback
    assert "bad.jsonl:1" in capsys.readouterr().err
    llama = tmp_path / "llama"
    dense_model("llama").save_pretrained(llama)
    assert profile_main([str(llama), str(data), "--quiet"]) == EXIT_SOURCE
    assert "is a llama model; profile a DeepTalk model" in capsys.readouterr().err
    truncated = tmp_path / "truncated"
    shutil.copytree(deeptalk_checkpoint, truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:5000])
    assert profile_main([str(truncated), str(data), "--quiet"]) == EXIT_SOURCE
    assert f"cannot load {truncated}" in capsys.readouterr().err
    (tmp_path / "taken.json").write_text("{}")
    assert profile_main([model, str(data), "-o", str(tmp_path / "taken.json"), "--quiet"]) == EXIT_EXISTS
    assert (tmp_path / "taken.json").read_text() == "{}"
    with pytest.raises(SystemExit) as exit_info:
        profile_main([model, str(data), "--strategy", "adaptive", "--num-speech-experts", "2", "--assign-to", "x"])
    assert exit_info.value.code == EXIT_USAGE
    for option in (
        ["--speech-attention"],
        ["--num-speech-experts", "2"],
        ["--strategy", "random"],
        ["--strategy", "paper"],  # the default, named: still a choice without effect (it was accepted and ignored)
        ["--seed", "1"],
    ):
        with pytest.raises(SystemExit) as exit_info:  # they shape the saved split, which only --assign-to writes
            profile_main([model, str(data), *option])
        assert exit_info.value.code == EXIT_USAGE
        assert capsys.readouterr().err.splitlines()[-1].endswith("--assign-to DIR")  # (not the usage line)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert profile_main([model, str(tmp_path / "blank.jsonl"), "--quiet"]) == EXIT_SOURCE
    assert "holds no token to profile" in capsys.readouterr().err
    # Outputs that would destroy an input are refused before profiling: the data file, a folder holding the model.
    assert profile_main([model, str(data), "-o", str(data), "--overwrite", "--quiet"]) == EXIT_USAGE
    holder = tmp_path / "models"
    shutil.copytree(deeptalk_checkpoint, holder / "model")
    arguments = [str(holder / "model"), str(data), "--assign-to", str(holder), "--overwrite", "--quiet"]
    assert profile_main(arguments) == EXIT_USAGE
    assert "holds the source" in capsys.readouterr().err and (holder / "model" / "config.json").is_file()
    weights = holder / "model" / "model.safetensors"
    arguments = [str(holder / "model"), str(data), "-o", str(weights), "--overwrite", "--quiet"]
    assert profile_main(arguments) == EXIT_USAGE
    assert "inside the model" in capsys.readouterr().err
    arguments = [str(holder / "model"), str(data), "--assign-to", str(weights), "--num-speech-experts", "1"]
    assert profile_main([*arguments, "--overwrite", "--quiet"]) == EXIT_USAGE
    assert "is part of the source" in capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(holder / "model")  # intact
    # --assign-to replacing the data file or a folder holding it; -o/--plot inside --assign-to (replaced at the end).
    (tmp_path / "keep.txt").write_text("user file")
    for assign_to in (data, tmp_path):
        arguments = [model, str(data), "--assign-to", str(assign_to), "--num-speech-experts", "1", "--overwrite"]
        assert profile_main([*arguments, "--quiet"]) == EXIT_USAGE
        assert "holds the source" in capsys.readouterr().err
    assert data.is_file() and (tmp_path / "keep.txt").read_text() == "user file"
    arguments = [model, str(data), "--assign-to", str(tmp_path / "out"), "--num-speech-experts", "1"]
    arguments += ["-o", str(tmp_path / "out" / "load.json")]
    assert profile_main([*arguments, "--quiet"]) == EXIT_USAGE
    assert "inside the model or --assign-to folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # The load or heatmap at the --assign-to path itself, or above it: the model folder would replace it (or be
    # refused, or fail under a file) at the end.
    arguments = [model, str(data), "--assign-to", str(tmp_path / "load.json" / "model"), "--num-speech-experts", "1"]
    assert profile_main([*arguments, "-o", str(tmp_path / "load.json"), "--quiet"]) == EXIT_USAGE
    assert "or above it" in capsys.readouterr().err and not (tmp_path / "load.json").exists()
    for option, name in (("-o", "out"), ("--plot", "out.png")):
        arguments = [model, str(data), "--assign-to", str(tmp_path / name), "--num-speech-experts", "1"]
        assert profile_main([*arguments, option, str(tmp_path / name), "--overwrite", "--quiet"]) == EXIT_USAGE
        assert "or that folder itself" in capsys.readouterr().err and not (tmp_path / name).exists()
    assert (
        profile_main([model, str(data), "-o", str(tmp_path / "a"), "--plot", str(tmp_path / "a"), "--quiet"])
        == EXIT_USAGE
    )
    assert "name two files" in capsys.readouterr().err
    # An image path without a known suffix (matplotlib would write `a.png` past the checks) or under a file.
    (tmp_path / "a.png").write_text("earlier plot")
    for plot in ("a", "a.xyz"):
        assert profile_main([model, str(data), "--plot", str(tmp_path / plot), "--quiet"]) == EXIT_USAGE
        assert "name an image file ending in one of" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_text() == "earlier plot"
    assert profile_main([model, str(data), "-o", str(tmp_path / "keep.txt" / "load.json"), "--quiet"]) == EXIT_USAGE
    assert "keep.txt is a file, not a directory" in capsys.readouterr().err
    # Data of one modality: the load is written (its folder created), the assignment refused as unusable data.
    text_only, load, split = tmp_path / "text.jsonl", tmp_path / "new" / "load.json", tmp_path / "split"
    text_only.write_text('{"input_ids": [3, 4, 5]}\n')
    arguments = [model, str(text_only), "-o", str(load), "--assign-to", str(split), "--quiet"]
    assert profile_main([*arguments, "--num-speech-experts", "1"]) == EXIT_SOURCE
    assert "has no speech tokens" in capsys.readouterr().err and not split.exists()
    assert ModalityLoad.load(load).text_tokens > 0
    speech_only = tmp_path / "speech.jsonl"
    speech_only.write_text(f'{{"input_ids": [{TEXT_VOCAB}, {TEXT_VOCAB + 1}]}}\n')
    speech_arguments = [model, str(speech_only), "--assign-to", str(split), "--num-speech-experts", "1", "--quiet"]
    assert profile_main(speech_arguments) == EXIT_SOURCE
    assert "has no text tokens" in capsys.readouterr().err and not split.exists()
    with pytest.raises(SystemExit) as exit_info:  # one batch of the whole file would not be a batch size
        profile_main([model, str(data), "--batch-size", "0", "--quiet"])
    assert exit_info.value.code == EXIT_USAGE
    # Refused before profiling: no count for a model without speech experts (the default would move none), a bad
    # device.
    load.unlink()
    assert profile_main(arguments) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "no speech experts yet" in error and "--num-speech-experts" in error and not load.exists()
    # Meta tensors hold no values; a torch built without CUDA asserts, and one without a device's module (hpu) fails
    # to import it.
    for device in ("bogus", "meta", "hpu", "xla", *(() if torch.cuda.is_available() else ("cuda",))):
        assert profile_main([*arguments, "--num-speech-experts", "1", "--device", device]) == EXIT_USAGE
        error = capsys.readouterr().err
        assert f"--device {device} cannot be used" in error and not load.exists()
        assert len(error.splitlines()) == 1, error  # one line, not torch's dispatch table (xla)
    if importlib.util.find_spec("matplotlib") is None:
        assert profile_main([model, str(data), "--plot", str(tmp_path / "p.png"), "--quiet"]) == EXIT_USAGE
        assert "deeptalk-hf[plot]" in capsys.readouterr().err
