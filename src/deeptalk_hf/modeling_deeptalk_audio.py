"""DeepTalk with ears: an audio encoder and a speech connector in front of a `DeepTalkForCausalLM`.

The encoder (Whisper's by default) turns log-mel features into frames; the connector stacks `stack_factor` frames
(the downsampling to the LLM's token rate) and maps them with an MLP into the LLM's width. Those frames replace the
`<|audio|>` placeholders of `input_ids` and are routed as speech, so under hard routing they only reach speech experts.
The LLM stays a whole `DeepTalkForCausalLM` (both output heads, its generation logic); the encoder is `audio_encoder`
and the connector `speech_connector`, so the naming rule (every speech-specific tensor's name contains `speech`) holds.
"""

import copy
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_deeptalk import DeepTalkAudioConfig
from .modeling_deeptalk import (
    DeepTalkCausalLMOutputWithPast,
    DeepTalkForCausalLM,
    DeepTalkPreTrainedModel,
    check_modality_ids_values,
    check_prompt_modality_ids,
    speech_positions,
    warn_if_checkpointing_stops_balancing,
    without_modality_ids_for_text_drafts,
)

# Where audio encoders keep their transformer layers: Whisper / Qwen2-Audio / GLM-ASR, and the wav2vec2 family.
_ENCODER_LAYER_PATHS = ("layers", "encoder.layers")


def audio_encoder_class(audio_config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The encoder built for `audio_config`: Whisper's encoder (not the whole encoder-decoder) for Whisper configs,
    the `AutoModel` class otherwise (an encoder-only audio model, such as the wav2vec2 family)."""
    if audio_config.model_type == "whisper":
        return WhisperEncoder
    if getattr(audio_config, "is_encoder_decoder", False) or type(audio_config) not in MODEL_MAPPING:
        raise ValueError(
            f"a {audio_config.model_type} config is not an audio encoder DeepTalk can use: give Whisper's config or an "
            "encoder-only audio model's (e.g. wav2vec2)"
        )
    return MODEL_MAPPING[type(audio_config)]


def audio_frame_lengths(audio_config: PreTrainedConfig, feature_lengths: torch.Tensor) -> torch.Tensor:
    """Number of valid encoder frames of each audio, from its number of valid features (its mask's sum).

    This is the encoder class's own `_get_feat_extract_output_lengths`; transformers' audio encoders compute it from
    `self.config` alone, so a processor can count without building the encoder.
    """
    lengths_of = getattr(audio_encoder_class(audio_config), "_get_feat_extract_output_lengths", None)
    if lengths_of is None:
        raise ValueError(
            f"the {audio_config.model_type} audio encoder does not say how many frames it makes from its input "
            "(no `_get_feat_extract_output_lengths`)"
        )
    lengths = lengths_of(SimpleNamespace(config=audio_config), torch.as_tensor(feature_lengths))
    if not isinstance(lengths, torch.Tensor):  # e.g. Qwen2-Audio's encoder: lengths before and after its pooling
        raise ValueError(
            f"the {audio_config.model_type} audio encoder counts its frames in a way DeepTalk does not read; use "
            "Whisper's encoder or an encoder-only audio model (e.g. wav2vec2)"
        )
    return lengths


def audio_frame_width(audio_config: PreTrainedConfig) -> int:
    """Width of the encoder's output frames: `hidden_size`, or an adapter's `output_hidden_size` (wav2vec2, WavLM,
    w2v-bert with `add_adapter=True`)."""
    if getattr(audio_config, "add_adapter", False):
        return audio_config.output_hidden_size
    return audio_config.hidden_size


def audio_token_lengths(config: DeepTalkAudioConfig, feature_lengths: torch.Tensor) -> torch.Tensor:
    """Number of `<|audio|>` positions each audio fills: its encoder frames stacked by `stack_factor` (a partly
    filled last stack still makes a position)."""
    return -(-audio_frame_lengths(config.audio_config, feature_lengths) // config.stack_factor)


class DeepTalkSpeechConnector(nn.Module):
    """Stacks `stack_factor` consecutive encoder frames into one and maps it into the LLM's width with an MLP."""

    def __init__(self, config: DeepTalkAudioConfig):
        super().__init__()
        self.stack_factor = config.stack_factor
        self.linear_1 = nn.Linear(
            config.stack_factor * audio_frame_width(config.audio_config), config.connector_hidden_size
        )
        self.act = ACT2FN[config.connector_hidden_act]
        self.linear_2 = nn.Linear(config.connector_hidden_size, config.text_config.hidden_size)

    def forward(self, audio_frames: torch.Tensor) -> torch.Tensor:
        """`[audios, frames, encoder_width]` -> `[audios, ceil(frames / stack_factor), llm_width]`."""
        audios, frames, width = audio_frames.shape
        stacked = F.pad(audio_frames, (0, 0, 0, -frames % self.stack_factor))
        stacked = stacked.reshape(audios, -1, self.stack_factor * width)
        return self.linear_2(self.act(self.linear_1(stacked)))


class DeepTalkForConditionalGeneration(PreTrainedModel, GenerationMixin):
    r"""
    A DeepTalk LLM that hears: `audio_encoder` -> `speech_connector` -> `<|audio|>` positions of `language_model`.

    Build it from a config, or from existing checkpoints with `from_parts`. `forward` and `generate` take the text's
    `input_ids` (one `<|audio|>` per stacked frame, see `audio_token_lengths`), the encoder's `input_features` (one row
    per audio, in the order the audios appear in the batch) and their `input_features_mask`.
    """

    config: DeepTalkAudioConfig
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    # Refuse checkpoint tensors of the wrong shape, naming them, as the LLM does.
    _finalize_model_loading = staticmethod(DeepTalkPreTrainedModel._finalize_model_loading)

    def __init__(self, config: DeepTalkAudioConfig):
        super().__init__(config)
        # An encoder whose frames cannot be counted would fail at the first audio: refused by name when built.
        audio_frame_lengths(config.audio_config, torch.ones(1, dtype=torch.long))
        self.audio_encoder = audio_encoder_class(config.audio_config)(config.audio_config)
        # What the encoder's own model never trains (Whisper's sinusoidal positions): no stage nor `also` unfreezes it.
        self.fixed_encoder_parameters = tuple(
            name for name, param in self.audio_encoder.named_parameters() if not param.requires_grad
        )
        self.speech_connector = DeepTalkSpeechConnector(config)
        self.language_model = DeepTalkForCausalLM(config.text_config)
        # The placeholder is input only: a generated one would ask for audio that does not exist.
        self.generation_config.suppress_tokens = [config.audio_token_id]
        self.post_init()

    @classmethod
    def from_parts(
        cls,
        audio_encoder: str | os.PathLike | PreTrainedModel,
        language_model: str | os.PathLike | DeepTalkForCausalLM,
        **config_kwargs,
    ) -> "DeepTalkForConditionalGeneration":
        """One model from an existing audio encoder and an existing DeepTalk (or upcycled) LLM; the connector is new.

        `audio_encoder`: a model or checkpoint path; of an encoder-decoder (e.g. a saved Whisper model) only the
        encoder is kept. `language_model`: a `DeepTalkForCausalLM` or its checkpoint path. `config_kwargs` go to
        `DeepTalkAudioConfig` (`audio_token_id`, `stack_factor`, ...). The parts are used as they are (no copy).
        """
        if not isinstance(audio_encoder, PreTrainedModel):
            audio_encoder = _load_audio_encoder(audio_encoder)
        if audio_encoder.config.is_encoder_decoder:
            audio_encoder = audio_encoder.get_encoder()
        if not isinstance(language_model, PreTrainedModel):
            language_model = _load_complete(DeepTalkForCausalLM, language_model)
        config = DeepTalkAudioConfig(
            audio_config=audio_encoder.config, text_config=language_model.config, **config_kwargs
        )
        expected = audio_encoder_class(config.audio_config)
        if type(audio_encoder) is not expected:
            raise ValueError(
                f"a {config.audio_config.model_type} config builds a {expected.__name__} encoder, but the given encoder "
                f"is a {type(audio_encoder).__name__}"
            )
        with torch.device("meta"):  # placeholders for the given parts: nothing is allocated twice
            model = cls(config)
        model.audio_encoder = audio_encoder
        model.language_model = language_model
        model.speech_connector = DeepTalkSpeechConnector(config).to(language_model.device, language_model.dtype)
        model.speech_connector.apply(model._init_weights)
        model.generation_config = copy.deepcopy(language_model.generation_config)  # its end-of-turn ids, sampling, ...
        suppressed = model.generation_config.suppress_tokens or []
        model.generation_config.suppress_tokens = sorted({*suppressed, config.audio_token_id})
        return model

    @property
    def dtype(self) -> torch.dtype:
        """The language model's dtype, not the first parameter's (the encoder's, which may be float32 beside a bf16
        LLM): `save_pretrained` records it, so `from_pretrained`, which loads a model in one dtype, does not widen the
        LLM; generation sizes its caches with it."""
        return self.language_model.dtype

    @property
    def device(self) -> torch.device:
        """The language model's device, where ids and generated tokens go (not the encoder's, which may be offloaded
        to disk, on the meta device)."""
        return self.language_model.device

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """Its experts are the language model's (transformers reads this from the module's source, which has none)."""
        return True

    def train(self, mode: bool = True) -> "DeepTalkForConditionalGeneration":
        """Frozen parts of the audio encoder (all of it, or the layers below those trained) stay in eval mode (no
        dropout, normalisation statistics kept, e.g. a conformer's BatchNorm), so stages that freeze them leave them
        bit-identical. A part is a module whose parameters are all frozen; parameter-free modules follow their parent,
        so a partly trained encoder's own input dropout, LayerDrop and (wav2vec2 family) SpecAugment stay on."""
        super().train(mode)
        pending = [self.audio_encoder] if mode else []
        while pending:  # top down, so each frozen part is scanned once (transformers' Trainer calls this every step)
            module = pending.pop()
            parameters = list(module.parameters())
            if parameters and not any(parameter.requires_grad for parameter in parameters):
                module.eval()
            else:
                pending.extend(module.children())
        return self

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """transformers' activation checkpointing, which reaches the language model's layers without going through its
        `activation_checkpointing_enable`: so the warning about a reentrant checkpoint's router losses is given here."""
        warn_if_checkpointing_stops_balancing(self.config.text_config, activation_checkpointing_kwargs)
        super().activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """The LLM's `resize_token_embeddings` (which keeps its text and speech blocks apart), refused where it would
        drop the audio placeholder's id."""
        self._check_keeps_audio_token(self.language_model.resized_vocab_size(new_num_tokens, pad_to_multiple_of))
        return self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def resize_speech_vocab(self, speech_vocab_size: int) -> None:
        """The LLM's `resize_speech_vocab`, then this model's map of tied parameters, which transformers gathers from
        the parts once when the model is built (resize here, not on `language_model`, or the map misses the change)."""
        self._check_keeps_audio_token(self.config.text_config.speech_token_start + speech_vocab_size)
        self.language_model.resize_speech_vocab(speech_vocab_size)
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def _check_keeps_audio_token(self, vocab_size: int) -> None:
        """A vocabulary without the placeholder's id makes a model (and a saved config) that cannot be built again."""
        if self.config.audio_token_id >= vocab_size:
            raise ValueError(
                f"a vocabulary of {vocab_size} ids leaves out audio_token_id={self.config.audio_token_id}; keep the "
                "placeholder's id in the vocabulary (or set config.audio_token_id to an id inside it first)"
            )

    def audio_encoder_top_layers(self, num_layers: int) -> list[str]:
        """Parameter names of the audio encoder's top `num_layers` transformer layers (its final norm excluded).

        Stage "align" trains the speech connector only; these names are what it adds to also adapt the top of the
        encoder, e.g. `set_training_stage(model, "align", also=model.audio_encoder_top_layers(2))`.
        """
        modules = dict(self.audio_encoder.named_modules())
        path = next((p for p in _ENCODER_LAYER_PATHS if isinstance(modules.get(p), nn.ModuleList)), None)
        if path is None:
            raise ValueError(f"{type(self.audio_encoder).__name__} keeps its layers in none of {_ENCODER_LAYER_PATHS}")
        layers = modules[path]
        if not 0 <= num_layers <= len(layers):
            raise ValueError(f"num_layers={num_layers} must be in [0, {len(layers)}] (the encoder's layer count)")
        return [
            f"audio_encoder.{path}.{index}.{name}"
            for index in range(len(layers) - num_layers, len(layers))
            for name, _ in layers[index].named_parameters()
        ]

    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder + connector: `([audios, positions, llm_width], positions each audio fills)`.

        Encoder frames past an audio's valid length are zeroed before stacking, so an audio's positions do not depend
        on how much the others pad it (Whisper ignores the mask and always encodes its fixed window; other encoders
        get the mask as `attention_mask`).
        """
        encoder = self.audio_encoder
        # An encoder offloaded to disk has meta weights until accelerate's hook loads them: its device is the hook's.
        device = input_features.device if encoder.device.type == "meta" else encoder.device
        input_features = input_features.to(device, encoder.dtype)
        if encoder.is_activation_checkpointing and torch.is_grad_enabled() and not input_features.requires_grad:
            # A reentrant checkpoint passes gradients only to inputs that need them: an encoder without an input
            # embedding for transformers' hook (w2v-bert) would give its trainable layers none, silently.
            if any(param.requires_grad for param in encoder.parameters()):
                input_features = input_features.detach().requires_grad_()
        feature_lengths = _feature_lengths(self.config.audio_config, input_features, input_features_mask)
        positions = audio_token_lengths(self.config, feature_lengths)
        if (positions < 1).any():  # it would fill no placeholder, and drop out unnoticed
            short = int((positions < 1).nonzero()[0])
            raise ValueError(
                f"audio {short} ({int(feature_lengths[short])} valid features) is too short for the encoder to make a "
                "frame"
            )
        if input_features_mask is not None:
            input_features_mask = input_features_mask.to(input_features.device)
            first = torch.arange(input_features_mask.shape[-1]) < feature_lengths[:, None]
            if not torch.equal(input_features_mask.bool(), first.to(input_features.device)):
                raise ValueError(
                    "input_features_mask must mark each audio's first frames (padding on the right); a feature "
                    "extractor with padding_side='left' pads the other way"
                )
        frames = self.audio_encoder(input_features, attention_mask=input_features_mask).last_hidden_state
        frame_lengths = audio_frame_lengths(self.config.audio_config, feature_lengths).to(frames.device)
        valid = torch.arange(frames.shape[1], device=frames.device) < frame_lengths[:, None]
        frames = frames * valid.unsqueeze(-1).to(frames.dtype)
        # The connector's dtype (the encoder's may differ), or the LLM's where a quantised connector stores another.
        dtype = self.speech_connector.linear_1.weight.dtype
        if not dtype.is_floating_point or dtype.itemsize < 2:
            dtype = self.get_input_embeddings().weight.dtype
        embeds = self.speech_connector(frames.to(dtype))
        return embeds, positions

    def _merge_audio(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        input_features: torch.Tensor | None,
        input_features_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """Writes the audio positions over the `<|audio|>` placeholders (in order), checking that the counts match."""
        is_audio = input_ids == self.config.audio_token_id
        num_placeholders = int(is_audio.sum())
        if input_features is None:
            if num_placeholders:  # a step of generation never holds one (the placeholder is suppressed)
                raise ValueError(
                    f"input_ids has {num_placeholders} audio placeholders (audio_token_id={self.config.audio_token_id}) "
                    "but no input_features were given (an assistant model in generate gets none: assisted "
                    "generation does not support audio inputs)"
                )
            return inputs_embeds
        # Waveform encoders (wav2vec2 family) take `[audios, samples]`, spectrogram ones `[audios, bins, frames]`.
        dims = 2 if self.audio_encoder.main_input_name == "input_values" else 3
        if input_features.dim() != dims or (input_features_mask is not None and input_features_mask.dim() != 2):
            mask = (
                "" if input_features_mask is None else f" and input_features_mask {tuple(input_features_mask.shape)}"
            )
            raise ValueError(
                f"input_features must be {dims}-D, a batch of audios as the feature extractor returns it "
                f"(input_features_mask [audios, frames]); got {tuple(input_features.shape)}{mask}"
            )
        frames = input_features.shape[_frame_axis(self.config.audio_config, input_features)]
        if input_features_mask is not None and input_features_mask.shape != (input_features.shape[0], frames):
            raise ValueError(  # a wider mask counted frames the features lack (a masked_scatter error, or a count one)
                f"input_features {tuple(input_features.shape)} ({input_features.shape[0]} audios of {frames} frames) "
                f"does not match input_features_mask {tuple(input_features_mask.shape)}"
            )
        embeds, lengths = self.get_audio_features(input_features, input_features_mask)
        if num_placeholders != int(lengths.sum()):
            past = cache.get_seq_length() if cache is not None else 0
            raise ValueError(
                f"input_ids has {num_placeholders} audio placeholders (audio_token_id={self.config.audio_token_id}) but "
                f"the {len(lengths)} audios fill {int(lengths.sum())} positions ({lengths.tolist()} each)"
                + (
                    f"; with {past} positions cached, only the uncached ids are read: give the audios of those alone"
                    if past
                    else ""
                )
            )
        # Every run of placeholders (a row's end ends one) must end where an audio ends: otherwise an audio would be
        # split over two runs (audios given in another order than their runs, or over two rows).
        runs = _placeholder_runs(input_ids, self.config.audio_token_id)
        if not torch.isin(runs.cumsum(0), lengths.cpu().cumsum(0)).all():
            raise ValueError(
                f"the placeholder runs (reading order) hold {runs.tolist()} positions, which the audios' "
                f"{lengths.tolist()} positions do not fill run by run: give the audios in the order of their "
                "placeholder runs, each run as long as its audios (audio_token_lengths)"
            )
        valid = torch.arange(embeds.shape[1]) < lengths[:, None]
        audio = embeds[valid.to(embeds.device)].to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_audio.unsqueeze(-1).to(inputs_embeds.device), audio)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        modality_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeepTalkCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Token ids; each audio is a run of `audio_token_id` placeholders as long as `audio_token_lengths` says.
        input_features (`torch.FloatTensor` of shape `(num_audios, feature_size, feature_length)`, *optional*):
            The audio encoder's input (log-mel features for Whisper), one row per audio in the order the placeholder
            runs appear in the batch; only needed while the placeholders are being read (prefill).
        input_features_mask (`torch.LongTensor` of shape `(num_audios, feature_length)`, *optional*):
            1 for valid features, 0 for padding; decides how many positions each audio fills.
        modality_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            0 text, 1 speech (routing only); audio positions are always speech, other positions default to what the
            ids say.
        labels (`torch.LongTensor`, *optional*):
            As for `DeepTalkForCausalLM`; use -100 on the prompt and the audio positions.
        """
        if use_cache is None:  # this config's (`Trainer` sets it), or else the LLM's own default
            use_cache = getattr(self.config, "use_cache", None)
        if inputs_embeds is not None and input_features is not None:
            raise ValueError("input_features fill the placeholders of input_ids; they cannot go with inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.model.embed(input_ids)
            inputs_embeds = self._merge_audio(input_ids, inputs_embeds, input_features, input_features_mask, cache)
        is_speech = speech_positions(
            self.config.text_config, input_ids, modality_ids, inputs_embeds.shape[:2], inputs_embeds.device
        )
        check_modality_ids_values(modality_ids, attention_mask)
        if input_ids is not None:
            is_speech = is_speech | (input_ids == self.config.audio_token_id).to(is_speech.device)
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            modality_ids=is_speech,  # booleans: checked above
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' `generate`, with a prompt's `modality_ids` checked against the prompt first."""
        check_prompt_modality_ids(inputs if inputs is not None else kwargs.get("input_ids"), kwargs)
        return super().generate(inputs, *args, **kwargs)

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        """For beams and `num_return_sequences`: each sequence's audios are repeated with it. transformers repeats
        every tensor row by row, but `input_features` has a row per audio, so a copy of a sequence with two audios
        would hear one of them twice."""
        features = {key: kwargs.pop(key, None) for key in ("input_features", "input_features_mask")}
        if expand_size > 1 and input_ids is not None and features["input_features"] is not None:
            lengths = audio_token_lengths(self.config, _feature_lengths(self.config.audio_config, *features.values()))
            rows = _rows_of_audios(input_ids, self.config.audio_token_id, lengths)
            order = torch.cat([(rows == row).nonzero().flatten().repeat(expand_size) for row in range(len(input_ids))])
            features = {
                key: None if value is None else value[order.to(value.device)] for key, value in features.items()
            }
        input_ids, kwargs = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kwargs)
        return input_ids, kwargs | features

    def adjust_generation_fn(
        self,
        generation_config: GenerationConfig | None,
        from_auto_class: bool,
        from_pipeline: str | None,
        pretrained_model_name_or_path: str | os.PathLike | None,
        **kwargs,
    ) -> None:
        """`from_pretrained` reads the saved generation config here; its `suppress_tokens` holds the placeholder the
        model was saved with. When `audio_token_id` changed at load, the new placeholder takes the old one's place
        (the old id is now a token like any other, which must not stay suppressed)."""
        super().adjust_generation_fn(
            generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
        )
        if generation_config is not None or pretrained_model_name_or_path is None:
            return  # the caller's own settings are taken as they are
        download = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        saved, _ = PreTrainedConfig.get_config_dict(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in download}
        )
        old, new = saved.get("audio_token_id"), self.config.audio_token_id
        suppressed = self.generation_config.suppress_tokens or []
        if old != new and old in suppressed:
            self.generation_config.suppress_tokens = sorted({*suppressed, new} - {old})

    def _prepare_generation_config(self, generation_config: GenerationConfig | None, **kwargs) -> tuple:
        """Every generation suppresses the placeholder: a `suppress_tokens=` of the caller's adds to it rather than
        replaces it (a generated placeholder has no audio to fill it)."""
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        suppressed = generation_config.suppress_tokens or []
        if self.config.audio_token_id not in suppressed:
            generation_config.suppress_tokens = [*suppressed, self.config.audio_token_id]
        return generation_config, model_kwargs

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args, inputs_embeds: torch.Tensor | None = None, **kwargs
    ) -> dict:
        """The LLM's step inputs (its `modality_ids` handling included); transformers passes `input_features` and
        `input_features_mask` at prefill only when a cache is used. (`inputs_embeds` is named so that `generate`
        accepts a prompt given as embeddings.)"""
        return self.language_model.prepare_inputs_for_generation(
            input_ids, *args, inputs_embeds=inputs_embeds, **kwargs
        )

    def _get_candidate_generator(self, generation_config: GenerationConfig, *args, **kwargs):
        if generation_config.assistant_early_exit is not None:  # transformers would look for layers on this model
            raise ValueError(
                "assistant_early_exit drafts with the first layers of a language model's own stack, which this "
                "composite model does not expose: generate with model.language_model for a text prompt, or give an "
                "assistant_model"
            )
        return without_modality_ids_for_text_drafts(
            super()._get_candidate_generator(generation_config, *args, **kwargs)
        )


def _rows_of_audios(input_ids: torch.Tensor, audio_token_id: int, lengths: torch.Tensor) -> torch.Tensor:
    """The row of each audio's first position: the audios fill the placeholders in order, row after row."""
    placeholders = (input_ids == audio_token_id).sum(-1).cpu().cumsum(0)
    lengths = lengths.cpu()
    return torch.searchsorted(placeholders, lengths.cumsum(0) - lengths, right=True)


def _placeholder_runs(input_ids: torch.Tensor, audio_token_id: int) -> torch.Tensor:
    """The lengths of the runs of placeholders, in reading order (on CPU); a row's end ends a run."""
    is_audio = (input_ids == audio_token_id).cpu()
    run_ends = is_audio & ~torch.cat([is_audio[:, 1:], torch.zeros_like(is_audio[:, :1])], dim=1)
    ends = is_audio.flatten().cumsum(0)[run_ends.flatten()]
    return torch.diff(ends, prepend=ends.new_zeros(1))


def _feature_lengths(
    audio_config: PreTrainedConfig, input_features: torch.Tensor, input_features_mask: torch.Tensor | None
) -> torch.Tensor:
    """Valid feature frames of each audio (on CPU): the mask's count, or the whole padded length without one."""
    if input_features_mask is None:
        return torch.full((input_features.shape[0],), input_features.shape[_frame_axis(audio_config, input_features)])
    return input_features_mask.sum(-1).cpu()


def _frame_axis(audio_config: PreTrainedConfig, input_features: torch.Tensor) -> int:
    """The frames' axis: the last of waveforms and of Whisper's `[audios, mel bins, frames]`, 1 of w2v-bert's
    `[audios, frames, features]`."""
    bins_first = input_features.shape[1] == getattr(audio_config, "num_mel_bins", None)
    return 1 if input_features.dim() == 3 and not bins_first else -1


def _load_complete(model_class: type, path: str | os.PathLike, kept: str = "", **kwargs) -> PreTrainedModel:
    """`from_pretrained` (with `kwargs`) that refuses a checkpoint leaving weights missing (they would silently stay
    random); only those under the prefix `kept` count, where the rest of the model is dropped. (A weight of the wrong
    shape `from_pretrained` refuses itself.)"""
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    if missing := sorted(key for key in info["missing_keys"] if key.startswith(kept)):
        raise ValueError(
            f"{path} does not hold every weight of {type(model).__name__}{f' under {kept}' if kept else ''}: "
            f"missing {missing}"
        )
    return model


def _load_audio_encoder(path: str | os.PathLike) -> PreTrainedModel:
    """The audio model of a checkpoint: a saved Whisper encoder alone (`model.audio_encoder.save_pretrained`), or
    `AutoModel`'s model, of which an encoder-decoder keeps its encoder (a Whisper fine-tune without a decoder, such as
    `WhisperForAudioClassification`, then loads too)."""
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "whisper" and WhisperEncoder.__name__ in (config.architectures or []):
        return _load_complete(WhisperEncoder, path)
    return _load_complete(AutoModel, path, kept="encoder." if config.is_encoder_decoder else "")


__all__ = ["DeepTalkForConditionalGeneration", "DeepTalkSpeechConnector", "audio_frame_lengths", "audio_token_lengths"]
