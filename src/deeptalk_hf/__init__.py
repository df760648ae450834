"""deeptalk_hf: DeepTalk-style speech-text Mixture-of-Experts LLMs for the Hugging Face ecosystem.

Importing the package registers the DeepTalk classes with transformers' Auto classes and the checkpoint conversion
mapping that fuses per-expert tensors on load (and splits them on save), as transformers does for Qwen3-MoE.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

from .configuration_deeptalk import DeepTalkConfig
from .modeling_deeptalk import DeepTalkForCausalLM, DeepTalkModel, DeepTalkPreTrainedModel

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
    register_checkpoint_conversion_mapping(
        DeepTalkConfig.model_type,
        _experts_conversion("experts") + _experts_conversion("speech_experts"),
        overwrite=True,
    )


_register()

__all__ = ["DeepTalkConfig", "DeepTalkForCausalLM", "DeepTalkModel", "DeepTalkPreTrainedModel"]

# Speech input: an audio encoder and a speech connector in front of the LLM, registered where transformers registers
# Qwen2-Audio (`AutoModelForMultimodalLM`).
from transformers import AutoModelForMultimodalLM  # noqa: E402

from .configuration_deeptalk import DeepTalkAudioConfig  # noqa: E402
from .feature_extraction_deeptalk import expand_audio_placeholders, extract_audio_features  # noqa: E402
from .modeling_deeptalk_audio import DeepTalkForConditionalGeneration, audio_token_lengths  # noqa: E402

AutoConfig.register(DeepTalkAudioConfig.model_type, DeepTalkAudioConfig, exist_ok=True)
AutoModelForMultimodalLM.register(DeepTalkAudioConfig, DeepTalkForConditionalGeneration, exist_ok=True)

__all__ += [
    "DeepTalkAudioConfig",
    "DeepTalkForConditionalGeneration",
    "audio_token_lengths",
    "expand_audio_placeholders",
    "extract_audio_features",
]
