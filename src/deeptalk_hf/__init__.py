"""deeptalk_hf: DeepTalk-style speech-text Mixture-of-Experts LLMs for the Hugging Face ecosystem.

Importing the package registers the DeepTalk classes with transformers' Auto classes (config, model, causal LM,
processor, and the audio-input model with `AutoModelForMultimodalLM`, where transformers registers Qwen2-Audio), the
checkpoint conversion mapping that fuses per-expert tensors on load (and splits them on save), as
transformers does for Qwen3-MoE, and the `"deeptalk_triton"` experts implementation (fused Triton MoE kernels, see
`deeptalk_hf.kernels`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMultimodalLM, AutoProcessor
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .audio_codecs import AudioCodec, MimiCodec, SnacCodec, resample
from .configuration_deeptalk import DeepTalkAudioConfig, DeepTalkConfig
from .feature_extraction_deeptalk import expand_audio_placeholders, extract_audio_features
from .kernels import register_experts_implementation
from .lora import lora_config_for_stage
from .modality import (
    ModalityLoad,
    add_speech_attention,
    assign_modality_experts,
    move_speech_experts,
    profile_modality_load,
    set_training_stage,
    training_stage_parameters,
)
from .modeling_deeptalk import DeepTalkForCausalLM, DeepTalkModel, DeepTalkPreTrainedModel
from .modeling_deeptalk_audio import DeepTalkForConditionalGeneration, audio_token_lengths
from .processing_deeptalk import (
    AudioChunk,
    DeepTalkAudioProcessor,
    DeepTalkParallelStreamer,
    DeepTalkProcessor,
    DeepTalkStreamer,
    ParallelSpeechOutput,
    SpeechChunk,
    SpeechTextOutput,
    SpeechUnitsLogitsProcessor,
    TextDelta,
    add_speech_tokens,
    fit_speech_vocab,
)
from .upcycling import upcycle_checkpoint, upcycle_dense, upcycle_moe, upcycle_moe_checkpoint

__version__ = "0.1.0"


def _experts_conversion(group: str) -> list[WeightConverter]:
    """On disk each expert is its own `gate_proj`/`up_proj`/`down_proj`; in memory a group is two fused tensors."""
    return [
        WeightConverter(
            source_patterns=[f"mlp.{group}.*.gate_proj.weight", f"mlp.{group}.*.up_proj.weight"],
            target_patterns=f"mlp.{group}.gate_up_proj",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1)],
        ),
        WeightConverter(
            source_patterns=f"mlp.{group}.*.down_proj.weight",
            target_patterns=f"mlp.{group}.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]


def _register() -> None:
    AutoConfig.register(DeepTalkConfig.model_type, DeepTalkConfig, exist_ok=True)
    AutoModel.register(DeepTalkConfig, DeepTalkModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepTalkConfig, DeepTalkForCausalLM, exist_ok=True)
    # `Trainer` shifts the labels for label smoothing only for the causal LMs it finds by class name in this table
    # (`register` does not add them): unlisted, the smoothed loss scored each position against its own token.
    for config_class, model_class in (
        (DeepTalkConfig, DeepTalkForCausalLM),
        (DeepTalkAudioConfig, DeepTalkForConditionalGeneration),
    ):
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(config_class.model_type, model_class.__name__)
    AutoProcessor.register(DeepTalkConfig, DeepTalkProcessor, exist_ok=True)
    AutoConfig.register(DeepTalkAudioConfig.model_type, DeepTalkAudioConfig, exist_ok=True)
    AutoModelForMultimodalLM.register(DeepTalkAudioConfig, DeepTalkForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(DeepTalkAudioConfig, DeepTalkAudioProcessor, exist_ok=True)
    register_checkpoint_conversion_mapping(
        DeepTalkConfig.model_type,
        _experts_conversion("experts") + _experts_conversion("speech_experts"),
        overwrite=True,
    )
    register_experts_implementation()


_register()

__all__ = [
    "AudioChunk",
    "AudioCodec",
    "DeepTalkAudioConfig",
    "DeepTalkAudioProcessor",
    "DeepTalkConfig",
    "DeepTalkForCausalLM",
    "DeepTalkForConditionalGeneration",
    "DeepTalkModel",
    "DeepTalkParallelStreamer",
    "DeepTalkPreTrainedModel",
    "DeepTalkProcessor",
    "DeepTalkStreamer",
    "MimiCodec",
    "ModalityLoad",
    "ParallelSpeechOutput",
    "SnacCodec",
    "SpeechChunk",
    "SpeechTextOutput",
    "SpeechUnitsLogitsProcessor",
    "TextDelta",
    "add_speech_attention",
    "add_speech_tokens",
    "assign_modality_experts",
    "audio_token_lengths",
    "expand_audio_placeholders",
    "extract_audio_features",
    "fit_speech_vocab",
    "lora_config_for_stage",
    "move_speech_experts",
    "profile_modality_load",
    "resample",
    "set_training_stage",
    "training_stage_parameters",
    "upcycle_checkpoint",
    "upcycle_dense",
    "upcycle_moe",
    "upcycle_moe_checkpoint",
]
