"""The `deeptalk_triton` experts kernels against the torch reference and transformers' eager experts.

Without CUDA the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, which `conftest.py` sets before
anything imports Triton); with CUDA the same checks run compiled on the GPU. Shapes stay tiny because the interpreter
costs about 2 ms per program and reduction step. bf16 is checked only in `test_kernels_gpu.py` (the interpreter's bf16
dot is not faithful).
"""

import contextlib
import importlib.util
import inspect
import itertools
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import GptOssConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

import deeptalk_hf  # noqa: E402
from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM  # noqa: E402
from deeptalk_hf import kernels as K  # noqa: E402
from deeptalk_hf.kernels import fused_moe as fused_moe_module  # noqa: E402
from deeptalk_hf.kernels import triton_moe  # noqa: E402

from .conftest import tiny_config  # noqa: E402
from .kernel_cases import (  # noqa: E402
    MODELS,
    assert_close,
    build_case,
    check_model_matches_eager,
    outputs_and_grads,
    tiny_deeptalk,
    tiny_mixtral,
    tiny_qwen3_moe,
    upcast,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Largest error allowed, relative to the largest magnitude of the expected tensor (per output and per gradient).
# fp32: the kernels and the float64 reference differ only by fp32 rounding (seen: <= 3e-5, routing-weight
# gradients being dot products with cancellation).
# fp16: inputs are the same fp16 values; the kernels round the intermediates (gate/up, activation, its gradient) to
# fp16 as every fp16 backend does (relative error ~1e-3 each), the reference keeps them in float64.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


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


def check_against_reference(case: dict, dtype: torch.dtype) -> None:
    inputs, grad_out = build_case(case, dtype, DEVICE)
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    assert out.dtype == dtype
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, upcast(inputs), grad_out.double())
    # fp16: a sum that cancels (one token's routing gradient) may lose more than `tol` of its size; there the kernels
    # must be as accurate as plain torch in fp16 (which accumulates in fp32 on CPU)
    same_out, same_grads = None, [None] * len(grads)
    if dtype == torch.float16:
        same_out, same_grads = outputs_and_grads(K.moe_experts_reference, upcast(inputs, dtype), grad_out)
    tol = TOLERANCE[dtype]
    assert_close(out, ref_out, tol, "output", same_out)
    names = [
        n
        for n, a in zip(("hidden", "gate_up_proj", "down_proj", "", "routing"), inputs, strict=True)
        if a.requires_grad
    ]
    for name, grad, ref_grad, same_grad, leaf in zip(
        names, grads, ref_grads, same_grads, (a for a in inputs if a.requires_grad), strict=True
    ):
        assert grad.dtype == leaf.dtype
        assert_close(grad, ref_grad, tol, f"grad {name}", same_grad)


@given(case=moe_cases())
def test_fp32_matches_reference(case):
    check_against_reference(case, torch.float32)


@given(case=moe_cases())
@example(  # one token's routing gradient, 0.6% of its terms' sum of magnitudes: fp16 torch and the kernels err by 1.3%
    case=dict(
        num_tokens=2,
        hidden=40,
        inter=40,
        num_experts=1,
        top_k=1,
        num_used=1,
        sentinel_rate=0.25,
        layout="contiguous",
        trainable="all",
        seed=1,
    )  # fmt: skip
)
def test_fp16_matches_reference(case):
    check_against_reference(case, torch.float16)


TUNED_TILES = [
    (kernel, tile)
    for kernel, tiles in (
        ("_gate_up_kernel", triton_moe.GROUPED_TILES),
        ("_down_backward_kernel", triton_moe.GROUPED_TILES),
        ("_scatter_kernel", triton_moe.SCATTER_TILES),
        ("_expert_grad_kernel", triton_moe.EXPERT_GRAD_TILES),
    )
    for tile in dict.fromkeys(tile[:3] for tile in tiles)  # block sizes; stages and warps are GPU-only
]


@pytest.mark.parametrize(
    ("kernel", "tile"), TUNED_TILES, ids=lambda v: "x".join(map(str, v[:3])) if isinstance(v, tuple) else v[1:-7]
)
def test_every_tuned_tile_gives_reference_results(kernel, tile, monkeypatch):
    """The interpreter runs one small config; here each tile the GPU autotuner may pick runs instead, on weights
    smaller than the tile and ragged experts, so its masking is checked before any GPU sees it."""
    kernel = getattr(triton_moe, kernel)
    monkeypatch.setattr(kernel, "configs", [triton.Config(dict(zip(triton_moe._MNK, tile[:3])))])
    monkeypatch.setattr(kernel, "cache", {})
    case = dict(
        num_tokens=40, hidden=136, inter=72, num_experts=5, top_k=3, num_used=4, sentinel_rate=0.1,
        layout="contiguous", trainable="all", seed=3,
    )  # fmt: skip
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize(
    "case",
    [
        dict(num_tokens=0, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.0),  # T = 0
        dict(num_tokens=9, num_experts=5, top_k=1, num_used=5, sentinel_rate=0.0),  # top-1
        dict(num_tokens=7, num_experts=5, top_k=8, num_used=5, sentinel_rate=0.0),  # k > E: spare sentinel slots
        dict(num_tokens=20, num_experts=8, top_k=2, num_used=1, sentinel_rate=0.0),  # one hot expert, 7 idle
        dict(num_tokens=6, num_experts=3, top_k=2, num_used=3, sentinel_rate=1.0),  # only sentinels
        dict(num_tokens=3, num_experts=9, top_k=2, num_used=9, sentinel_rate=0.25),  # fewer pairs than experts
    ],
)
def test_edge_cases_match_reference(case):
    check_against_reference(
        dict(case, hidden=40, inter=24, layout="contiguous", trainable="all", seed=0), torch.float32
    )


@pytest.mark.parametrize("trainable", ["gate_up_only", "down_only", "hidden_only", "router_only"])
def test_each_input_alone_gets_its_own_gradient(trainable):
    """One input requiring grad at a time (e.g. LoRA-free fine-tuning of one projection): the backward must read
    which input asked for what, not assume they come together."""
    check_against_reference(
        dict(
            num_tokens=7, hidden=16, inter=16, num_experts=3, top_k=2, num_used=3, sentinel_rate=0.0,
            layout="contiguous", trainable=trainable, seed=2,
        ),
        torch.float32,
    )  # fmt: skip


def test_many_experts_and_large_top_k():
    """256 experts (the tile lookup spans them all) and k = 10."""
    check_against_reference(
        dict(
            num_tokens=6, hidden=16, inter=16, num_experts=256, top_k=10, num_used=256, sentinel_rate=0.1,
            layout="contiguous", trainable="all", seed=1,
        ),
        torch.float32,
    )  # fmt: skip


def test_widths_and_row_counts_one_past_a_block_match_reference():
    """Hidden and intermediate widths of 33, one past a multiple of every block size (the reduction loops' last step
    holds a single element; the other cases' widths are multiples of 8), and experts of 17 rows, one past the
    weight-gradient kernel's row block; on the training and the decode paths."""
    case = dict(
        num_tokens=17, hidden=33, inter=33, num_experts=3, top_k=2, num_used=2, sentinel_rate=0.0,
        layout="contiguous", trainable="all", seed=9,
    )  # fmt: skip
    check_against_reference(case, torch.float32)  # experts 0 and 1 get every token, expert 2 none
    inputs, _ = build_case(dict(case, num_tokens=1, trainable="none"), torch.float32, DEVICE)
    assert fused_moe_module.use_decode_path(1, 2, 3)
    expected = K.moe_experts_reference(*upcast(inputs))
    assert_close(K.fused_moe_experts(*inputs), expected, TOLERANCE[torch.float32], "decode output")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """`torch.use_deterministic_algorithms(enabled)` for the block, the previous setting restored after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("deterministic", [False, True])
def test_no_tokens_give_zero_weight_gradients(deterministic):
    """A one-modality training batch runs the other group's experts on no tokens, so that data-parallel training gets a
    gradient for every tensor: an empty output and weight gradients written as zeros (deterministic mode's NaN-filled
    allocations show a buffer left unwritten)."""
    hidden, inter, num_experts, top_k = 16, 8, 3, 2
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, requires_grad=True)
    down = torch.randn(num_experts, hidden, inter, device=DEVICE, requires_grad=True)
    x = torch.randn(0, hidden, device=DEVICE, requires_grad=True)
    weights = torch.rand(0, top_k, device=DEVICE, requires_grad=True)
    index = torch.zeros(0, top_k, dtype=torch.long, device=DEVICE)
    with deterministic_algorithms(deterministic):
        out = K.fused_moe_experts(x, gate_up, down, index, weights)
        out.sum().backward()
    assert out.shape == (0, hidden)
    for param in (gate_up, down):
        assert torch.equal(param.grad, torch.zeros_like(param))


def test_deterministic_mode_matches_reference():
    """Under `torch.use_deterministic_algorithms` the kernels store per-pair rows instead of adding atomically."""
    case = dict(
        num_tokens=13, hidden=40, inter=40, num_experts=4, top_k=3, num_used=4, sentinel_rate=0.25,
        layout="contiguous", trainable="all", seed=5,
    )  # fmt: skip
    with deterministic_algorithms(True):
        check_against_reference(case, torch.float32)


def test_deterministic_mode_does_not_depend_on_the_expert_labels():
    """Deterministic mode sums each token's pairs in its top-k slot order, so relabelling the experts (the weights
    permuted alike) gives bit-identical outputs and gradients; atomic adds follow the expert order (under the
    interpreter, fixed: the relabelled sum differs, which shows the check can see the mode)."""
    case = dict(
        num_tokens=13, hidden=40, inter=40, num_experts=4, top_k=3, num_used=4, sentinel_rate=0.0,
        layout="contiguous", trainable="all", seed=5,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.float32, DEVICE)
    x, gate_up, down, index, weights = inputs
    label = torch.tensor([3, 1, 0, 2], device=DEVICE)  # expert e is called label[e]
    old = torch.argsort(label)
    relabelled_weights = [w.detach()[old].clone().requires_grad_() for w in (gate_up, down)]
    relabelled = [x, *relabelled_weights, label[index], weights]
    for deterministic in (True, False):
        with deterministic_algorithms(deterministic):
            out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
            out_relabelled, (grad_x, grad_gate_up, grad_down, grad_routing) = outputs_and_grads(
                K.fused_moe_experts, relabelled, grad_out
            )
        same = [torch.equal(out, out_relabelled)] + [
            torch.equal(a, b)
            for a, b in zip(grads, [grad_x, grad_gate_up[label], grad_down[label], grad_routing], strict=True)
        ]
        if deterministic:
            assert all(same), same
        elif DEVICE.type == "cpu":
            assert not same[0]


def test_deterministic_routing_gradient_holds_a_partial_per_column_block_of_any_tuned_tile(monkeypatch):
    """The deterministic routing gradient keeps one partial per column block of the narrowest tuned tile, whichever
    tile the GPU autotuner picks; the interpreter has only one tile, so here the tuned list is put back and the
    backward kernel runs the narrowest tile, on an intermediate width that spans two of its column blocks."""
    tiles = triton_moe.GROUPED_TILES
    monkeypatch.setattr(
        triton_moe, "_GROUPED_CONFIGS", [triton.Config(dict(zip(triton_moe._MNK, t[:3]))) for t in tiles]
    )
    narrowest = min(tiles, key=lambda t: (t[1], t[0]))
    kernel = triton_moe._down_backward_kernel
    monkeypatch.setattr(kernel, "configs", [triton.Config(dict(zip(triton_moe._MNK, narrowest[:3])))])
    monkeypatch.setattr(kernel, "cache", {})
    case = dict(
        num_tokens=13, hidden=16, inter=72, num_experts=3, top_k=2, num_used=3, sentinel_rate=0.0,
        layout="contiguous", trainable="router_only", seed=11,
    )  # fmt: skip
    assert triton.cdiv(case["inter"], narrowest[1]) > 1
    with deterministic_algorithms(True):
        check_against_reference(case, torch.float32)


def test_no_read_outside_the_inputs():
    """Inputs at the corner of NaN-filled buffers (layout "padded"): an element past a width or a reduction's ragged
    end must be masked on both operands of its product (NaN * 0 is NaN), on the training and the decode paths. Under
    deterministic mode new buffers are NaN-filled too, which covers reads of the rows the kernels leave unwritten:
    those of sentinel pairs, such as the decode case's second pair."""
    case = dict(
        num_tokens=13, hidden=40, inter=24, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.2,
        layout="padded", trainable="all", seed=10,
    )  # fmt: skip
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            check_against_reference(case, torch.float32)
            inputs, _ = build_case(dict(case, num_tokens=1, trainable="none"), torch.float32, DEVICE)
            inputs[3][0] = torch.tensor([1, case["num_experts"]])  # a real pair, then a sentinel pair
            expected = K.moe_experts_reference(*upcast(inputs))
            assert_close(K.fused_moe_experts(*inputs), expected, TOLERANCE[torch.float32], "decode output")


def test_an_experts_nan_weights_reach_only_its_own_tokens():
    """A row tile's rows past its expert's last row are masked: nothing of them may reach an output, not even the
    zeros they compute, which are NaN where the expert's weights are (masked atomic adds land on token 0, pair 0).
    Expert 1 (5 pairs, a ragged tile) holds NaN weights and token 0 does not use it: every output, input gradient,
    routing gradient and other expert's weight gradient that does not involve expert 1 must equal the reference
    computed with expert 1 zeroed, on the training path and in deterministic mode."""
    case = dict(
        num_tokens=13, hidden=40, inter=24, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.0,
        layout="contiguous", trainable="all", seed=15,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.float32, DEVICE)
    x, gate_up, down, index, weights = inputs
    index[:] = torch.tensor([0, 2], device=DEVICE)
    index[[2, 4, 7, 8, 12], 1] = 1  # 5 pairs on expert 1, none of them token 0's
    ref_inputs = upcast(inputs)
    with torch.no_grad():
        for w in ref_inputs[1:3]:
            w[1] = 0.0
        gate_up[1], down[1] = float("nan"), float("nan")
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, ref_inputs, grad_out.double())
    clean = (index != 1).all(1)  # tokens not routed to expert 1
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            out, (grad_x, grad_gate_up, grad_down, grad_routing) = outputs_and_grads(
                K.fused_moe_experts, inputs, grad_out
            )
        pairs = [
            ("output", out[clean], ref_out[clean]),
            ("grad hidden", grad_x[clean], ref_grads[0][clean]),
            ("grad gate_up_proj", grad_gate_up[[0, 2, 3]], ref_grads[1][[0, 2, 3]]),
            ("grad down_proj", grad_down[[0, 2, 3]], ref_grads[2][[0, 2, 3]]),
            ("grad routing", grad_routing[index != 1], ref_grads[3][index != 1]),
        ]
        for name, ours, ref in pairs:
            assert ours.isfinite().all(), f"{name} (deterministic={deterministic}): NaN outside expert 1's tokens"
            assert_close(ours, ref, TOLERANCE[torch.float32], f"{name} (deterministic={deterministic})")


def test_the_decode_path_never_reads_a_sentinel_pairs_expert():
    """A sentinel id E (a group smaller than top-k) names no expert: the gate/up decode kernel must skip its pair, not
    read `gate_up_proj[E]`, one expert past the tensor (the down kernel skipping it too hid such a read). The weights
    sit in a buffer whose row E is finite, and under deterministic mode the new activation buffer is NaN-filled: the
    sentinel pair's row must stay NaN."""
    num_experts, inter, hidden = 2, 16, 16
    buffer = torch.full((num_experts + 1, 2 * inter, hidden), 7.0, device=DEVICE)
    gate_up = buffer[:num_experts].normal_()
    down = torch.randn(num_experts, hidden, inter, device=DEVICE)
    x, index = torch.randn(1, hidden, device=DEVICE), torch.tensor([[1, num_experts]], device=DEVICE)
    weights = torch.tensor([[0.6, 0.4]], device=DEVICE)
    launch, captured = triton_moe._down_decode_kernel, {}

    class Capture:  # the down kernel's launcher, recording the activation buffer it reads
        def __getitem__(self, grid):
            return lambda act, *args, **kwargs: (captured.setdefault("act", act), launch[grid](act, *args, **kwargs))

    with deterministic_algorithms(True), pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_moe, "_down_decode_kernel", Capture())
        out = triton_moe.decode_forward(x, gate_up, down, index, weights, torch.float32)
    assert captured["act"][1].isnan().all() and not captured["act"][0].isnan().any()
    expected = K.moe_experts_reference(x, gate_up, down, index, weights)
    assert_close(out, expected, TOLERANCE[torch.float32], "decode output")


def test_kernels_write_only_the_rows_of_their_experts():
    """A row tile writes only its expert's sorted rows: on a GPU a write past them races with the next expert's tile.
    The interpreter runs the tiles in order, so there the next tile overwrites such a write and only one past the
    last expert shows. Deterministic mode fills new buffers with NaN: the sentinel pairs' rows, past `offsets[E]`,
    of the per-row buffers (activation, kept pre-activation, its gradient, the weighted activation) must stay NaN."""
    case = dict(
        num_tokens=13, hidden=40, inter=40, num_experts=4, top_k=3, num_used=4, sentinel_rate=0.3,
        layout="contiguous", trainable="none", seed=5,
    )  # fmt: skip
    (x, gate_up, down, index, weights), grad_out = build_case(case, torch.float32, DEVICE)
    with deterministic_algorithms(True):
        sorted_pairs, offsets = K.sort_by_expert(index, case["num_experts"])
        act, kept = triton_moe.gate_up_forward(x, gate_up, sorted_pairs, offsets, case["top_k"], keep_gate_up=True)
        end = offsets[-1].item()
        written = {"act": act[:end].clone(), "gate_up": kept[:end].clone()}
        unwritten = {"act": act[end:].clone(), "gate_up": kept[end:].clone()}
        kept[end:] = 0.0  # finite, so that a backward tile reading past its rows would write finite values there
        grad_gate_up, _, weighted_act = triton_moe.down_backward(
            grad_out, down, kept, weights.reshape(-1), sorted_pairs, offsets, case["top_k"], True, True, True
        )
    written["grad_gate_up"], unwritten["grad_gate_up"] = grad_gate_up[:end], grad_gate_up[end:]
    written["weighted_act"], unwritten["weighted_act"] = weighted_act[:end], weighted_act[end:]
    assert 0 < end < sorted_pairs.numel()
    for name in written:
        assert written[name].isfinite().all() and unwritten[name].isnan().all(), name


def test_autocast_computes_in_the_autocast_dtype():
    """fp32 weights under fp16 autocast: fp16 products (as eager's `F.linear`), fp32 gradients for the weights."""
    case = dict(
        num_tokens=13, hidden=40, inter=24, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.0,
        layout="contiguous", trainable="all", seed=6,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.float32, DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # The reference on the fp16-rounded inputs, in float64.
    rounded = [
        a.detach().half().double().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in inputs
    ]
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, rounded, grad_out.double())
    names = ("output", "hidden", "gate_up", "down", "routing")
    for name, grad, ref in zip(names, [out, *grads], [ref_out, *ref_grads], strict=True):
        assert_close(grad, ref, TOLERANCE[torch.float16], name)
    # The grouped kernels see the hidden states rounded to fp16 too, bit for bit, and both weights in fp16.
    x, gate_up, down, *routing = inputs
    with torch.no_grad():
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            autocast = K.fused_moe_experts(*inputs)
            assert torch.equal(autocast, K.fused_moe_experts(x.half().float(), gate_up, down, *routing))
        assert torch.equal(autocast, K.fused_moe_experts(x, gate_up.half(), down.half(), *routing))
    # Without the cast the products would be fp32: much closer to the fp32 reference than fp16 rounding allows.
    exact = K.moe_experts_reference(*upcast(inputs))
    assert (out.double() - exact).abs().max() > 1e-5 * exact.abs().max()


def test_fp16_sums_accumulate_in_fp32():
    """fp16 inputs in which the second block of each reduction cancels the first up to small terms (32 columns for
    the down projection over I and its input gradient over H, 16 rows for its weight gradient): fp32 accumulators
    keep the small remainder, fp16 ones round the first block's sum, ~250 times larger, to 11 bits and lose it
    (seen under the interpreter: errors 6 to 12 times the tolerance; 0.07 times with fp32 accumulators)."""
    case = dict(
        num_tokens=32, hidden=64, inter=64, num_experts=1, top_k=1, num_used=1, sentinel_rate=0.0,
        layout="contiguous", trainable="all", seed=12,
    )  # fmt: skip
    inputs, _ = build_case(case, torch.float16, DEVICE)
    x, gate_up, down, index, weights = inputs
    gen = torch.Generator().manual_seed(12)
    flip = torch.cat([torch.ones(32), -torch.ones(32)])
    mirrored = torch.randn(32, 32, generator=gen).repeat(2, 2) * flip[:, None] * flip[None, :]
    grad = torch.randn(16, 32, generator=gen)
    small = torch.randn(16, 32, generator=gen) / 256
    # Output-gradient column h + 32 = column h; token t + 16 = -token t + small.
    grad_out = torch.cat([grad, small - grad]).repeat(1, 2).to(DEVICE, torch.float16)
    with torch.no_grad():
        # down[h, i + 32] = -down[h, i] + small and down[h + 32, i] = -down[h, i] + small.
        down[0] = mirrored + torch.randn(64, 64, generator=gen) / 256
        gate_up[0, 32:64] = gate_up[0, :32]  # gate and up rows i + 32 = rows i: act[:, i + 32] = act[:, i]
        gate_up[0, 96:] = gate_up[0, 64:96]
        x[16:] = x[:16]  # token t + 16 = token t
        weights.fill_(1.0)  # weighted output gradients exact in fp16
    out, grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.moe_experts_reference, upcast(inputs), grad_out.double())
    # Not gate_up_proj's gradient: tokens t and t + 16 cancel there to second order, below the fp16 rounding of the
    # per-row gradients that every fp16 backend does.
    names = ("output", "hidden", "gate_up", "down", "routing")
    for name, ours, ref in zip(names, [out, *grads], [ref_out, *ref_grads], strict=True):
        if name != "gate_up":
            assert_close(ours, ref, TOLERANCE[torch.float16], name)


def test_fp16_gate_and_up_sums_accumulate_in_fp32():
    """The gate/up products reduce over H: fp16 hidden states whose second half repeats the first, and gate (for half
    the intermediate columns) or up rows (the other half) whose second half is minus the first plus small terms, so
    that the sum over the second half of H cancels the first's up to a small remainder. fp32 accumulators keep it,
    fp16 ones round the first half's sum to 11 bits and lose it; on the grouped path (training and inference, any
    `BLOCK_K` up to H/2) and the decode path (seen under the interpreter: errors 0.18 (grouped) and 0.06 (decode) of
    the largest output with fp16 accumulators, <= 5e-4 with fp32 ones)."""
    hidden, inter, half = 128, 32, 64
    case = dict(
        num_tokens=16, hidden=hidden, inter=inter, num_experts=1, top_k=1, num_used=1, sentinel_rate=0.0,
        layout="contiguous", trainable="none", seed=14,
    )  # fmt: skip
    (x, gate_up, down, index, weights), _ = build_case(case, torch.float16, DEVICE)
    gen = torch.Generator().manual_seed(14)
    small = torch.randn(2 * inter, half, generator=gen) / hidden**0.5 / 1024
    # The first half of the gate rows, the second half of the up rows.
    cancelled = torch.cat([torch.arange(inter // 2), torch.arange(inter + inter // 2, 2 * inter)])
    with torch.no_grad():
        x[:, half:] = x[:, :half]
        mirrored = -gate_up[0, :, :half].float() + small.to(DEVICE)
        gate_up[0, cancelled, half:] = mirrored[cancelled].half()
    expected = K.moe_experts_reference(*upcast((x, gate_up, down, index, weights)))
    for path, rows in (("grouped", slice(None)), ("decode", slice(0, 1))):
        args = (x[rows], gate_up, down, index[rows], weights[rows])
        assert fused_moe_module.use_decode_path(args[0].shape[0], 1, 1) == (path == "decode")
        with torch.no_grad():
            assert_close(K.fused_moe_experts(*args), expected[rows], TOLERANCE[torch.float16], f"{path} output")
    x.requires_grad_()  # the training path keeps the pre-activation too
    assert_close(K.fused_moe_experts(x, gate_up, down, index, weights), expected, TOLERANCE[torch.float16], "output")


def test_eager_experts_agree():
    """transformers' eager experts, the reference and the kernels agree (ties the oracle to transformers' math)."""
    case = dict(
        num_tokens=24, hidden=40, inter=24, num_experts=6, top_k=3, num_used=5, sentinel_rate=0.2,
        layout="contiguous", trainable="all", seed=3,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.float32, DEVICE)
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
    names = ("output", "hidden", "gate_up", "down", "routing")
    for name, kernel, expected, reference in zip(
        names, [out, *grads], [eager_out, *eager_grads], [ref_out, *ref_grads], strict=True
    ):
        assert_close(kernel, expected, TOLERANCE[torch.float32], f"kernels vs eager {name}")
        assert_close(reference, expected, TOLERANCE[torch.float32], f"reference vs eager {name}")


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
        inputs, _ = build_case(case, torch.float32, DEVICE)
        x, gate_up, down, index, weights = inputs
        index[index == 0] = 16  # expert 0 is never routed to: its NaN weights must not be read
        expected = K.moe_experts_reference(*upcast(inputs))
        gate_up[0] = float("nan")
        assert fused_moe_module.use_decode_path(num_tokens, top_k, 16)
        assert_close(K.fused_moe_experts(*inputs), expected, TOLERANCE[torch.float32], "decode output")


def test_decode_path_takes_one_token_or_at_most_a_quarter_of_the_experts_pairs():
    """docs/kernels.md: inference on one token, or on at most E/4 (token, slot) pairs, takes the per-pair kernels;
    more pairs take the grouped ones (per-pair kernels re-read an expert's weights for every pair)."""
    for num_experts in (4, 8, 16, 64, 65):
        for top_k in (1, 2, 4):
            for num_tokens in range(0, 40):
                expected = num_tokens == 1 or 0 < num_tokens * top_k <= num_experts / 4
                chosen = fused_moe_module.use_decode_path(num_tokens, top_k, num_experts)
                assert chosen == expected, (num_tokens, top_k, num_experts)


@pytest.mark.parametrize("grad", [False, True])  # the decode path (no autograd, few pairs) and the grouped one
def test_ids_outside_the_experts_are_skipped_on_both_paths(grad):
    """docs/kernels.md: an expert id outside [0, E) skips its slot, as `grouped_mm` does; a negative one too."""
    case = dict(
        num_tokens=1, hidden=16, inter=16, num_experts=8, top_k=2, num_used=8, sentinel_rate=0.0,
        layout="contiguous", trainable="none", seed=5,
    )  # fmt: skip
    inputs, _ = build_case(case, torch.float32, DEVICE)
    x, gate_up, down, index, weights = inputs
    index[0] = torch.tensor([3, -1])
    assert fused_moe_module.use_decode_path(1, 2, 8)
    skipped = index.clone()
    skipped[0, 1] = 8
    expected = K.moe_experts_reference(*upcast((x, gate_up, down, skipped, weights)))
    with torch.set_grad_enabled(grad):
        out = K.fused_moe_experts(x, gate_up, down, index, weights.requires_grad_(grad))
    assert_close(out, expected, TOLERANCE[torch.float32], "a negative id")


def test_weights_of_another_dtype_are_refused():
    case = dict(
        num_tokens=4, hidden=16, inter=16, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.0,
        layout="contiguous", trainable="none", seed=6,
    )  # fmt: skip
    (x, gate_up, down, index, weights), _ = build_case(case, torch.float32, DEVICE)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="gate_up_proj is torch.float64"):
            K.fused_moe_experts(x.double(), gate_up.double(), down.double(), index, weights.double())
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="down_proj is torch.float64"):  # either
            K.fused_moe_experts(x, gate_up, down.double(), index, weights)


def test_decode_path_returns_the_hidden_states_dtype():
    """The per-pair kernels compute in the weights' dtype (fp16 weights, or fp16 autocast over fp32 weights) and,
    as the grouped path and eager's experts, return fp32 for fp32 hidden states."""
    case = dict(
        num_tokens=1, hidden=16, inter=16, num_experts=8, top_k=2, num_used=8, sentinel_rate=0.0,
        layout="contiguous", trainable="none", seed=4,
    )  # fmt: skip
    inputs, _ = build_case(case, torch.float32, DEVICE)
    x, gate_up, down, index, weights = inputs
    assert fused_moe_module.use_decode_path(1, 2, 8)
    rounded = [a.half().double() if a.is_floating_point() else a for a in inputs]
    expected = K.moe_experts_reference(*rounded)
    fp16_weights = K.fused_moe_experts(x, gate_up.half(), down.half(), index, weights)
    assert fp16_weights.dtype == torch.float32
    assert_close(fp16_weights, expected, TOLERANCE[torch.float16], "fp16 weights")
    # The kernels see the hidden states rounded to the weights' dtype, as `F.linear` does: bit for bit the same.
    assert torch.equal(
        fp16_weights, K.fused_moe_experts(x.half().float(), gate_up.half(), down.half(), index, weights)
    )
    with torch.autocast(DEVICE.type, dtype=torch.float16):  # both weights cast to fp16: the same again
        out = K.fused_moe_experts(*inputs)
        assert torch.equal(out, K.fused_moe_experts(x.half().float(), gate_up, down, index, weights))
    assert torch.equal(out, fp16_weights)
    assert out.dtype == torch.float32
    assert_close(out, expected, TOLERANCE[torch.float16], "fp16 autocast")


def test_inconsistent_shapes_are_refused_before_any_kernel_runs():
    """The kernels index with the shapes unchecked: a mismatch must not reach them (it wrote out of bounds)."""
    x, gate_up, down = torch.randn(6, 32), torch.randn(4, 32, 32), torch.randn(4, 32, 16)
    index, weights = torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    wrong = {
        "3D hidden states": (x.view(2, 3, 32), gate_up, down, index, weights),
        "fewer hidden rows than routed tokens": (x[:4], gate_up, down, index, weights),
        "another hidden size": (torch.randn(6, 16), gate_up, down, index, weights),
        "down_proj of another width": (x, gate_up, torch.randn(4, 32, 8), index, weights),
        "weights of another shape than the index": (x, gate_up, down, index, weights[:, :1]),
        "an odd gate_up width": (x, torch.randn(4, 33, 32), down, index, weights),
    }
    for inputs in wrong.values():
        with pytest.raises(ValueError, match=r"fused_moe_experts takes hidden_states \[T, H\]"):
            K.fused_moe_experts(*inputs)


def small_trainable_case(num_tokens: int) -> list[torch.Tensor]:
    """fp32 inputs of a small case in which every tensor but the indices requires grad."""
    case = dict(
        num_tokens=num_tokens, hidden=16, inter=16, num_experts=3, top_k=2, num_used=3, sentinel_rate=0.0,
        layout="contiguous", trainable="all", seed=0,
    )  # fmt: skip
    return build_case(case, torch.float32, DEVICE)[0]


def test_second_order_gradients_are_refused_not_zero():
    """Also for a loss linear in the output (a gradient penalty's), whose output gradient has no graph of its own."""
    inputs = small_trainable_case(num_tokens=5)
    for loss in (lambda out: out.square().sum(), lambda out: out.sum()):
        with pytest.raises(RuntimeError, match="no second-order gradients"):
            torch.autograd.grad(loss(K.fused_moe_experts(*inputs)), inputs[0], create_graph=True)


def test_inference_keeps_no_buffer_for_a_backward(monkeypatch):
    """Weights that require grad (as `from_pretrained` leaves them) under no_grad: nothing is saved for backward."""
    kept = []
    forward = fused_moe_module._forward_impl

    def recording_forward(*args):
        kept.append(args[-1])
        return forward(*args)

    monkeypatch.setattr(fused_moe_module, "_forward_impl", recording_forward)
    inputs = small_trainable_case(num_tokens=13)  # enough tokens for the grouped kernels, not the decode ones
    with torch.no_grad():
        K.fused_moe_experts(*inputs)
    with torch.inference_mode():
        K.fused_moe_experts(*inputs)
    K.fused_moe_experts(*inputs)
    assert kept == [False, False, True]


def test_fullgraph_compile():
    """Under `torch.compile(fullgraph=True)` the kernels are opaque custom ops: same outputs and gradients."""
    case = dict(
        num_tokens=12, hidden=40, inter=24, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.2,
        layout="contiguous", trainable="all", seed=7,
    )  # fmt: skip
    inputs, grad_out = build_case(case, torch.float32, DEVICE)
    compiled = torch.compile(K.fused_moe_experts, backend="aot_eager", fullgraph=True)
    out, grads = outputs_and_grads(compiled, inputs, grad_out)
    ref_out, ref_grads = outputs_and_grads(K.fused_moe_experts, inputs, grad_out)
    for name, a, b in zip(("output", "hidden", "gate_up", "down", "routing"), [out, *grads], [ref_out, *ref_grads], strict=True):  # fmt: skip
        assert_close(a, b, 1e-6, name)
    x, gate_up, down, index, weights = inputs
    one_token = (x[:1], gate_up, down, index[:1], weights[:1])
    with torch.no_grad():  # the decode op
        assert_close(compiled(*one_token), K.fused_moe_experts(*one_token), 1e-6, "decode")


def test_calls_make_no_import_system_lookup(monkeypatch):
    """torch 2.11's compiler refuses to trace `importlib.util.find_spec`, so a per-call lookup for Triton broke every
    fullgraph compile of a model on these kernels there (seen on an H200); Triton's presence is looked up at import."""

    def refuse(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec called per call")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    case = dict(
        num_tokens=3, hidden=16, inter=16, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.0,
        layout="contiguous", trainable="none", seed=0,
    )  # fmt: skip
    inputs, _ = build_case(case, torch.float32, DEVICE)
    assert_close(K.fused_moe_experts(*inputs), K.moe_experts_reference(*upcast(inputs)), 1e-4, "output")


@pytest.mark.parametrize("variant", ["fp32", "fp16", "transposed", "hidden_differs_from_inter"])
def test_custom_ops_fake_kernels_match_the_real_ones(variant):
    """`torch.library.opcheck`: each op's schema holds and its fake kernel gives the real outputs' shapes, dtypes and
    strides (what compiled graphs are built from), also in fp16 (outputs and gradients in their inputs' dtypes; the
    decode op's fp32 output beside fp16 weights), for transposed weights (their gradients are new contiguous
    tensors) and for H != I. opcheck's eager-vs-AOT comparison is left out: the kept pre-activation buffer's rows past
    `offsets[E]` (sentinel pairs) are never written, nor read by the backward, so two runs differ there
    (uninitialised memory) while every row the backward reads is equal."""
    case = dict(
        num_tokens=6, hidden=16, inter=24 if variant == "hidden_differs_from_inter" else 16, num_experts=3, top_k=2,
        num_used=3, sentinel_rate=0.2, layout="transposed" if variant == "transposed" else "contiguous",
        trainable="none", seed=8,
    )  # fmt: skip
    dtype = torch.float16 if variant == "fp16" else torch.float32
    (x, gate_up, down, index, weights), grad_out = build_case(case, dtype, DEVICE)
    routing = weights.reshape(-1)
    checks = dict(test_utils=("test_schema", "test_faketensor"))
    for keep in (True, False):
        torch.library.opcheck(
            torch.ops.deeptalk_hf.moe_experts_forward, (x, gate_up, down, index, routing, keep), **checks
        )
    _, kept, sorted_pairs, offsets = fused_moe_module._forward_impl(x, gate_up, down, index, routing, True)
    backward_args = (grad_out, x, gate_up, down, routing, sorted_pairs, offsets, kept, 2)
    for needs in [(True, True, True, True), (True, False, False, True)]:
        torch.library.opcheck(torch.ops.deeptalk_hf.moe_experts_backward, (*backward_args, *needs), **checks)
    decode_args = (x[:1], gate_up, down, index[:1], weights[:1], torch.float32)
    torch.library.opcheck(torch.ops.deeptalk_hf.moe_experts_decode, decode_args, **checks)


def test_a_model_with_swish_experts_runs_on_the_kernels():
    """transformers spells SiLU "swish" too (`ACT2FN` gives `nn.SiLU` for it, `SiLUActivation` for "silu"): a model
    the backend is the default for, so it must run on the kernels and match eager."""
    config = tiny_config(hidden_act="swish", experts_implementation="eager")
    model = DeepTalkForCausalLM(config).to(DEVICE).eval()
    input_ids = torch.randint(0, config.vocab_size, (1, 6), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids).logits
        model.set_experts_implementation("deeptalk_triton")
        assert_close(model(input_ids).logits, expected, 1e-4, "swish logits")


def test_deeptalk_model_fullgraph_compile():
    """DeepTalk's hard routing compiles with `fullgraph=True` on this backend too, as on grouped_mm and batched_mm."""
    model = DeepTalkForCausalLM(tiny_config(experts_implementation="deeptalk_triton")).to(DEVICE).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 6), device=DEVICE)
    assert (input_ids >= model.config.speech_token_start).any()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(input_ids).logits, model(input_ids).logits, 1e-6, "logits")


def test_sort_by_expert():
    index = torch.tensor([[2, 0], [3, 2], [0, 3], [1, 2]])  # 3 is the sentinel for E = 3
    sorted_pairs, offsets = K.sort_by_expert(index, 3)
    assert sorted_pairs.tolist()[:6] == [1, 4, 6, 0, 3, 7]  # experts 0, 0, 1, 2, 2, 2 in token order
    assert sorted(sorted_pairs.tolist()[6:]) == [2, 5]  # the sentinel slots, past offsets[E]
    assert offsets.tolist() == [0, 2, 3, 6]
    assert sorted_pairs.dtype == offsets.dtype == torch.int32


@pytest.mark.parametrize("kernel", ["_scatter_kernel", "_down_backward_kernel"])
def test_autotuning_runs_do_not_add_up(kernel, monkeypatch):
    """On a GPU the autotuner runs every candidate config, several times, on the call's own buffers before the chosen
    one: the kernels that add into their output atomically must have it zeroed before each run (`reset_to_zero`).
    The interpreter has one config and never benchmarks; here two configs and a benchmark that runs each twice."""
    kernel = getattr(triton_moe, kernel)
    tiles = [(16, 32, 32), (16, 64, 32)]
    monkeypatch.setattr(kernel, "configs", [triton.Config(dict(zip(triton_moe._MNK, t))) for t in tiles])
    monkeypatch.setattr(kernel, "cache", {})
    timings = itertools.cycle(range(len(tiles), 0, -1))  # configs are benchmarked in order: the last is the fastest

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        return [float(next(timings))] * len(quantiles)

    monkeypatch.setattr(kernel, "_do_bench", bench)
    case = dict(
        num_tokens=13, hidden=40, inter=24, num_experts=4, top_k=2, num_used=4, sentinel_rate=0.2,
        layout="contiguous", trainable="all", seed=13,
    )  # fmt: skip
    check_against_reference(case, torch.float32)
    assert kernel.cache and all(config.kwargs["BLOCK_N"] == tiles[-1][1] for config in kernel.cache.values())


@pytest.mark.parametrize(
    "kernel", ["_gate_up_kernel", "_scatter_kernel", "_down_backward_kernel", "_expert_grad_kernel"]
)
def test_autotuning_key_names_every_variant_flag(kernel):
    """A flag that picks a kernel's variant (which outputs it writes, atomics or stores, which operand is gathered)
    changes its best tile, so it must be in the key: else the rare down-only backward reuses the full one's tile."""
    kernel = getattr(triton_moe, kernel)
    shape_fixed = {"TOP_K", "NUM_EXPERTS", "E_POW2", *triton_moe._MNK}  # PRECISION: fp32's follows torch's setting
    params = inspect.signature(kernel.fn.fn).parameters.values()  # the Python function, compiled or interpreted
    flags = {param.name for param in params if param.annotation is triton.language.constexpr} - shape_fixed
    assert flags and flags <= set(kernel.keys)


def test_fp32_products_follow_torch_matmul_precision():
    """fp32 products are exact (IEEE) under torch's default matmul precision and TF32 only where the user allows it
    (`torch.set_float32_matmul_precision`); the interpreter ignores the kernels' `input_precision`, so the choice is
    checked where it is made. fp16 keeps the backend's default."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_moe._precision(torch.float32) == "ieee"
        for allowed in ("high", "medium"):
            torch.set_float32_matmul_precision(allowed)
            assert triton_moe._precision(torch.float32) == "tf32"
        assert triton_moe._precision(torch.float16) is None
    finally:
        torch.set_float32_matmul_precision(previous)


# --------------------------------------------------------------------------------------------------------------------
# Models: `set_experts_implementation("deeptalk_triton")` gives eager's logits and gradients.


@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_eager(name):
    check_model_matches_eager(name, DEVICE)


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
        vocab_size=32, hidden_size=16, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
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
    monkeypatch.setattr(K, "_triton_interpreting", lambda: False)  # a process started without the interpreter
    experts, *args = tiny_experts_call()
    with pytest.raises(RuntimeError, match="grouped_mm"):
        K.deeptalk_triton_experts_forward(experts, *args)
    with pytest.raises(RuntimeError, match="grouped_mm"):  # the functional form too (not Triton's driver error)
        K.fused_moe_experts(args[0], experts.gate_up_proj, experts.down_proj, *args[1:])
    # Any device but CUDA (here `meta`; xpu or mps alike) gets the same error.
    x, gate_up, down = (torch.empty(shape, device="meta") for shape in ((3, 16), (2, 32, 16), (2, 16, 16)))
    index, weights = torch.zeros(3, 1, dtype=torch.long, device="meta"), torch.ones(3, 1, device="meta")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors, got meta.*grouped_mm"):
        K.fused_moe_experts(x, gate_up, down, index, weights)


def test_interpreter_mode_changed_after_triton_was_imported_is_named(monkeypatch):
    """Triton reads TRITON_INTERPRET when imported; set later (a notebook cell), Triton failed inside a kernel."""
    experts, *args = tiny_experts_call()
    for imported_with, now in ((True, "0"), (False, "1")):
        monkeypatch.setattr(K, "_triton_interpreting", lambda: imported_with)  # noqa: B023 (called in the loop)
        monkeypatch.setenv("TRITON_INTERPRET", now)
        with pytest.raises(RuntimeError, match="when Triton was imported.*before starting Python"):
            K.deeptalk_triton_experts_forward(experts, *args)
    monkeypatch.setattr(K, "_triton_interpreting", lambda: True)
    for spelling in ("y", "Yes", "ON"):  # the variable is read as Triton reads it
        monkeypatch.setenv("TRITON_INTERPRET", spelling)
        assert K._check_interpreter_mode() is True
    for spelling in ("1", "true", "TRUE", "on", "yes", "y", "Y", "t", "2", "0", "no", "n", "off", "", " 1"):
        monkeypatch.setenv("TRITON_INTERPRET", spelling)
        assert K._interpreting() == triton.knobs.runtime.interpret, spelling
    # The mode Triton itself took, whoever imported it first (here PEFT, before deeptalk_hf), in a fresh process.
    script = """if True:
        import os, peft, torch
        os.environ["TRITON_INTERPRET"] = "1"
        from deeptalk_hf.kernels import fused_moe_experts
        try:
            fused_moe_experts(torch.randn(2, 8), torch.randn(2, 16, 8), torch.randn(2, 8, 8),
                              torch.tensor([[0], [1]]), torch.ones(2, 1))
        except RuntimeError as error:
            print(error)
    """
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert "TRITON_INTERPRET is on now but was off when Triton was imported" in done.stdout, done.stderr[-2000:]


def test_interpreter_older_than_triton_3_7_is_named(monkeypatch):
    """Triton 3.5/3.6 (pinned by torch 2.9-2.11) interpret these kernels wrongly-typed ('only 0-dimensional arrays can be
    converted to Python scalars' from inside a kernel): refused by name before any kernel runs."""
    if not K._check_interpreter_mode():
        pytest.skip("the kernels are compiled in this session")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    experts, *args = tiny_experts_call()
    with pytest.raises(RuntimeError, match="from Triton 3.7 on, found 3.6.0.*grouped_mm"):
        K.deeptalk_triton_experts_forward(experts, *args)


def test_bf16_under_the_interpreter_is_refused():
    """The interpreter's bf16 `tl.dot` is wrong (logits off by ~1 on a tiny model, silently): refused by name, as
    fp16 autocast is not."""
    experts, x, index, weights = tiny_experts_call()
    bf16 = [t.bfloat16() for t in (x, experts.gate_up_proj, experts.down_proj)]
    with pytest.raises(TypeError, match="interpreter computes bfloat16 dots wrongly"):
        K.fused_moe_experts(bf16[0], *bf16[1:], index, weights.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bfloat16 dots"):
        K.fused_moe_experts(x, experts.gate_up_proj, experts.down_proj, index, weights)
    with pytest.raises(TypeError, match="bfloat16 dots"):  # either weight
        K.fused_moe_experts(x, experts.gate_up_proj, bf16[2], index, weights)


def test_bf16_refusal_follows_the_mode_the_kernels_were_built_in(monkeypatch):
    """The interpreter also runs CUDA tensors (through host copies), where the device check that reads
    TRITON_INTERPRET is skipped: the bf16 refusal must follow the kernels' own mode, not the device or the variable."""
    if not triton_moe._INTERPRET:
        pytest.skip("the kernels are compiled in this session")
    monkeypatch.delenv("TRITON_INTERPRET")  # as a CUDA call sees it: nothing else reads the variable on its way
    experts, x, index, weights = tiny_experts_call()
    bf16 = [t.bfloat16() for t in (x, experts.gate_up_proj, experts.down_proj, weights)]
    with pytest.raises(TypeError, match="bfloat16 dots"):
        fused_moe_module.fused_moe_experts(*bf16[:3], index, bf16[3])


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
    del experts.act_fn  # a function other than `F.silu` (which LFM2-MoE's experts hold as `act_fn`)
    experts.act_fn = torch.nn.functional.gelu
    with pytest.raises(NotImplementedError, match="activation gelu"):
        K.deeptalk_triton_experts_forward(experts, *args)
    config = GptOssConfig(num_local_experts=2, hidden_size=8, intermediate_size=8)
    with pytest.raises(NotImplementedError, match=r"biases.*transposed.*interleaved.*_apply_gate`;") as error:
        K.deeptalk_triton_experts_forward(GptOssExperts(config), *args)
    assert "activation" not in str(error.value)  # its gate is custom: no act_fn to name
    experts, *args = tiny_experts_call()
    # A gate patched onto one module (a clamped SwiGLU, say) is honoured by transformers' backends: refused, not ignored.
    experts._apply_gate = types.MethodType(lambda self, gate_up: gate_up.chunk(2, dim=-1)[1], experts)
    with pytest.raises(NotImplementedError, match="custom `_apply_gate`"):
        K.deeptalk_triton_experts_forward(experts, *args)
    experts, *args = tiny_experts_call()
    experts.has_post_expert_norm = True  # skipping the norm would be a silent wrong result
    with pytest.raises(NotImplementedError, match=r"a post-expert norm \(has_post_expert_norm=True\)"):
        K.deeptalk_triton_experts_forward(experts, *args)


def test_triton_is_the_default_for_silu_experts_on_cuda(monkeypatch):
    """transformers spells SiLU "silu" or "swish"; other activations keep transformers' default."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(K, "is_triton_available", lambda: True)
    assert K.triton_is_default("silu") and K.triton_is_default("swish") and not K.triton_is_default("gelu")
    monkeypatch.setattr(K, "is_triton_available", lambda: False)
    assert not K.triton_is_default("silu")


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
