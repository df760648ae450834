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

# Speech-token processor (issue 4): registered with AutoProcessor on import.
from transformers import AutoProcessor  # noqa: E402

from .audio_codecs import AudioCodec, MimiCodec, SnacCodec, resample  # noqa: E402
from .processing_deeptalk import (  # noqa: E402
    AudioChunk,
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

AutoProcessor.register(DeepTalkConfig, DeepTalkProcessor, exist_ok=True)
__all__ += [
    "AudioChunk",
    "AudioCodec",
    "DeepTalkParallelStreamer",
    "DeepTalkProcessor",
    "DeepTalkStreamer",
    "MimiCodec",
    "ParallelSpeechOutput",
    "SnacCodec",
    "SpeechChunk",
    "SpeechTextOutput",
    "SpeechUnitsLogitsProcessor",
    "TextDelta",
    "add_speech_tokens",
    "fit_speech_vocab",
    "resample",
]
