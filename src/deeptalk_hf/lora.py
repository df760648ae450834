"""LoRA for DeepTalk's training stages: a ready `peft.LoraConfig` per stage, so nobody has to know parameter names.

A stage means the same tensors here as in `set_training_stage` (both read `training_stage_parameters`); this module
only decides *how* each of them is adapted:
- the 3D experts tensors (`mlp.experts.*`, `mlp.speech_experts.*`) get LoRA through PEFT's `target_parameters`;
- linear layers (attention, dense MLPs, shared experts, routers) and, through `also`, an audio encoder's 1D
  convolutions get LoRA through `target_modules`;
- the speech modules that an upcycled or audio-extended model creates new (speech embeddings and output heads, the
  parallel audio streams' tables, the speech connector) train in full through `modules_to_save`: their rows start
  from a mean or at random, far from anything a low-rank update of them could reach;
- the rest stays frozen, as PEFT's `"all-linear"` leaves it: norms, biases, the text embeddings and the LM head.
"""

from collections import Counter
from collections.abc import Iterable
from fnmatch import fnmatchcase

import torch
from peft import LoraConfig
from torch import nn
from transformers import PreTrainedModel

from .modality import also_patterns, training_stage_parameters
from .modeling_deeptalk import DeepTalkExperts

NEW_SPEECH_MODULES = (
    "speech_embed_tokens",
    "speech_lm_head",
    "speech_stream_embed",
    "speech_stream_heads",
    "speech_connector",
)
TIED_SPEECH_MODULES = ("speech_embed_tokens", "speech_lm_head")  # tied to each other under `tie_word_embeddings`
# `LoraConfig` fields the stage decides.
_CHOSEN_BY_STAGE = {"target_modules", "target_parameters", "modules_to_save", "exclude_modules"}
# Modules that read their layers' attributes instead of only calling them: WavLM's attention passes its projections'
# weights to `F.multi_head_attention_forward` (a LoRA wrapper's forward would never run: its factors would not train,
# and merging would change the model); Whisper's encoder reads its convolutions' `stride`, which PEFT's wrapper
# lacks (every forward would fail). Such layers train in full (`set_training_stage(..., also=...)`).
_LAYERS_READ_DIRECTLY = ("WavLMAttention", "WhisperEncoder")


def _shortest_suffixes(chosen: set[str], universe: Iterable[str]) -> list[str]:
    """The shortest dotted suffixes that select exactly `chosen` among `universe` under PEFT's matching (a name
    matches `s` if it is `s` or ends with `"." + s`): e.g. `"speech_gate"` rather than one name per layer, and still
    exact where names repeat elsewhere (an audio encoder's `self_attn.q_proj`)."""
    matches, hits = Counter(), Counter()
    for name in universe:
        parts = name.split(".")
        for start in range(len(parts)):
            suffix = ".".join(parts[start:])
            matches[suffix] += 1
            hits[suffix] += name in chosen
    suffixes = set()
    for name in chosen:
        parts = name.split(".")
        # A suffix starts at a name, not at a layer index ("layers.2.self_attn.q_proj", never "2.self_attn.q_proj").
        starts = [start for start in reversed(range(len(parts))) if not parts[start].isdigit()]
        candidates = (".".join(parts[start:]) for start in starts)
        suffixes.add(next(suffix for suffix in candidates if matches[suffix] == hits[suffix]))
    return sorted(suffixes)


def _check_not_sharded(model: nn.Module) -> None:
    """PEFT's LoRA added to a model whose tensors are already sharded (DTensors: `from_pretrained(...,
    distributed_config=...)` or FSDP2) fails under tensor parallelism (PEFT 0.21 sizes the factors by the local shard,
    transformers' TP hooks read them as the whole: a shape error at the first forward) and on the experts tensors, and
    under FSDP trains factors that are not sharded, so not averaged across ranks (the ranks' adapters drift apart):
    transformers' own MoE models alike. Adding the adapter first and sharding after works."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = next((name for name, param in model.named_parameters() if isinstance(param, DTensor)), None)
    if sharded is not None:
        raise ValueError(
            f"lora_config_for_stage on a sharded model ({sharded} is a DTensor: loaded with a distributed_config, or "
            "FSDP-wrapped): PEFT's LoRA does not work on sharded tensors (tensor or expert parallelism: it fails; FSDP: "
            "the adapter's gradients are not averaged across ranks). Add the adapter to the model loaded without "
            "distributed_config, then shard it (FSDP2: fully_shard on each decoder layer, then on the model)"
        )


def lora_config_for_stage(
    model: nn.Module,
    stage: str,
    *,
    also: Iterable[str] = (),
    train_new_speech_modules: bool = True,
    **lora_kwargs,
) -> LoraConfig:
    """A `LoraConfig` that adapts what training stage `stage` trains in `model` (see `set_training_stage`).

    - `"speech"`: LoRA on the speech experts, speech routers and speech attention projections (if any); the speech
      embeddings and output heads in full (speech q/k norms stay frozen, as norms do in every stage).
    - `"text"`: LoRA on the text experts and text routers only.
    - `"joint"`: LoRA on both experts groups, all routers, attention, dense MLPs and shared experts; the speech
      embeddings and output heads in full; text embeddings, LM head and norms frozen.
    - `"align"`: the speech connector in full; pass `also` (e.g. `model.audio_encoder_top_layers(2)`) to add LoRA
      on encoder layers.

    `also` adds glob patterns over parameter names (e.g. `("*.self_attn.*",)` in the speech stage); together they must
    reach a linear layer, a Conv1d or an experts tensor. `train_new_speech_modules=False` leaves the speech embeddings, heads and
    connector frozen (a model whose speech vocabulary is already trained). Other keywords (`r`, `lora_alpha`, ...) go
    to `LoraConfig`, but not the fields the stage decides (`target_modules`, `modules_to_save`, ...: set them on the
    result); PEFT's LoRA on experts tensors needs `lora_dropout=0` (the default; another value is refused for a stage
    that adapts experts).
    """
    chosen = sorted(_CHOSEN_BY_STAGE & lora_kwargs.keys())
    if chosen:  # PEFT would say "got multiple values", blaming LoraConfig
        raise ValueError(
            f"lora_config_for_stage chooses {chosen} from the stage: add tensors with also= patterns, or change "
            "these fields on the LoraConfig it returns"
        )
    also = also_patterns(also)
    stage_names = training_stage_parameters(model, stage, also=also)
    if not isinstance(model, PreTrainedModel):  # its output embeddings and config decide what LoRA may wrap
        raise TypeError(
            f"lora_config_for_stage takes a transformers model, got {type(model).__name__}: pass the DeepTalk model "
            "it holds and give the config to get_peft_model with that model (PEFT adapts its layers in place)"
        )
    _check_not_sharded(model)
    modules = dict(model.named_modules())
    output_embeddings = model.get_output_embeddings()
    target_modules, target_parameters, modules_to_save, read_directly = set(), set(), set(), set()
    for name in stage_names:
        module_name, _, param_name = name.rpartition(".")
        path = module_name.split(".")
        new = next((i for i, part in enumerate(path) if part in NEW_SPEECH_MODULES), None)
        if new is not None:
            if train_new_speech_modules:
                modules_to_save.add(".".join(path[: new + 1]))
            continue
        module = modules[module_name]
        parent = modules[module_name.rpartition(".")[0]]
        if isinstance(module, DeepTalkExperts):
            target_parameters.add(name)
        # A grouped (depthwise) convolution is left out: PEFT needs a rank divisible by its groups.
        elif (
            isinstance(module, (nn.Linear, nn.Conv1d))
            and param_name == "weight"
            and module is not output_embeddings
            and getattr(module, "groups", 1) == 1
        ):
            if type(parent).__name__ in _LAYERS_READ_DIRECTLY:
                read_directly.add(name)
            else:
                target_modules.add(module_name)
    adapted = target_parameters | {f"{module}.weight" for module in target_modules}
    if also and not any(fnmatchcase(name, pattern) for name in adapted for pattern in also):
        skipped = sorted(name for name in read_directly if any(fnmatchcase(name, pattern) for pattern in also))
        raise ValueError(
            f"also={list(also)} reaches no linear layer, convolution or experts tensor that LoRA can adapt"
            + (
                f" ({', '.join(skipped)}: their module reads their attributes directly, which a LoRA wrapper breaks; "
                "train them in full with set_training_stage(..., also=...))"
                if skipped
                else ""
            )
        )
    if not adapted:
        raise ValueError(
            f"stage {stage!r} has no linear layer or experts tensor to adapt in this model; train it in full with "
            f"set_training_stage(model, {stage!r}), or pass `also` patterns"
        )
    if target_parameters and lora_kwargs.get("lora_dropout"):  # PEFT would name its `ParamWrapper`, not the experts
        raise ValueError(
            f"lora_dropout={lora_kwargs['lora_dropout']}: stage {stage!r} adapts experts tensors (e.g. "
            f"{min(target_parameters)}), on which PEFT's LoRA takes no dropout: pass lora_dropout=0 (the default)"
        )
    tied = sorted(name for name in modules_to_save if name.rpartition(".")[2] in TIED_SPEECH_MODULES)
    if tied and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        raise ValueError(
            f"{', '.join(tied)}: the speech embeddings and output head are tied, and PEFT's modules_to_save would "
            "untie them: pass train_new_speech_modules=False (and train them with set_training_stage before adding "
            "LoRA)"
        )
    # CAUSAL_LM: get_peft_model gives a PeftModelForCausalLM, and AutoPeftModelForCausalLM can load the adapter of a
    # DeepTalkForCausalLM (the audio model's loads with PeftModel.from_pretrained on the composite).
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(
        target_modules=_shortest_suffixes(target_modules, modules),
        target_parameters=_shortest_suffixes(target_parameters, (name for name, _ in model.named_parameters())),
        modules_to_save=sorted(modules_to_save) or None,
        **lora_kwargs,
    )


__all__ = ["NEW_SPEECH_MODULES", "lora_config_for_stage"]
