"""Modality experts: measure which experts carry speech, move them into the speech group, and train by stage.

1. `profile_modality_load` runs a DeepTalk model with modality routing off (every token scored over all experts, as
   the source MoE did) and counts, per MoE layer and expert, the top-k assignments and router probability mass of
   speech and of text tokens: a `ModalityLoad`.
2. `assign_modality_experts` moves the chosen experts (and their router rows) into `speech_experts`/`speech_gate`
   (`move_speech_experts` for a split chosen elsewhere): a permutation, so with routing off the model computes what it
   did before (the same routing; outputs equal up to float rounding, as the experts' sums run in another order).
3. `set_training_stage` switches `requires_grad` on whole tensors, so freezing a modality is exact with any optimizer.
"""

import json
import operator
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import MISSING, dataclass, fields
from fnmatch import fnmatchcase
from numbers import Number
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from .audio_codecs import has_integer_dtype
from .configuration_deeptalk import DeepTalkConfig
from .modeling_deeptalk import (
    DeepTalkAttention,
    DeepTalkExperts,
    DeepTalkForCausalLM,
    DeepTalkModel,
    DeepTalkPreTrainedModel,
    DeepTalkSparseMoeBlock,
    DeepTalkTopKRouter,
    check_no_adapters,
    correction_bias,
    speech_positions,
)
from .modeling_deeptalk_audio import DeepTalkForConditionalGeneration
from .upcycling import atomic_output_file

TRAINING_STAGES = ("align", "speech", "text", "joint")
ASSIGNMENT_STRATEGIES = ("paper", "adaptive", "random")
_TEXT_EXPERTS = re.compile(r"\.mlp\.(experts|gate)\.")
_LOAD_FORMAT = "deeptalk-modality-load"
_LOAD_VERSION = 1  # what `ModalityLoad.save` writes and `ModalityLoad.load` reads


def _integer(value: object) -> int:
    """`value` as an int when it is an integral number of any kind (Python, NumPy, a 0-d tensor or array), else a
    TypeError: a count of 2.0 or 2.5 is a mistake, not a count to round; bools are flags, as transformers has them."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        raise TypeError(f"{value!r} is a boolean")
    return operator.index(value)


@dataclass(eq=False)  # the generated `==` compares lists of tensors, which raises: see `__eq__`
class ModalityLoad:
    """How a model routed speech and text tokens, per MoE layer and expert.

    Experts are indexed in the source MoE's order (`config.expert_order`), which stays fixed when experts are moved
    between the text and speech groups, so a load measured before or after an assignment means the same experts.
    `*_counts` are top-k assignments (padding excluded), `*_mass` sums of router probabilities; `layers` are the
    decoder-layer indices of the MoE layers.
    """

    layers: list[int]
    top_k: int
    speech_counts: list[torch.Tensor]
    text_counts: list[torch.Tensor]
    speech_mass: list[torch.Tensor]
    text_mass: list[torch.Tensor]
    speech_tokens: int = 0
    text_tokens: int = 0

    def __post_init__(self):
        whole = {"top_k": 1, "speech_tokens": 0, "text_tokens": 0}
        for name, least in whole.items():
            try:
                value = _integer(getattr(self, name))
            except TypeError:
                value = None
            if value is None or value < least:
                raise ValueError(f"ModalityLoad.{name}={getattr(self, name)!r} must be an integer >= {least}")
            setattr(self, name, value)  # a plain int, so `save` can write it
        try:
            self.layers = [_integer(layer) for layer in self.layers]
        except TypeError as error:
            raise ValueError(f"ModalityLoad.layers={self.layers!r} must be decoder-layer indices") from error
        sizes = None
        for name in ("speech_counts", "text_counts", "speech_mass", "text_mass"):
            counts = name.endswith("counts")
            # Masses in float64 from the start: a list of floats (what `load` reads) would pass through float32.
            try:
                values = [
                    torch.as_tensor(v, dtype=None if counts else torch.float64).cpu() for v in getattr(self, name)
                ]
            except (TypeError, ValueError, RuntimeError) as error:  # e.g. a null in a file: "could not infer dtype"
                raise ValueError(f"ModalityLoad.{name} must hold numbers per layer and expert ({error})") from error
            if any(v.dim() != 1 for v in values):
                raise ValueError(f"ModalityLoad.{name} must hold one list of numbers per layer (one per expert)")
            # torch reads [True, 2] as integers: a boolean among counts is a flag, as `_integer` has it
            flags = any(isinstance(x, bool) for v in getattr(self, name) if isinstance(v, (list, tuple)) for x in v)
            if counts and (flags or any(v.numel() and not has_integer_dtype(v) for v in values)):
                raise ValueError(
                    f"ModalityLoad.{name} must hold whole assignment counts (integers, not fractions or booleans)"
                )
            values = [v.to(torch.int64) for v in values] if counts else values
            sizes = sizes or [v.numel() for v in values]
            if len(values) != len(self.layers) or [v.numel() for v in values] != sizes:
                raise ValueError(
                    f"ModalityLoad.{name} must hold, for each of the {len(self.layers)} layers, one value per expert "
                    f"(as many per layer as speech_counts: {sizes})"
                )
            if any((v < 0).any() or not v.isfinite().all() for v in values):
                raise ValueError(f"ModalityLoad.{name} holds negative or non-finite values")
            setattr(self, name, values)

    @property
    def num_experts(self) -> list[int]:
        """Experts (text + speech) of each MoE layer."""
        return [counts.numel() for counts in self.speech_counts]

    @staticmethod
    def _shares(counts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [c.double() / c.sum().clamp(min=1) for c in counts]

    @property
    def rho_speech(self) -> list[torch.Tensor]:
        """ρA: each expert's share of the speech tokens' assignments in its layer (sums to 1 over the layer, or is
        all 0 without speech tokens)."""
        return self._shares(self.speech_counts)

    @property
    def rho_text(self) -> list[torch.Tensor]:
        """ρT: each expert's share of the text tokens' assignments in its layer (sums to 1 over the layer, or is
        all 0 without text tokens)."""
        return self._shares(self.text_counts)

    @property
    def scores(self) -> list[torch.Tensor]:
        """DeepTalk's speech-expert score ρA·(1−ρT): heavy speech traffic and light text traffic."""
        return [a * (1 - t) for a, t in zip(self.rho_speech, self.rho_text, strict=True)]

    def ranked(self, index: int) -> list[int]:
        """The experts of MoE layer `layers[index]` by score, highest first; equal scores: the lowest index first.

        Ranked on ρA·(1−ρT) times the layer's speech and text totals, in integers, so that scores equal as numbers tie
        (the float `scores` round apart, e.g. 0.1·(1−0.3) < 0.07·(1−0)).
        """
        speech, text = self.speech_counts[index].tolist(), self.text_counts[index].tolist()
        text_total = max(sum(text), 1)  # as `_shares` divides
        exact = [s * (text_total - t) for s, t in zip(speech, text, strict=True)]
        return sorted(range(len(exact)), key=lambda expert: (-exact[expert], expert))

    def __eq__(self, other: object) -> bool:
        """Same layers, counts and masses, exactly (a `save`/`load` round trip is equal)."""
        return isinstance(other, ModalityLoad) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        data = {"format": _LOAD_FORMAT, "version": _LOAD_VERSION}
        for field in fields(self):
            value = getattr(self, field.name)
            data[field.name] = [v.tolist() for v in value] if field.name.endswith(("counts", "mass")) else value
        return data

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Write the load as JSON (through a temporary file, so an existing file is never left half-written; without
        `overwrite`, never replaced)."""
        with atomic_output_file(path, overwrite=overwrite) as partial, open(partial, "w", encoding="utf-8") as file:
            json.dump(self.to_dict(), file, indent=1)
            file.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModalityLoad":
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested too deep: none names the file
            raise ValueError(f"{path} is not a DeepTalk modality load: {error}") from error
        if not isinstance(data, dict) or data.pop("format", None) != _LOAD_FORMAT:
            raise ValueError(
                f"{path} is not a DeepTalk modality load (expected a JSON object with format {_LOAD_FORMAT!r})"
            )
        version = data.pop("version", None)
        if type(version) is not int or version != _LOAD_VERSION:  # `true` and `1.0` equal 1 but were never written
            raise ValueError(
                f"{path}: version={version!r}; this library reads modality-load version {_LOAD_VERSION} files"
            )
        missing = sorted({field.name for field in fields(cls) if field.default is MISSING} - set(data))
        unknown = sorted(set(data) - {field.name for field in fields(cls)})
        if missing or unknown:
            problems = [
                f"{kind} fields {', '.join(names)}"
                for kind, names in (("missing", missing), ("unknown", unknown))
                if names
            ]
            raise ValueError(f"{path} is not a modality load: {'; '.join(problems)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error

    @staticmethod
    def plot_format(path: str | os.PathLike) -> str:
        """The image format `plot` writes to `path`, from its suffix (matplotlib would add one to a path without)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("plotting a modality load needs matplotlib: pip install 'deeptalk-hf[plot]'") from None
        supported = Figure().canvas.get_supported_filetypes()
        suffix = Path(path).suffix.lower().removeprefix(".")
        if suffix not in supported:
            raise ValueError(f"{path}: name an image file ending in one of .{', .'.join(sorted(supported))}")
        return suffix

    def plot(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        """Heatmaps (layers × experts) of ρA, ρT and ρA·(1−ρT) into an image file (needs the `plot` extra; without
        `overwrite`, an existing file is never replaced)."""
        image_format = self.plot_format(path)
        from matplotlib.figure import Figure

        if not self.layers:
            raise ValueError("the load covers no MoE layer: there is nothing to plot")
        width = max(self.num_experts)
        panels = {"speech share ρA": self.rho_speech, "text share ρT": self.rho_text, "score ρA·(1−ρT)": self.scores}
        figure = Figure(figsize=(4 + 1.2 * width, 1.5 + 0.35 * len(self.layers)), layout="constrained")
        for axes, (title, values) in zip(figure.subplots(1, len(panels)), panels.items(), strict=True):
            grid = torch.full((len(self.layers), width), float("nan"), dtype=torch.float64)
            for row, value in enumerate(values):
                grid[row, : value.numel()] = value
            image = axes.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
            axes.set_title(title)
            axes.set_xlabel("expert (source index)")
            axes.set_ylabel("layer")
            axes.set_yticks(range(len(self.layers)), labels=[str(layer) for layer in self.layers])
            figure.colorbar(image, ax=axes)
        with atomic_output_file(path, overwrite=overwrite) as partial:
            figure.savefig(partial, format=image_format)


def profile_modality_load(model: DeepTalkForCausalLM | DeepTalkModel, batches: Iterable[Mapping]) -> ModalityLoad:
    """Measure how `model` (a DeepTalk LLM, or the `DeepTalkModel` that `AutoModel` loads) routes speech and text
    tokens, with modality routing off.

    `batches` yields dicts with `input_ids` (`[batch, seq]` or `[seq]`, tensors or lists) and optionally
    `modality_ids` (1 marks speech; otherwise the id block decides), `attention_mask` (0 marks padding, which is
    not counted) and `position_ids` (a padding-free batch, e.g. from transformers' `DataCollatorWithFlattening`:
    positions restart at each packed sequence, which then attends to itself only). The model runs in eval mode with
    `modality_routing="none"`; both are restored afterwards.
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):  # profiling only reads the model
        model = model.module
    if isinstance(model, PeftModel):  # its adapters stay active: the load of the adapted model
        adapter = model.active_peft_config
        if adapter.is_prompt_learning:  # virtual tokens live in PeftModel's forward, not the base's
            raise ValueError(
                f"profile_modality_load measures the model on the batches' ids; a {adapter.peft_type.value} adapter's "
                "virtual tokens would be left out (the base model measured, silently): profile the base model, or one "
                "with LoRA adapters"
            )
        model = model.get_base_model()
    if isinstance(getattr(model, "language_model", None), DeepTalkForCausalLM):
        raise ValueError(
            "profile_modality_load measures a DeepTalk LLM on id batches: pass the audio model's language_model "
            "(audio features are not taken)"
        )
    config = model.config
    if not isinstance(config, DeepTalkConfig):  # else an AttributeError on the first DeepTalk field read
        raise ValueError(
            f"profile_modality_load measures a DeepTalk LLM, got a {type(model).__name__}: import the MoE first "
            "(upcycle_moe), then profile the DeepTalk model"
        )
    if config.num_audio_streams:
        raise ValueError(
            f"profile_modality_load reads single-stream batches; this model has num_audio_streams="
            f"{config.num_audio_streams} parallel streams, which it does not support"
        )
    if isinstance(batches, Mapping):
        raise ValueError("batches must be an iterable of batch dicts: wrap a single batch in a list")
    layers = config.moe_layers
    decoder_layers = model.get_decoder().layers  # also the `DeepTalkModel` that `AutoModel` loads, or compiled
    blocks = [decoder_layers[layer].mlp for layer in layers]
    sizes = [sum(config.layer_experts(layer)) for layer in layers]
    counts = {modality: [torch.zeros(n, dtype=torch.int64) for n in sizes] for modality in ("speech", "text")}
    mass = {modality: [torch.zeros(n, dtype=torch.float64) for n in sizes] for modality in ("speech", "text")}
    tokens = {"speech": 0, "text": 0}
    # Only the router logits are read: the language-model head runs on one position, not on [batch, seq, vocab]
    # logits (with a 150k vocabulary, gigabytes per batch).
    head = {"logits_to_keep": 1} if isinstance(model, DeepTalkForCausalLM) else {}
    for number, batch in enumerate(batches):
        input_ids, extra = _profile_batch(number, batch, model.device, config.vocab_size)
        # Switched around the forward only, not while `batches` makes the next batch (it may run the model itself).
        routing, training = config.modality_routing, {module: module.training for module in model.modules()}
        config.modality_routing = "none"
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(input_ids=input_ids, output_router_logits=True, use_cache=False, **head, **extra)
        finally:
            config.modality_routing = routing
            for module, mode in training.items():  # each module's own (`model.train(mode)` would set them all alike)
                module.training = mode
        is_speech = speech_positions(
            config, input_ids, extra.get("modality_ids"), input_ids.shape, model.device
        ).reshape(-1)
        valid = extra["attention_mask"].reshape(-1).bool() if "attention_mask" in extra else torch.ones_like(is_speech)
        selections = {"speech": valid & is_speech, "text": valid & ~is_speech}
        for modality, selected in selections.items():
            tokens[modality] += int(selected.sum())
        for i, logits in enumerate(outputs.router_logits):
            probs, _, indices = blocks[i].route_all(logits.float())
            for modality, selected in selections.items():
                selected = selected.to(indices.device)  # under a device_map each layer routes on its own device
                picked = indices[selected].reshape(-1).cpu()
                counts[modality][i] += torch.bincount(picked, minlength=sizes[i] + 1)[: sizes[i]]
                mass[modality][i] += probs[selected].sum(0).double().cpu()
    return ModalityLoad(
        layers=layers,
        top_k=config.num_experts_per_tok,
        speech_counts=counts["speech"],
        text_counts=counts["text"],
        speech_mass=mass["speech"],
        text_mass=mass["text"],
        speech_tokens=tokens["speech"],
        text_tokens=tokens["text"],
    )


def _profile_batch(
    number: int, batch: object, device: torch.device, vocab_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`batch` as `[batch, seq]` ids and masks, checked: a malformed batch fails here, by number, not deep inside the
    model (an id out of range is a device assert on a GPU) or, with a mask of another shape, not at all."""

    def refuse(problem: str) -> ValueError:
        return ValueError(f"batch {number}: {problem}")

    if not isinstance(batch, Mapping) or batch.get("input_ids") is None:
        raise refuse(f"expected a dict with input_ids, got {type(batch).__name__}")
    tensors = {}
    for key in ("input_ids", "attention_mask", "modality_ids", "position_ids"):
        if batch.get(key) is not None:
            try:
                value = torch.as_tensor(batch[key], device=device)
            except (TypeError, ValueError, RuntimeError) as error:  # ragged or non-numeric lists
                raise refuse(f"{key} is not a tensor ({error})") from error
            tensors[key] = value.unsqueeze(0) if value.dim() == 1 else value
    input_ids = tensors.pop("input_ids")
    if input_ids.dim() != 2 or not input_ids.numel() or not has_integer_dtype(input_ids):
        raise refuse(
            f"input_ids must be non-empty integer ids [batch, seq] or [seq], got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
    if not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab_size:
        raise refuse(f"input_ids has ids outside [0, {vocab_size})")
    for key, value in tensors.items():
        if value.shape != input_ids.shape:
            raise refuse(f"{key} {tuple(value.shape)} does not match input_ids {tuple(input_ids.shape)}")
        if key == "position_ids":
            if not has_integer_dtype(value):
                raise refuse(f"position_ids must be integers, got {value.dtype}")
        elif not ((value == 0) | (value == 1)).all():  # 1 marks speech or a real token; others would count silently
            raise refuse(f"{key} must hold 0/1 values")
    return input_ids.long(), tensors  # int16 or uint8 ids are ids too, which the embedding does not take


def _choose_speech_experts(
    load: ModalityLoad, index: int, count: int | None, strategy: str, generator: torch.Generator
) -> list[int]:
    """Source indices of the experts that become speech experts in MoE layer `load.layers[index]`."""
    num_experts = load.num_experts[index]
    if strategy == "random":
        return sorted(torch.randperm(num_experts, generator=generator)[:count].tolist())
    ranked = load.ranked(index)
    if strategy == "adaptive":
        # This library's adaptive rule: the experts whose share of the speech traffic exceeds their share of the text
        # traffic, keeping at least one expert in each group (by the score where that trims or tops up the set).
        leaning = (load.rho_speech[index] > load.rho_text[index]).tolist()
        ranked = [e for e in ranked if leaning[e]] + [e for e in ranked if not leaning[e]]
        count = min(max(sum(leaning), 1), num_experts - 1)
    return sorted(ranked[:count])


def _new_module(
    cls: type[nn.Module], config: DeepTalkConfig, tensors: Mapping[str, torch.Tensor], like: nn.Module
) -> nn.Module:
    """An experts or router module holding `tensors` (built on meta, so nothing is allocated twice)."""
    with torch.device("meta"):
        module = cls(config, next(iter(tensors.values())).shape[0])
    for name, tensor in tensors.items():
        setattr(module, name, nn.Parameter(tensor, requires_grad=getattr(like, name).requires_grad))
    return module


def _regroup(block: DeepTalkSparseMoeBlock, speech_ids: list[int]) -> None:
    """Rebuild `block`'s groups so that `speech_ids` (source indices) form the speech group, in source order."""
    config = block.config
    total = block.num_text_experts + block.num_speech_experts
    order = config.expert_order(block.layer_idx) or list(range(total))
    position = {source: p for p, source in enumerate(order)}
    chosen = set(speech_ids)
    groups = [(block.gate, block.experts)]
    if block.num_speech_experts:
        groups.append((block.speech_gate, block.speech_experts))
    biases = [correction_bias(gate) for gate, _ in groups]  # DeepSeek-V3's correction moves with its expert
    combined_bias = None if biases[0] is None else torch.cat([bias.detach() for bias in biases])
    combined = {
        "weight": torch.cat([gate.weight.detach() for gate, _ in groups]),
        "gate_up_proj": torch.cat([experts.gate_up_proj.detach() for _, experts in groups]),
        "down_proj": torch.cat([experts.down_proj.detach() for _, experts in groups]),
    }
    # Indexing with a list copies, so each new parameter has its own storage.
    text_rows = [position[s] for s in range(total) if s not in chosen]
    speech_rows = [position[s] for s in sorted(speech_ids)]
    (text_gate, text_experts), (speech_gate, speech_experts) = groups[0], groups[-1]
    for name in ("speech_gate", "speech_experts"):
        if hasattr(block, name):
            delattr(block, name)
    for rows, gate_name, experts_name, like_gate, like_experts in (
        (text_rows, "gate", "experts", text_gate, text_experts),
        (speech_rows, "speech_gate", "speech_experts", speech_gate, speech_experts),
    ):
        if not rows:
            continue
        router = _new_module(DeepTalkTopKRouter, config, {"weight": combined["weight"][rows]}, like_gate)
        if combined_bias is not None:
            router.e_score_correction_bias = combined_bias[rows]
        experts = _new_module(
            DeepTalkExperts,
            config,
            {name: combined[name][rows] for name in ("gate_up_proj", "down_proj")},
            like_experts,
        )
        setattr(block, gate_name, router)
        setattr(block, experts_name, experts)
    block.num_text_experts, block.num_speech_experts = len(text_rows), len(speech_rows)


def _check_layer_order(values: object, what: str, layers: list[int]) -> None:
    """Per-layer values come in the order of `config.moe_layers`: a mapping (its keys would be read as the values,
    silently) or a set (it has no order, and drops repeats) is refused."""
    if isinstance(values, (Mapping, AbstractSet)):
        kind = "a mapping" if isinstance(values, Mapping) else "a set (it has no order)"
        raise ValueError(f"{what} in the order of config.moe_layers {layers}, not {kind}")


def speech_expert_counts(config: DeepTalkConfig, num_speech_experts: int | Sequence[int] | None) -> list[int]:
    """The per-MoE-layer speech expert counts `assign_modality_experts` takes from `num_speech_experts`, checked (so
    a caller can check them before profiling)."""
    layers = config.moe_layers
    sizes = [sum(config.layer_experts(layer)) for layer in layers]
    if num_speech_experts is None:
        num_speech_experts = [config.layer_experts(layer)[1] for layer in layers]
        if not any(num_speech_experts):  # an imported MoE: the default would move nothing, silently
            raise ValueError(
                "the model has no speech experts yet, so the default num_speech_experts (its current counts) would "
                "move none: pass num_speech_experts"
            )
    _check_layer_order(num_speech_experts, "num_speech_experts is one count, or one per MoE layer", layers)
    # One number for every layer (any number or 0-d array: a fraction is refused below, not iterated) or one per layer.
    single = isinstance(num_speech_experts, Number) or getattr(num_speech_experts, "ndim", None) == 0
    try:
        counts = [_integer(c) for c in ([num_speech_experts] * len(layers) if single else num_speech_experts)]
    except TypeError as error:
        raise ValueError(f"num_speech_experts={num_speech_experts!r} must be whole expert counts") from error
    if len(counts) != len(layers) or any(not 0 <= c < n for c, n in zip(counts, sizes, strict=False)):
        raise ValueError(
            f"num_speech_experts={num_speech_experts} must give, for each of the {len(layers)} MoE layers, a count "
            f"in [0, experts) so at least one text expert remains (experts per layer: {sizes})"
        )
    return counts


def assign_modality_experts(
    model: DeepTalkForCausalLM,
    load: ModalityLoad,
    *,
    num_speech_experts: int | Sequence[int] | None = None,
    strategy: str = "paper",
    seed: int = 0,
) -> list[list[int]]:
    """Move the experts chosen from `load` into each MoE layer's speech group; returns their source indices per layer.

    Strategies:
    - `"paper"` (DeepTalk's rule): per layer, the `num_speech_experts` experts with the highest ρA·(1−ρT) (ties: the
      lowest index).
    - `"adaptive"`: per layer the experts with a larger share of the speech than of the text assignments (ρA > ρT);
      at least one and leaving at least one text expert, by the same score where that trims or tops up the set.
    - `"random"`: `num_speech_experts` experts drawn with `seed` (an ablation baseline).

    `num_speech_experts` is an int or one count per MoE layer; it defaults to the model's current counts, which a model
    without speech experts must not leave to the default (not used by `"adaptive"`). Expert tensors and router rows
    move between `experts`/`gate` and `speech_experts`/`speech_gate`, and `config.num_experts`,
    `config.num_speech_experts` and `config.speech_expert_ids` record the new split, so with
    `modality_routing="none"` the model computes what it did before, up to float rounding (also on an already split
    model: the load and the ids are in source order). Each group's rebuilt tensors keep that group's `requires_grad` (a
    new speech group takes the text group's): a moved expert takes the flag of the group it joins.
    """
    _check_not_data_parallel(model, "moving experts")
    model = _language_model(model)
    config = model.config
    if strategy not in ASSIGNMENT_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is unknown; expected one of {ASSIGNMENT_STRATEGIES}")
    layers = config.moe_layers
    sizes = [sum(config.layer_experts(layer)) for layer in layers]
    if load.layers != layers or load.num_experts != sizes:
        raise ValueError(
            f"the load covers MoE layers {load.layers} with {load.num_experts} experts but the model has layers "
            f"{layers} with {sizes} experts: profile this model"
        )
    if strategy != "random":
        for modality, total in (("speech", load.speech_tokens), ("text", load.text_tokens)):
            if not total:
                raise ValueError(f"the load has no {modality} tokens; profile on both speech and text data")
    if strategy == "adaptive":
        if num_speech_experts is not None:
            raise ValueError("strategy='adaptive' chooses the per-layer counts itself; do not pass num_speech_experts")
        if min(sizes) < 2:
            raise ValueError(f"strategy='adaptive' needs at least 2 experts per MoE layer, got {sizes}")
        counts: list[int | None] = [None] * len(layers)
    else:
        counts = speech_expert_counts(config, num_speech_experts)
    try:
        generator = torch.Generator().manual_seed(_integer(seed))
    except TypeError as error:
        raise ValueError(f"seed={seed!r} must be an integer (it makes the random draws reproducible)") from error
    chosen = [_choose_speech_experts(load, i, count, strategy, generator) for i, count in enumerate(counts)]
    move_speech_experts(model, chosen)
    return chosen


def move_speech_experts(model: DeepTalkForCausalLM, speech_expert_ids: Sequence[Sequence[int]]) -> None:
    """Make exactly `speech_expert_ids` (source indices, one list per MoE layer) each layer's speech experts.

    The move behind `assign_modality_experts`, for a split chosen some other way: a published one, or one picked by a
    measure other than the load. Indices are in source order, so it also re-splits an already split model; with
    `modality_routing="none"` the model computes what it did before, up to float rounding.
    """
    check_no_adapters(model, "moving experts regroups the base tensors under any adapter on them")
    _check_not_data_parallel(model, "moving experts")
    model = _language_model(model)
    config = model.config
    layers = config.moe_layers
    sizes = [sum(config.layer_experts(layer)) for layer in layers]
    _check_layer_order(speech_expert_ids, "speech_expert_ids is one list per MoE layer,", layers)
    if len(speech_expert_ids) != len(layers):
        raise ValueError(
            f"speech_expert_ids has {len(speech_expert_ids)} lists but the model has {len(layers)} MoE layers {layers}"
        )
    chosen = []
    for layer, given, size in zip(layers, speech_expert_ids, sizes, strict=True):
        try:
            ids = sorted(_integer(i) for i in given)  # an index of 2.5 or True is a mistake, not one to round
        except TypeError as error:
            raise ValueError(
                f"speech_expert_ids for MoE layer {layer} must be integer expert indices, got {given!r}"
            ) from error
        if len(set(ids)) != len(ids) or any(not 0 <= i < size for i in ids) or len(ids) >= size:
            raise ValueError(
                f"speech_expert_ids for MoE layer {layer} must be distinct indices in [0, {size}) leaving at least one "
                f"text expert, got {list(given)}"
            )
        chosen.append(ids)
    # Every layer's current order is read from the config before the config records the new one.
    decoder_layers = model.get_decoder().layers
    offloaded = [layer for layer in layers if any(t.is_meta for t in decoder_layers[layer].mlp.state_dict().values())]
    if offloaded:  # placeholders of accelerate's offloading: the regrouped experts would hold no weights
        raise ValueError(
            f"the experts of MoE layers {offloaded} are offloaded (on the meta device, as a device_map with cpu or disk "
            "offload leaves them): load the model without offloading to move experts"
        )
    for layer, ids in zip(layers, chosen, strict=True):
        _regroup(decoder_layers[layer].mlp, ids)
    config.num_experts = [size - len(ids) for size, ids in zip(sizes, chosen, strict=True)]
    config.num_speech_experts = [len(ids) for ids in chosen]
    config.speech_expert_ids = chosen
    config.validate_deeptalk()


def _check_not_data_parallel(model: nn.Module, what: str) -> None:
    """(Distributed)DataParallel records the parameters it reduces, and which train, when it is built: changing them
    under it breaks its next steps, so `what` is done on the bare model, which is then wrapped again."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError(
            f"{what} on a {type(model).__name__}, which keeps the parameters and trainable set it was built with: do it "
            "on the bare model (.module), then wrap that in a new one"
        )


def _language_model(model: nn.Module) -> DeepTalkForCausalLM:
    """The DeepTalk LLM whose experts move: the model, or an audio model's language model (which shares its config)."""
    language_model = getattr(model, "language_model", None)
    return language_model if isinstance(language_model, DeepTalkForCausalLM) else model  # type: ignore[return-value]


def add_speech_attention(model: nn.Module) -> None:
    """Give every attention layer speech projections (`config.speech_attention`), copies of its text ones.

    The model computes what it did before up to float rounding (bit for bit on text-only inputs and at text positions
    before the first speech position: later text attends to keys and values the speech copies compute). From
    then on speech positions use the copies, which are speech tensors (the `"speech"` stage trains them), so speech
    learns to attend without changing text attention. The copies keep the `requires_grad` of the tensors they copy;
    saved checkpoints record the setting in the config.
    """
    _check_not_data_parallel(model, "add_speech_attention")
    layers = speech_attention_layers(model)
    for attention in layers:
        attention.add_speech_projections()
    layers[0].config.speech_attention = True


def speech_attention_layers(model: nn.Module) -> list[DeepTalkAttention]:
    """The attention layers `add_speech_attention` would extend; a `ValueError` if it cannot (no standard attention,
    or speech attention already there), so callers can check before expensive work."""
    # A copied PEFT layer would be an adapter its config does not name: saved, then dropped on loading.
    check_no_adapters(model, "the speech projections are copies of the text ones, adapters included")
    layers = [module for module in model.modules() if isinstance(module, DeepTalkAttention)]
    if not layers:
        raise ValueError(
            "the model has no standard attention layers to give speech projections (multi-head latent "
            "attention is not supported)"
        )
    if layers[0].config.speech_attention:
        raise ValueError("the model already has speech attention (config.speech_attention is True)")
    return layers


def also_patterns(also: Iterable[str]) -> tuple[str, ...]:
    """`also` as a tuple, read once (a generator would be used up by the first pass over it)."""
    if isinstance(also, str):  # a string is a sequence too: each character would be a pattern
        raise TypeError(f"also={also!r} is one string; pass a sequence of patterns, e.g. also=({also!r},)")
    if not isinstance(also, Iterable):
        raise TypeError(f"also={also!r} must be a sequence of glob patterns over parameter names")
    return tuple(also)


def _name_inside_deeptalk(model: nn.Module) -> Callable[[str], str]:
    """A parameter's name inside the outermost DeepTalk model holding it (its own name elsewhere): the stage rules
    read that, so a wrapper's attribute (`speech_llm`) cannot make every tensor a speech tensor."""
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, DeepTalkPreTrainedModel | DeepTalkForConditionalGeneration):
            if not any(name.startswith(prefix) for prefix in prefixes):
                prefixes.append(f"{name}." if name else "")
    return lambda name: name.removeprefix(next((p for p in prefixes if name.startswith(p)), ""))


def _audio_models(model: nn.Module) -> list[DeepTalkForConditionalGeneration]:
    """The speech-input models in `model`: itself, or held by a user's module."""
    return [module for module in model.modules() if isinstance(module, DeepTalkForConditionalGeneration)]


def training_stage_parameters(model: nn.Module, stage: str, *, also: Iterable[str] = ()) -> list[str]:
    """Names of the parameters that training stage `stage` trains, plus those matching `also`; the model is unchanged.

    The one definition of the stages: `set_training_stage` (full training) and `lora_config_for_stage` (LoRA) both
    read it, so a stage names the same tensors either way (LoRA adapts the linear and experts tensors among them).

    - `"speech"`: every speech tensor (name contains `speech`) except the audio encoder;
    - `"text"`: the text experts and the text router only (`mlp.experts`, `mlp.gate`);
    - `"joint"`: everything except the audio encoder;
    - `"align"`: the speech connector only (a model without an audio encoder is an error).

    `also` adds glob patterns over parameter names (e.g. `"*.self_attn.*"`); each must match something. Tensors the
    audio encoder's own model keeps fixed (Whisper's sinusoidal positions) stay frozen.
    """
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage={stage!r} is unknown; expected one of {TRAINING_STAGES}")
    also = also_patterns(also)
    # Names would select the frozen base tensors inside PEFT's wrappers (and PEFT allows one set of experts tensors
    # across adapters): stages take turns, merging in between.
    check_no_adapters(model, "stages select tensors by name, which would reach the base weights inside them")
    # Each tensor once, by its first name; `also` may name a tied one by any (a tied `lm_head.weight` is the embeddings').
    canonical = {id(param): name for name, param in model.named_parameters()}
    names = list(canonical.values())
    own_name = _name_inside_deeptalk(model)
    if stage == "align" and not any("audio_encoder" in own_name(name) for name in names):
        raise ValueError("stage 'align' trains the speech connector of an audio encoder, but this model has none")
    rules = {
        "speech": lambda name: "speech" in name and "audio_encoder" not in name,
        "text": lambda name: "speech" not in name and _TEXT_EXPERTS.search(name) is not None,
        "joint": lambda name: "audio_encoder" not in name,
        "align": lambda name: "speech_connector" in name,
    }
    # What each audio encoder's own model never trains, by the encoder's class (the composite may sit in a wrapper).
    fixed = {
        canonical[id(composite.audio_encoder.get_parameter(n))]: type(composite.audio_encoder).__name__
        for composite in _audio_models(model)
        for n in composite.fixed_encoder_parameters
    }
    aliases = [(alias, canonical[id(param)]) for alias, param in model.named_parameters(remove_duplicate=False)]
    for pattern in also:
        matched = {name for alias, name in aliases if fnmatchcase(alias, pattern)}
        if not matched:
            raise ValueError(f"also pattern {pattern!r} matches no parameter of the model")
        if matched <= fixed.keys():
            raise ValueError(
                f"also pattern {pattern!r} matches only {sorted(matched)}, which "
                f"{' and '.join(sorted({fixed[name] for name in matched}))} never trains"
            )
    by_also = {name for alias, name in aliases if any(fnmatchcase(alias, pattern) for pattern in also)}
    trainable = [name for name in names if (rules[stage](own_name(name)) or name in by_also) and name not in fixed]
    if not trainable:
        reason = {
            "speech": "it has no speech tensors (speech vocabulary, experts or attention): add them first, e.g. with "
            "resize_speech_vocab and assign_modality_experts",
            "text": "it has no text experts or text router (mlp.experts, mlp.gate): no layer is an MoE layer",
            "joint": "it has no parameters outside the audio encoder",
            "align": "it has no speech connector",
        }
        raise ValueError(f"stage {stage!r} leaves nothing to train in this model: {reason[stage]}")
    return trainable


def set_training_stage(model: nn.Module, stage: str, *, also: Iterable[str] = ()) -> list[str]:
    """Make exactly one training stage's tensors trainable (whole tensors, so it is exact with any optimizer).

    The stages and `also` are those of `training_stage_parameters`. Frozen tensors lose any stale `.grad`, so an
    optimizer holding them leaves them untouched; the audio encoder's frozen parts go to eval mode. Returns the trainable
    names.
    """
    _check_not_data_parallel(model, "set_training_stage")
    trainable = training_stage_parameters(model, stage, also=also)
    selected = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in selected)
        if name not in selected:
            param.grad = None
    for composite in _audio_models(model):  # its encoder's modes follow which parts are frozen (see its `train`)
        composite.train(composite.training)
    return trainable


__all__ = [
    "ASSIGNMENT_STRATEGIES",
    "TRAINING_STAGES",
    "ModalityLoad",
    "add_speech_attention",
    "assign_modality_experts",
    "move_speech_experts",
    "profile_modality_load",
    "set_training_stage",
    "speech_expert_counts",
    "training_stage_parameters",
]
