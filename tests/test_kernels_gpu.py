"""The `deeptalk_triton` kernels compiled on CUDA: bf16 at real MoE shapes, decode, determinism, no host sync.

Skipped without CUDA (and under `TRITON_INTERPRET`, which would interpret instead of compile). bf16 results are
compared with a float32 torch reference on the same bf16 inputs, and with the error transformers' own `grouped_mm`
backend makes on the same problem: the kernels must be within `BF16_TOLERANCE` of the largest expected magnitude and
no less accurate than `grouped_mm` (up to a factor of 2, plus a small floor).
"""

import os

import pytest
import torch

# Skip before importing the kernels: importing them builds them, compiled or interpreted for the whole session.
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off"):
    pytest.skip("checks the compiled kernels; TRITON_INTERPRET is set", allow_module_level=True)
pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from deeptalk_hf import kernels as K  # noqa: E402
from deeptalk_hf.kernels import triton_moe  # noqa: E402

from .kernel_cases import (  # noqa: E402
    MODELS,
    assert_close,
    build_case,
    check_model_matches_eager,
    max_error,
    outputs_and_grads,
    tiny_deeptalk,
    upcast,
)

DEVICE = torch.device("cuda")
BF16_TOLERANCE = 2e-2
# (hidden, moe_intermediate, experts, top_k, tokens): the benchmark's model shapes at a test-sized token count.
SHAPES = {
    "qwen3_30b_a3b": (2048, 768, 128, 8, 512),
    "deepseek_v2_lite": (2048, 1408, 64, 6, 512),
    "mixtral_8x7b": (4096, 14336, 8, 2, 128),
}
GRAD_NAMES = ("output", "hidden", "gate_up_proj", "down_proj", "routing")


def model_case(shape: str, **overrides) -> dict:
    hidden, inter, experts, top_k, tokens = SHAPES[shape]
    case = dict(
        num_tokens=tokens, hidden=hidden, inter=inter, num_experts=experts, top_k=top_k,
        num_used=max(1, experts - 2), sentinel_rate=0.05, layout="contiguous", trainable="all", seed=0,
    )  # fmt: skip
    return {**case, **overrides}


def grouped_mm_experts(gate_up: torch.Tensor, down: torch.Tensor) -> Qwen3MoeExperts:
    """transformers' experts module on the same weights, dispatching to its `grouped_mm` backend (sentinel-safe)."""
    num_experts, two_i, hidden = gate_up.shape
    config = Qwen3MoeConfig(
        hidden_size=hidden,
        moe_intermediate_size=two_i // 2,
        num_experts=num_experts,
        experts_implementation="grouped_mm",
    )
    experts = Qwen3MoeExperts(config).to(DEVICE, gate_up.dtype)
    experts._is_expert_parallel = True
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    return experts


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bf16_matches_reference_at_model_shapes(shape):
    inputs, grad_out = build_case(model_case(shape), torch.bfloat16, DEVICE)
    x, gate_up, down, index, weights = inputs
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, upcast(inputs, torch.float32), grad_out.float())
    experts = grouped_mm_experts(gate_up.detach(), down.detach())
    gmm_inputs = (x.detach().requires_grad_(), experts.gate_up_proj, experts.down_proj, index, weights.detach())
    gmm_inputs[4].requires_grad_()  # a fresh leaf: the routing weights' gradient through grouped_mm
    gmm_out, gmm_grads = outputs_and_grads(lambda x, w1, w2, i, w: experts(x, i, w), gmm_inputs, grad_out)
    for name, ours, ref, gmm in zip(
        GRAD_NAMES, [out, *grads], [ref_out, *ref_grads], [gmm_out, *gmm_grads], strict=True
    ):
        assert ours.dtype == torch.bfloat16, name
        assert_close(ours, ref, BF16_TOLERANCE, f"{shape} {name}")
        floor = 1e-3 * ref.abs().max().item()
        assert max_error(ours, ref) <= 2 * max_error(gmm, ref) + floor, (
            f"{shape} {name}: error {max_error(ours, ref):.3e} vs grouped_mm's {max_error(gmm, ref):.3e}"
        )


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_bf16_non_contiguous(layout):
    case = model_case("qwen3_30b_a3b", num_tokens=300, layout=layout, sentinel_rate=0.2, num_used=100)
    inputs, grad_out = build_case(case, torch.bfloat16, DEVICE)
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, upcast(inputs, torch.float32), grad_out.float())
    for name, ours, ref in zip(GRAD_NAMES, [out, *grads], [ref_out, *ref_grads], strict=True):
        assert_close(ours, ref, BF16_TOLERANCE, f"{layout} {name}")


@pytest.mark.parametrize("num_tokens", [1, 3, 257])
def test_bf16_ragged_widths_read_nothing_past_the_inputs(num_tokens):
    """Widths one past a multiple of every block size, inputs at the corner of NaN-filled buffers (layout "padded"): a
    compiled kernel reading past a width or a reduction's ragged end, on the grouped or the decode path, poisons the
    result; the outputs must match too where a tile writing past its rows would race with another (the interpreter
    runs tiles in order)."""
    case = dict(
        num_tokens=num_tokens, hidden=1025, inter=321, num_experts=20, top_k=4, num_used=16, sentinel_rate=0.1,
        layout="padded", trainable="all" if num_tokens > 3 else "none", seed=num_tokens,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.bfloat16, DEVICE)
    if case["trainable"] == "none":
        with torch.no_grad():
            out, grads = K.fused_moe_experts(*inputs), []
            ref_out, ref_grads = K.moe_experts_reference(*upcast(inputs, torch.float32)), []
    else:
        out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
        ref_out, ref_grads = outputs_and_grads(
            K.moe_experts_reference, upcast(inputs, torch.float32), grad_out.float()
        )
    for name, ours, ref in zip(GRAD_NAMES, [out, *grads], [ref_out, *ref_grads]):
        assert_close(ours, ref, BF16_TOLERANCE, f"T={num_tokens} {name}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_fp32_fp16_compiled(dtype, tol):
    """Compiled fp32 uses exact (IEEE) products under torch's default matmul precision, fp16 accumulates in fp32."""
    case = dict(
        num_tokens=333, hidden=1024, inter=320, num_experts=48, top_k=5, num_used=40, sentinel_rate=0.1,
        layout="contiguous", trainable="all", seed=1,
    )  # fmt: skip
    inputs, grad_out = build_case(case, dtype, DEVICE)
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, upcast(inputs), grad_out.double())
    for name, ours, ref in zip(GRAD_NAMES, [out, *grads], [ref_out, *ref_grads], strict=True):
        assert_close(ours, ref, tol, f"{dtype} {name}")


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("shape", ["qwen3_30b_a3b", "mixtral_8x7b"])
def test_bf16_inference_small_batches(shape, num_tokens):
    """Decode-sized batches (the per-pair path where it applies, the grouped path above) without autograd."""
    case = model_case(shape, num_tokens=num_tokens, trainable="none", seed=num_tokens)
    inputs, _ = build_case(case, torch.bfloat16, DEVICE)
    with torch.no_grad():
        out = K.fused_moe_experts(*inputs)
        ref = K.moe_experts_reference(*upcast(inputs, torch.float32))
    assert_close(out, ref, BF16_TOLERANCE, f"{shape} T={num_tokens}")


def test_deterministic_mode_is_bitwise_reproducible():
    inputs, grad_out = build_case(model_case("qwen3_30b_a3b", num_tokens=1024), torch.bfloat16, DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
        second = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(GRAD_NAMES, [first[0], *first[1]], [second[0], *second[1]], strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("num_tokens", [1, 1024])
def test_no_host_sync(num_tokens):
    """After the first call (autotuning), forward and backward never wait for the device."""
    case = model_case("qwen3_30b_a3b", num_tokens=num_tokens)
    inputs, grad_out = build_case(case, torch.bfloat16, DEVICE)
    outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    with torch.no_grad():
        K.fused_moe_experts(*inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
        with torch.no_grad():
            K.fused_moe_experts(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autotuning_is_cached_per_shape_class():
    """A new token count in the same rows-per-expert bucket reuses the tuned configs; a new bucket tunes once."""
    kernel = triton_moe._gate_up_kernel

    def run(num_tokens: int) -> None:
        case = model_case("qwen3_30b_a3b", num_tokens=num_tokens, trainable="none")
        inputs, _ = build_case(case, torch.bfloat16, DEVICE)
        with torch.no_grad():
            K.fused_moe_experts(*inputs)

    run(1000)  # P / E = 62 -> rows bucket 64
    tuned = set(kernel.cache)
    run(1010)  # P / E = 63 -> the same bucket
    assert set(kernel.cache) == tuned
    run(4000)  # P / E = 250 -> bucket 256: at most one new entry, keyed (N, K, NUM_EXPERTS, ROWS_BUCKET, dtypes...)
    assert len(set(kernel.cache) - tuned) <= 1
    assert any(key[:4] == (768, 2048, 128, 256) for key in kernel.cache)


def test_inductor_fullgraph_compile():
    inputs, grad_out = build_case(model_case("qwen3_30b_a3b", num_tokens=256), torch.bfloat16, DEVICE)
    compiled = torch.compile(K.fused_moe_experts, fullgraph=True)
    out, grads = outputs_and_grads(compiled, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    for name, ours, ref in zip(GRAD_NAMES, [out, *grads], [ref_out, *ref_grads], strict=True):
        assert_close(ours, ref, 1e-2, f"compiled {name}")
    x, gate_up, down, index, weights = inputs
    one_token = (x[:1], gate_up, down, index[:1], weights[:1])
    with torch.no_grad():
        assert_close(compiled(*one_token), K.fused_moe_experts(*one_token), 1e-2, "compiled decode")


@pytest.mark.parametrize("name", list(MODELS))
def test_models_match_eager_on_gpu(name):
    check_model_matches_eager(name, DEVICE)


def test_deeptalk_defaults_to_triton_on_cuda():
    model = tiny_deeptalk("hard").to(DEVICE, torch.bfloat16)
    assert model.config._experts_implementation == "deeptalk_triton"
    input_ids = torch.arange(64, device=DEVICE).view(4, 16)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.layers[0].mlp.speech_experts.gate_up_proj.grad.abs().sum() > 0
