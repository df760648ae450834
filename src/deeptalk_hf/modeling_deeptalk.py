"""DeepTalk: a speech-text Mixture-of-Experts causal LM whose experts are split by modality.

The text model is an ordinary Qwen3-MoE-style decoder. Everything speech-specific lives in its own tensors beside it:
`mlp.speech_experts` / `mlp.speech_gate` in each MoE layer, `model.speech_embed_tokens` and `speech_lm_head` for the
speech block of the vocabulary, and optionally `self_attn.speech_*` attention projections used at speech positions.
Under hard modality routing a text token only touches text tensors, so freezing a modality is `requires_grad=False`
on whole tensors and text outputs stay bit-identical through speech-only training.
"""

import copy
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, TrainableTokensWrapper
from torch import nn
from transformers import PretrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.distributed import DistributedConfig
from transformers.generation import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeExperts,
    Qwen3MoeMLP,
    Qwen3MoeRMSNorm,
    Qwen3MoeRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_deeptalk import DeepTalkConfig, check_modality_routing, is_whole
from .generation_deeptalk import stream_id_outside
from .kernels import EXPERTS_IMPLEMENTATION, triton_is_default

logger = logging.get_logger(__name__)

DeepTalkRMSNorm = Qwen3MoeRMSNorm
DeepTalkMLP = Qwen3MoeMLP
DeepTalkRotaryEmbedding = Qwen3MoeRotaryEmbedding


def check_modality_ids_is_tensor(modality_ids: object) -> None:
    if not isinstance(modality_ids, torch.Tensor):  # else an AttributeError on `.shape` or `.dtype`
        raise ValueError(f"modality_ids must be a tensor [batch, seq] of 0/1, got a {type(modality_ids).__name__}")


def check_modality_ids_shape(modality_ids: torch.Tensor, shape: tuple[int, ...]) -> None:
    check_modality_ids_is_tensor(modality_ids)
    if tuple(modality_ids.shape) != tuple(shape):
        raise ValueError(f"modality_ids has shape {tuple(modality_ids.shape)} but the input has {tuple(shape)}")


def check_prompt_modality_ids(input_ids: torch.Tensor | None, model_kwargs: dict) -> None:
    """`generate` would broadcast a prompt's `modality_ids` of another shape over the batch, or cut it, silently.
    Called with `generate`'s own arguments (transformers later drops an all-ones mask, which tells the two ways of
    continuing from a cache apart).

    With `input_ids`, `modality_ids` may cover their first positions only: the rest take their modality from their
    ids, as generated tokens do (assisted generation hands the assistant the prompt's `modality_ids` with ids that
    have grown since). Continuing from a cache with only the new ids (transformers reads that from an
    `attention_mask` longer than them), `modality_ids` is aligned with the mask, cached positions first, and must
    reach at least one new id: one that covers cached positions only would be ignored."""
    if (modality_ids := model_kwargs.get("modality_ids")) is None:
        return
    mask = model_kwargs.get("attention_mask")
    check_modality_ids_values(modality_ids, mask)
    prompt = model_kwargs.get("inputs_embeds")
    if prompt is not None or input_ids is None:  # no ids: the prompt is embeddings, or a BOS generate adds
        check_modality_ids_shape(modality_ids, prompt.shape[:2] if prompt is not None else (modality_ids.shape[0], 1))
        return
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))  # as the parallel-stream path reads it
    past = cache.get_seq_length() if cache is not None else 0
    length = input_ids.shape[-1]
    new_only = past > 0 and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > length
    if new_only:
        length = mask.shape[1]
    if modality_ids.dim() != 2 or modality_ids.shape[0] != input_ids.shape[0] or modality_ids.shape[1] > length:
        raise ValueError(
            f"modality_ids has shape {tuple(modality_ids.shape)} but the input has {tuple(input_ids.shape)}: it must "
            "have the prompt's batch size and cover at most its length"
            + (f" (here the attention_mask's {length}: new ids after {past} cached positions)" if new_only else "")
        )
    if new_only and modality_ids.shape[1] <= past:
        raise ValueError(
            f"modality_ids covers {modality_ids.shape[1]} positions, all of them among the {past} cached ones: "
            "continuing from a cache with only the new ids, modality_ids is aligned with the attention_mask (the "
            "whole sequence, cached positions first)"
        )


def check_modality_ids_values(modality_ids: torch.Tensor | None, attention_mask: torch.Tensor | dict | None) -> None:
    """Any value but 0 and 1 would route as text, silently; padding (0 in a 2D `attention_mask`, whose last columns
    are the input's) may hold anything. Checked eagerly, on integer ids of a known shape (a host sync): booleans are
    0 and 1 (what `generate` passes at each step, having checked the prompt's), and where the mask is prepared (a
    per-layer dict, 4D) the padding is not known."""
    if modality_ids is None or torch.compiler.is_compiling():
        return
    check_modality_ids_is_tensor(modality_ids)
    if modality_ids.dtype == torch.bool:
        return
    wrong = (modality_ids != 0) & (modality_ids != 1)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return
        if attention_mask.shape[0] == wrong.shape[0] and attention_mask.shape[1] >= wrong.shape[-1]:
            wrong = wrong & attention_mask[:, attention_mask.shape[1] - wrong.shape[-1] :].to(wrong.device).bool()
    if wrong.any():
        raise ValueError(
            f"modality_ids must be 0 (text) or 1 (speech) where attention_mask is not 0, got "
            f"{modality_ids[wrong].unique().tolist()}"
        )


def check_no_adapters(model: nn.Module, why: str) -> None:
    """A `ValueError` for a model holding PEFT adapters (LoRA and co, `modules_to_save`, trainable tokens), which the
    caller would reach past or copy (`why`)."""
    if any(isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for module in model.modules()):
        raise ValueError(f"the model already holds PEFT adapters: {why}; call merge_and_unload() first")


def speech_positions(
    config: DeepTalkConfig,
    input_ids: torch.LongTensor | None,
    modality_ids: torch.Tensor | None,
    shape: torch.Size,
    device: torch.device,
) -> torch.Tensor:
    """Boolean `[batch, seq]` mask of the positions routed as speech.

    `modality_ids` (0 text, 1 speech) wins; without it the ids decide: a speech-block id, or, with parallel streams
    (`input_ids` `[batch, 1 + S, seq]`), an audio code in any audio stream. Without either, all positions are text.
    """
    if modality_ids is not None:
        check_modality_ids_shape(modality_ids, shape)
        return modality_ids.to(device=device) == 1
    if input_ids is None:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if input_ids.dim() == 3:
        return (input_ids[:, 0] >= config.speech_token_start) | (input_ids[:, 1:] < config.audio_codebook_size).any(1)
    return input_ids >= config.speech_token_start


# Where speech attention uses the speech projections: (batch, position) indices, or a [batch, seq] mask when compiling.
SpeechIndex = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


class ModalitySplit:
    """Hard routing's split of a forward's tokens, shared by its MoE layers: the first layer that needs the rows finds
    them, so a forward makes one host sync (`nonzero`) rather than one or two per layer."""

    def __init__(self, is_speech: torch.Tensor):
        self.is_speech = is_speech.reshape(-1)

    @functools.cached_property
    def speech_rows(self) -> torch.Tensor:
        return self.is_speech.nonzero().squeeze(-1)

    @functools.cached_property
    def text_rows(self) -> torch.Tensor:
        return (~self.is_speech).nonzero().squeeze(-1)


@dataclass(frozen=True)
class RoutingSettings:
    """The config's top-k routing fields, read once per MoE block: a config attribute read costs ~1 us
    (`PreTrainedConfig.__getattribute__`) and `topk_routing` runs per layer and decoding step. The fields keep the
    config's names, so a config can be passed where these are taken."""

    num_experts_per_tok: int
    scoring_func: str
    topk_method: str
    n_group: int | None
    topk_group: int | None
    norm_topk_prob: bool
    routed_scaling_factor: float
    routing_weights_dtype: str | None = None

    @classmethod
    def from_config(cls, config: DeepTalkConfig) -> "RoutingSettings":
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


def router_probs(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router scores normalised per token (softmax, or sigmoid scores over their sum): the probabilities that the
    balancing losses and the load profile average."""
    if scoring_func == "softmax":
        return F.softmax(logits, dim=-1, dtype=torch.float)
    scores = logits.float().sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


def topk_routing(
    logits: torch.Tensor,
    settings: RoutingSettings,
    bias: torch.Tensor | None = None,
    group_limited: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores one expert group and picks a tie-stable top-k (the lowest index wins among equal scores).

    Scoring is softmax or sigmoid (`settings.scoring_func`); DeepSeek-V3's score-correction `bias` shifts the choice
    but not the weights; with `group_limited` (a router that sees all of a layer's experts) DeepSeek's group-limited
    top-k keeps the `topk_group` best of `n_group` groups first. A group smaller than top-k uses all its experts: the
    spare slots carry the sentinel index `E` (the group size) with weight 0 (see `DeepTalkSparseMoeBlock._run`).
    Returns `(weights, indices)`, the weights in the logits' dtype (float32 with `routing_weights_dtype="float32"`).
    """
    num_experts = logits.shape[-1]
    top_k, softmax, method = settings.num_experts_per_tok, settings.scoring_func == "softmax", settings.topk_method
    scores = F.softmax(logits, dim=-1, dtype=torch.float) if softmax else logits.float().sigmoid()
    choice = scores if bias is None else scores + bias
    if group_limited and method != "greedy":
        grouped = choice.unflatten(-1, (settings.n_group, -1))
        if method == "group_limited_greedy":  # DeepSeek-V2: a group's best expert
            group_scores = grouped.amax(dim=-1)
        else:  # DeepSeek-V3: the sum of a group's two best experts
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[..., : settings.topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, kept, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=-1), float("-inf"))
    k = min(top_k, num_experts)
    ranked, indices = torch.sort(choice, dim=-1, descending=True, stable=True)
    indices = indices[..., :k]
    # Without a bias or a group mask the sorted values are the scores themselves: no gather needed.
    weights = ranked[..., :k] if choice is scores else scores.gather(-1, indices)
    if settings.norm_topk_prob:
        # The epsilon guards a sum of ~0: softmax's top-k are the largest scores (sum >= 1/E), so only sigmoid
        # scores or a biased/group-masked choice need it (adding it would not change a softmax sum's bits either).
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / (total if softmax and choice is scores else total + 1e-20)
    if settings.routed_scaling_factor != 1.0:
        weights = weights * settings.routed_scaling_factor
    if k < top_k:
        weights = F.pad(weights, (0, top_k - k), value=0.0)
        indices = F.pad(indices, (0, top_k - k), value=num_experts)
    return (weights if settings.routing_weights_dtype == "float32" else weights.to(logits.dtype)), indices


class DeepTalkAttention(nn.Module):
    """GQA attention with optional qkv bias (Qwen2), q/k norm per head (Qwen3) or over the whole projection with q/k/v
    clipping (OLMoE), and sliding window, via `ALL_ATTENTION_FUNCTIONS`.

    With `config.speech_attention`, speech positions use speech copies of the projections and q/k norms (text
    positions compute exactly what they would without them); all positions share one attention over one KV cache.
    """

    def __init__(self, config: DeepTalkConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        qkv_bias = config.attention_bias or config.qkv_bias
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)
        self.qk_norm_type = config.qk_norm_type if config.use_qk_norm else None  # read per call otherwise
        if config.use_qk_norm:
            per_head = config.qk_norm_type == "head"
            self.q_norm = DeepTalkRMSNorm(self.head_dim if per_head else q_size, eps=config.rms_norm_eps)
            self.k_norm = DeepTalkRMSNorm(self.head_dim if per_head else kv_size, eps=config.rms_norm_eps)
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        if config.speech_attention:
            self.add_speech_projections()

    def add_speech_projections(self) -> None:
        """Create `speech_{q,k,v,o}_proj` (and `speech_{q,k}_norm`) as copies of the text ones, `requires_grad`
        included, so the model's function is unchanged until they are trained."""
        names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["q_norm", "k_norm"] if self.qk_norm_type else [])
        for name in names:
            self.add_module(f"speech_{name}", copy.deepcopy(getattr(self, name)))

    def _project(
        self,
        name: str,
        states: torch.Tensor,
        speech_index: SpeechIndex | None,
        speech_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`name` (e.g. `"q_proj"`) applied to `states` `[batch, seq, ...]`, its speech copy at `speech_index`.
        `speech_states`: `states[speech_index]`, gathered once for q, k and v (each gather is kept for backward)."""
        # The text module runs on every row (speech rows are overwritten) so that text rows see exactly the matmul of
        # a model without speech attention: projecting only the text rows would change the float rounding.
        out = getattr(self, name)(states)
        if speech_index is None:
            return out
        speech = getattr(self, f"speech_{name}")
        # A mask (under torch.compile), or hooks that read the batch's rows (PEFT's per-row adapters, `adapter_names`):
        # the speech copy runs on every row too.
        if isinstance(speech_index, torch.Tensor) or speech._forward_pre_hooks:
            if not isinstance(speech_index, torch.Tensor):
                speech_index = torch.zeros(out.shape[:2], dtype=torch.bool, device=out.device).index_put_(
                    speech_index, torch.tensor(True, device=out.device)
                )
            return torch.where(speech_index.view(*speech_index.shape, *[1] * (out.dim() - 2)), speech(states), out)
        return out.index_put(speech_index, speech(states[speech_index] if speech_states is None else speech_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        speech_index: SpeechIndex | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        speech_index (`tuple(torch.LongTensor, torch.LongTensor)` or `torch.BoolTensor`, *optional*):
            (batch, position) indices of the speech positions, which use the speech projections, or their
            `[batch, seq]` mask under `torch.compile`; only with `config.speech_attention`.
        """
        config = self.config
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        speech_states = hidden_states[speech_index] if isinstance(speech_index, tuple) else None
        query_states = self._project("q_proj", hidden_states, speech_index, speech_states)
        key_states = self._project("k_proj", hidden_states, speech_index, speech_states)
        value_states = self._project("v_proj", hidden_states, speech_index, speech_states)
        if self.qk_norm_type == "full":  # OLMoE: before the head split
            query_states = self._project("q_norm", query_states, speech_index)
            key_states = self._project("k_norm", key_states, speech_index)
        query_states, key_states = query_states.view(hidden_shape), key_states.view(hidden_shape)
        if self.qk_norm_type == "head":
            query_states = self._project("q_norm", query_states, speech_index)
            key_states = self._project("k_norm", key_states, speech_index)
        if config.clip_qkv is not None:
            query_states = query_states.clamp(-config.clip_qkv, config.clip_qkv)
            key_states = key_states.clamp(-config.clip_qkv, config.clip_qkv)
            value_states = value_states.clamp(-config.clip_qkv, config.clip_qkv)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self._project("o_proj", attn_output, speech_index), attn_weights


class DeepTalkMLAttention(DeepseekV3Attention):
    """Multi-head latent attention (DeepSeek-V2/V3) as transformers implements it; the KV cache holds the compressed
    latents. `config.rope_interleave` selects DeepSeek's interleaved rotary layout."""


class DeepTalkMLAttentionComplexRope(DeepTalkMLAttention):
    """DeepSeek-V2's multi-head latent attention (`config.rope_complex`): the same tensors, the rotary applied as
    transformers' V2 applies it (a float32 complex product on interleaved pairs, from `DeepseekV2RotaryEmbedding`'s
    position embeddings), so a V2 import computes as transformers' V2 in half precision too."""

    forward = DeepseekV2Attention.forward


# The output heads of `DeepTalkForCausalLM`, beside its base model.
_OUTPUT_HEADS = ("lm_head", "speech_lm_head", "speech_stream_heads")
_NEW_STREAM_TABLES = ("speech_stream_embed", "speech_stream_heads")  # what `num_audio_streams` adds to a model
# One expert's tensor as `save_pretrained` writes it, relative to its experts module.
_SAVED_EXPERT = re.compile(r"(\d+)\.(gate|up|down)_proj\.weight")


@use_experts_implementation
class DeepTalkExperts(Qwen3MoeExperts):
    """Experts as fused 3D tensors (`gate_up_proj` `[E, 2I, H]`, `down_proj` `[E, H, I]`), Qwen3-MoE's eager math.

    The expert count is per module (text and speech groups differ, and may differ per layer). DeepTalk routing emits
    sentinel slots (groups smaller than top-k, routing "none", compiled hard routing), which the backends skip on their
    sentinel-safe path (`DeepTalkSparseMoeBlock._run` handles those that do not).
    """

    def __init__(self, config: DeepTalkConfig, num_experts: int):
        nn.Module.__init__(self)
        self.num_experts = num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self.top_k = config.num_experts_per_tok

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing_keys: list, *args
    ) -> None:
        """Takes experts saved one by one (`{prefix}{j}.gate_proj.weight`, ..., as `save_pretrained` writes them) as
        well as the fused tensors: `Trainer` reloads its checkpoints (resume, best model) with `load_state_dict`,
        which skips the conversion mapping `from_pretrained` applies. A fused tensor whose experts are all there is
        built from them; a shard holding some of them sets just those (the others are reported missing).
        """
        inter, hidden = self.intermediate_dim, self.hidden_dim
        fused_parts = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}  # gate rows first, then up rows
        rows = {"gate": slice(0, inter), "up": slice(inter, 2 * inter), "down": slice(None)}
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        saved: dict[str, dict[tuple[int, str], torch.Tensor]] = {name: {} for name in fused_parts}
        for key in [key for key in state_dict if key.startswith(prefix)]:
            if (match := _SAVED_EXPERT.fullmatch(key[len(prefix) :])) is None:
                continue
            expert, part = int(match[1]), match[2]
            tensor = state_dict.pop(key)
            if expert >= self.num_experts:
                raise ValueError(
                    f"{key}: {prefix[:-1]} holds {self.num_experts} experts (0 to {self.num_experts - 1})"
                )
            if tensor.shape != shapes[part]:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}; this model's {part}_proj is {shapes[part]}")
            saved["down_proj" if part == "down" else "gate_up_proj"][expert, part] = tensor
        for name, parts in saved.items():
            wanted = [(expert, part) for expert in range(self.num_experts) for part in fused_parts[name]]
            if not parts:
                continue
            if len(parts) == len(wanted):  # all there: the fused tensor is theirs alone
                experts = range(self.num_experts)
                state_dict[prefix + name] = torch.stack(
                    [torch.cat([parts[expert, part] for part in fused_parts[name]]) for expert in experts]
                )
                continue
            given = prefix + name in state_dict  # the fused tensor, with some experts given again one by one
            fused = state_dict.get(prefix + name, getattr(self, name).detach()).clone()
            for (expert, part), tensor in parts.items():
                fused[expert, rows[part]] = tensor
            state_dict[prefix + name] = fused
            if not given:
                missing_keys.extend(f"{prefix}{e}.{p}_proj.weight" for e, p in wanted if (e, p) not in parts)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)

    @property
    def _is_expert_parallel(self) -> bool:
        """Whether the backends take their sentinel-safe path (the expert-parallel one): only where sentinel slots can
        occur, since masking every row costs ~15% of a layer on CPU."""
        config = self.config
        return (
            self._expert_parallel
            or self.num_experts < self.top_k
            or config.modality_routing == "none"
            or torch.compiler.is_compiling()
        )

    @_is_expert_parallel.setter
    def _is_expert_parallel(self, value: bool) -> None:  # set by the decorator and by transformers' expert parallelism
        self._expert_parallel = value


class DeepTalkTopKRouter(nn.Linear):
    """A bias-free linear router over one expert group (an `nn.Linear`, so PEFT can put LoRA on it); top-k selection
    happens in the sparse block, per modality."""

    def __init__(self, config: DeepTalkConfig, num_experts: int):
        in_float32 = config.router_dtype == "float32"
        # Built in float32 where they are kept so (as transformers' DeepSeek routers are), also in a model built in
        # half precision (`_from_config(config, dtype=torch.bfloat16)`); loading keeps them so too (`post_init`).
        super().__init__(config.hidden_size, num_experts, bias=False, dtype=torch.float32 if in_float32 else None)
        self.in_float32 = in_float32
        # DeepSeek-V3's per-expert score correction (a checkpoint buffer that moves with its expert); None elsewhere.
        self.register_buffer(
            "e_score_correction_bias",
            torch.zeros(num_experts, dtype=torch.float32) if config.topk_method == "noaux_tc" else None,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype, or (`router_dtype="float32"`) from float32 inputs and weight, as DeepSeek's
        routers compute them: in bf16 they would pick other experts for some tokens."""
        if self.in_float32:
            return F.linear(hidden_states.float(), self.weight.float())
        return super().forward(hidden_states)


def correction_bias(router: nn.Module) -> torch.Tensor | None:
    """A router's score-correction bias, also when PEFT wraps the router (LoRA keeps the router as `base_layer`)."""
    return getattr(router, "base_layer", router).e_score_correction_bias


class DeepTalkSparseMoeBlock(nn.Module):
    """Text experts + router, speech experts + router, optional shared experts.

    Routing `"hard"`: text tokens are scored against `gate` only and use `experts`; speech tokens against
    `speech_gate` and use `speech_experts` (or the text group in a layer without speech experts). Routing `"none"`:
    every token is scored over `[gate; speech_gate]` in the source MoE's expert order, as that MoE did.
    Returns the output and the router logits `[tokens, E_text + E_speech]` (text columns first).
    """

    def __init__(self, config: DeepTalkConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_text_experts, self.num_speech_experts = config.layer_experts(layer_idx)
        self.routing = RoutingSettings.from_config(config)
        self.gate = DeepTalkTopKRouter(config, self.num_text_experts)
        self.experts = DeepTalkExperts(config, self.num_text_experts)
        if self.num_speech_experts:
            self.speech_gate = DeepTalkTopKRouter(config, self.num_speech_experts)
            self.speech_experts = DeepTalkExperts(config, self.num_speech_experts)
        # None rather than absent: a missed module lookup raises inside `hasattr`, ~1.5 us per layer and step.
        self.shared_experts = self.shared_experts_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_experts = DeepTalkMLP(config, intermediate_size=config.shared_expert_intermediate_size)
            if config.shared_expert_gate:
                self.shared_experts_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def _bias(self, router: nn.Module) -> torch.Tensor | None:
        # Only DeepSeek-V3's routers hold a bias; looking for a PEFT wrapper's `base_layer` costs ~2.5 us otherwise.
        if self.routing.topk_method != "noaux_tc":
            return None
        bias = correction_bias(router)
        if bias.is_meta:  # read after the router's forward, where accelerate's buffer offloading has put it back
            raise ValueError(
                f"layer {self.layer_idx}'s router score-correction bias (e_score_correction_bias) is on the meta "
                "device: DeepSeek-V3 routing reads it outside the router's forward, so its buffers cannot be offloaded; "
                "load with offload_buffers=False (the default)"
            )
        return bias

    def _route(
        self, logits: torch.Tensor, router: nn.Module, group_limited: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_routing(logits, self.routing, self._bias(router), group_limited)

    def _run(
        self,
        experts: nn.Module,
        count: int,
        hidden: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        sentinels: bool = False,
    ) -> torch.Tensor:
        """`experts`, a group of `count` experts, on its slots. Sentinel slots (`count`, weight 0: a group smaller than
        top-k, or `sentinels`, where other groups' slots were masked) are skipped by eager, grouped_mm and the Triton
        kernels, but `batched_mm` runs one on the group's last expert (an inf output times 0 is NaN) and expert
        parallelism's all-to-all dispatch takes real ids only: there they point at an expert the token uses anyway,
        with weight 0 (or expert 0 for a token without any). A token with no expert in the group gets exact zeros.
        (The backend is read from the block's config, which its experts share: a PEFT wrapper of them has none.)"""
        if not sentinels and indices.shape[-1] <= count:
            return experts(hidden, indices, weights)
        is_sentinel = indices >= count
        own = torch.where(is_sentinel, count, indices).min(-1, keepdim=True).values
        has_own = own < count
        sharded = experts.num_experts < count
        if sharded or self.config._experts_implementation == "batched_mm":
            indices = torch.where(is_sentinel, own.masked_fill(~has_own, 0) if sharded else own, indices)
        return torch.where(has_own, experts(hidden, indices, weights.masked_fill(is_sentinel, 0.0)), 0.0)

    def _hard(
        self, hidden: torch.Tensor, split: ModalitySplit, output_router_logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each token goes to its own modality's group only; the groups run on their own tokens. A batch of one
        modality (e.g. a decoding step) is scored by its own router alone unless the router logits are returned; under
        autograd the other group runs on no tokens, so that every trainable tensor gets a gradient.

        Under `torch.compile` shapes must not depend on data, so both groups see every token and the other
        modality's slots become sentinels (see `_run`; their rows come out exactly 0): same result, more routing work.
        """
        compiling = torch.compiler.is_compiling()
        text_group = (self.gate, self.experts, self.num_text_experts)
        speech_group = (self.speech_gate, self.speech_experts, self.num_speech_experts)
        if not compiling and split.speech_rows.numel() in (0, hidden.shape[0]):  # one modality: no gather and scatter
            is_speech = bool(split.speech_rows.numel())
            (router, experts, count), (other_router, other_experts, _) = (
                (speech_group, text_group) if is_speech else (text_group, speech_group)
            )
            logits = router(hidden)
            weights, indices = self._route(logits, router)
            output = self._run(experts, count, hidden, indices, weights)
            if torch.is_grad_enabled():
                output = output + self._on_no_tokens(hidden, other_router, other_experts)
            if not output_router_logits:
                return output, None
            other_logits = other_router(hidden)
            return output, torch.cat([other_logits, logits] if is_speech else [logits, other_logits], dim=-1)
        text_logits, speech_logits = self.gate(hidden), self.speech_gate(hidden)
        router_logits = torch.cat([text_logits, speech_logits], dim=-1)
        if compiling:
            output = torch.zeros_like(hidden)
            for keep, logits, (router, experts, count) in (
                (~split.is_speech, text_logits, text_group),
                (split.is_speech, speech_logits, speech_group),
            ):
                weights, indices = self._route(logits, router)
                drop = ~keep.unsqueeze(-1)
                output = output + self._run(
                    experts,
                    count,
                    hidden,
                    indices.masked_fill(drop, count),
                    weights.masked_fill(drop, 0.0),
                    sentinels=True,
                )
            return output, router_logits
        output = torch.empty_like(hidden)
        for rows, logits, (router, experts, count) in (
            (split.text_rows, text_logits, text_group),
            (split.speech_rows, speech_logits, speech_group),
        ):
            weights, indices = self._route(logits[rows], router)
            # index_put_, not index_copy_: autograd's index_copy keeps the whole source ([rows, H] per group and layer)
            # for its shape alone; index_put_ keeps only the rows.
            output.index_put_((rows,), self._run(experts, count, hidden[rows], indices, weights))
        return output, router_logits

    def _on_no_tokens(self, hidden: torch.Tensor, router: nn.Module, experts: nn.Module) -> torch.Tensor:
        """A group run on no tokens: an exact zero that keeps its router and experts in the autograd graph. DDP without
        `find_unused_parameters` needs a gradient for every trainable tensor in each backward, which the grouped
        backends give all of transformers' MoE experts (`eager` skips experts without tokens, here as there)."""
        empty = hidden[:0]
        weights, indices = self._route(router(empty), router)
        return experts(empty, indices, weights).sum()

    def _source_order(
        self, router_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Router logits `[tokens, E_text + E_speech]` and the correction biases in the source MoE's expert order,
        and the column of each source expert in `[experts; speech_experts]` (`None`: the orders agree)."""
        order = self.config.expert_order(self.layer_idx)
        position = None if order is None else torch.argsort(torch.tensor(order, device=router_logits.device))
        bias = self._bias(self.gate)
        if bias is not None and self.num_speech_experts:
            bias = torch.cat([bias, self._bias(self.speech_gate)])
        if position is not None:
            router_logits = router_logits[:, position]
            bias = bias[position] if bias is not None else None
        return router_logits, bias, position

    def route_all(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing `"none"` as the load profile sees it: `(probs, weights, indices)` of `topk_routing` over all experts
        in the source MoE's order (group limits and correction biases included), from router logits
        `[tokens, E_text + E_speech]`. Indices are source indices."""
        logits, bias, _ = self._source_order(router_logits)
        weights, indices = topk_routing(logits, self.routing, bias, group_limited=True)
        return router_probs(logits, self.routing.scoring_func), weights, indices

    def _joint(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Routing `"none"`: one top-k over all experts in source order, then each group gets its slots."""
        num_text = self.num_text_experts
        logits, bias, position = self._source_order(router_logits)
        weights, indices = topk_routing(logits, self.routing, bias, group_limited=True)
        if position is not None:
            # Back from source indices to `[experts; speech_experts]` positions (the sentinel stays the sentinel).
            indices = torch.cat([position, position.new_tensor([position.numel()])])[indices]
        output = 0
        for experts, first, count in (
            (self.experts, 0, num_text),
            (self.speech_experts, num_text, self.num_speech_experts),
        ):
            mine = (indices >= first) & (indices < first + count)
            masked = torch.where(mine, indices - first, count)
            output = output + self._run(
                experts, count, hidden, masked, weights.masked_fill(~mine, 0.0), sentinels=True
            )
        return output

    def forward(
        self,
        hidden_states: torch.Tensor,
        split: ModalitySplit | None = None,
        output_router_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`split`: the tokens' modalities (all text without it). The router logits come back unless
        `output_router_logits` is False and hard routing skipped a router (then None)."""
        batch_size, seq_len, hidden_dim = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_dim)
        if not self.num_speech_experts:
            router_logits = self.gate(hidden)
            weights, indices = self._route(router_logits, self.gate, group_limited=True)
            output = self._run(self.experts, self.num_text_experts, hidden, indices, weights)
        elif self.config.modality_routing == "none":
            router_logits = torch.cat([self.gate(hidden), self.speech_gate(hidden)], dim=-1)
            output = self._joint(hidden, router_logits)
        else:
            if split is None:
                split = ModalitySplit(torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device))
            output, router_logits = self._hard(hidden, split, output_router_logits)
        if self.shared_experts is not None:
            shared = self.shared_experts(hidden)
            if self.shared_experts_gate is not None:
                shared = torch.sigmoid(self.shared_experts_gate(hidden)) * shared
            output = output + shared
        return output.reshape(batch_size, seq_len, hidden_dim), router_logits


class DeepTalkDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepTalkConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        attention_class = DeepTalkAttention
        if config.kv_lora_rank is not None:
            attention_class = DeepTalkMLAttentionComplexRope if config.rope_complex else DeepTalkMLAttention
        self.self_attn = attention_class(config, layer_idx)
        self.is_sparse = layer_idx not in config.mlp_only_layers
        if self.is_sparse:
            self.mlp = DeepTalkSparseMoeBlock(config, layer_idx)
        else:
            self.mlp = DeepTalkMLP(config, intermediate_size=config.intermediate_size)
        self.input_layernorm = DeepTalkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepTalkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        modality_split: ModalitySplit | None = None,
        speech_index: SpeechIndex | None = None,
        output_router_logits: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            speech_index=speech_index,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_sparse:
            hidden_states, _ = self.mlp(hidden_states, modality_split, output_router_logits)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


def warn_if_checkpointing_stops_balancing(
    config: DeepTalkConfig, activation_checkpointing_kwargs: dict | None
) -> None:
    """Warn where activation checkpointing would silently stop load balancing: a reentrant checkpoint runs the layers
    without autograd, so the router logits behind the router losses carry no gradient (as in transformers' own MoE
    models). For every model that checkpoints DeepTalk layers (the audio model's language model too)."""
    losses = config.router_aux_loss_coef or config.router_z_loss_coef
    # None gets transformers' use_reentrant=False; a dict without the key gets torch's default, reentrant (PEFT's
    # prepare_model_for_kbit_training passes {}).
    reentrant = activation_checkpointing_kwargs is not None and activation_checkpointing_kwargs.get(
        "use_reentrant", True
    )
    if losses and config.moe_layers and reentrant:
        logger.warning(
            "activation checkpointing with use_reentrant=True: the router losses (aux_loss, z_loss) get no "
            "gradient, so load balancing stops; use the default use_reentrant=False"
        )


# The hint for a checkpoint of another architecture, which transformers' loading reads into a DeepTalk config.
_CONVERTED = (
    "A dense or other MoE checkpoint is converted with upcycle_checkpoint / upcycle_moe_checkpoint (deeptalk-upcycle)"
)


def _other_deeptalk_checkpoint(model: nn.Module, missing: list[str], unexpected: list[str]) -> str | None:
    """The hint where the checkpoint is the other DeepTalk model's: the audio model's loaded as its language model (its
    keys under `language_model.`, or renamed by `key_mapping` with the encoder's left over), or a language model's
    loaded as the audio model."""
    parts = ("audio_encoder.", "speech_connector.")
    if not hasattr(model, "language_model"):
        if any(key.startswith(("language_model.", *parts)) for key in unexpected):
            return (
                "It is an audio model's checkpoint (DeepTalkForConditionalGeneration): load it with "
                "AutoModelForMultimodalLM and take its .language_model"
            )
    elif any(key.startswith("language_model.") for key in missing) and any(
        key.split(".")[0] in ("model", *_OUTPUT_HEADS) for key in unexpected
    ):
        return (
            "It is a language model's checkpoint (DeepTalkForCausalLM): build the audio model from it and an audio "
            "encoder with DeepTalkForConditionalGeneration.from_parts(audio_encoder, path)"
        )
    return None


def _adds_stream_tables(model: nn.Module, missing: list[str], load_config) -> bool:
    """Whether the missing tensors are exactly the parallel-stream tables of a checkpoint saved without streams (its
    own config.json, its LLM's for the audio model, read before any load-time override): streams asked for at load."""
    if any(key.split(".")[-2] not in _NEW_STREAM_TABLES for key in missing):
        return False
    tables = sorted(name for name, _ in model.named_parameters() if name.split(".")[-2] in _NEW_STREAM_TABLES)
    try:
        saved, _ = PretrainedConfig.get_config_dict(
            load_config.pretrained_model_name_or_path, **(load_config.download_kwargs or {})
        )
    except (OSError, ValueError, TypeError):  # unreadable: no exception to the refusal
        return False
    return missing == tables and saved.get("text_config", saved).get("num_audio_streams", 0) == 0


class DeepTalkPreTrainedModel(PreTrainedModel):
    """What the DeepTalk models share: weight initialisation, checks after loading, the experts backend choice,
    activation checkpointing and the guard on `resize_token_embeddings` (the speech block follows the text ids)."""

    config: DeepTalkConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepTalkDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    # Loaded in half precision, DeepSeek-V3's score-correction bias stays float32, as in transformers' DeepSeek-V3 (a
    # rounded bias picks other experts); so do the routers with `router_dtype="float32"` (see `post_init`).
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(DeepTalkSparseMoeBlock, index=1),
        "hidden_states": DeepTalkDecoderLayer,
        "attentions": OutputRecorder((DeepTalkAttention, DeepTalkMLAttention), index=1),
    }

    def post_init(self) -> None:
        if self.config.router_dtype == "float32":
            self._keep_in_fp32_modules_strict = [*self._keep_in_fp32_modules_strict, r"mlp\.(speech_)?gate\.weight"]
        super().post_init()

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        """Refuse a checkpoint whose tensors do not fit the config, leave some of its tensors missing or have no place
        in it, naming them (transformers only logs them)."""
        if loading_info.mismatched_keys and not load_config.ignore_mismatched_sizes:
            details = "; ".join(
                f"{key}: checkpoint {tuple(found)} vs model {tuple(expected)}"
                for key, found, expected in sorted(loading_info.mismatched_keys)
            )
            raise ValueError(
                f"Checkpoint tensors have the wrong shape for this DeepTalk config: {details}: the config was given or "
                "overridden with other sizes (`ignore_mismatched_sizes=True` initialises those tensors anew; the "
                f"speech vocabulary is resized with resize_speech_vocab), or it is another model's checkpoint. {_CONVERTED}"
            )
        loading_info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)  # ties drop out
        missing = sorted(loading_info.missing_keys)
        unexpected = sorted(loading_info.unexpected_keys)
        other = _other_deeptalk_checkpoint(model, missing, unexpected)
        if isinstance(model, DeepTalkModel):  # the base model of a causal LM's checkpoint: the heads are not its
            unexpected = [key for key in unexpected if key.split(".")[0] not in _OUTPUT_HEADS]
        if missing and _adds_stream_tables(model, missing, load_config):
            # A checkpoint without parallel streams, loaded with `num_audio_streams` set: new tables, as asked.
            logger.warning(f"parallel audio streams added: {', '.join(missing)} are new (initialised), train them")
        elif missing:  # they would stay random: a checkpoint of another layout, or a config override
            if other:
                hint = other
            elif all(key.split(".")[0] in _OUTPUT_HEADS for key in missing):
                hint = (
                    "Only output heads are missing: a checkpoint of the base model (load it with AutoModel), or one "
                    "saved with tied embeddings and loaded with tie_word_embeddings=False (load it tied)"
                )
            elif not unexpected and all(".mlp.shared_experts." in key for key in missing):  # (another MoE's: its own)
                hint = (
                    "The config was given or overridden with shared experts the checkpoint does not have, or its "
                    "config.json holds an `n_shared_experts`, which deeptalk_hf saved unused before 2026-11-29 and now "
                    "reads as shared experts: load such a checkpoint with n_shared_experts=0 to keep the model it was"
                )
            else:
                hint = (
                    "The config was given or overridden with other fields than the checkpoint's (e.g. mlp_only_layers, "
                    f"shared experts), or it is another model's checkpoint. {_CONVERTED}; speech attention is added "
                    "with add_speech_attention, the speech vocabulary with resize_speech_vocab"
                )
            raise ValueError(
                f"the checkpoint lacks {len(missing)} tensors this DeepTalk config needs ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}). {hint}"
            )
        if unexpected:  # dropped weights: the model would compute something else than the source
            raise ValueError(
                f"the checkpoint has {len(unexpected)} tensors this DeepTalk config has no place for "
                f"({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''}): "
                + (other or f"another model's checkpoint, or the config was overridden. {_CONVERTED}")
            )
        return loading_info

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' activation checkpointing, with a warning where it silently stops load balancing (see
        `warn_if_checkpointing_stops_balancing`)."""
        warn_if_checkpointing_stops_balancing(self.config, activation_checkpointing_kwargs)
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Without a request: the fused Triton kernels where they run natively (CUDA, Triton, SiLU experts), else
        transformers' default `grouped_mm`, or `eager` where torch's grouped matmul would refuse the expert strides
        (it wants multiples of 16 bytes: 8 elements cover every dtype)."""
        config = self.config
        # float64 weights: from the config's dtype, or the default dtype the weights are built in (no grouped matmul
        # or kernel takes float64)
        if requested_experts is None and (
            config.dtype in (torch.float64, "float64") or torch.get_default_dtype() == torch.float64
        ):
            requested_experts = "eager"
        elif requested_experts is None and triton_is_default(config.hidden_act):
            requested_experts = EXPERTS_IMPLEMENTATION
        elif requested_experts is None and (config.moe_intermediate_size % 8 or config.hidden_size % 8):
            requested_experts = "eager"
        return super().get_correct_experts_implementation(requested_experts)

    def resized_vocab_size(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> int:
        """The vocabulary size `resize_token_embeddings(new_num_tokens, pad_to_multiple_of)` asks for (as transformers
        rounds it)."""
        size = self.config.vocab_size if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        return size

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """transformers' resize of the text vocabulary, for a model without a speech block.

        With one, the vocabulary is the text ids then the speech ids, and a tokenizer appends new tokens after the
        speech units, where no text row can be: a call that would change the size is refused (pointing to
        `resize_speech_vocab`); `resize_token_embeddings(len(tokenizer))` with a matching tokenizer changes nothing.
        """
        config = self.config
        size = self.resized_vocab_size(new_num_tokens, pad_to_multiple_of)
        if config.speech_vocab_size and size != config.vocab_size:
            raise ValueError(
                f"resize_token_embeddings({new_num_tokens}, pad_to_multiple_of={pad_to_multiple_of}): this model's "
                f"{config.vocab_size} ids are {config.speech_token_start} text ids, then {config.speech_vocab_size} "
                "speech ids, and new tokenizer tokens land after the speech units, where no text row can be. Size the "
                "speech block with resize_speech_vocab; text tokens are added before the speech vocabulary, to the "
                "text model and its tokenizer before add_speech_tokens and resize_speech_vocab (resize_speech_vocab(0) "
                "here would discard this model's speech rows and move its speech ids away from the tokenizer's)"
            )
        if config.speech_vocab_size:
            return self.get_input_embeddings()
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepTalkExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepTalkTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)


class DeepTalkModel(DeepTalkPreTrainedModel):
    """The DeepTalk decoder without heads: text and speech embedding tables, decoder layers whose MoE blocks route
    text tokens to the text experts and speech tokens to the speech experts (`modality_ids`, or the id block), and
    the final norm. Returns the last hidden states and the cache (and router logits when asked)."""

    def __init__(self, config: DeepTalkConfig):
        config.validate_deeptalk()  # a config edited after construction: its fields' error, not a torch one
        super().__init__(config)
        text_vocab = config.speech_token_start
        self.padding_idx = (
            config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < text_vocab else None
        )
        self.embed_tokens = nn.Embedding(text_vocab, config.hidden_size, self.padding_idx)
        if config.speech_vocab_size:
            self.speech_embed_tokens = nn.Embedding(config.speech_vocab_size, config.hidden_size)
        if config.num_audio_streams:  # one table for all audio streams, stream s at offset s * stream vocabulary
            self.speech_stream_embed = nn.Embedding(
                config.num_audio_streams * config.audio_stream_vocab_size, config.hidden_size
            )
        self.layers = nn.ModuleList(
            [DeepTalkDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = DeepTalkRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rotary = DeepseekV2RotaryEmbedding if config.rope_complex else DeepTalkRotaryEmbedding
        self.rotary_emb = rotary(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def embed(self, input_ids: torch.LongTensor, split: ModalitySplit | None = None) -> torch.Tensor:
        """Text ids read `embed_tokens`, speech ids `speech_embed_tokens` (rows chosen by id); parallel streams
        `[batch, 1 + S, seq]` add one `speech_stream_embed` row per non-pad audio code to the text stream's one.

        `split`: the ids' own modality split (2D ids), where hard routing finds its rows anyway: a batch of one
        modality (e.g. a decoding step) then reads its one table: one lookup, not two lookups and their merge."""
        config = self.config
        if input_ids.dim() == 3:
            if not config.num_audio_streams:
                raise ValueError(
                    "input_ids of shape [batch, streams, seq] are for a model with parallel audio streams"
                )
            if input_ids.shape[1] != config.num_audio_streams + 1:
                raise ValueError(
                    f"input_ids has {input_ids.shape[1]} streams but the model has 1 text + "
                    f"{config.num_audio_streams} audio streams"
                )
            # The streams share one table: a wrong id would read another stream's row (checked eagerly: a host sync).
            if not torch.compiler.is_compiling() and (outside := stream_id_outside(input_ids, config)):
                raise ValueError(f"input_ids: {outside}")
            audio_ids = input_ids[:, 1:]
            offsets = torch.arange(config.num_audio_streams, device=input_ids.device) * config.audio_stream_vocab_size
            audio = self.speech_stream_embed(audio_ids + offsets[:, None])
            # Pad adds nothing, so a text position (all audio streams pad) is exactly the single-stream model's.
            audio = audio.masked_fill((audio_ids == config.audio_pad_token_id).unsqueeze(-1), 0.0).sum(dim=1)
            return self.embed(input_ids[:, 0]) + audio
        try:
            return self._lookup(input_ids, split)
        except IndexError as error:  # torch's message names no table and no range (CPU; CUDA asserts instead)
            raise ValueError(
                f"input_ids range from {input_ids.min().item()} to {input_ids.max().item()}, outside the vocabulary "
                f"[0, {config.vocab_size}) (text ids below {config.speech_token_start}, speech ids from it)"
            ) from error

    def _lookup(self, input_ids: torch.Tensor, split: ModalitySplit | None) -> torch.Tensor:
        """`embed` of 2D ids."""
        if not self.config.speech_vocab_size:
            return self.embed_tokens(input_ids)
        start = self.config.speech_token_start
        if split is not None:
            num_speech = split.speech_rows.numel()
            if num_speech == 0:
                return self.embed_tokens(input_ids)
            if num_speech == input_ids.numel():
                return self.speech_embed_tokens(input_ids - start)
        is_speech = input_ids >= start
        text = self.embed_tokens(input_ids.masked_fill(is_speech, 0))
        speech = self.speech_embed_tokens((input_ids - start).clamp(min=0))
        return torch.where(is_speech.unsqueeze(-1), speech, text)

    def _ids_split(
        self, input_ids: torch.LongTensor, modality_ids: torch.Tensor | None, routing: str
    ) -> ModalitySplit | None:
        """The routing split of 2D ids that decide their own modality, for `embed` to share, where hard routing finds
        its rows (a host sync) anyway: a layer has speech experts and the graph is not being compiled. Not under
        autograd, where the table a batch does not read must still get its (zero) gradient."""
        counts = self.config.num_speech_experts
        if (
            modality_ids is not None
            or input_ids.dim() != 2
            or routing != "hard"
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or not any(counts if isinstance(counts, list) else [counts])
        ):
            return None
        return ModalitySplit(speech_positions(self.config, input_ids, None, input_ids.shape, input_ids.device))

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        modality_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            0 for text and 1 for speech positions; decides routing only (e.g. for `inputs_embeds` from an audio
            encoder). Without it routing follows the id block; without either, every position is text.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        config = self.config  # each attribute read costs ~1 us: read each once per forward
        routing = config.modality_routing
        check_modality_routing(routing)  # it may be switched on a built model
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        modality_split = None
        if inputs_embeds is None:
            modality_split = self._ids_split(input_ids, modality_ids, routing)
            inputs_embeds = self.embed(input_ids, modality_split)
        if modality_split is None:
            modality_split = ModalitySplit(
                speech_positions(config, input_ids, modality_ids, inputs_embeds.shape[:2], inputs_embeds.device)
            )
            check_modality_ids_values(modality_ids, attention_mask)  # (its shape checked by `speech_positions`)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        layer_types = config.layer_types
        if min(len(self.layers), config.num_hidden_layers) > len(layer_types):  # (a ModuleList slice registers anew)
            # PEFT's `layer_replication` copies decoder layers and raises `num_hidden_layers` only: the per-layer
            # settings (attention types, MoE layers and their expert groups, router-loss layers) would not follow.
            # (Fewer layers, the first ones kept, run as the full model's first layers do: pruning, early exit.)
            raise ValueError(
                f"the model holds {len(self.layers)} decoder layers but its config describes {len(layer_types)} "
                "(`layer_types`): copied layers, as LoRA's `layer_replication` makes, are not supported"
            )
        if not isinstance(causal_mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "cache": cache,
                "position_ids": position_ids,
            }
            causal_mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in layer_types:
                causal_mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        # The speech attention indexes with the split's rows: the forward's one host sync, not one per projection.
        # Under `torch.compile` shapes must not depend on data: a mask, and the speech projections on every row.
        speech_index: SpeechIndex | None = None
        if config.speech_attention and torch.compiler.is_compiling():
            speech_index = modality_split.is_speech.view(inputs_embeds.shape[:2])
        elif config.speech_attention:
            rows, seq_len = modality_split.speech_rows, inputs_embeds.shape[1]
            speech_index = (rows // seq_len, rows % seq_len)
        # As `capture_outputs` decides: unrecorded router logits let a one-modality batch skip the other router.
        output_router_logits = bool(
            kwargs.pop("output_router_logits") if "output_router_logits" in kwargs else config.output_router_logits
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer_idx, decoder_layer in enumerate(self.layers[: config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask_mapping[layer_types[layer_idx]],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                modality_split=modality_split,
                speech_index=speech_index,
                output_router_logits=output_router_logits,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def accumulation_share(labels: torch.Tensor, loss_kwargs: dict) -> torch.Tensor | float:
    """This batch's share of the labels a training step accumulates (1 without `num_items_in_batch`).

    `Trainer` with gradient accumulation sums the micro-batches' losses and hands each `num_items_in_batch`, the label
    count of them all (of every process, with `average_tokens_across_devices`), which normalises the language-model
    loss; weighting the router losses by the share keeps their coefficients' weight whatever the accumulation (each at
    full weight would count G-fold). A step without labels (a prompt-only row truncated to its prompt) has share 0, not
    0/0: a NaN weight would send NaN into every router's gradient, and `Trainer` would write it into every weight."""
    num_items = loss_kwargs.get("num_items_in_batch")
    if num_items is None:
        return 1.0
    counted = loss_kwargs.get("shift_labels")
    counted = labels[..., 1:] if counted is None else counted  # what Trainer counts
    counted = counted.ne(-100).sum(dtype=torch.float32)  # not the default dtype (float64 in gradient checks)
    return counted / torch.as_tensor(num_items, device=counted.device).clamp(min=1)


def modality_router_losses(
    router_logits: tuple[torch.Tensor, ...],
    is_speech: torch.Tensor,
    config: DeepTalkConfig,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-balancing and z-loss per modality group, averaged over MoE layers.

    For each layer and group (hard routing: text tokens over the text router, speech tokens over the speech router,
    or over the text router in a layer without speech experts; routing "none": all tokens over all experts) the
    load-balancing loss is `E_g * sum_i f_i * P_i` (f_i: fraction of top-k assignments, summing to k; P_i: mean
    router probability), the z-loss `mean(logsumexp(logits)**2)`; groups are weighted by their share of the
    (non-padding) tokens. Returns `(aux_loss, z_loss)`.
    """
    # float32 throughout, as the router probabilities are (whatever the default dtype: gradient checks set float64)
    device, dtype = router_logits[0].device, torch.float32
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:  # 4D or per-layer masks: no padding
        valid = torch.ones(is_speech.numel(), device=device, dtype=dtype)
    else:  # with a cache the mask also covers the cached positions
        valid = attention_mask[:, -is_speech.shape[1] :].to(device=device, dtype=dtype).reshape(-1)
    is_speech = is_speech.reshape(-1).to(device)
    total = valid.sum().clamp(min=1.0)
    aux_loss = torch.zeros((), device=device, dtype=dtype)
    z_loss = torch.zeros((), device=device, dtype=dtype)
    # Layers with the same expert counts go through together: ~40 small ops per shape instead of per layer (4 layers
    # of 1,024 tokens on CPU: 5.1 -> 3.3 ms forward+backward). The logits of a model spread over devices meet on the
    # first layer's device.
    stacks: dict[tuple[int, int], list[torch.Tensor]] = {}
    for layer_idx, logits in zip(config.moe_layers, router_logits):
        stacks.setdefault(config.layer_experts(layer_idx), []).append(logits.to(device))
    for (num_text, num_speech), layers in stacks.items():
        logits = torch.stack(layers).to(dtype)  # [layers, tokens, experts]
        if config.modality_routing == "none" or not num_speech:
            groups = [(valid, logits)]
        else:
            groups = [
                (valid * ~is_speech, logits[..., :num_text].contiguous()),
                (valid * is_speech, logits[..., num_text:].contiguous()),
            ]
        for weight, group_logits in groups:
            num_experts = group_logits.shape[-1]
            probs = router_probs(group_logits, config.scoring_func)
            # Tie-stable on the scores the routing sorts (torch's topk is not: a zero router's loss would push other
            # experts; sigmoid scores over their sum could round two scores into a tie the routing does not see).
            top_k = min(config.num_experts_per_tok, num_experts)
            ranked = probs if config.scoring_func == "softmax" else group_logits.sigmoid()
            picks = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :top_k]
            assignments = torch.zeros(len(layers), num_experts, device=device, dtype=dtype).scatter_add_(
                1, picks.flatten(1), weight.repeat_interleave(top_k).expand(len(layers), -1)
            )
            denominator = weight.sum().clamp(min=1.0)
            # share * f_i = assignments_i / total, with P_i = weight @ probs / count (per layer)
            aux_loss = aux_loss + num_experts * (assignments / total * (weight @ probs) / denominator).sum()
            z_loss = z_loss + (torch.logsumexp(group_logits, dim=-1).pow(2) @ weight).sum() / total
    return aux_loss / len(router_logits), z_loss / len(router_logits)


def without_modality_ids_for_text_drafts(generator: object) -> object:
    """transformers hands the assistant every model kwarg: a draft model without `modality_ids` (a text LM)
    proposes from the ids alone; the DeepTalk model verifies with them."""
    draft = getattr(generator, "assistant_model", None)
    if draft is not None and "modality_ids" not in inspect.signature(draft.forward).parameters:
        generator.assistant_kwargs.pop("modality_ids", None)
    return generator


@dataclass
class DeepTalkCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    z_loss (`torch.FloatTensor`, *optional*):
        Router z-loss `mean(logsumexp(router_logits)**2)`, per modality group, averaged over MoE layers.
    audio_logits (`torch.FloatTensor` of shape `(batch_size, num_audio_streams, sequence_length, audio_vocab)`):
        Logits of each parallel audio stream (models with `num_audio_streams > 0`).
    """

    z_loss: torch.FloatTensor | None = None
    audio_logits: torch.FloatTensor | None = None


class DeepTalkForCausalLM(DeepTalkPreTrainedModel, GenerationMixin):
    """DeepTalk speech-text language model: `DeepTalkModel` with a text head and a speech head whose logits are
    concatenated over the whole vocabulary (text ids, then the speech block), the router losses added to the loss in
    training, `generate` for interleaved answers and, with `num_audio_streams`, parallel audio streams."""

    _tp_plan = {"lm_head": "colwise_gather_output", "speech_lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DeepTalkConfig):
        super().__init__(config)
        self.model = DeepTalkModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.speech_token_start, bias=False)
        tied = {"lm_head.weight": "model.embed_tokens.weight"}
        if config.speech_vocab_size:
            self.speech_lm_head = nn.Linear(config.hidden_size, config.speech_vocab_size, bias=False)
            tied["speech_lm_head.weight"] = "model.speech_embed_tokens.weight"
        if config.num_audio_streams:  # all audio streams' output heads in one projection
            self.speech_stream_heads = nn.Linear(
                config.hidden_size, config.num_audio_streams * config.audio_stream_vocab_size, bias=False
            )
        self._tied_weights_keys = tied
        self.post_init()

    @classmethod
    def maybe_distribute_model(
        cls, model: nn.Module, distributed_config: DistributedConfig | None, mesh_manager: object | None
    ) -> nn.Module:
        """transformers' parallelism. Pipeline parallelism hands every stage after the first the hidden states in
        place of `input_ids`, so their MoE layers would route speech positions as text: the ids' modality is passed
        on as `modality_ids` (single-stream models; the naive pipeline does not lay out parallel streams anyway)."""
        model = super().maybe_distribute_model(model, distributed_config, mesh_manager)
        if mesh_manager is None or distributed_config.pp_size <= 1 or model.config.num_audio_streams:
            return model
        pipeline_forward, signature = model.forward, inspect.signature(model.forward)

        @functools.wraps(pipeline_forward)
        def forward(*args, **kwargs) -> ModelOutput:
            bound = signature.bind_partial(*args, **kwargs)
            input_ids = bound.arguments.get("input_ids")
            if input_ids is not None and bound.arguments.get("modality_ids") is None:  # the model's own rule
                speech = speech_positions(model.config, input_ids, None, input_ids.shape, input_ids.device)
                bound.arguments["modality_ids"] = speech.long()
            return pipeline_forward(*bound.args, **bound.kwargs)

        model.forward = forward
        return model

    def resize_speech_vocab(self, speech_vocab_size: int) -> None:
        """Give the speech block `speech_vocab_size` ids; the text block and the kept speech rows are untouched.

        New speech rows (embedding and output) start at the mean of the text rows, a neutral point that keeps the
        first speech logits in the range of the text logits. `vocab_size` grows or shrinks with the speech block.
        """
        if not is_whole(speech_vocab_size, 0):  # checked before anything changes (the config's own check came after)
            raise ValueError(f"speech_vocab_size={speech_vocab_size!r} must be an integer >= 0")
        speech_vocab_size = int(speech_vocab_size)  # a NumPy count too
        config = self.config
        old = config.speech_vocab_size
        if speech_vocab_size == old:
            return
        tables = [self.model.embed_tokens, self.lm_head]
        if old:
            tables += [self.model.speech_embed_tokens, self.speech_lm_head]
        check_no_adapters(nn.ModuleList(tables), "resizing replaces the speech tables and reads the text ones")

        def resized(text_weight: torch.Tensor, speech_weight: torch.Tensor | None) -> torch.Tensor:
            rows = text_weight.new_empty(speech_vocab_size, text_weight.shape[1])
            with torch.no_grad():
                rows.copy_(text_weight.mean(0, keepdim=True).expand_as(rows))
                kept = min(old, speech_vocab_size)
                if kept:
                    rows[:kept] = speech_weight[:kept]
            return rows

        embed = self.model.embed_tokens.weight
        old_embed = self.model.speech_embed_tokens.weight if old else None
        old_head = self.speech_lm_head.weight if old else None
        if old:
            del self.model.speech_embed_tokens, self.speech_lm_head
            self._tied_weights_keys.pop("speech_lm_head.weight")
        config.vocab_size = config.speech_token_start + speech_vocab_size
        config.speech_vocab_size = speech_vocab_size
        self.vocab_size = config.vocab_size
        if speech_vocab_size:
            # A frozen table stays frozen (a training stage's choice), as in transformers' `resize_token_embeddings`;
            # new speech tables follow the text tables.
            embed_before = old_embed if old_embed is not None else embed
            head_before = old_head if old_head is not None else self.lm_head.weight
            embed_rows = resized(embed, old_embed)
            self.model.speech_embed_tokens = nn.Embedding.from_pretrained(
                embed_rows, freeze=not embed_before.requires_grad
            )
            self.speech_lm_head = nn.Linear(config.hidden_size, speech_vocab_size, bias=False)
            self.speech_lm_head.to(device=embed.device, dtype=embed.dtype)
            with torch.no_grad():
                self.speech_lm_head.weight.copy_(resized(self.lm_head.weight, old_head))
            self.speech_lm_head.weight.requires_grad_(head_before.requires_grad)
            self._tied_weights_keys["speech_lm_head.weight"] = "model.speech_embed_tokens.weight"
            if config.tie_word_embeddings:
                self.speech_lm_head.weight = self.model.speech_embed_tokens.weight
        # transformers' map of tied parameters, computed once in `post_init` (read by `init_weights`, device maps).
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=False)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary: `[lm_head(h) ; speech_lm_head(h)]`."""
        logits = self.lm_head(hidden_states)
        config = self.config
        if config.tie_word_embeddings:
            self._check_tied_adapters()
        if config.speech_vocab_size:
            logits = torch.cat([logits, self.speech_lm_head(hidden_states)], dim=-1)
        return logits

    def _check_tied_adapters(self) -> None:
        """PEFT adapters on a tied model: PEFT ties adapters to the text table only (and only where the model's own
        config says it is tied, which the audio model's does not), and picks modules by name suffix (`"lm_head"` also
        names `speech_lm_head`). A side of a tied pair that does not train with the other makes the adapter and its
        merge different models (merging changes the shared tensor): refused at the first forward, naming it. That is
        any adapter on the speech pair (LoRA, e.g. from `"all-linear"`, or a `modules_to_save` copy), and trainable
        tokens on either pair unless PEFT tied the head's to the table's."""
        speech_pair = (
            {"model.speech_embed_tokens": self.model.speech_embed_tokens, "speech_lm_head": self.speech_lm_head}
            if self.config.speech_vocab_size
            else {}
        )
        adapted = [
            name for name, module in speech_pair.items() if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
        ]
        if adapted:
            raise ValueError(
                f"a PEFT adapter on {', '.join(adapted)} of a model with tie_word_embeddings: PEFT does not know "
                "that speech_lm_head is tied to speech_embed_tokens (it ties a head to the text table only), so "
                "the pair would train apart and merging would change both tensors, giving another model. Leave "
                "the speech pair out (with target_modules='all-linear', exclude_modules=['speech_lm_head']), use "
                "an untied model, or train the pair in full (set_training_stage)"
            )
        pairs = [("embed_tokens / lm_head", self.model.embed_tokens, self.lm_head)]
        if speech_pair:
            pairs.append(("speech_embed_tokens / speech_lm_head", *speech_pair.values()))
        broken = [
            name
            for name, table, head in pairs
            if (isinstance(table, TrainableTokensWrapper) or isinstance(head, TrainableTokensWrapper))
            and not (
                isinstance(table, TrainableTokensWrapper)
                and isinstance(head, TrainableTokensWrapper)
                and head.token_adapter.tied_adapter is table.token_adapter
            )
        ]
        if broken:
            raise ValueError(
                f"PEFT trainable tokens on a model with tie_word_embeddings leave the tied pair {', '.join(broken)} "
                "apart: PEFT ties a head to the text table only (where the model's own config says it is tied) and "
                "picks modules by name suffix ('lm_head' also names speech_lm_head), so the head would not train with "
                "its table's rows and merging would give another model. Use an untied model, or train whole tables "
                "(set_training_stage)"
            )

    def _stream_loss(self, logits: torch.Tensor, audio_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The `stream_loss_weights`-weighted mean of each stream's mean loss, over the streams that have labels (a
        stream all -100, e.g. the audio of a text-only batch, has no loss rather than a NaN one). Each stream is
        normalised by its own labels, so `Trainer`'s `num_items_in_batch` (counted over all streams) is not taken."""
        config = self.config
        per_stream = [(logits, self.vocab_size)] + [
            (audio_logits[:, s], config.audio_stream_vocab_size) for s in range(config.num_audio_streams)
        ]
        # In tensors, without a host sync (so that it compiles): a stream without labels gets weight 0.
        total = weight_sum = logits.new_zeros((), dtype=torch.float32)
        for s, ((stream_logits, vocab), weight) in enumerate(zip(per_stream, config.stream_loss_weights)):
            if weight:
                count = (labels[:, s, 1:] != -100).sum()
                loss = self.loss_function(stream_logits, labels[:, s], vocab, num_items_in_batch=count.clamp(min=1))
                present = weight * (count > 0).float()
                total, weight_sum = total + present * loss, weight_sum + present
        return total / weight_sum.clamp(min=torch.finfo(weight_sum.dtype).tiny)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether `Trainer` may hand over `num_items_in_batch`: not with parallel streams, whose losses are each
        stream's own mean (the Trainer then averages micro-batches itself)."""
        return not self.config.num_audio_streams

    def audio_stream_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of each parallel audio stream, `[batch, S, seq, audio_vocab]`."""
        config = self.config
        logits = self.speech_stream_heads(hidden_states)
        return logits.unflatten(-1, (config.num_audio_streams, config.audio_stream_vocab_size)).transpose(1, 2)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeepTalkCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, or `(batch_size, 1 + S, sequence_length)` with parallel audio streams):
            Token ids. With `config.num_audio_streams = S`, stream 0 is text and streams 1..S the delayed audio
            codes; a 2D input is then read as the streams flattened into rows (`batch * (1 + S)`, and so are its
            `attention_mask` and `position_ids`), as in `generate`, and the logits come back in that layout, each row
            padded with `-inf` to a common width.
        labels (`torch.LongTensor`, same layout as `input_ids`, *optional*):
            With parallel streams the loss is the `stream_loss_weights`-weighted mean of each stream's loss.
        modality_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            0 for text and 1 for speech positions (routing only); defaults to what the ids say.
        """
        config = self.config
        num_audio_streams = config.num_audio_streams  # each config read costs ~1 us: once per forward
        streams = num_audio_streams + 1
        flattened = num_audio_streams > 0 and input_ids is not None and input_ids.dim() == 2
        if flattened:  # generation's layout: one row per stream
            rows = input_ids.shape[0]
            # An item's mask or positions ([batch, seq]) would be read as the rows' (`[::streams]`), giving wrong items.
            mask_rows = None if attention_mask is None else attention_mask.shape[0]
            position_rows = None if position_ids is None else position_ids.shape[0]
            if rows % streams or mask_rows not in (None, rows) or position_rows not in (None, 1, rows):
                raise ValueError(
                    f"2D input_ids are the {streams} streams of each item flattened into rows, as generate lays them "
                    "out, with one attention_mask and position_ids row per row (or one position_ids row for all): got "
                    f"{rows} rows, {mask_rows} mask rows and {position_rows} position_ids rows"
                )
            input_ids = input_ids.reshape(-1, streams, input_ids.shape[-1])
            attention_mask = attention_mask[::streams] if attention_mask is not None else None
            position_ids = position_ids[::streams] if position_ids is not None else None
        output_router_logits = (
            output_router_logits if output_router_logits is not None else config.output_router_logits
        )
        # Balancing must not silently stop in training because router logits were not requested; without labels
        # (`Trainer` with a `compute_loss_func` or label smoothing) the losses are still there to add.
        wants_router_losses = self.training and (config.router_aux_loss_coef or config.router_z_loss_coef)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            modality_ids=modality_ids,
            output_router_logits=bool(output_router_logits or wants_router_losses),
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.compute_logits(hidden_states)
        audio_logits = self.audio_stream_logits(hidden_states) if num_audio_streams else None

        loss = None
        if labels is not None:
            if audio_logits is None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            else:
                # `[batch, 1 + S, seq]`, also for embeddings given in place of the ids (`model.model.embed(ids)`).
                batch_size, length = outputs.last_hidden_state.shape[:2]
                expected = (batch_size, streams, length)
                labels = labels.reshape(expected) if flattened else labels
                if tuple(labels.shape) != expected:
                    raise ValueError(
                        f"labels has shape {tuple(labels.shape)}; the streams need [batch, 1 + S, seq] = {expected}"
                    )
                # torch's cross entropy would name no stream ("Target 18 is out of bounds"; a device assert on GPU).
                if not torch.compiler.is_compiling() and (outside := stream_id_outside(labels, config, -100)):
                    raise ValueError(f"labels: {outside} (and is not -100, the ignored label)")
                loss = self._stream_loss(logits, audio_logits, labels)

        aux_loss = z_loss = None
        if outputs.router_logits:
            shape = outputs.last_hidden_state.shape[:2]
            is_speech = speech_positions(config, input_ids, modality_ids, shape, logits.device)
            aux_loss, z_loss = modality_router_losses(outputs.router_logits, is_speech, config, attention_mask)
            if loss is not None and labels is not None:  # (the loss comes from the labels)
                router_loss = config.router_aux_loss_coef * aux_loss + config.router_z_loss_coef * z_loss
                share = 1.0 if audio_logits is not None else accumulation_share(labels, kwargs)
                loss = loss + torch.as_tensor(share, device=loss.device, dtype=loss.dtype) * router_loss.to(
                    loss.device
                )

        if flattened:
            width = max(logits.shape[-1], audio_logits.shape[-1])
            rows = [F.pad(logits, (0, width - logits.shape[-1]), value=-float("inf")).unsqueeze(1)]
            rows.append(F.pad(audio_logits, (0, width - audio_logits.shape[-1]), value=-float("inf")))
            logits = torch.cat(rows, dim=1).flatten(0, 1)
        return DeepTalkCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            audio_logits=audio_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if output_router_logits else None,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args,
        inputs_embeds: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
        batch_parallel: bool = False,
        **kwargs,
    ):
        """Extends a prompt's `modality_ids` over the generated ids (whose block gives their modality); with batch
        parallel decoding, the text stream of each speech answer reads the text of its text-only copy.
        (`inputs_embeds` is named so that `generate` accepts a prompt given as embeddings.)"""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        step_ids = model_inputs.get("input_ids")
        if batch_parallel and step_ids is not None:
            streams = step_ids.view(-1, self.config.num_audio_streams + 1, step_ids.shape[-1]).clone()
            half = streams.shape[0] // 2
            streams[:half, 0] = streams[half:, 0]
            model_inputs["input_ids"] = step_ids = streams.flatten(0, 1)
        if modality_ids is None and step_ids is not None:  # the model reads each id's modality itself
            return model_inputs
        cache = model_inputs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        if step_ids is None:  # first step from `inputs_embeds`: the modality of its uncached positions
            positions = slice(past, past + model_inputs["inputs_embeds"].shape[1])
            if modality_ids is not None:  # as booleans (padding may hold anything): `generate` checked the values
                model_inputs["modality_ids"] = modality_ids[:, positions] == 1
            elif input_ids.shape[1] >= positions.stop:  # transformers passes only the embeddings of ids given beside
                ids = input_ids[:, positions]  # them (embeddings alone come with `[batch, 0]` ids: all text)
                model_inputs["modality_ids"] = speech_positions(self.config, ids, None, ids.shape, ids.device)
            return model_inputs
        covered = min(modality_ids.shape[1] - past, step_ids.shape[1])
        if covered <= 0:  # past the prompt's modality ids, the model reads the same modality from the ids themselves
            return model_inputs
        step_modality = step_ids >= self.config.speech_token_start
        step_modality[:, :covered] = modality_ids[:, past : past + covered] == 1
        model_inputs["modality_ids"] = step_modality
        return model_inputs

    def _get_candidate_generator(self, *args, **kwargs):
        return without_modality_ids_for_text_drafts(super()._get_candidate_generator(*args, **kwargs))

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        *,
        speech_answer: bool | None = None,
        batch_parallel: bool = False,
        **kwargs,
    ):
        r"""transformers' `generate` (its first four parameters by position, the rest by keyword); with parallel audio
        streams, `inputs` is `[batch, 1 + S, seq]` in the delayed layout and so is the result (`audio_codes_per_stream`
        reads the codes back, or `processor.decode_parallel` the text and frames; `revert_delay_pattern` takes whole
        patterns only, not answers that end at different steps or are cut by `max_new_tokens`).

        speech_answer (`bool` or one `bool` per item, defaults to `True`):
            Parallel streams only: answer in speech (audio streams follow the delay pattern and generation stops when
            every audio stream has ended) or in text only (audio streams emit pad; stops at the text end).
        batch_parallel (`bool`, defaults to `False`):
            Parallel streams only: decode a text-only copy of each query beside it, whose text is fed to the speech
            answer as its text stream and returned as the answer's text (DeepTalk / Mini-Omni batch parallel
            decoding); an item is done once its audio streams and its copy's text have ended.
        """
        config = self.config
        if not config.num_audio_streams:
            if speech_answer is not None or batch_parallel:
                raise ValueError(
                    "speech_answer and batch_parallel are for models with parallel audio streams; a single-stream "
                    "model answers in speech from a prompt that opens the answer's speech "
                    "(processor.apply_chat_template(..., speech_answer=True))"
                )
            check_prompt_modality_ids(inputs if inputs is not None else kwargs.get("input_ids"), kwargs)
            return super().generate(inputs, generation_config, logits_processor, stopping_criteria, **kwargs)
        from .generation_deeptalk import (
            DelayPatternLogitsProcessor,
            ParallelStreamsStoppingCriteria,
            text_pad_token_id,
        )

        # What transformers will run: the given config (or the model's) filled from the model's, then the kwargs.
        setting, _ = self._prepare_generation_config(generation_config, **kwargs)
        cache_implementation = setting.cache_implementation
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        refused = {
            "num_beams > 1": (setting.num_beams or 1) > 1,
            "num_return_sequences > 1": (setting.num_return_sequences or 1) > 1,
            f"cache_implementation={cache_implementation!r}": cache_implementation not in (None, "dynamic"),
            f"a {type(cache).__name__}": cache is not None and type(cache) is not DynamicCache,
            # transformers enforces them through the end ids, which here are per stream (the text's can be a code)
            "min_new_tokens / min_length": bool(setting.min_new_tokens) or bool(setting.min_length),
            "forced_eos_token_id / exponential_decay_length_penalty": setting.forced_eos_token_id is not None
            or setting.exponential_decay_length_penalty is not None,
            # transformers' stop-string criterion stops rows one by one, and only the text row spells the string
            "stop_strings": setting.stop_strings is not None,
            "inputs_embeds": "inputs_embeds" in kwargs,
            "modality_ids (the streams decide each position's modality)": "modality_ids" in kwargs,
            "assisted decoding (an assistant model, prompt lookup, early exit)": kwargs.get("assistant_model")
            is not None
            or setting.prompt_lookup_num_tokens is not None
            or setting.assistant_early_exit is not None,
        }
        if any(refused.values()):
            raise ValueError(
                "parallel-stream generation keeps each item's streams together as consecutive rows and does not "
                f"support {', '.join(name for name, given in refused.items() if given)}"
            )
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        streams = config.num_audio_streams + 1
        if input_ids is None or input_ids.dim() != 3 or input_ids.shape[1] != streams:
            raise ValueError(
                f"parallel-stream generation takes input_ids of shape [batch, {streams}, seq] (a prompt: "
                f"processor.parallel_prompt), got {None if input_ids is None else tuple(input_ids.shape)}"
            )
        batch, _, prompt_length = input_ids.shape
        # The text stream pads with the config's pad id, as the processor lays prompts out; it ends at the end ids
        # transformers would use (argument, then generation config, then model config), which the pattern and the
        # stopping criteria read: transformers' own end check would stop an item at an audio code of the same id.
        pad_token_id = text_pad_token_id(config)
        given = kwargs.pop("pad_token_id", None)
        if given is not None and given != pad_token_id:
            raise ValueError(
                f"pad_token_id={given}: parallel-stream generation pads with the config's pad_token_id "
                f"({pad_token_id}), as the processor lays prompts out; set it there"
            )
        kwargs.pop("eos_token_id", None)  # in `setting`
        eos_token_id = setting.eos_token_id if setting.eos_token_id is not None else config.eos_token_id
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, prompt_length):
            raise ValueError(
                f"attention_mask must be [batch, seq] = {(batch, prompt_length)} (one row per item, for all its "
                f"streams), got {tuple(attention_mask.shape)}"
            )
        if attention_mask is None:  # transformers would read it from the text row alone, masking audio over text pad
            padding = (input_ids[:, 0] == pad_token_id) & (input_ids[:, 1:] == config.audio_pad_token_id).all(1)
            # Left padding only: an all-pad column inside a prompt (an audio stream's delay, an answer's text ended
            # while its audio had not begun, an end id that is also the pad) is part of it, as the cache saw it. A pad
            # that is an end id (the fallback without pad_token_id) may open a prompt (BOS = EOS in GPT-2's
            # vocabulary): as transformers does then, nothing is read as padding.
            if eos_token_id is not None and pad_token_id in torch.tensor(eos_token_id):
                padding = torch.zeros_like(padding)
            attention_mask = (~padding.long().cumprod(-1).bool()).long()
        speech = torch.as_tensor(True if speech_answer is None else speech_answer)
        if speech.dim() == 0:  # one truth value for every item
            speech = torch.full((batch,), bool(speech))
        if speech.dtype != torch.bool or tuple(speech.shape) != (batch,):
            raise ValueError(
                f"speech_answer must be a bool or one bool per item ({batch} items), got {speech_answer!r}"
            )
        speech = speech.cpu()
        if batch_parallel:
            if not speech.all():
                raise ValueError(
                    "batch_parallel=True drives speech answers; it needs speech_answer=True for every item"
                )
            if cache is not None and cache.get_seq_length():  # a previous turn's: its copies continue the same history
                rows = next(layer.keys.shape[0] for layer in cache.layers if layer.is_initialized)
                if rows != batch:
                    raise ValueError(f"the cache holds {rows} rows but the batch has {batch} items")
                cache.reorder_cache(torch.arange(batch).repeat(2))
            input_ids = torch.cat([input_ids, input_ids])
            attention_mask = torch.cat([attention_mask, attention_mask])
            speech = torch.cat([speech, torch.zeros_like(speech)])
        attention_mask = attention_mask.repeat_interleave(streams, dim=0)
        output = super().generate(
            input_ids.flatten(0, 1),
            generation_config,
            [*(logits_processor or []), DelayPatternLogitsProcessor(prompt_length, config, speech, eos_token_id)],
            [*(stopping_criteria or []), ParallelStreamsStoppingCriteria(prompt_length, config, speech, eos_token_id)],
            attention_mask=attention_mask,
            eos_token_id=None,  # the stopping criteria and the pattern handle the ends, per stream
            pad_token_id=pad_token_id,
            batch_parallel=batch_parallel,
            **kwargs,
        )
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        sequences = sequences.view(-1, streams, sequences.shape[-1])
        if batch_parallel:
            sequences = torch.cat([sequences[batch:, :1], sequences[:batch, 1:]], dim=1)
            # The cache of the returned sequences is the speech answers' (their text stream read the copies' text);
            # the copies' rows never saw the answers' audio.
            returned = cache if isinstance(output, torch.Tensor) else output.cache  # (a given cache is returned)
            if returned is not None:
                returned.batch_select_indices(torch.arange(batch))
        if isinstance(output, torch.Tensor):
            return sequences
        output.sequences = sequences
        return output


__all__ = ["DeepTalkForCausalLM", "DeepTalkModel", "DeepTalkPreTrainedModel"]
