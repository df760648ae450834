"""DeepTalk configuration: a Qwen3-MoE-style config with modality experts and a speech vocabulary block."""

import dataclasses
import math
from numbers import Integral

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_rope_utils import RopeParameters
from transformers.utils import logging

logger = logging.get_logger(__name__)

MODALITY_ROUTING_MODES = ("hard", "none")


def check_modality_routing(mode: str) -> None:
    """Raise unless `mode` is a routing mode (checked at construction and at forward, as it may be switched)."""
    if mode not in MODALITY_ROUTING_MODES:
        raise ValueError(f"modality_routing={mode!r} is unknown; expected one of {MODALITY_ROUTING_MODES}")


SCORING_FUNCTIONS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
QK_NORM_TYPES = ("head", "full")
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


class ChecksOverrides:
    """Builds a config loaded with keyword overrides (`from_pretrained(path, num_experts_per_tok=0)`) from the saved
    fields and the overrides together. transformers sets the overrides on the built config, past `__post_init__`: a
    bad value then went unchecked until `save_pretrained` refused it (or failed in the model with a torch error), and
    fields derived from it (audio ids, `head_dim`, ...) kept the saved values."""

    # Fields `__post_init__` derives when they are None. A saved config holds the derived values: those it would
    # derive again from its own fields are dropped when overrides are given, so they follow the overrides.
    derived_fields: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        aliases = getattr(cls, "attribute_map", {})
        own = {field.name for field in dataclasses.fields(cls)} - {
            field.name for field in dataclasses.fields(PreTrainedConfig)
        }
        own |= set(getattr(cls, "construction_kwargs", ()))  # read by `__post_init__`, folded into fields
        overrides = {aliases.get(key, key): kwargs.pop(key) for key in list(kwargs) if aliases.get(key, key) in own}
        for key, spec in getattr(cls, "sub_configs_defaults", {}).items():  # a dict updates the saved sub-config
            saved = config_dict.get(key)
            if isinstance(overrides.get(key), dict) and saved is not None:
                saved = saved.to_dict() if isinstance(saved, PreTrainedConfig) else saved
                sub_class = spec.config_class
                if issubclass(sub_class, ChecksOverrides):
                    overrides[key] = sub_class._overridden(saved, overrides[key])
                else:
                    overrides[key] = _merged(saved, overrides[key], getattr(sub_class, "attribute_map", {}))
        return super().from_dict(cls._overridden(config_dict, overrides), **kwargs)

    @classmethod
    def _overridden(cls, saved: dict, overrides: dict) -> dict:
        """`saved` updated by `overrides`, less the saved `derived_fields` that are what `saved` alone derives (not
        values of their own) and that `overrides` does not give: derived again, from the overridden fields."""
        merged = _merged(saved, overrides, getattr(cls, "attribute_map", {}))
        stale = [name for name in cls.derived_fields if name in saved and name not in overrides]
        if overrides and stale:
            try:
                rederived = super().from_dict({k: v for k, v in saved.items() if k not in stale})
            except (ValueError, TypeError, StrictDataclassError):  # refused as saved, repaired by an override: keep
                return merged
            for name in stale:
                if getattr(rederived, name) == saved[name]:
                    del merged[name]
        return merged


def _merged(saved: dict, overrides: dict, aliases: dict[str, str]) -> dict:
    """`saved` updated by `overrides`, less the saved aliases of overridden fields (the constructor would apply an
    alias after its field)."""
    given = {aliases.get(key, key) for key in overrides}
    return {**{key: value for key, value in saved.items() if aliases.get(key, key) not in given}, **overrides}


def is_whole(value: object, least: int = 1) -> bool:
    """A whole number `>= least` (numpy integers too; not booleans, which are flags, nor 2.0): a rate, a count."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= least


def _layout_count(kwargs: dict, name: str, default: int) -> int:
    """A Qwen/DeepSeek layout key from `kwargs` (None: `default`), refused unless an integer >= `default`."""
    value = kwargs.pop(name, None)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < default:
        raise ValueError(f"{name}={value!r} must be an integer >= {default}")
    return value


@strict
class DeepTalkConfig(ChecksOverrides, PreTrainedConfig):
    r"""
    Configuration of a DeepTalk speech-text Mixture-of-Experts LLM.

    Field names follow Qwen3-MoE (so a Qwen3-MoE `config.json` builds an equivalent config); the DeepTalk-specific
    fields are:

    - `speech_vocab_size`: size of the speech block, always the **last** ids of the vocabulary
      (`speech_token_start = vocab_size - speech_vocab_size`). Speech ids use `model.speech_embed_tokens` and
      `speech_lm_head`, text ids the original `embed_tokens` and `lm_head`.
    - `num_experts`: text experts per MoE layer; `num_speech_experts`: speech experts per MoE layer (0 allowed).
      Each is an int or a list with one entry per MoE layer (the layers not in `mlp_only_layers`).
    - `modality_routing`: `"hard"` (a token only sees its own modality's experts) or `"none"` (every token is
      scored over all experts, as the source MoE did). Read at forward time.
    - `speech_expert_ids`: per MoE layer, the source-MoE indices of the experts held by `speech_experts` (recorded
      by expert assignment), so routing `"none"` scores experts in the source order. `None` means the speech
      experts follow the text experts.
    - `shared_expert_intermediate_size` / `shared_expert_gate`: optional shared experts for every token, with an
      optional Qwen2-MoE-style sigmoid gate.
    - `speech_attention`: each layer also has speech copies of its attention projections (and q/k norms),
      `self_attn.speech_{q,k,v,o}_proj` (`speech_{q,k}_norm`), used at speech positions; text positions keep the
      original ones. Speech then learns to attend (e.g. to the text it speaks) in speech tensors, so the speech stage
      leaves text attention untouched. `add_speech_attention` turns it on for a built model, copying the text
      projections (a model built from a config with it on initialises them like any new weights). Not with multi-head
      latent attention.
    - `router_z_loss_coef`: weight of the router z-loss (`mean(logsumexp(logits)**2)`).
    - `qkv_bias`: bias on q/k/v only (Qwen2); `attention_bias` puts a bias on q/k/v/o (Llama, Qwen3).
    - `use_qk_norm`: RMSNorm on queries and keys, per head (`qk_norm_type="head"`, Qwen3) or over the whole q/k
      projection before the head split (`"full"`, OLMoE); `clip_qkv` clamps queries, keys and values (OLMoE).
    - DeepSeek-V2/V3: multi-head latent attention when `kv_lora_rank` is set (`q_lora_rank`, `qk_nope_head_dim`,
      `qk_rope_head_dim`, `v_head_dim`, `rope_interleave`, and `rope_complex` for DeepSeek-V2's rotary, a float32
      complex product on interleaved pairs, where V3's rotates in the model dtype: V2 imports set it, so that in bf16
      they compute as transformers' V2); `head_dim` becomes `qk_rope_head_dim`, as in transformers'
      DeepSeek configs, and `use_qk_norm`/`qk_norm_type` do not apply: MLA normalises its latents itself); router
      `scoring_func` (softmax or sigmoid), `topk_method` (`"greedy"`, V2's `"group_limited_greedy"`, V3's `"noaux_tc"` with a per-expert score-correction bias),
      `n_group`/`topk_group` and `routed_scaling_factor`. Group-limited top-k applies where a router sees all of a
      layer's experts (routing "none", or a layer without speech experts); a split modality group uses plain top-k.
    - `router_dtype`: `"float32"` computes router logits in float32 and keeps the router weights (`mlp.gate`,
      `mlp.speech_gate`) in float32 when loaded in half precision, as transformers' DeepSeek-V2/V3 do (imports of
      them set it); `None` computes them in the model's dtype, as Qwen-MoE and Mixtral do. V3's score-correction
      bias is kept in float32 always.
    - `routing_weights_dtype`: `"float32"` multiplies the experts' outputs by the float32 routing weights, as
      transformers' Mixtral does (its imports set it); `None` rounds the weights to the router logits' dtype first, as
      Qwen-MoE and OLMoE do. The two differ in half precision only.

    Parallel text-speech decoding (DeepTalk / Mini-Omni style) is on when `num_audio_streams` (S) > 0: inputs are
    `[batch, 1 + S, seq]` (stream 0 text), each audio stream has `audio_codebook_size` codes followed by its pad,
    begin and end codes (`audio_pad_token_id`, `audio_bos_token_id`, `audio_eos_token_id`, by default the next three
    ids), is delayed by `audio_stream_delays[s]` positions behind the text, and its embedding and output head are
    speech tensors (`model.speech_stream_embed`, `speech_stream_heads`). `stream_loss_weights` weighs the text
    stream and each audio stream in the loss. With S = 0 the model is the single-stream model, with no extra weights.

    `decoder_sparse_step` and `first_k_dense_replace` are accepted and folded into `mlp_only_layers`, the one place
    that holds the dense layers; DeepSeek's `n_shared_experts` into `shared_expert_intermediate_size`.
    """

    model_type = "deeptalk"
    keys_to_ignore_at_inference = ["cache"]
    construction_kwargs = ("decoder_sparse_step", "first_k_dense_replace", "use_sliding_window", "n_shared_experts")
    derived_fields = (
        "layer_types",  # (not `head_dim`, which transformers' configs keep at load, as Qwen3's 128 whatever the width)
        "audio_pad_token_id",
        "audio_bos_token_id",
        "audio_eos_token_id",
        "audio_stream_delays",
        "stream_loss_weights",
    )
    attribute_map = {"num_local_experts": "num_experts", "n_routed_experts": "num_experts"}

    base_model_tp_plan = {
        # transformers shards `embed_tokens` so; the speech table likewise, which a tied `speech_lm_head` shares
        "speech_embed_tokens": "embedding_rowwise",
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.self_attn.speech_q_proj": "colwise",
        "layers.*.self_attn.speech_k_proj": "colwise",
        "layers.*.self_attn.speech_v_proj": "colwise",
        "layers.*.self_attn.speech_q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.speech_k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.speech_o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.speech_experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.speech_experts.down_proj": "rowwise",
        "layers.*.mlp.speech_experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
        "layers.*.mlp.speech_experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.speech_experts.down_proj": "grouped_gemm",
        "layers.*.mlp.speech_experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 151936
    speech_vocab_size: int = 0
    hidden_size: int = 2048
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    use_qk_norm: bool = True
    qk_norm_type: str = "head"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True
    rope_complex: bool = False
    mlp_only_layers: list[int] | None = None
    num_experts: int | list[int] = 8
    num_speech_experts: int | list[int] = 0
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    router_dtype: str | None = None
    routing_weights_dtype: str | None = None
    modality_routing: str = "hard"
    speech_expert_ids: list[list[int]] | None = None
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    speech_attention: bool = False
    num_audio_streams: int = 0
    audio_codebook_size: int = 4096
    audio_pad_token_id: int | None = None
    audio_bos_token_id: int | None = None
    audio_eos_token_id: int | None = None
    audio_stream_delays: list[int] | None = None
    stream_loss_weights: list[float] | None = None
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # Folded into `mlp_only_layers` (Qwen2/3-MoE `decoder_sparse_step`, DeepSeek `first_k_dense_replace`).
        sparse_step = _layout_count(kwargs, "decoder_sparse_step", 1)  # every step-th layer is MoE
        first_dense = _layout_count(kwargs, "first_k_dense_replace", 0)  # the first layers are dense
        # DeepSeek's shared experts, each `moe_intermediate_size` wide: one shared MLP of their total width.
        if shared := _layout_count(kwargs, "n_shared_experts", 0):
            width = shared * self.moe_intermediate_size
            if self.shared_expert_intermediate_size not in (0, width):
                raise ValueError(
                    f"n_shared_experts={shared} (shared experts of moe_intermediate_size={self.moe_intermediate_size}, "
                    f"{width} wide in all) contradicts shared_expert_intermediate_size="
                    f"{self.shared_expert_intermediate_size}"
                )
            self.shared_expert_intermediate_size = width
        # Qwen-style switch: a window given with `use_sliding_window=False` is not used.
        if not kwargs.pop("use_sliding_window", True):
            self.sliding_window = None
        kwargs.pop("max_window_layers", None)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        kwargs.pop("qk_head_dim", None)  # derived (a property)
        # A source checkpoint's type (a Qwen3-MoE config read into this class): the model is a DeepTalk model, and its
        # checkpoint conversion (experts fused on load) is registered under "deeptalk".
        source_type = kwargs.pop("model_type", None)
        if source_type == "qwen3_moe":  # whose model ignores a saved `layer_types`: a window covers every layer
            self.layer_types = None
        elif source_type in ("deepseek_v2", "deepseek_v3"):  # read directly, it would load as another model in bf16
            raise ValueError(
                f"a {source_type} config is not read as a DeepTalk config: import the checkpoint with upcycle_moe, "
                "which keeps its routers in float32 (and, for V2, its rotary) as transformers does"
            )
        if self.kv_lora_rank is not None:  # MLA: RoPE covers the rope part of each head (as in DeepSeek's configs)
            self.head_dim = self.qk_rope_head_dim
        elif self.head_dim is None and self.num_attention_heads > 0:  # 0 heads: refused by `validate_deeptalk`
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_audio_streams:
            codes = self.audio_codebook_size
            for offset, name in enumerate(("audio_pad_token_id", "audio_bos_token_id", "audio_eos_token_id")):
                if getattr(self, name) is None:
                    setattr(self, name, codes + offset)
            if self.audio_stream_delays is None:
                self.audio_stream_delays = list(range(1, self.num_audio_streams + 1))
            if self.stream_loss_weights is None:
                self.stream_loss_weights = [1.0] * (self.num_audio_streams + 1)
        dense = set(self.mlp_only_layers or [])
        dense.update(range(min(first_dense, self.num_hidden_layers)))
        if sparse_step != 1:
            dense.update(i for i in range(self.num_hidden_layers) if (i + 1) % sparse_step != 0)
        self.mlp_only_layers = sorted(dense)
        if self.layer_types is None:
            kind = "full_attention" if self.sliding_window is None else "sliding_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if self.kv_lora_rank is not None or self.qk_norm_type == "full":
            # MLA's low-rank projections and a q/k norm over the whole projection do not split over heads: attention
            # stays replicated (as in transformers' DeepSeek-V3), the experts and MLPs are still sharded.
            self.base_model_tp_plan = {k: v for k, v in self.base_model_tp_plan.items() if ".self_attn." not in k}
        self.validate_deeptalk()  # here too, so that a bad field raises a plain ValueError at construction
        super().__post_init__(**kwargs)

    def validate_deeptalk(self) -> None:
        """Checks that fail with a `ValueError` naming the field and the offending values; a `@strict` class
        validator, so `save_pretrained` (through `validate`) refuses a config broken after construction too."""
        folded = [name for name in self.construction_kwargs if name in self.__dict__]
        if folded:
            raise ValueError(
                f"{folded} are read when the config is built (folded into mlp_only_layers / sliding_window / "
                "shared_expert_intermediate_size): set those instead"
            )
        # Derived from other fields when None, at construction only (the streams' fields only for a model with them).
        built = ("mlp_only_layers", *(self.derived_fields if self.num_audio_streams else ("layer_types",)))
        unset = [name for name in built if getattr(self, name) is None]
        if unset:
            raise ValueError(f"{unset} are None: they are derived when the config is built, not later; set them")
        if not 0 <= self.speech_vocab_size < self.vocab_size:
            raise ValueError(
                f"speech_vocab_size={self.speech_vocab_size} does not fit in vocab_size={self.vocab_size}: the speech "
                "block is the last `speech_vocab_size` ids and the text block must keep at least one id"
            )
        check_modality_routing(self.modality_routing)
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise ValueError(
                f"mlp_only_layers has layer indices {bad_layers} outside [0, num_hidden_layers={self.num_hidden_layers})"
            )
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(_ATTENTION_LAYER_TYPES):
            raise ValueError(
                f"layer_types={self.layer_types} must have num_hidden_layers={self.num_hidden_layers} entries from "
                f"{_ATTENTION_LAYER_TYPES} (num_hidden_layers changed after the config was built? set layer_types too)"
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None")
        if self.qk_norm_type not in QK_NORM_TYPES:
            raise ValueError(f"qk_norm_type={self.qk_norm_type!r} is unknown; expected one of {QK_NORM_TYPES}")
        if self.clip_qkv is not None and not 0 < self.clip_qkv < math.inf:
            raise ValueError(f"clip_qkv={self.clip_qkv} must be positive and finite (or None for no clipping)")
        if not 0 < self.routed_scaling_factor < math.inf:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be positive and finite")
        for name in ("router_dtype", "routing_weights_dtype"):
            if getattr(self, name) not in (None, "float32"):
                raise ValueError(f"{name}={getattr(self, name)!r} must be None (the model's dtype) or 'float32'")
        if self.sliding_window is not None and self.sliding_window < 2:
            raise ValueError(
                f"sliding_window={self.sliding_window} must be at least 2 (transformers' sliding-window cache gets a "
                "window of 1 wrong in cached generation)"
            )
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate=True needs shared experts (shared_expert_intermediate_size > 0)")
        if self.scoring_func not in SCORING_FUNCTIONS:
            raise ValueError(f"scoring_func={self.scoring_func!r} is unknown; expected one of {SCORING_FUNCTIONS}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r} is unknown; expected one of {TOPK_METHODS}")
        if self.topk_method != "greedy" and not (
            self.n_group and self.topk_group and 0 < self.topk_group <= self.n_group
        ):
            raise ValueError(
                f"topk_method={self.topk_method!r} needs n_group and topk_group with 0 < topk_group <= n_group, got "
                f"n_group={self.n_group}, topk_group={self.topk_group}"
            )
        if self.kv_lora_rank is not None and None in (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim):
            raise ValueError(
                "kv_lora_rank is set (multi-head latent attention) but qk_nope_head_dim, qk_rope_head_dim or "
                f"v_head_dim is missing: {self.qk_nope_head_dim}, {self.qk_rope_head_dim}, {self.v_head_dim}"
            )
        if self.rope_complex and self.kv_lora_rank is None:
            raise ValueError(
                "rope_complex=True is DeepSeek-V2's rotary of multi-head latent attention: set kv_lora_rank"
            )
        mla = self.kv_lora_rank is not None
        sizes = {
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "moe_intermediate_size": self.moe_intermediate_size,
        }
        if self.mlp_only_layers:  # the dense layers' MLP width
            sizes["intermediate_size"] = self.intermediate_size
        if mla:
            sizes |= {"kv_lora_rank": self.kv_lora_rank, "v_head_dim": self.v_head_dim}
            sizes |= {
                "qk_rope_head_dim": self.qk_rope_head_dim,
                "q_lora_rank": 1 if self.q_lora_rank is None else self.q_lora_rank,
            }
        else:
            sizes["head_dim"] = self.head_dim
        # A head_dim the user may not have given: the default, hidden_size // num_attention_heads.
        default = (
            f" (head_dim defaults to hidden_size={self.hidden_size} // num_attention_heads="
            f"{self.num_attention_heads}: set head_dim, or change those)"
            if not mla
            and self.num_attention_heads > 0
            and self.head_dim == self.hidden_size // self.num_attention_heads
            else ""
        )
        small = {name: value for name, value in sizes.items() if value is None or value < 1}
        if small or (mla and self.qk_nope_head_dim < 0):
            raise ValueError(
                f"{small or {'qk_nope_head_dim': self.qk_nope_head_dim}} must be positive sizes"
                + (default if "head_dim" in small else "")
            )
        rope = "qk_rope_head_dim" if mla else "head_dim"
        if getattr(self, rope) % 2:
            raise ValueError(
                f"{rope}={getattr(self, rope)} must be even: rotary embeddings turn pairs of dimensions{default}"
            )
        if not mla and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (each key/value head serves a group of query heads)"
            )
        if mla and self.head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"head_dim={self.head_dim} must equal qk_rope_head_dim={self.qk_rope_head_dim} with multi-head latent "
                "attention (kv_lora_rank is set): rotary embeddings cover the rope part of each head"
            )
        if mla and (self.clip_qkv is not None or self.qkv_bias):
            raise ValueError(
                "clip_qkv and qkv_bias apply to standard attention; multi-head latent attention (kv_lora_rank is "
                "set) would ignore them"
            )
        if self.kv_lora_rank is not None and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError(
                f"multi-head latent attention (kv_lora_rank is set) expands keys and values to every head: "
                f"num_key_value_heads={self.num_key_value_heads} must equal num_attention_heads={self.num_attention_heads}"
            )
        if self.speech_attention and self.kv_lora_rank is not None:
            raise ValueError(
                "speech_attention is not supported with multi-head latent attention (kv_lora_rank is set): speech "
                "copies of the attention projections exist for standard attention only"
            )
        if self.num_experts_per_tok < 1:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be at least 1")
        num_moe = len(self.moe_layers)
        for name, minimum in (("num_experts", 1), ("num_speech_experts", 0)):
            value = getattr(self, name)
            counts = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) != num_moe:
                raise ValueError(
                    f"{name} has {len(value)} entries but the model has {num_moe} MoE layers "
                    f"(num_hidden_layers={self.num_hidden_layers}, mlp_only_layers={self.mlp_only_layers})"
                )
            if any(c < minimum for c in counts):
                raise ValueError(f"{name}={value} has counts below {minimum}")
        if self.topk_method != "greedy":
            for layer in self.moe_layers:
                total = sum(self.layer_experts(layer))
                if total % self.n_group:
                    raise ValueError(f"n_group={self.n_group} does not divide the {total} experts of layer {layer}")
                if self.topk_group * (total // self.n_group) < self.num_experts_per_tok:
                    raise ValueError(
                        f"topk_group={self.topk_group} groups of {total // self.n_group} experts (layer {layer}) hold "
                        f"fewer than num_experts_per_tok={self.num_experts_per_tok}"
                    )
        if self.num_audio_streams < 0:
            raise ValueError(f"num_audio_streams={self.num_audio_streams} must be >= 0")
        if self.num_audio_streams:
            if self.audio_codebook_size < 1:
                raise ValueError(f"audio_codebook_size={self.audio_codebook_size} must be >= 1")
            specials = [self.audio_pad_token_id, self.audio_bos_token_id, self.audio_eos_token_id]
            if len(set(specials)) != 3 or any(i < self.audio_codebook_size for i in specials):
                raise ValueError(
                    f"audio pad/bos/eos ids {specials} must be distinct and above the {self.audio_codebook_size} codes"
                )
            if len(self.audio_stream_delays) != self.num_audio_streams or min(self.audio_stream_delays) < 1:
                raise ValueError(
                    f"audio_stream_delays={self.audio_stream_delays} needs num_audio_streams={self.num_audio_streams} "
                    "delays of at least 1"
                )
            if len(self.stream_loss_weights) != self.num_audio_streams + 1:
                raise ValueError(
                    f"stream_loss_weights={self.stream_loss_weights} needs {self.num_audio_streams + 1} entries "
                    "(text stream first)"
                )
            weights = self.stream_loss_weights
            if min(weights) < 0 or not 0 < sum(weights) < math.inf:
                raise ValueError(f"stream_loss_weights={weights} must be finite, >= 0 and with a positive sum")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(f"shared_expert_intermediate_size={self.shared_expert_intermediate_size} is negative")
        if self.speech_expert_ids is not None:
            if len(self.speech_expert_ids) != num_moe:
                raise ValueError(
                    f"speech_expert_ids has {len(self.speech_expert_ids)} entries but the model has {num_moe} MoE layers"
                )
            for layer, ids in zip(self.moe_layers, self.speech_expert_ids):
                num_text, num_speech = self.layer_experts(layer)
                if (
                    len(ids) != num_speech
                    or len(set(ids)) != len(ids)
                    or not all(0 <= i < num_text + num_speech for i in ids)
                ):
                    raise ValueError(
                        f"speech_expert_ids[{self.moe_layers.index(layer)}]={ids} must list {num_speech} distinct "
                        f"expert indices in [0, {num_text + num_speech}) for layer {layer}"
                    )

    def validate_token_ids(self):
        """Part of `@strict` validation: text special ids against the vocabulary, audio codes against a stream's
        vocabulary (transformers' check would read every `*_token_id` as a text id)."""
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            ids = getattr(self, name)
            if any(not 0 <= i < self.vocab_size for i in (ids if isinstance(ids, list) else [ids]) if i is not None):
                logger.warning_once(f"{name}={ids} lies outside the vocabulary [0, {self.vocab_size})")

    @property
    def speech_token_start(self) -> int:
        """First id of the speech block (the last `speech_vocab_size` ids of the vocabulary)."""
        return self.vocab_size - self.speech_vocab_size

    @property
    def qk_head_dim(self) -> int | None:
        """Query/key head width of multi-head latent attention (`None` for standard attention)."""
        return None if self.kv_lora_rank is None else self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def audio_stream_vocab_size(self) -> int:
        """Ids per audio stream: the codes and the pad/begin/end codes."""
        return (
            max(self.audio_codebook_size, self.audio_pad_token_id, self.audio_bos_token_id, self.audio_eos_token_id)
            + 1
        )

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers with a sparse MoE block, in order."""
        dense = set(self.mlp_only_layers or [])
        return [i for i in range(self.num_hidden_layers) if i not in dense]

    def _moe_position(self, layer_idx: int) -> int:
        """Where MoE layer `layer_idx` is among `moe_layers` (the per-MoE-layer lists' index)."""
        moe_layers = self.moe_layers
        if layer_idx not in moe_layers:
            raise ValueError(f"layer {layer_idx} is not an MoE layer (moe_layers: {moe_layers})")
        return moe_layers.index(layer_idx)

    def layer_experts(self, layer_idx: int) -> tuple[int, int]:
        """`(num_text_experts, num_speech_experts)` of MoE layer `layer_idx`."""
        position = self._moe_position(layer_idx)

        def pick(value):
            return value[position] if isinstance(value, list) else value

        return pick(self.num_experts), pick(self.num_speech_experts)

    def expert_order(self, layer_idx: int) -> list[int] | None:
        """Source-MoE index of each expert in `[experts; speech_experts]` order, or `None` if it is the identity."""
        num_text, num_speech = self.layer_experts(layer_idx)
        if self.speech_expert_ids is None:
            return None
        speech = self.speech_expert_ids[self._moe_position(layer_idx)]
        taken = set(speech)
        order = [i for i in range(num_text + num_speech) if i not in taken] + list(speech)
        return None if order == list(range(num_text + num_speech)) else order


@strict
class DeepTalkAudioConfig(ChecksOverrides, PreTrainedConfig):
    r"""
    Configuration of `DeepTalkForConditionalGeneration`: an audio encoder and a speech connector in front of a DeepTalk
    LLM, so the LLM hears audio (as Qwen2-Audio or GLM-ASR do).

    - `audio_config`: any transformers audio encoder config (Whisper's by default; for a Whisper config the model
      uses Whisper's encoder only). The encoder's output frames are stacked by `stack_factor` (the downsampling to
      the LLM's token rate) and mapped by a two-layer MLP (`connector_hidden_size`, `connector_hidden_act`; the hidden
      size defaults to the LLM's) into the LLM's width.
    - `text_config`: the `DeepTalkConfig` of the LLM.
    - `audio_token_id`: the `<|audio|>` placeholder id; each audio fills as many placeholders as it has stacked
      frames, and those positions are speech for modality routing. Any id of the LLM's vocabulary (e.g. a speech
      marker, or an unused padding row of the text block); by default the last text-block id.
    """

    model_type = "deeptalk_audio"
    derived_fields = ("audio_token_id", "connector_hidden_size")  # from the LLM's config (see `ChecksOverrides`)
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "text_config": SubConfigSpec(config_class=DeepTalkConfig),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_token_id: int | None = None
    stack_factor: int = 4
    connector_hidden_size: int | None = None
    connector_hidden_act: str = "gelu"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        if not isinstance(text, DeepTalkConfig):
            raise ValueError(f"text_config must be a DeepTalkConfig, got {type(text).__name__}")
        if self.audio_token_id is None:
            self.audio_token_id = text.speech_token_start - 1
        if self.connector_hidden_size is None:
            self.connector_hidden_size = text.hidden_size
        if not 0 <= self.audio_token_id < text.vocab_size:
            raise ValueError(
                f"audio_token_id={self.audio_token_id} is outside the LLM's vocabulary [0, {text.vocab_size})"
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # padding would read as audio, an end never come
            ids = getattr(text, name)
            if self.audio_token_id in (ids if isinstance(ids, list) else [ids]):
                raise ValueError(
                    f"audio_token_id={self.audio_token_id} is the LLM's {name}; give the placeholder its own id"
                )
        if self.stack_factor < 1:
            raise ValueError(f"stack_factor={self.stack_factor} must be at least 1")
        audio = self.audio_config
        if getattr(audio, "add_adapter", False):  # transformers' frame count of an adapter holds for some shapes only
            kernel, stride = audio.adapter_kernel_size, audio.adapter_stride
            miscounted = kernel // 2 != stride // 2 if audio.model_type == "wav2vec2-bert" else kernel != 3
            if miscounted:
                raise ValueError(
                    f"transformers miscounts the frames of a {audio.model_type} adapter with adapter_kernel_size="
                    f"{kernel}, adapter_stride={stride}, so the audio positions would be wrong"
                )
        if text.num_audio_streams:
            raise ValueError(
                f"text_config has num_audio_streams={text.num_audio_streams}: audio input is not supported together "
                "with parallel audio streams yet"
            )


__all__ = ["DeepTalkAudioConfig", "DeepTalkConfig"]
