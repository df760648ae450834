"""Shared fixtures: tiny random configs (no downloads), deterministic seeds and a hypothesis profile for CI."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton fixes interpreted vs compiled when it is imported (transformers imports it), so this must precede
# `import deeptalk_hf`: without CUDA the `deeptalk_triton` kernel tests run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import deeptalk_hf  # noqa: E402,F401  (registers the Auto classes)
from deeptalk_hf import DeepTalkConfig  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("ci")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> DeepTalkConfig:
    """A DeepTalk config small enough for CPU tests: 3 layers (one dense), text and speech experts."""
    fields = dict(
        vocab_size=80,
        speech_vocab_size=16,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_speech_experts=3,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        max_position_embeddings=256,
        norm_topk_prob=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    fields.update(overrides)
    return DeepTalkConfig(**fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
