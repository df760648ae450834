"""Console scripts `deeptalk-upcycle` (dense or MoE checkpoint → DeepTalk checkpoint) and `deeptalk-profile` (modality
load).

Exit codes (both scripts): 0 success, 1 unexpected error, 2 invalid arguments or options, 3 the source model or data
cannot be used (unsupported, missing, corrupt), 4 the output exists (pass --overwrite).
"""

import argparse
import importlib.util
import json
import os
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import utils as hub_utils
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from .configuration_deeptalk import DeepTalkAudioConfig, DeepTalkConfig
from .modality import (
    ASSIGNMENT_STRATEGIES,
    ModalityLoad,
    add_speech_attention,
    assign_modality_experts,
    profile_modality_load,
    speech_attention_layers,
    speech_expert_counts,
)
from .upcycling import (
    MOE_ARCHITECTURES,
    SUPPORTED_ARCHITECTURES,
    CheckpointError,
    _check_architecture,
    _copy_tokenizer,
    _read_config,
    _resolve_source,
    _resolve_weights,
    _shard_bytes,
    atomic_output_dir,
    check_output_dir,
    upcycle_checkpoint,
    upcycle_moe_checkpoint,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_SOURCE, EXIT_EXISTS = 0, 1, 2, 3, 4
_EXIT_CODES = """exit codes:
  0  success
  1  unexpected error
  2  invalid arguments or options
  3  the source model or data cannot be used (unsupported, missing, corrupt)
  4  the output already exists (pass --overwrite)
"""
_DTYPES = ("float32", "bfloat16", "float16")


class DataError(ValueError):
    """A profiling data file that cannot be read as DeepTalk JSONL."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _shard_size(text: str) -> int:
    try:
        return _shard_bytes(int(text) if text.isdigit() else text)  # a plain number of bytes, as the Python API takes
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fail(prog: str, code: int, error: BaseException | str) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return code


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' and huggingface_hub's bars (loading, saving, downloading) follow `--quiet` as ours do; their
    settings are restored afterwards."""
    transformers_on, hub_on = hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    if not enabled:
        hf_logging.disable_progress_bar()  # huggingface_hub's too
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        (hub_utils.enable_progress_bars if hub_on else hub_utils.disable_progress_bars)()


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _unwinding_signals() -> list[signal.Signals]:
    """The signals to unwind like Ctrl-C, so a half-written output is removed: SIGTERM (`timeout`, Slurm, `docker
    stop`) unless a handler installed outside Python holds it (`getsignal` gives None for it, so it could not be put
    back), and SIGHUP (a closed terminal, a dropped ssh session) where it would end the process, not where it is
    ignored (`nohup`: the run goes on). Only from the main thread, the only one Python lets set a handler."""
    if threading.current_thread() is not threading.main_thread():
        return []
    taken = [signal.SIGTERM] if signal.getsignal(signal.SIGTERM) is not None else []
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        taken.append(signal.SIGHUP)
    return taken


def _run(prog: str, action: Callable[[], None]) -> int:
    """Map the library's errors to exit codes (argparse itself exits with 2 on bad arguments), with the signals of
    `_unwinding_signals` unwinding the action."""
    previous = {signum: signal.signal(signum, _terminated) for signum in _unwinding_signals()}
    try:
        action()
    except FileExistsError as error:
        return _fail(prog, EXIT_EXISTS, error)
    except (CheckpointError, DataError) as error:
        return _fail(prog, EXIT_SOURCE, error)
    except ValueError as error:
        return _fail(prog, EXIT_USAGE, error)
    except Exception as error:  # a bug or an environment failure (disk full, ...): keep the traceback
        traceback.print_exc()
        return _fail(prog, EXIT_FAILURE, f"{type(error).__name__}: {error}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_OK


# Options of dense upcycling only, named as `upcycle_checkpoint`'s arguments; argparse leaves them unset unless given
# (`argument_default=SUPPRESS`), so an MoE source can refuse them and a dense one gets the function's defaults.
_DENSE_OPTIONS = (
    "num_text_experts",
    "num_experts_per_tok",
    "num_speech_experts",
    "granularity",
    "num_shared_experts",
    "mlp_only_layers",
    "init_noise",
    "drop_fraction",
    "seed",
)
_DENSE_REQUIRED = ("num_text_experts", "num_experts_per_tok")


def upcycle_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeptalk-upcycle",
        description=textwrap.fill(
            "Convert a checkpoint into a DeepTalk speech-text MoE checkpoint, streaming shard by shard (the source and "
            "the result are never in memory together). The source's config decides what happens. A dense Llama, "
            "Qwen2, Qwen3 or Mistral checkpoint is upcycled: its MLPs become experts (--num-text-experts and --top-k "
            "are required); without --init-noise/--drop-fraction the result computes the same logits on text. An MoE "
            f"checkpoint ({', '.join(sorted(MOE_ARCHITECTURES))}) is imported as it is: the same model, every expert "
            "a text expert (the expert options do not apply; choose speech experts afterwards with deeptalk-profile "
            "--assign-to). The output is written into a temporary directory beside DST and renamed at the end: a "
            "failure leaves no DST.",
            width=88,
        ),
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "source", metavar="SRC", help="dense or MoE checkpoint directory or hub model id (safetensors weights)"
    )
    parser.add_argument("destination", metavar="DST", help="output directory for the DeepTalk checkpoint")
    experts = parser.add_argument_group("experts (dense sources only)")
    experts.add_argument(
        "--num-text-experts", type=int, help="routed text experts per MoE layer (fine-grained count; dense: required)"
    )
    experts.add_argument("--num-speech-experts", type=int, help="routed speech experts per MoE layer (default: 0)")
    experts.add_argument(
        "--top-k",
        "--num-experts-per-tok",
        dest="num_experts_per_tok",
        type=int,
        help="experts per token (dense: required)",
    )
    experts.add_argument(
        "--granularity",
        type=int,
        help="cut the MLP's intermediate dimension into this many parts, one per fine-grained expert; expert counts "
        "and --top-k must be multiples of granularity minus --shared-experts (default: 1, whole-MLP copies)",
    )
    experts.add_argument(
        "--shared-experts",
        dest="num_shared_experts",
        type=int,
        help="how many of the granularity parts form an always-on shared expert (below --granularity; default: 0)",
    )
    experts.add_argument(
        "--mlp-only-layers",
        type=_int_list,
        metavar="I,J,...",
        help="decoder layers that keep their dense MLP (default: none, every layer becomes MoE)",
    )
    init = parser.add_argument_group("initialisation (dense sources only)")
    init.add_argument(
        "--init-noise",
        type=float,
        help="Gaussian noise on routed expert weights, relative to each dense matrix's std (default: 0, exact)",
    )
    init.add_argument(
        "--drop-fraction",
        type=float,
        help="Drop-Upcycling: fraction of each routed expert's intermediate channels re-initialised from the dense "
        "matrix's mean and std (default: 0, exact)",
    )
    init.add_argument("--seed", type=int, help="seed of --init-noise and --drop-fraction (default: 0)")
    output = parser.add_argument_group("vocabulary and output (dense and MoE sources)")
    output.add_argument(
        "--speech-vocab-size",
        type=int,
        default=0,
        help="speech-unit ids appended to the vocabulary, rows starting at the mean of the text rows (default: 0)",
    )
    output.add_argument("--dtype", choices=_DTYPES, default=None, help="weights dtype (default: the source's)")
    output.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="5GB",
        help="largest output safetensors shard, e.g. 500MB, 2GiB or a number of bytes (default: 5GB)",
    )
    output.add_argument("--revision", default=None, help="hub revision when SRC is a hub id")
    output.add_argument(
        "--overwrite",
        action="store_true",
        default=False,
        help="replace an existing DST: a model folder (a config.json and no sub-folders; replaced whole, other "
        "files included), an empty folder or a file, only once the new one is complete; a folder without a "
        "config.json, or holding other folders, is refused",
    )
    output.add_argument("--quiet", action="store_true", default=False, help="no progress bar")
    return parser


def upcycle_main(argv: list[str] | None = None) -> int:
    """Entry point of `deeptalk-upcycle`."""
    parser = upcycle_parser()
    args = parser.parse_args(argv)
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    dense_options = {name: value for name, value in vars(args).items() if name in _DENSE_OPTIONS}

    def action():
        check_output_dir(args.destination, overwrite=args.overwrite)  # before a hub download
        configs = _resolve_source(args.source, args.revision)  # the weights once the options are right
        config = _read_config(configs)
        # A hub source's weights from the commit its config came from (the snapshot folder's name).
        revision = None if Path(args.source).is_dir() else configs.name
        _check_architecture(config, {*SUPPORTED_ARCHITECTURES, *MOE_ARCHITECTURES}, "dense or MoE")
        kind = config.model_type
        output = dict(
            speech_vocab_size=args.speech_vocab_size,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        if kind in MOE_ARCHITECTURES:
            if dense_options:
                parser.error(
                    f"{', '.join(flags[name] for name in dense_options)}: SRC is a {kind} MoE, imported with its own "
                    "experts; these options apply to dense sources only"
                )
            upcycle_moe_checkpoint(args.source, args.destination, revision=revision, **output)
            print(f"wrote DeepTalk checkpoint {args.destination} (imported {kind}; no speech experts yet)")
            return
        missing = [flags[name] for name in _DENSE_REQUIRED if name not in dense_options]
        if missing:
            parser.error(f"SRC is a dense {kind} model: upcycling it needs {' and '.join(missing)}")
        upcycle_checkpoint(
            args.source, args.destination, revision=revision, **{"num_speech_experts": 0, **dense_options}, **output
        )
        print(f"wrote DeepTalk checkpoint {args.destination}")

    with _progress_bars(enabled=not args.quiet):
        return _run(parser.prog, action)


def _data_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """A data file's non-blank lines with their numbers, for the reader and the progress bar's count alike.

    UTF-8, which a BOM may open; lines end as in text mode (\\n, \\r\\n or \\r). Bad bytes are carried through
    (`surrogateescape`) only to be reported with their line.
    """
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as file:
        for number, line in enumerate(file, start=1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as error:  # an escaped byte: U+DC80..U+DCFF stand for 0x80..0xFF
                byte = ord(line[error.start]) - 0xDC00
                raise DataError(
                    f"{path}:{number}: not UTF-8 text (byte 0x{byte:02x} at column {error.start + 1})"
                ) from None
            if line.strip():
                yield number, line


def read_jsonl_batches(
    path: str | Path, *, batch_size: int, vocab_size: int, speech_token_start: int, max_length: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the profiling data format: one JSON object a line, `{"input_ids": [...], "modality_ids": [...]}`.

    `modality_ids` (0 text, 1 speech, one per id) is optional; without it the id block decides (ids from
    `speech_token_start` on are speech). Sequences are cut to `max_length` and right-padded; padding is masked out.
    """

    def pack(rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        modality_ids = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            ids = torch.tensor(row["input_ids"], dtype=torch.long)
            modality = row.get("modality_ids")
            input_ids[i, : len(ids)] = ids
            attention_mask[i, : len(ids)] = 1
            modality_ids[i, : len(ids)] = (
                (ids >= speech_token_start).long() if modality is None else torch.tensor(modality)
            )
        return {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids}

    rows: list[dict] = []
    for number, line in _data_lines(path):
        try:
            row = json.loads(line)
            ids, modality = row["input_ids"], row.get("modality_ids")
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
            raise DataError(f"{path}:{number}: expected a JSON object with 'input_ids' ({error!r})") from error
        if not isinstance(ids, list) or not ids or not all(type(i) is int and 0 <= i < vocab_size for i in ids):
            raise DataError(f"{path}:{number}: input_ids must be a non-empty list of ids in [0, {vocab_size})")
        if modality is not None and (
            not isinstance(modality, list)
            or len(modality) != len(ids)
            or not all(type(m) is int and m in (0, 1) for m in modality)
        ):
            raise DataError(f"{path}:{number}: modality_ids must be 0/1 values, one per input id")
        rows.append({"input_ids": ids[:max_length], "modality_ids": modality and modality[:max_length]})
        if len(rows) == batch_size:
            yield pack(rows)
            rows = []
    if rows:
        yield pack(rows)


def profile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeptalk-profile",
        description=textwrap.fill(
            "Measure the modality load of a DeepTalk model: per MoE layer and expert, how many top-k assignments and "
            "how much router probability speech and text tokens give it, with modality routing off (as the source "
            "MoE routes). Prints the experts DeepTalk's rule would pick, and can write the load as JSON, a heatmap, "
            "and the model with the chosen experts moved into the speech group. Profile a trained MoE (or a model "
            "after joint warm-up): a freshly upcycled dense model has identical experts and zero routers, so its "
            "load says nothing.",
            width=88,
        ),
        epilog="data format (DATA): JSON Lines, one sequence a line:\n"
        '  {"input_ids": [12, 7, 151700, ...], "modality_ids": [0, 0, 1, ...]}\n'
        "modality_ids (0 text, 1 speech) is optional; without it ids from the speech block on count as speech.\n\n"
        + _EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="DeepTalk checkpoint directory or hub model id")
    parser.add_argument("data", metavar="DATA", help="JSON Lines file of token ids (format below)")
    parser.add_argument("--output", "-o", metavar="JSON", help="write the ModalityLoad as JSON")
    parser.add_argument(
        "--plot",
        metavar="IMAGE",
        help="write per-layer heatmaps of the load, in the format its suffix names (.png, .svg, .pdf, ...; needs "
        "deeptalk-hf[plot])",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument(
        "--max-length", type=int, default=None, help="cut sequences to this many ids (default: no cut)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=_DTYPES,
        default=None,
        help="dtype to profile in (default: saved); --assign-to saves the split in the saved dtype",
    )
    assign = parser.add_argument_group("expert assignment")
    assign.add_argument(
        "--assign-to",
        metavar="DIR",
        help="also move the chosen experts into the speech group and save that model to DIR (atomically)",
    )
    assign.add_argument(
        "--strategy",
        choices=ASSIGNMENT_STRATEGIES,
        default=None,  # None, not "paper": a --strategy given without --assign-to is refused, whichever it names
        help="paper: top experts by rhoA*(1-rhoT); adaptive: per-layer count where rhoA > rhoT; random: ablation "
        "(default: paper)",
    )
    assign.add_argument(
        "--num-speech-experts",
        type=_int_list,
        default=None,
        metavar="N[,N...]",
        help="speech experts per MoE layer, one count or one per MoE layer (default: the model's current counts; "
        "required for a model without speech experts, such as an imported MoE)",
    )
    assign.add_argument("--seed", type=int, help="seed of --strategy random (default: 0)")
    assign.add_argument(
        "--speech-attention",
        action="store_true",
        help="also give speech positions their own attention projections, copies of the text ones "
        "(add_speech_attention), in the saved model",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing --output/--plot files and --assign-to DIR"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _summary(load: ModalityLoad, chosen: list[list[int]] | None) -> str:
    lines = [f"tokens: {load.speech_tokens} speech, {load.text_tokens} text; top-k {load.top_k}"]
    for i, layer in enumerate(load.layers):
        scores = load.scores[i]
        best = load.ranked(i)[:4]
        ranked = ", ".join(f"{e} ({scores[e]:.3f})" for e in best)
        line = f"layer {layer}: highest rhoA*(1-rhoT): {ranked}"
        if chosen is not None:
            line += f"; speech experts: {chosen[i]}"
        lines.append(line)
    return "\n".join(lines)


def _check_load_files(args: argparse.Namespace, source: Path) -> None:
    """`-o`/`--plot` must name two files that are not inputs, before the profiling that takes long."""
    if args.output and args.plot and Path(args.output).resolve() == Path(args.plot).resolve():
        raise ValueError(f"-o and --plot both name {args.output}; name two files")
    # The model folder written at the end would replace (or, when new, refuse) a folder holding the file.
    folders = [source.resolve(), *([Path(args.assign_to).resolve()] if args.assign_to else [])]
    if args.plot:
        ModalityLoad.plot_format(args.plot)
    for path in filter(None, (args.output, args.plot)):
        target = Path(path).resolve()
        if target.is_dir() or any(f == target or f in target.parents or target in f.parents for f in folders):
            raise ValueError(
                f"{path} is a directory, inside the model or --assign-to folder, or that folder itself or above it; "
                "name a new file to write"
            )
        check_output_dir(target, overwrite=args.overwrite, inputs=[args.data])


def profile_main(argv: list[str] | None = None) -> int:
    """Entry point of `deeptalk-profile`."""
    parser = profile_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        parser.error("--batch-size and --max-length must be positive")
    counts = args.num_speech_experts
    if counts is not None and args.strategy == "adaptive":
        parser.error("--strategy adaptive chooses the counts itself; drop --num-speech-experts")
    if args.speech_attention and not args.assign_to:
        parser.error("--speech-attention changes the saved model: it needs --assign-to DIR")
    chooses = counts is not None or args.strategy is not None or args.seed is not None
    if chooses and not args.assign_to:
        parser.error(
            "--num-speech-experts, --strategy and --seed choose the experts to move: they need --assign-to DIR"
        )
    args.strategy = args.strategy or "paper"

    def action():
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'deeptalk-hf[plot]'")
        if not Path(args.data).is_file():
            raise DataError(
                f"data file {args.data} "
                + (
                    "is not a regular file (it is read twice: not a folder or a pipe)"
                    if os.path.exists(args.data)
                    else "does not exist"
                )
            )
        configs = _resolve_source(args.model, None)  # a hub id's weights once the rest is checked
        inputs = [configs, Path(args.data)]
        _check_load_files(args, configs)
        if args.assign_to:
            check_output_dir(args.assign_to, overwrite=args.overwrite, inputs=inputs)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            if torch.device(device).type == "meta":
                raise RuntimeError("a meta tensor holds no values to run on")
            torch.empty(0, device=device)
        # AssertionError: a torch built without CUDA; ImportError: a device type whose torch module is absent (hpu)
        except (RuntimeError, AssertionError, ImportError) as error:
            # The first line: for a backend this build lacks (mps, xla) torch appends its whole dispatch table.
            reason = str(error).partition("\n")[0]
            raise ValueError(f"--device {device} cannot be used: {reason}") from error

        config = _read_config(configs)
        if isinstance(config, DeepTalkAudioConfig):
            raise CheckpointError(
                f"{args.model} is a DeepTalk audio model; the command profiles DeepTalk LLM checkpoints (in Python: "
                "profile_modality_load(model.language_model, batches), then assign_modality_experts(model, load, ...))"
            )
        if not isinstance(config, DeepTalkConfig):
            raise CheckpointError(
                f"{args.model} is a {config.model_type} model; profile a DeepTalk model (upcycle or import it first)"
            )
        number = counts[0] if counts and len(counts) == 1 else counts  # one count for every MoE layer
        if args.assign_to and args.strategy != "adaptive":
            try:  # checked before the weights are read and profiled, which can take long
                speech_expert_counts(config, number)
            except ValueError as error:  # the library's message names the argument; the user types the option
                raise ValueError(f"--num-speech-experts: {error}") from error
        source = _resolve_weights(args.model, configs)

        def load_model(dtype: str) -> PreTrainedModel:
            try:
                return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
                raise CheckpointError(f"cannot load {args.model}: {error}") from error

        model = load_model(args.dtype or "auto").to(device)
        if args.speech_attention:
            try:  # checked before profiling, which can take long
                speech_attention_layers(model)
            except ValueError as error:
                raise CheckpointError(f"{args.model}: --speech-attention: {error}") from error
        total = sum(1 for _ in _data_lines(args.data))  # the lines the reader will read
        batches = read_jsonl_batches(
            args.data,
            batch_size=args.batch_size,
            vocab_size=config.vocab_size,
            speech_token_start=config.speech_token_start,
            max_length=args.max_length,
        )
        with tqdm(total=total, unit="seq", desc="Profiling", disable=args.quiet) as bar:

            def counted():
                for batch in batches:
                    yield batch
                    bar.update(len(batch["input_ids"]))

            load = profile_modality_load(model, counted())
        if not load.speech_tokens + load.text_tokens:
            raise DataError(f"{args.data} holds no token to profile")
        # The measured load first: it is what took long, and it stays useful if the assignment below fails.
        if args.output:
            load.save(args.output, overwrite=args.overwrite)
        if args.plot:
            load.plot(args.plot, overwrite=args.overwrite)
        chosen = None
        if args.assign_to:
            missing = [
                name for name, count in (("speech", load.speech_tokens), ("text", load.text_tokens)) if not count
            ]
            if missing:
                raise DataError(
                    f"{args.data} has no {' and no '.join(missing)} tokens; assigning needs both modalities"
                )
            if args.dtype is not None:  # profiled in another dtype: split the stored weights, which save as they are
                model = load_model("auto")
            chosen = assign_modality_experts(
                model, load, num_speech_experts=number, strategy=args.strategy, seed=args.seed or 0
            )
            if args.speech_attention:
                add_speech_attention(model)
            with atomic_output_dir(args.assign_to, overwrite=args.overwrite, inputs=inputs) as staging:
                model.save_pretrained(staging)
                # A DeepTalk source's processor settings (interleaving) belong with its tokenizer.
                _copy_tokenizer(source, staging, extra=("processor_config.json",))
        print(_summary(load, chosen))

    with _progress_bars(enabled=not args.quiet):
        return _run(parser.prog, action)


if __name__ == "__main__":  # `python -m deeptalk_hf.cli` would otherwise do nothing and exit 0
    sys.exit("deeptalk_hf.cli holds two commands, installed with the package: deeptalk-upcycle and deeptalk-profile")
