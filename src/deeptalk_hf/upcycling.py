"""Upcycling dense LLMs and importing MoE LLMs as DeepTalk models that compute the same function.

Upcycling (`upcycle_dense`) turns a dense Llama / Qwen2 / Qwen3 / Mistral LLM into a DeepTalk MoE. Every routed expert
starts as a part of the dense MLP and the routers start at zero. DeepTalk's top-k is tie-stable, so a zero router picks
the lowest-index experts with equal weights; the experts are laid out so that those picks hold every part equally
often, and `routed_scaling_factor` undoes the renormalisation: the upcycled model *is* the dense model until training
moves the routers.

Importing (`upcycle_moe`) maps a Qwen2-MoE / Qwen3-MoE / Mixtral / OLMoE / DeepSeek-V2 / DeepSeek-V3 model onto
DeepTalk name by name (one small table per family, `MOE_ARCHITECTURES`): the result is the source MoE, with all its
experts as text experts; the speech experts come later from profiling and assignment (`deeptalk_hf.modality`).

Both work tensor by tensor on the on-disk layout (one source tensor in, its DeepTalk tensors out, in the per-expert
layout that `from_pretrained` fuses), so the same converter builds a model in memory and streams a checkpoint directory
to disk shard by shard, atomically, without ever holding the source and the result at once.
"""

import copy
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download, split_torch_state_dict_into_shards
from huggingface_hub.errors import StrictDataclassError
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.core_model_loading import build_glob_alternation, revert_weight_conversion
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import remove_tied_weights_from_state_dict, str_to_torch_dtype
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging
from transformers.utils.hub import convert_file_size_to_int

from .configuration_deeptalk import DeepTalkConfig, is_whole
from .modeling_deeptalk import DeepTalkForCausalLM, check_no_adapters

logger = logging.get_logger(__name__)

# What differs between the supported dense families, in DeepTalk's terms (everything else maps field by field).
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "llama": {"qkv_bias": False, "use_qk_norm": False},
    "mistral": {"qkv_bias": False, "use_qk_norm": False},
    "qwen2": {"qkv_bias": True, "use_qk_norm": False},
    "qwen3": {"qkv_bias": False, "use_qk_norm": True},
}
_DENSE_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_EMBEDDINGS, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
_SPEECH_ROWS = {_EMBEDDINGS: "model.speech_embed_tokens.weight", _HEAD: "speech_lm_head.weight"}
# Files of a hub snapshot that conversion reads besides the weights (configs, index, tokenizer files and their code;
# no `.bin` weights, no images or docs).
_SNAPSHOT_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenization_*.py"]
# A tokenizer's files, copied as they are (loading one can need its own code, `tokenization_*.py`).
_TOKENIZER_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "tokenization_*.py",
    "additional_chat_templates",
)
# Folders a saved model's folder may hold (a tokenizer's templates; `hf download --local-dir`'s metadata).
_MODEL_FOLDER_SUBFOLDERS = ("additional_chat_templates", ".cache")
# Tensors that transformers drops when loading a source (Llama-2-era checkpoints hold the rotary frequencies).
_IGNORED_SOURCE_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# Weight dtypes a converted checkpoint may take.
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class CheckpointError(ValueError):
    """The source cannot be converted: unsupported architecture, missing, truncated or corrupt files."""


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    resolved = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), None)
    if resolved not in _FLOAT_DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is not a weights dtype: expected one of float32, bfloat16, float16, float64"
        )
    return resolved


def _check_architecture(source: PretrainedConfig, supported: Iterable[str], what: str) -> None:
    """Refuse an unsupported `model_type` (naming it and the supported ones, and the other entry point where it has
    one) and quantized checkpoints (their weights are not plain tensors)."""
    kind = source.model_type
    if kind not in supported:
        names = ", ".join(getattr(source, "architectures", None) or []) or type(source).__name__
        hint = ""
        if kind in SUPPORTED_ARCHITECTURES:
            hint = " (it is a dense model: use upcycle_dense, or upcycle_checkpoint to write a checkpoint)"
        elif kind in MOE_ARCHITECTURES:
            hint = " (it is an MoE: use upcycle_moe, or upcycle_moe_checkpoint to write a checkpoint)"
        elif kind == DeepTalkConfig.model_type:
            hint = " (it is already a DeepTalk model: load it with from_pretrained)"
        raise CheckpointError(
            f"cannot convert model_type {kind!r} ({names}): supported {what} architectures are "
            f"{', '.join(sorted(supported))}{hint}"
        )
    quantization = getattr(source, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else type(quantization).__name__
        raise CheckpointError(f"cannot convert a quantized {kind} checkpoint ({method}): dequantize it first")
    if getattr(source, "mlp_bias", False):
        raise CheckpointError(f"cannot convert a {kind} model with mlp_bias=True: DeepTalk experts have no bias")
    # Values the model would fail on only once built (a KeyError), or a checkpoint that could not be loaded again.
    if source.hidden_act not in ACT2FN:
        raise CheckpointError(
            f"the source config's hidden_act={source.hidden_act!r} is not an activation transformers has"
        )
    rope_type = (source.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise CheckpointError(f"the source config's rope_type={rope_type!r} is not one transformers has")
    try:
        _as_dtype(source.dtype)
    except ValueError as error:
        raise CheckpointError(f"the source config's {error}") from None
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    small = {name: value for name in sizes if not (value := getattr(source, name, None)) or value < 0}
    if small:  # else refused later as if an option were wrong, or a model that fails in its first forward
        raise CheckpointError(f"the source config's {small} must be positive sizes")
    if source.num_attention_heads % source.num_key_value_heads:
        raise CheckpointError(
            f"the source config's num_attention_heads={source.num_attention_heads} is not a multiple of its "
            f"num_key_value_heads={source.num_key_value_heads}"
        )


def _common_fields(source: PretrainedConfig, speech_vocab_size: int, dtype: torch.dtype | None) -> dict[str, Any]:
    """The DeepTalk config fields that every supported family carries under the same name."""
    if not is_whole(speech_vocab_size, 0):  # (added to the source's vocabulary before the config checks it)
        raise ValueError(f"speech_vocab_size={speech_vocab_size!r} must be a whole number of speech ids, >= 0")
    return dict(
        vocab_size=source.vocab_size + speech_vocab_size,
        speech_vocab_size=speech_vocab_size,
        hidden_size=source.hidden_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=source.initializer_range,
        rms_norm_eps=source.rms_norm_eps,
        use_cache=source.use_cache,
        tie_word_embeddings=source.tie_word_embeddings,
        output_router_logits=_declared(source, "output_router_logits") or False,  # MoE sources: eval outputs and loss
        rope_parameters=copy.deepcopy(source.rope_parameters),
        attention_dropout=source.attention_dropout,
        pad_token_id=source.pad_token_id,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        dtype=dtype or source.dtype or torch.float32,
        architectures=["DeepTalkForCausalLM"],
    )


def _declared(config: PretrainedConfig, name: str) -> Any:
    """A field the config's class declares, else `None`: any config takes extra attributes, which its model ignores
    (e.g. `layer_types` on a Mistral config, whose model slides the window on every layer)."""
    return getattr(config, name) if name in {f.name for f in fields(config)} else None


def deeptalk_config_from_dense(
    dense: PretrainedConfig,
    *,
    num_text_experts: int,
    num_speech_experts: int,
    num_experts_per_tok: int,
    granularity: int = 1,
    num_shared_experts: int = 0,
    speech_vocab_size: int = 0,
    mlp_only_layers: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> DeepTalkConfig:
    """The DeepTalk config of an upcycled dense model: the dense architecture field by field, plus the experts.

    With `granularity=g` the dense intermediate dimension is cut into g parts of `intermediate_size / g`;
    `num_shared_experts` of them form the always-on shared expert and every routed expert holds one of the other
    `g - num_shared_experts` parts. Expert counts and `num_experts_per_tok` count these fine-grained routed experts and
    must be multiples of `g - num_shared_experts`, so the top-k picks can hold whole sets of parts.
    """
    _check_architecture(dense, SUPPORTED_ARCHITECTURES, "dense")
    intermediate = dense.intermediate_size
    if granularity < 1 or intermediate % granularity:
        raise ValueError(
            f"granularity={granularity} must be a positive divisor of the dense intermediate_size={intermediate}"
        )
    if not 0 <= num_shared_experts < granularity:
        raise ValueError(
            f"num_shared_experts={num_shared_experts} must be in [0, granularity={granularity}): the shared expert "
            "takes that many of the granularity parts and the routed experts need at least one"
        )
    routed_parts = granularity - num_shared_experts
    counts = {
        "num_text_experts": num_text_experts,
        "num_speech_experts": num_speech_experts,
        "num_experts_per_tok": num_experts_per_tok,
    }
    if num_text_experts < 1 or num_speech_experts < 0 or num_experts_per_tok < 1:
        raise ValueError(
            f"num_text_experts={num_text_experts} must be >= 1 (at least one text expert), num_speech_experts="
            f"{num_speech_experts} >= 0 and num_experts_per_tok={num_experts_per_tok} >= 1"
        )
    bad = {name: value for name, value in counts.items() if value % routed_parts}
    if bad:
        raise ValueError(
            f"{bad} must be multiples of granularity - num_shared_experts = {routed_parts} (so the top-k picks of a "
            "zero router hold whole sets of the MLP's parts)"
        )
    part = intermediate // granularity
    return DeepTalkConfig(
        **_common_fields(dense, speech_vocab_size, dtype),
        intermediate_size=intermediate,
        moe_intermediate_size=part,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        attention_bias=_declared(dense, "attention_bias") or False,
        sliding_window=_declared(dense, "sliding_window"),
        layer_types=copy.deepcopy(_declared(dense, "layer_types")),
        mlp_only_layers=sorted(mlp_only_layers or []),
        num_experts=num_text_experts,
        num_speech_experts=num_speech_experts,
        num_experts_per_tok=num_experts_per_tok,
        norm_topk_prob=True,
        routed_scaling_factor=float(routed_parts),
        shared_expert_intermediate_size=num_shared_experts * part,
        **SUPPORTED_ARCHITECTURES[dense.model_type],
    )


@dataclass(frozen=True)
class MoeFamily:
    """How one MoE family maps onto DeepTalk.

    `fields`: DeepTalk config field -> the source config attribute of that name or a function of the source config (a
    missing or `None` value leaves DeepTalk's default, which is `None` or off wherever a source may lack the field); `fixed`: DeepTalk fields that hold for the whole family;
    `renames`: (regex, replacement) pairs, applied in order, from the source's on-disk tensor names to DeepTalk's;
    `mtp_layers`: the checkpoint may hold DeepSeek-V3 multi-token-prediction layers after the decoder layers (not part
    of the causal LM, so not imported, as in transformers).
    """

    fields: Mapping[str, str | Callable[[PretrainedConfig], Any]]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()
    mtp_layers: bool = False


def _same(names: str) -> dict[str, str]:
    """Fields that keep their name, given as one space-separated string."""
    return {name: name for name in names.split()}


_QWEN_MOE = _same(
    "moe_intermediate_size intermediate_size num_experts norm_topk_prob head_dim mlp_only_layers decoder_sparse_step"
)
_DEEPSEEK = {
    **_same(
        "moe_intermediate_size intermediate_size attention_bias q_lora_rank kv_lora_rank qk_nope_head_dim "
        "qk_rope_head_dim v_head_dim routed_scaling_factor n_group topk_group first_k_dense_replace"
    ),
    "num_experts": "n_routed_experts",
    "shared_expert_intermediate_size": lambda c: c.moe_intermediate_size * (c.n_shared_experts or 0),
}
# Mixtral and OLMoE: `intermediate_size` is the expert width (they have no dense layers).
_EXPERT_WIDTH = {"moe_intermediate_size": "intermediate_size", "intermediate_size": "intermediate_size"}

# Each family as transformers implements it (the oracle the tests compare with).
MOE_ARCHITECTURES: dict[str, MoeFamily] = {
    "qwen2_moe": MoeFamily(
        fields={
            **_QWEN_MOE,
            **_same("qkv_bias shared_expert_intermediate_size layer_types"),
            "sliding_window": lambda c: c.sliding_window or None,  # 0 when use_sliding_window is off
            "shared_expert_gate": lambda c: bool(c.shared_expert_intermediate_size),
        },
        fixed={"use_qk_norm": False},
        renames=(
            (r"\.mlp\.shared_expert\.", ".mlp.shared_experts."),
            (r"\.mlp\.shared_expert_gate\.", ".mlp.shared_experts_gate."),
        ),
    ),
    "qwen3_moe": MoeFamily(
        fields={**_QWEN_MOE, **_same("attention_bias sliding_window")},
        fixed={"use_qk_norm": True},
    ),
    "mixtral": MoeFamily(
        fields={**_EXPERT_WIDTH, **_same("head_dim sliding_window"), "num_experts": "num_local_experts"},
        # Mixtral always renormalises its top-k, and weighs its experts' outputs in float32.
        fixed={"norm_topk_prob": True, "use_qk_norm": False, "routing_weights_dtype": "float32"},
        renames=(
            (r"\.block_sparse_moe\.", ".mlp."),
            (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
            (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."),
            (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj."),
        ),
    ),
    "olmoe": MoeFamily(
        fields={**_EXPERT_WIDTH, **_same("num_experts norm_topk_prob attention_bias head_dim clip_qkv")},
        fixed={"use_qk_norm": True, "qk_norm_type": "full"},
    ),
    "deepseek_v2": MoeFamily(
        fields={**_DEEPSEEK, "topk_method": lambda c: c.topk_method or "greedy"},
        # transformers' DeepSeek-V2 router never renormalises its top-k weights, whatever `norm_topk_prob` says.
        fixed={
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "rope_interleave": True,
            "use_qk_norm": False,
            "router_dtype": "float32",
            "rope_complex": True,
        },
    ),
    "deepseek_v3": MoeFamily(
        fields={**_DEEPSEEK, "norm_topk_prob": "norm_topk_prob", "rope_interleave": lambda c: bool(c.rope_interleave)},
        fixed={"scoring_func": "sigmoid", "topk_method": "noaux_tc", "use_qk_norm": False, "router_dtype": "float32"},
        mtp_layers=True,
    ),
}


def deeptalk_config_from_moe(
    source: PretrainedConfig, *, speech_vocab_size: int = 0, dtype: torch.dtype | None = None
) -> DeepTalkConfig:
    """The DeepTalk config of an imported MoE: the source's architecture and routing, every expert a text expert."""
    _check_architecture(source, MOE_ARCHITECTURES, "MoE")
    family = MOE_ARCHITECTURES[source.model_type]
    fields = {
        name: attribute(source) if callable(attribute) else getattr(source, attribute, None)
        for name, attribute in family.fields.items()
    }
    fields = {name: value for name, value in fields.items() if value is not None}
    if hasattr(source, "router_aux_loss_coef"):
        fields["router_aux_loss_coef"] = source.router_aux_loss_coef
    return DeepTalkConfig(
        **_common_fields(source, speech_vocab_size, dtype),
        num_experts_per_tok=source.num_experts_per_tok,
        **copy.deepcopy(fields),
        **family.fixed,
    )


@dataclass(kw_only=True)
class _Converter:
    """Maps each source tensor (on-disk name and layout) to DeepTalk tensors (on-disk names, per-expert layout).

    The base conversion renames (`renames`), drops what is not part of the model (`ignore`, a tied `lm_head`), copies,
    and adds the speech rows of the embeddings and the output head; subclasses convert more.
    """

    config: DeepTalkConfig
    dtype: torch.dtype | None = None
    renames: tuple[tuple[str, str], ...] = ()
    ignore: re.Pattern | None = None
    # Whether unchanged tensors may be passed on as they are: yes for read-only file maps (streaming), no for a
    # user's model (the result must not share storage with it).
    pass_through: bool = False
    # Where copies go: `allocate(name, shape, dtype)`, by default new tensors (streaming reuses shard buffers).
    allocate: Callable[[str, torch.Size, torch.dtype], torch.Tensor] | None = None
    # Source tensors of a part the config gives width 0 (transformers still builds them, empty): dropped, and refused
    # if they hold elements after all.
    empty: re.Pattern | None = None
    _float32_plans: dict[torch.dtype, re.Pattern | None] = field(default_factory=dict, init=False, repr=False)

    @functools.cached_property
    def _meta_model(self) -> DeepTalkForCausalLM:
        with torch.device("meta"):
            return DeepTalkForCausalLM(copy.deepcopy(self.config))

    def _float32_names(self, dtype: torch.dtype) -> re.Pattern | None:
        """Output names the model keeps in float32 when loaded in `dtype` (`_keep_in_fp32_modules_strict` in half
        precision: DeepSeek's correction bias, routers with `router_dtype="float32"`), matched as transformers' loading
        does: they stay float32, as transformers loads and saves them, instead of being rounded (a rounded V3 bias
        moved ~1% of the tokens to other experts)."""
        if dtype not in self._float32_plans:
            plan = self._meta_model._get_dtype_plan(dtype)
            self._float32_plans[dtype] = build_glob_alternation(list(plan))[0] if plan else None
        return self._float32_plans[dtype]

    def _dtype(self, name: str, source_dtype: torch.dtype) -> torch.dtype:
        """The dtype of output `name`: the target dtype (the source's without one), float32 where the model keeps it
        in that dtype, so a half-precision source's routers come out as a conversion to that dtype gives them."""
        dtype = self.dtype or source_dtype
        names = self._float32_names(dtype)
        return torch.float32 if names is not None and names.search(name) else dtype

    def _fresh(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Output `name` as a contiguous copy of `tensor` in its output dtype (never aliasing the source)."""
        dtype = self._dtype(name, tensor.dtype)
        if self.allocate is None or tensor.is_meta:
            return torch.empty(tensor.shape, dtype=dtype, device=tensor.device).copy_(tensor)
        return self.allocate(name, tensor.shape, dtype).copy_(tensor)

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        config = self.config
        if _IGNORED_SOURCE_TENSORS.fullmatch(name) or (self.ignore is not None and self.ignore.match(name)):
            return
        if self.empty is not None and self.empty.match(name):
            if tensor.numel():
                raise CheckpointError(
                    f"{name} has shape {tuple(tensor.shape)}, but the config gives this shared expert width 0"
                )
            return
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        if name == _HEAD and config.tie_word_embeddings:
            return  # tied to the embeddings, in DeepTalk as in the source
        unchanged = self.pass_through and tensor.is_contiguous() and self._dtype(name, tensor.dtype) == tensor.dtype
        result = tensor if unchanged else self._fresh(name, tensor)
        yield name, result
        if config.speech_vocab_size and name in _SPEECH_ROWS:
            # The rows `DeepTalkForCausalLM.resize_speech_vocab` gives: the mean of the text rows.
            rows = result.mean(0, keepdim=True).expand(config.speech_vocab_size, -1)
            yield _SPEECH_ROWS[name], self._fresh(_SPEECH_ROWS[name], rows)

    def plan(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Dry run on meta tensors: every output name and shape, in output order; checked against the DeepTalk model."""
        planned: dict[str, torch.Tensor] = {}
        for name, tensor in tensors:
            for out, result in self.convert(name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")):
                if out in planned:  # the writer would save its shard twice, the second time with this tensor alone
                    raise CheckpointError(f"the source checkpoint gives {out} twice (the second time from {name})")
                planned[out] = result
        model = self._meta_model
        expected = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
        missing = sorted(set(expected) - set(planned))
        unexpected = sorted(set(planned) - set(expected))
        mismatched = sorted(
            f"{k}: {tuple(planned[k].shape)} vs {tuple(expected[k].shape)}"
            for k in set(planned) & set(expected)
            if planned[k].shape != expected[k].shape
        )
        if missing or unexpected or mismatched:
            fused = any(_FUSED_EXPERTS.search(name) for name in unexpected)
            raise CheckpointError(
                "the source checkpoint does not match its config: "
                + "; ".join(
                    f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
                    if keys
                )
                + (
                    " (its experts are in transformers' fused in-memory layout, as a state dict saved by "
                    "safetensors' or accelerate's save_model holds them: save the model with save_pretrained, which "
                    "writes them one by one)"
                    if fused
                    else ""
                )
            )
        return planned


def _moe_converter(source: PretrainedConfig, config: DeepTalkConfig, dtype: torch.dtype | None) -> _Converter:
    family = MOE_ARCHITECTURES[source.model_type]
    ignore = None
    if family.mtp_layers and getattr(source, "num_mtp_layers", 0):
        mtp = "|".join(str(source.num_hidden_layers + i) for i in range(source.num_mtp_layers))
        ignore = re.compile(rf"model\.layers\.({mtp})\.")
    empty = None
    if not config.shared_expert_intermediate_size:
        # A zero-width shared expert (Qwen2-MoE's gated one included) adds nothing: the model has none.
        empty = re.compile(r"model\.layers\.\d+\.mlp\.shared_experts?\.")
        gate = r"model\.layers\.\d+\.mlp\.shared_expert_gate\."
        ignore = re.compile(gate if ignore is None else f"{ignore.pattern}|{gate}")
    return _Converter(config=config, dtype=dtype, renames=family.renames, ignore=ignore, empty=empty)


def _moe_importer(source: PretrainedConfig, dtype: torch.dtype | None, *, speech_vocab_size: int) -> _Converter:
    """The converter of `upcycle_moe` and `upcycle_moe_checkpoint`."""
    config = deeptalk_config_from_moe(source, speech_vocab_size=speech_vocab_size, dtype=dtype)
    return _moe_converter(source, config, dtype)


def _seeded(*key) -> torch.Generator:
    """A generator per (seed, layer, group, expert, ...), so any tensor can be converted alone and reproducibly."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(kw_only=True)
class _Upcycler(_Converter):
    """Converts a dense model: each MoE layer's MLP becomes the experts (and zero routers), the rest is copied."""

    granularity: int
    num_shared_experts: int
    init_noise: float
    drop_fraction: float
    seed: int

    def __post_init__(self):
        if not (math.isfinite(self.init_noise) and self.init_noise >= 0 and 0 <= self.drop_fraction <= 1):
            raise ValueError(
                f"init_noise={self.init_noise} must be finite and >= 0, drop_fraction={self.drop_fraction} in [0, 1]"
            )

    def convert(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        mlp = _DENSE_MLP.fullmatch(name)
        if mlp and int(mlp[1]) in self.config.moe_layers:
            yield from self._experts(int(mlp[1]), mlp[2], tensor)
        else:
            yield from super().convert(name, tensor)

    def _experts(self, layer: int, proj: str, dense: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        config = self.config
        part = config.moe_intermediate_size
        axis = 1 if proj == "down_proj" else 0  # the intermediate dimension
        routed_parts = self.granularity - self.num_shared_experts
        prefix = f"model.layers.{layer}.mlp"
        intermediate = self.granularity * part
        expected = (config.hidden_size, intermediate) if axis else (intermediate, config.hidden_size)
        if tuple(dense.shape) != expected:  # experts narrow it: a wider tensor would lose rows silently
            raise CheckpointError(
                f"{prefix}.{proj}.weight has shape {tuple(dense.shape)}, but the config (intermediate_size="
                f"{intermediate}, hidden_size={config.hidden_size}) needs {expected}"
            )
        if self.num_shared_experts:
            name = f"{prefix}.shared_experts.{proj}.weight"
            yield name, self._fresh(name, dense.narrow(axis, 0, self.num_shared_experts * part))
        num_text, num_speech = config.layer_experts(layer)
        if proj == "gate_proj":
            for router, count in (("gate", num_text), ("speech_gate", num_speech)):
                if count:
                    name = f"{prefix}.{router}.weight"
                    dtype = self._dtype(name, dense.dtype)
                    yield name, torch.zeros(count, config.hidden_size, dtype=dtype, device=dense.device)
        stats = None
        for group, count in (("experts", num_text), ("speech_experts", num_speech)):
            for j in range(count):
                # Expert j holds part j mod routed_parts: the k lowest indices hold whole sets of parts.
                weight = dense.narrow(axis, (self.num_shared_experts + j % routed_parts) * part, part)
                if (self.init_noise or self.drop_fraction) and not weight.is_meta:
                    if stats is None:
                        stats = dense.float().mean(), dense.float().std()
                    weight = self._perturb(weight, axis, stats, (self.seed, layer, group, j), proj)
                name = f"{prefix}.{group}.{j}.{proj}.weight"
                yield name, self._fresh(name, weight)

    def _perturb(self, weight: torch.Tensor, axis: int, stats, key: tuple, proj: str) -> torch.Tensor:
        """Drop-Upcycling re-initialisation of some intermediate channels, then relative Gaussian noise.

        The dropped channels of an expert are the same in its gate, up and down projections (drawn from the expert's
        key alone); new values follow the dense matrix's mean and standard deviation.
        """
        mean, std = stats
        result = weight.to(torch.float32, copy=True)
        width = result.shape[axis]
        dropped = round(self.drop_fraction * width)
        if dropped:
            channels = torch.randperm(width, generator=_seeded(*key, "drop"))[:dropped]
            shape = list(result.shape)
            shape[axis] = dropped
            fresh = torch.randn(shape, generator=_seeded(*key, proj, "init")) * std + mean
            result.index_copy_(axis, channels, fresh)
        if self.init_noise:
            result += self.init_noise * std * torch.randn(result.shape, generator=_seeded(*key, proj, "noise"))
        return result.to(weight.dtype)


def _resolve_source(model_path: str | os.PathLike, revision: str | None) -> Path:
    """A local checkpoint directory, or a hub id's configs and tokenizer files alone (downloaded), so that a wrong
    option or an unsupported model fails before a long download; `_resolve_weights` fetches the weights."""
    path = Path(model_path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory or a hub model id")
    return _download(str(model_path), revision, _SNAPSHOT_PATTERNS)


def _resolve_weights(model_path: str | os.PathLike, configs: Path) -> Path:
    """The whole source whose configs `_resolve_source` gave: a hub id's weights come from the
    same commit (the snapshot folder's name). The single weights file where there is one (transformers reads it
    first, beside an index too); else only the files the index names: a repository may hold other safetensors beside
    them (Mistral's `consolidated.safetensors`, the same weights again)."""
    if Path(model_path).is_dir():
        return configs
    index = configs / SAFE_WEIGHTS_INDEX_NAME
    folder = _download(str(model_path), configs.name, [*_SNAPSHOT_PATTERNS, SAFE_WEIGHTS_NAME])
    if (folder / SAFE_WEIGHTS_NAME).is_file() or not index.is_file():
        return folder
    weights = sorted(set(_weight_map(index).values()))
    return _download(str(model_path), folder.name, _SNAPSHOT_PATTERNS + weights)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{repo_id} is neither a local directory nor a downloadable hub model: {error}"
        ) from error


def _copy_tokenizer(source: Path, destination: Path, extra: tuple[str, ...] = ()) -> None:
    """Copy the source's tokenizer files (when it has any) and the `extra` patterns beside the converted weights, as
    they are."""
    patterns = (*_TOKENIZER_FILES, *extra)
    for path in {path for pattern in patterns for path in source.glob(pattern)}:  # once, if patterns overlap
        if path.is_dir():  # `additional_chat_templates/`
            shutil.copytree(path, destination / path.name)
        elif path.is_file():
            shutil.copyfile(path, destination / path.name)


def _weight_map(index: Path) -> dict[str, str]:
    """A safetensors index's tensor -> shard file map."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index} is not a valid safetensors index: {error!r}") from error
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid safetensors index: its weight_map is not a name -> file map")
    return weight_map


def _shard_files(source: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The weight files, and with an index the file it names for each tensor."""
    index = source / SAFE_WEIGHTS_INDEX_NAME
    owners = None
    # The single file first, as transformers reads a folder that holds both (a save over another leaves the old one).
    if (source / SAFE_WEIGHTS_NAME).is_file():
        files = [source / SAFE_WEIGHTS_NAME]
    elif index.is_file():
        owners = {name: source / file for name, file in _weight_map(index).items()}
        files = list(dict.fromkeys(owners.values()))
    else:
        raise CheckpointError(
            f"{source} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (only safetensors checkpoints are read)"
        )
    missing = [str(f.name) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{source} lacks the shard files {missing} listed in its index")
    return files, owners


def _read_config(source: Path) -> PretrainedConfig:
    """The config of a checkpoint directory (what `deeptalk-upcycle` reads to tell a dense source from an MoE)."""
    if not (source / "config.json").is_file():  # transformers would say "Unrecognized model" of it
        raise CheckpointError(f"{source} has no config.json: is it a transformers checkpoint?")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as error:  # a field of the wrong type
        raise CheckpointError(f"cannot read the config of {source}: {error!r}") from error


class _SourceCheckpoint:
    """The tensors of a safetensors checkpoint, read lazily one at a time."""

    def __init__(self, source: Path):
        self.source = source
        self.config = _read_config(source)
        # Names, shapes and dtypes from the headers, as meta tensors (nothing is read yet). With an index, each tensor
        # is read from the shard it names, as transformers reads it (a shard may hold a stale copy of another's).
        files, owners = _shard_files(source)
        self.layout: dict[Path, dict[str, torch.Tensor]] = {}
        for file in files:
            with self._open(file) as handle:
                self.layout[file] = {}
                for name in handle.keys():
                    if owners is not None and owners.get(name) != file:
                        continue
                    header = handle.get_slice(name)
                    dtype = str_to_torch_dtype[header.get_dtype()]
                    self.layout[file][name] = torch.empty(header.get_shape(), dtype=dtype, device="meta")
        if owners is not None:
            absent = sorted(set(owners) - {name for tensors in self.layout.values() for name in tensors})
            if absent:
                raise CheckpointError(f"{source}'s index lists tensors that their shards lack: {absent[:5]}")
        self.stored_names: dict[str, str] = {}  # a tensor read under another name than its file's
        self._prefix_base_model()
        self._tie_as_transformers()
        if self.config.dtype is None:  # a config.json without a dtype: the weights', as transformers' "auto" reads it
            self.config.dtype = next((t.dtype for _, t in self.shapes() if t.dtype in _FLOAT_DTYPES), None)

    def _prefix_base_model(self) -> None:
        """A base model's checkpoint (`LlamaModel.save_pretrained`: no `model.` in the names) is read as its causal LM's,
        as transformers' `from_pretrained` reads it: the output head then is the tied embeddings, or missing."""
        if any(name.startswith("model.") for tensors in self.layout.values() for name in tensors):
            return
        for file, tensors in self.layout.items():
            renamed = {name if name.startswith("lm_head.") else f"model.{name}": name for name in tensors}
            self.layout[file] = {new: tensors[old] for new, old in renamed.items()}
            self.stored_names.update({new: old for new, old in renamed.items() if new != old})

    def _tie_as_transformers(self) -> None:
        """Read a tied config's output head as transformers' `from_pretrained` does: a file holding the shared matrix
        only as `lm_head.weight` (`safetensors.torch.save_model` keeps a shared tensor's first name) gives the
        embeddings; a head that differs from the embeddings (a fine-tune that untied them, its config left tied) stays
        untied."""
        if not self.config.tie_word_embeddings:
            return
        where = {name: file for file, tensors in self.layout.items() for name in tensors}
        if _HEAD in where and _EMBEDDINGS not in where:
            tensors = self.layout[where[_HEAD]]
            tensors[_EMBEDDINGS] = tensors.pop(_HEAD)
            self.stored_names[_EMBEDDINGS] = _HEAD
        elif _HEAD in where and _EMBEDDINGS in where:

            def read(name: str) -> torch.Tensor:
                with self._open(where[name]) as handle:
                    return self._get(handle, where[name], name)

            head, embeddings = read(_HEAD), read(_EMBEDDINGS)
            if head.shape != embeddings.shape or not torch.equal(head, embeddings):
                logger.warning(
                    f"{self.source}'s config ties the output head to the embeddings, but its checkpoint holds a "
                    "different lm_head.weight: kept untied, as transformers loads it (tie_word_embeddings=False)"
                )
                self.config.tie_word_embeddings = False

    def _get(self, handle, file: Path, name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(self.stored_names.get(name, name))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {name} from {file}: {error}") from error

    def _open(self, file: Path):
        try:
            return safe_open(file, framework="pt")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {error}"
            ) from error

    def shapes(self) -> Iterator[tuple[str, torch.Tensor]]:
        for tensors in self.layout.values():
            yield from tensors.items()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file, tensors in self.layout.items():
            with self._open(file) as handle:
                for name in tensors:
                    yield name, self._get(handle, file, name)

    def generation_config(self, config: DeepTalkConfig) -> GenerationConfig:
        """The source's, as transformers loads it: from the model config where the file is missing or unreadable."""
        if (self.source / "generation_config.json").is_file():
            try:
                return GenerationConfig.from_pretrained(self.source)
            # TypeError: not a JSON object, or a field of the wrong type (`"max_new_tokens": "x"`); AttributeError: a
            # sub-config that is not one (`"watermarking_config": 5`)
            except (OSError, ValueError, TypeError, AttributeError) as error:
                logger.warning(
                    f"{self.source}/generation_config.json is unreadable ({error}); using the model config's"
                )
        return GenerationConfig.from_model_config(config)


class _SourceModel:
    """A model in memory, read in its on-disk layout (transformers' `revert_weight_conversion`, e.g. fused experts
    split one by one), so that it converts exactly like its saved checkpoint."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.config = model.config
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if self.config.tie_word_embeddings and head is not None and head.weight is not embeddings.weight:
            # Loaded untied (a checkpoint whose head differs from its embeddings): converted as it computes.
            self.config = copy.deepcopy(self.config)
            self.config.tie_word_embeddings = False
        self.dtype = model.dtype
        self.state = revert_weight_conversion(model, model.state_dict())

    def shapes(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.state.items()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Popped as they go, so the copies that reverting made (split experts) are freed once converted.
        for name in list(self.state):
            yield name, self.state.pop(name)

    def generation_config(self, config: DeepTalkConfig) -> GenerationConfig:
        return copy.deepcopy(self.model.generation_config)


def _opened(
    model_or_path: PreTrainedModel | str | os.PathLike,
    revision: str | None,
    dtype: torch.dtype | None,
    converter: Callable[..., _Converter],
) -> tuple[_SourceModel | _SourceCheckpoint, _Converter]:
    """The in-memory paths' source and its `converter(config, dtype)`: a model's dtype is the default; a path or hub id
    is checked on its configs before its weights are read or downloaded (`_checked_then_opened`)."""
    if isinstance(model_or_path, PreTrainedModel):
        check_no_adapters(model_or_path, "upcycling would copy the base weights without them")
        source = _SourceModel(model_or_path)
        return source, converter(source.config, dtype or source.dtype)
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            f"the source is a {type(model_or_path).__name__}: pass a transformers model or a checkpoint path"
            + ("; call merge_and_unload() first" if isinstance(model_or_path, PeftModel) else "")
        )
    return _checked_then_opened(model_or_path, revision, functools.partial(converter, dtype=dtype))


def _build_model(source: _SourceModel | _SourceCheckpoint, converter: _Converter) -> DeepTalkForCausalLM:
    """The in-memory path: plan, convert every tensor, and let `from_pretrained` fuse the per-expert tensors."""
    converter.plan(source.shapes())
    converted = {out: result for name, tensor in source.tensors() for out, result in converter.convert(name, tensor)}
    config = converter.config
    model = DeepTalkForCausalLM.from_pretrained(None, config=config, state_dict=converted, dtype=config.dtype)
    # No hub repo, as for a model built from a config (`None` would read as the repo "None", e.g. in PEFT adapters).
    model.name_or_path = model.config.name_or_path = ""
    model.generation_config = source.generation_config(model.config)
    return model


def _dense_upcycler(
    source_config: PretrainedConfig,
    dtype: torch.dtype | None,
    *,
    granularity: int,
    num_shared_experts: int,
    init_noise: float,
    drop_fraction: float,
    seed: int,
    **config_options,
) -> _Upcycler:
    """The converter of `upcycle_dense` and `upcycle_checkpoint`: the DeepTalk config and how each MLP is cut."""
    config = deeptalk_config_from_dense(
        source_config,
        granularity=granularity,
        num_shared_experts=num_shared_experts,
        dtype=dtype,
        **config_options,
    )
    return _Upcycler(
        config=config,
        dtype=dtype,
        granularity=granularity,
        num_shared_experts=num_shared_experts,
        init_noise=init_noise,
        drop_fraction=drop_fraction,
        seed=seed,
    )


def upcycle_dense(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    num_text_experts: int,
    num_speech_experts: int,
    num_experts_per_tok: int,
    granularity: int = 1,
    num_shared_experts: int = 0,
    speech_vocab_size: int = 0,
    init_noise: float = 0.0,
    drop_fraction: float = 0.0,
    dtype: torch.dtype | str | None = None,
    mlp_only_layers: list[int] | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> DeepTalkForCausalLM:
    """Upcycle a dense Llama / Qwen2 / Qwen3 / Mistral causal LM into a `DeepTalkForCausalLM`, in memory.

    Args:
        model_or_path: a transformers model, a local checkpoint directory or a hub id (safetensors weights).
        num_text_experts / num_speech_experts: routed experts per MoE layer in each modality group.
        num_experts_per_tok: top-k. With `granularity`, all three count fine-grained experts.
        granularity: cut the MLP's intermediate dimension into this many parts (fine-grained experts).
        num_shared_experts: how many of those parts form an always-on shared expert (must be below `granularity`).
        speech_vocab_size: speech block appended to the vocabulary (rows at the mean of the text rows).
        init_noise: relative Gaussian noise on routed expert weights (times the dense matrix's std).
        drop_fraction: Drop-Upcycling: fraction of each routed expert's intermediate channels re-initialised.
        dtype: dtype of the result (default: the source's).
        mlp_only_layers: decoder layers that stay dense.
        seed: seed of the noise and re-initialisation (each expert is reproducible on its own).
        revision: hub revision when `model_or_path` is a hub id.

    With `init_noise=0` and `drop_fraction=0` the result computes the same logits as the dense model on text.
    For checkpoints that do not fit twice in memory use `upcycle_checkpoint` (disk to disk, shard by shard).
    """
    source, upcycler = _opened(
        model_or_path,
        revision,
        _as_dtype(dtype),
        functools.partial(
            _dense_upcycler,
            num_text_experts=num_text_experts,
            num_speech_experts=num_speech_experts,
            num_experts_per_tok=num_experts_per_tok,
            granularity=granularity,
            num_shared_experts=num_shared_experts,
            speech_vocab_size=speech_vocab_size,
            mlp_only_layers=mlp_only_layers,
            init_noise=init_noise,
            drop_fraction=drop_fraction,
            seed=seed,
        ),
    )
    return _build_model(source, upcycler)


def upcycle_moe(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    speech_vocab_size: int = 0,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> DeepTalkForCausalLM:
    """Import a Qwen2-MoE / Qwen3-MoE / Mixtral / OLMoE / DeepSeek-V2 / DeepSeek-V3 causal LM as a
    `DeepTalkForCausalLM`, in memory.

    Args:
        model_or_path: a transformers model, a local checkpoint directory or a hub id (safetensors weights).
        speech_vocab_size: speech block appended to the vocabulary (rows at the mean of the text rows).
        dtype: dtype of the result (default: the source's).
        revision: hub revision when `model_or_path` is a hub id.

    The result is the source model (same logits on text): every expert is a text expert and there are no speech
    experts yet. Which experts become speech experts is measured, not guessed: `profile_modality_load` on speech and
    text data, then `assign_modality_experts` (see docs/recipe.md). For checkpoints that do not fit twice in memory
    use `upcycle_moe_checkpoint` (disk to disk, shard by shard).
    """
    source, converter = _opened(
        model_or_path,
        revision,
        _as_dtype(dtype),
        functools.partial(_moe_importer, speech_vocab_size=speech_vocab_size),
    )
    return _build_model(source, converter)


class _ShardBuffers:
    """Reusable memory for the output shards of a streaming conversion.

    The copied tensors of a shard are carved out of one byte buffer, which is reused for a later shard once the shard
    is written: memory is faulted in once, not once per shard (page faults cost more than the copies themselves).
    """

    def __init__(self, planned: dict[str, torch.Tensor], filename_to_tensors: dict[str, list[str]]):
        self.offsets: dict[str, tuple[str, int]] = {}
        self.size = 0
        for file, names in filename_to_tensors.items():
            position = 0
            for name in names:
                self.offsets[name] = (file, position)
                position += -(-planned[name].nbytes // 64) * 64  # 64-byte aligned views
            self.size = max(self.size, position)
        self.free: list[torch.Tensor] = []
        self.taken: dict[str, torch.Tensor] = {}

    def allocate(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        file, start = self.offsets[name]
        if file not in self.taken:
            self.taken[file] = self.free.pop() if self.free else torch.empty(self.size, dtype=torch.uint8)
        return self.taken[file][start : start + shape.numel() * dtype.itemsize].view(dtype).view(shape)

    def release(self, file: str) -> None:
        if file in self.taken:
            self.free.append(self.taken.pop(file))


def _umask() -> int:
    """The process umask, read without setting it where the system tells it (Linux's /proc/self/status): setting it
    to read it changes it for every thread meanwhile, so a file another thread created then could get 0644 under 077."""
    try:
        # In bytes: the file starts with the process name, cut to 15 bytes, so not always text in any encoding.
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _already_exists(path: Path) -> FileExistsError:
    return FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")


@contextmanager
def atomic_output_file(destination: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `destination` that replaces it only once written: on any error it is removed and
    an existing `destination` is untouched. Without `overwrite`, an existing `destination` is refused before writing,
    and one that appeared meanwhile is kept."""
    destination = Path(destination)
    if not overwrite and os.path.lexists(destination):
        raise _already_exists(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent)
    os.close(handle)
    try:
        yield Path(partial)
        os.chmod(partial, 0o666 & ~_umask())
        if not overwrite and os.path.lexists(destination):
            raise FileExistsError(f"{destination} was created while the output was written; it was kept")
        os.replace(partial, destination)
    finally:
        Path(partial).unlink(missing_ok=True)


def _links_somewhere(entry: Path) -> bool:
    """Whether `entry` is a symlink that resolves (a symlink loop points at nothing: `resolve` raises before Python
    3.13)."""
    if not entry.is_symlink():
        return False
    try:
        entry.resolve()
    except RuntimeError:
        return False
    return True


def check_output_dir(
    destination: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Raise unless `atomic_output_dir` may write `destination` (see there); for checking before long work."""
    given = Path(destination).absolute()
    destination = given.resolve()
    sources = list(map(Path, inputs))
    # A folder's symlinks too: a folder of links to files kept elsewhere (as the hub cache's snapshots are) reads the
    # folders they point into.
    sources += [
        entry for source in sources if source.is_dir() for entry in source.iterdir() if _links_somewhere(entry)
    ]
    for source in sources:
        if destination in (source.resolve(), *source.resolve().parents):
            raise ValueError(f"destination {destination} is or holds the source {source}; write the output elsewhere")
        if destination.exists() and source.resolve() in destination.parents:
            raise ValueError(f"destination {destination} is part of the source {source}; write the output elsewhere")
    blocking = next((parent for parent in destination.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"destination {destination} cannot be created: {blocking} is a file, not a directory")
    exists = os.path.lexists(given)  # a dangling symlink too: the final rename could not replace it unasked
    # A folder overwrite would not replace is named as such first: "pass --overwrite" would only lead to it.
    if exists and given.is_dir() and not given.is_symlink():
        if os.path.ismount(given):
            raise ValueError(f"{given} is a mount point, which cannot be replaced: write to a new folder inside it")
        try:
            cwd = Path.cwd().resolve()
        except FileNotFoundError:  # the process's folder was deleted already: it is in no destination
            cwd = None
        if cwd is not None and destination in (cwd, *cwd.parents):
            raise ValueError(
                f"{given} is or holds the current directory: replacing it would leave this process in a deleted "
                "folder (every relative path would fail); change directory first, or write elsewhere"
            )
        if next(given.iterdir(), None) is not None and not (given / "config.json").is_file():
            raise FileExistsError(
                f"{given} holds files but no config.json: it is not a model folder that overwrite would replace (all "
                "of its files would be deleted); remove it yourself or write elsewhere"
            )
        # A model folder holds files; a project that keeps its own config.json (src/, .git/, runs/, checkpoints) does
        # not become one by it.
        folders = sorted(e.name for e in given.iterdir() if e.is_dir() and e.name not in _MODEL_FOLDER_SUBFOLDERS)
        if folders:
            raise FileExistsError(
                f"{given} holds folders ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}) besides its "
                "config.json: it is not a model folder that overwrite would replace (all of it would be deleted); "
                "remove it yourself or write elsewhere"
            )
    if exists and not overwrite:
        raise _already_exists(given)
    writable = next(folder for folder in given.parents if folder.exists())
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"destination {given} cannot be written: no permission to write in {writable}")


@contextmanager
def atomic_output_dir(
    destination: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `destination` that becomes `destination` only on success.

    On any error the temporary directory is removed and `destination` is untouched. With `overwrite`, an existing
    `destination` is moved aside, replaced, and deleted only once the new one is in place. `inputs` are the paths
    the output is made from (a source checkpoint; a folder's symlinks count too): a `destination` that is one of them
    or a folder holding one is refused, so replacing it can never delete them; so is, even with `overwrite`, a folder
    that is not a model folder (files but no `config.json`, or folders besides it: "write into it" would delete
    them), a mount point, and the current directory or a folder holding it.
    """
    destination = Path(destination).absolute()
    if destination.name == "..":  # the folder itself: its temporary siblings would sit inside it, its rename fails
        destination = destination.resolve()
    check_output_dir(destination, overwrite=overwrite, inputs=inputs)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent))
    try:
        yield staging
        umask = _umask()
        staging.chmod(0o777 & ~umask)
        for file in staging.rglob("*"):  # writers such as safetensors' make their files private (0600)
            if file.is_file():
                file.chmod(0o666 & ~umask)
        if os.path.lexists(destination) and not overwrite:  # it appeared while this ran: never replace it unasked
            raise FileExistsError(f"{destination} was created while the output was written; nothing was replaced")
        if os.path.lexists(destination):
            previous = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".old", dir=destination.parent))
            try:
                os.replace(destination, previous / destination.name)
            except BaseException:
                previous.rmdir()
                raise
            try:
                os.replace(staging, destination)
            except BaseException:  # put the user's directory back (if even that fails, it stays in `previous`)
                os.replace(previous / destination.name, destination)
                previous.rmdir()
                raise
            try:
                shutil.rmtree(previous, ignore_errors=True)  # the output is in place: the old one's removal is a chore
            finally:  # cut short too (Ctrl-C, SIGTERM): say what is left
                if previous.exists():
                    logger.warning(
                        f"{destination} was replaced, but not all of the files it held could be deleted: they "
                        f"remain in {previous}"
                    )
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _shard_bytes(max_shard_size: int | str) -> int:
    """`max_shard_size` in bytes, read as transformers' `save_pretrained` reads it (an int, "5GB", "500MiB")."""
    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, AttributeError) as error:
        raise ValueError(f"max_shard_size={max_shard_size!r}: {error}") from None
    if size < 1:
        raise ValueError(f"max_shard_size={max_shard_size!r} must be a positive size")
    return size


def _checked_then_opened(
    source: str | os.PathLike, revision: str | None, converter: Callable[[PretrainedConfig], _Converter]
) -> tuple[_SourceCheckpoint, _Converter]:
    """The source checkpoint and its `converter(config)`, built first from the configs alone: the options and the
    model type are checked before a hub id's weights are downloaded, then the converter is built again from the
    config the weights complete (a config.json without a dtype takes theirs)."""
    configs = _resolve_source(source, revision)
    converter(_read_config(configs))
    checkpoint = _SourceCheckpoint(_resolve_weights(source, configs))
    return checkpoint, converter(checkpoint.config)


def _write_checkpoint(
    checkpoint: _SourceCheckpoint,
    converter: _Converter,
    destination: str | os.PathLike,
    *,
    max_shard_size: int | str,
    overwrite: bool,
    progress: bool,
) -> Path:
    """The streaming path: plan the output shards, convert one source tensor at a time, write each shard as soon as
    it is complete, all inside `atomic_output_dir` (with config, generation config and tokenizer)."""
    converter.pass_through = True
    planned = converter.plan(checkpoint.shapes())
    split = split_torch_state_dict_into_shards(
        planned,
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    pending = {file: set(names) for file, names in split.filename_to_tensors.items()}
    shard_buffers = _ShardBuffers(planned, split.filename_to_tensors)
    converter.allocate = shard_buffers.allocate
    total_bytes = split.metadata["total_size"]
    with atomic_output_dir(destination, overwrite=overwrite, inputs=[checkpoint.source]) as staging:
        buffers: dict[str, dict[str, torch.Tensor]] = {}
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Converting", disable=not progress) as bar:
            for name, tensor in checkpoint.tensors():
                for out, result in converter.convert(name, tensor):
                    file = split.tensor_to_filename[out]
                    buffers.setdefault(file, {})[out] = result
                    pending[file].discard(out)
                    if not pending[file]:
                        save_file(buffers.pop(file), staging / file, metadata={"format": "pt"})
                        shard_buffers.release(file)
                    bar.update(result.numel() * result.element_size())
        if split.is_sharded:
            index = {
                "metadata": {"total_parameters": sum(t.numel() for t in planned.values()), **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
            (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
        converter.config.save_pretrained(staging)
        checkpoint.generation_config(converter.config).save_pretrained(staging)
        _copy_tokenizer(checkpoint.source, staging)
    return Path(destination)


def upcycle_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    num_text_experts: int,
    num_speech_experts: int,
    num_experts_per_tok: int,
    granularity: int = 1,
    num_shared_experts: int = 0,
    speech_vocab_size: int = 0,
    init_noise: float = 0.0,
    drop_fraction: float = 0.0,
    dtype: torch.dtype | str | None = None,
    mlp_only_layers: list[int] | None = None,
    seed: int = 0,
    revision: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Upcycle a dense checkpoint directory (or hub id) into a DeepTalk checkpoint directory, streaming.

    Options are those of `upcycle_dense`. One dense tensor is read at a time and its upcycled tensors go to the output
    shard planned for them (`split_torch_state_dict_into_shards` over a meta-device dry run), which is written as soon
    as it is complete: memory stays around one output shard plus one input tensor. Weights, index, config, generation
    config and tokenizer are written into a temporary directory renamed to `destination` at the end, so a failure
    (corrupt or truncated source included) leaves no output. Returns `destination`.
    """
    dtype, max_shard_size = _as_dtype(dtype), _shard_bytes(max_shard_size)
    checkpoint, upcycler = _checked_then_opened(
        source,
        revision,
        functools.partial(
            _dense_upcycler,
            dtype=dtype,
            num_text_experts=num_text_experts,
            num_speech_experts=num_speech_experts,
            num_experts_per_tok=num_experts_per_tok,
            granularity=granularity,
            num_shared_experts=num_shared_experts,
            speech_vocab_size=speech_vocab_size,
            mlp_only_layers=mlp_only_layers,
            init_noise=init_noise,
            drop_fraction=drop_fraction,
            seed=seed,
        ),
    )
    return _write_checkpoint(
        checkpoint, upcycler, destination, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress
    )


def upcycle_moe_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    speech_vocab_size: int = 0,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Import an MoE checkpoint directory (or hub id) as a DeepTalk checkpoint directory, streaming.

    Options are those of `upcycle_moe`; writing is that of `upcycle_checkpoint`: one source tensor at a time, each
    output shard written when complete, everything in a temporary directory renamed to `destination` at the end (a
    failure leaves no output). Returns `destination`.
    """
    max_shard_size = _shard_bytes(max_shard_size)
    checkpoint, converter = _checked_then_opened(
        source,
        revision,
        functools.partial(_moe_importer, dtype=_as_dtype(dtype), speech_vocab_size=speech_vocab_size),
    )
    return _write_checkpoint(
        checkpoint,
        converter,
        destination,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
    )


__all__ = [
    "MOE_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "MoeFamily",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_dir",
    "deeptalk_config_from_dense",
    "deeptalk_config_from_moe",
    "upcycle_checkpoint",
    "upcycle_dense",
    "upcycle_moe",
    "upcycle_moe_checkpoint",
]
