"""The `deeptalk_triton` experts kernels against the torch reference and transformers' eager experts.

Without CUDA the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set below before any kernel is
built); with CUDA the same checks run compiled on the GPU. Shapes stay tiny because the interpreter costs about 2 ms
per program and reduction step. bf16 is checked only in `test_kernels_gpu.py` (the interpreter's bf16 dot is not
faithful). Setting the variable for the session only changes how Triton kernels run, and nothing else in the suite
builds Triton kernels on CPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import GptOssConfig, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

import deeptalk_hf  # noqa: E402
from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM  # noqa: E402
from deeptalk_hf import kernels as K  # noqa: E402
from deeptalk_hf.kernels import fused_moe as fused_moe_module  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Largest error allowed, relative to the largest magnitude of the expected tensor (per output and per gradient).
# fp32: the kernels and the float64 reference differ only by fp32 rounding (seen: <= 3e-5, routing-weight
# gradients being dot products with cancellation).
# fp16: inputs are the same fp16 values; the kernels round the intermediates (gate/up, activation, its gradient) to
# fp16 as every fp16 backend does (relative error ~1e-3 each), the reference keeps them in float64.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tol * max(scale, 1e-6), f"{what}: max error {error:.3e} > {tol:.0e} x max |expected| {scale:.3e}"


def make_routing(num_tokens: int, num_experts: int, top_k: int, num_used: int, sentinel_rate: float, gen) -> torch.Tensor:
    """`[T, k]` indices: distinct experts among the first `num_used` (leaving the others idle), spare slots and a
    random share of the rest set to the sentinel `num_experts`."""
    index = torch.full((num_tokens, top_k), num_experts, dtype=torch.long)
    real = min(top_k, num_used)
    for t in range(num_tokens):
        index[t, :real] = torch.randperm(num_used, generator=gen)[:real]
    index[torch.rand(num_tokens, top_k, generator=gen) < sentinel_rate] = num_experts
    return index


def strided(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout: every other column of a wider buffer, or a transposed buffer."""
    if layout == "sliced":
        wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype, device=tensor.device)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)


@st.composite
def moe_cases(draw):
    num_experts = draw(st.integers(1, 9))
    return dict(
        num_tokens=draw(st.sampled_from([0, 1, 2, 5, 13, 24])),
        hidden=draw(st.sampled_from([16, 40, 72])),
        inter=draw(st.sampled_from([16, 24, 40])),
        num_experts=num_experts,
        top_k=draw(st.integers(1, 9)),
        num_used=draw(st.integers(1, num_experts)),
        sentinel_rate=draw(st.sampled_from([0.0, 0.0, 0.25])),
        layout=draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        trainable=draw(st.sampled_from(["all", "all", "frozen_experts", "router_only"])),
        seed=draw(st.integers(0, 2**16)),
    )


def build_case(case: dict, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(case["seed"])
    t, h, i, e, k = (case[n] for n in ("num_tokens", "hidden", "inter", "num_experts", "top_k"))
    x = torch.randn(t, h, generator=gen)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    index = make_routing(t, e, k, case["num_used"], case["sentinel_rate"], gen)
    weights = torch.rand(t, k, generator=gen)
    grad_out = torch.randn(t, h, generator=gen)
    tensors = [x, gate_up, down, index, weights, grad_out]
    tensors = [a.to(DEVICE, dtype if a.is_floating_point() else a.dtype) for a in tensors]
    if case["layout"] != "contiguous":
        tensors = [strided(a, case["layout"]) for a in tensors]
    x, gate_up, down, index, weights, grad_out = tensors
    trainable = {
        "all": (x, gate_up, down, weights),
        "frozen_experts": (x, weights),
        "router_only": (weights,),
        "none": (),
    }
    for a in trainable[case["trainable"]]:
        a.requires_grad_()
    return (x, gate_up, down, index, weights), grad_out


def outputs_and_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    leaves = [a for a in inputs if a.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out) if out.numel() else [torch.zeros_like(a) for a in leaves]
    return out, list(grads)


def as_double(inputs):
    return [a.detach().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in inputs]


def check_against_reference(case: dict, dtype: torch.dtype) -> None:
    inputs, grad_out = build_case(case, dtype)
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    assert out.dtype == dtype
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, as_double(inputs), grad_out.double())
    tol = TOLERANCE[dtype]
    assert_close(out, ref_out, tol, "output")
    names = [n for n, a in zip(("hidden", "gate_up_proj", "down_proj", "", "routing"), inputs) if a.requires_grad]
    for name, grad, ref_grad, leaf in zip(names, grads, ref_grads, (a for a in inputs if a.requires_grad)):
        assert grad.dtype == leaf.dtype
        assert_close(grad, ref_grad, tol, f"grad {name}")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_cases())
def test_fp32_matches_reference(case):
    check_against_reference(case, torch.float32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=moe_cases())
def test_fp16_matches_reference(case):
    check_against_reference(case, torch.float16)


@pytest.mark.parametrize(
    "case",
    [
        dict(num_tokens=0, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.0),  # T = 0
        dict(num_tokens=9, num_experts=5, top_k=1, num_used=5, sentinel_rate=0.0),  # top-1
        dict(num_tokens=7, num_experts=5, top_k=8, num_used=5, sentinel_rate=0.0),  # k > E: spare sentinel slots
        dict(num_tokens=20, num_experts=8, top_k=2, num_used=1, sentinel_rate=0.0),  # one hot expert, 7 idle
        dict(num_tokens=6, num_experts=3, top_k=2, num_used=3, sentinel_rate=1.0),  # only sentinels
    ],
)
def test_edge_cases_match_reference(case):
    check_against_reference(
        dict(case, hidden=40, inter=24, layout="contiguous", trainable="all", seed=0), torch.float32
    )


def test_many_experts_and_large_top_k():
    """256 experts (the tile lookup spans them all) and k = 10."""
    check_against_reference(
        dict(
            num_tokens=6, hidden=16, inter=16, num_experts=256, top_k=10, num_used=256, sentinel_rate=0.1,
            layout="contiguous", trainable="all", seed=1,
        ),
        torch.float32,
    )  # fmt: skip


def test_deterministic_mode_matches_reference():
    """Under `torch.use_deterministic_algorithms` the kernels store per-pair rows instead of adding atomically."""
    case = dict(
        num_tokens=13, hidden=40, inter=40, num_experts=4, top_k=3, num_used=4, sentinel_rate=0.25,
        layout="contiguous", trainable="all", seed=5,
    )  # fmt: skip
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check_against_reference(case, torch.float32)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_eager_experts_agree():
    """transformers' eager experts, the reference and the kernels agree (ties the oracle to transformers' math)."""
    case = dict(
        num_tokens=24, hidden=40, inter=24, num_experts=6, top_k=3, num_used=5, sentinel_rate=0.2,
        layout="contiguous", trainable="all", seed=3,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.float32)
    x, gate_up, down, index, weights = inputs
    config = Qwen3MoeConfig(hidden_size=40, moe_intermediate_size=24, num_experts=6, experts_implementation="eager")
    eager = Qwen3MoeExperts(config).to(DEVICE)
    with torch.no_grad():
        eager.gate_up_proj.copy_(gate_up)
        eager.down_proj.copy_(down)
    eager_out, eager_grads = outputs_and_grads(
        lambda x, w1, w2, i, w: eager(x, i, w), (x, eager.gate_up_proj, eager.down_proj, index, weights), grad_out
    )
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, inputs, grad_out)
    for name, a, b, c in zip(("output", "hidden", "gate_up", "down", "routing"), [out, *grads], [eager_out, *eager_grads], [ref_out, *ref_grads]):  # fmt: skip
        assert_close(a, b, TOLERANCE[torch.float32], f"kernels vs eager {name}")
        assert_close(c, b, TOLERANCE[torch.float32], f"reference vs eager {name}")


def test_decode_path_needs_no_sort(monkeypatch):
    """Inference on a handful of tokens takes the per-pair kernels: no routing metadata, same result."""

    def no_sort(*args):
        raise AssertionError("the decode path sorted the routing")

    monkeypatch.setattr(fused_moe_module, "sort_by_expert", no_sort)
    for num_tokens, top_k in [(1, 4), (2, 2)]:
        case = dict(
            num_tokens=num_tokens, hidden=72, inter=40, num_experts=16, top_k=top_k, num_used=16, sentinel_rate=0.0,
            layout="sliced", trainable="none", seed=num_tokens,
        )  # fmt: skip
        inputs, _ = build_case(case, torch.float32)
        x, gate_up, down, index, weights = inputs
        index[index == 0] = 16  # expert 0 is never routed to: its NaN weights must not be read
        expected = K.moe_experts_reference(*as_double(inputs))
        gate_up[0] = float("nan")
        assert fused_moe_module.use_decode_path(num_tokens, top_k, 16)
        assert_close(K.fused_moe_experts(*inputs), expected, TOLERANCE[torch.float32], "decode output")


def test_sort_by_expert():
    index = torch.tensor([[2, 0], [3, 2], [0, 3], [1, 2]])  # 3 is the sentinel for E = 3
    sorted_pairs, offsets = K.sort_by_expert(index, 3)
    assert sorted_pairs.tolist()[:6] == [1, 4, 6, 0, 3, 7]  # experts 0, 0, 1, 2, 2, 2 in token order
    assert sorted(sorted_pairs.tolist()[6:]) == [2, 5]  # the sentinel slots, past offsets[E]
    assert offsets.tolist() == [0, 2, 3, 6]
    assert sorted_pairs.dtype == offsets.dtype == torch.int32


# --------------------------------------------------------------------------------------------------------------------
# Models: `set_experts_implementation("deeptalk_triton")` gives eager's logits and gradients.


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=48, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=6, num_experts_per_tok=4,
        norm_topk_prob=True,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def tiny_mixtral() -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=48, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def tiny_deeptalk(routing: str) -> DeepTalkForCausalLM:
    # top-k 3 > 2 speech experts: speech tokens carry sentinel slots under hard routing.
    config = DeepTalkConfig(
        vocab_size=64, speech_vocab_size=16, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_speech_experts=2, num_experts_per_tok=3,
        shared_expert_intermediate_size=16, modality_routing=routing,
    )  # fmt: skip
    return DeepTalkForCausalLM(config)


MODELS = {
    "qwen3_moe": tiny_qwen3_moe,
    "mixtral": tiny_mixtral,
    "deeptalk_hard": lambda: tiny_deeptalk("hard"),
    "deeptalk_none": lambda: tiny_deeptalk("none"),
}


def logits_and_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_eager(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(DEVICE)
    model.set_experts_implementation("eager")
    vocab = model.config.vocab_size
    # A mixed batch: DeepTalk's speech block is the last 16 ids, so each row holds text and speech tokens.
    input_ids = torch.cat([torch.randint(0, vocab - 16, (2, 4)), torch.randint(vocab - 16, vocab, (2, 3))], 1)
    input_ids = input_ids.to(DEVICE)
    eager_logits, eager_grads = logits_and_grads(model, input_ids)
    model.set_experts_implementation("deeptalk_triton")
    assert model.config._experts_implementation == "deeptalk_triton"
    logits, grads = logits_and_grads(model, input_ids)
    assert_close(logits, eager_logits, 1e-4, "logits")
    assert grads.keys() == eager_grads.keys()
    assert any("experts.gate_up_proj" in n for n in grads)
    for n in grads:
        assert_close(grads[n], eager_grads[n], 1e-4, n)


def test_from_pretrained_with_deeptalk_triton(tmp_path):
    torch.manual_seed(0)
    model = tiny_qwen3_moe()
    model.save_pretrained(tmp_path)
    input_ids = torch.randint(0, 48, (1, 5))
    expected = model(input_ids).logits
    loaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path, experts_implementation="deeptalk_triton").to(DEVICE)
    assert loaded.config._experts_implementation == "deeptalk_triton"
    assert_close(loaded(input_ids.to(DEVICE)).logits, expected, 1e-4, "logits")


# --------------------------------------------------------------------------------------------------------------------
# Registration, backend selection and errors.


def test_registered_with_transformers():
    assert ALL_EXPERTS_FUNCTIONS["deeptalk_triton"] is K.deeptalk_triton_experts_forward
    assert tiny_mixtral().get_correct_experts_implementation("deeptalk_triton") == "deeptalk_triton"


def test_deeptalk_default_backend(monkeypatch):
    """DeepTalk defaults to the kernels when CUDA and Triton are there (SiLU experts); other models are unchanged."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert tiny_deeptalk("hard").config._experts_implementation == "deeptalk_triton"
    assert tiny_qwen3_moe().config._experts_implementation == "grouped_mm"
    gelu = DeepTalkConfig(
        vocab_size=32, hidden_size=16, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        hidden_act="gelu",
    )  # fmt: skip
    assert DeepTalkForCausalLM(gelu).config._experts_implementation == "grouped_mm"
    monkeypatch.setattr(K, "is_triton_available", lambda: False)
    assert tiny_deeptalk("hard").config._experts_implementation == "grouped_mm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(K, "is_triton_available", lambda: True)
    assert tiny_deeptalk("hard").config._experts_implementation == "grouped_mm"


def tiny_experts_call():
    experts = tiny_qwen3_moe().model.layers[0].mlp.experts
    x = torch.randn(3, 32)
    index = torch.tensor([[0, 1, 2, 3]] * 3)
    return experts, x, index, torch.full((3, 4), 0.25)


def test_cpu_without_interpreter_points_to_grouped_mm(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    experts, *args = tiny_experts_call()
    with pytest.raises(RuntimeError, match="grouped_mm"):
        K.deeptalk_triton_experts_forward(experts, *args)


def test_missing_triton_points_to_grouped_mm(monkeypatch):
    monkeypatch.setattr(K, "is_triton_available", lambda: False)
    experts, *args = tiny_experts_call()
    with pytest.raises(ImportError, match="grouped_mm"):
        K.deeptalk_triton_experts_forward(experts, *args)


def test_unsupported_layouts_are_named():
    experts, *args = tiny_experts_call()
    experts.act_fn = torch.nn.GELU()
    with pytest.raises(NotImplementedError, match="GELU"):
        K.deeptalk_triton_experts_forward(experts, *args)
    config = GptOssConfig(num_local_experts=2, hidden_size=8, intermediate_size=8)
    with pytest.raises(NotImplementedError, match="biases.*transposed.*interleaved.*_apply_gate"):
        K.deeptalk_triton_experts_forward(GptOssExperts(config), *args)


def test_package_imports_without_triton():
    src = Path(deeptalk_hf.__file__).parents[1]
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import deeptalk_hf, deeptalk_hf.kernels as K\n"
        "assert not K.is_triton_available()\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "assert 'deeptalk_triton' in ALL_EXPERTS_FUNCTIONS\n"
    )
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
