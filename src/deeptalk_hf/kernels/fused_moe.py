"""The fused experts computation as one autograd function over the Triton kernels of `triton_moe`."""

import torch

from . import triton_moe
from .routing import sort_by_expert


def use_decode_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Per-pair kernels pay one read of an expert's weights per (token, slot); grouped kernels one per distinct expert
    plus the sort and an fp32 buffer. Below ~E/4 pairs few pairs share an expert, so the per-pair kernels win."""
    return num_tokens == 1 or 0 < num_tokens * top_k <= num_experts // 4


# The kernels run inside `torch.library` custom ops while `torch.compile` traces, so that compiled graphs (fullgraph
# included, e.g. generation with a static cache) hold them as opaque nodes with known output shapes; eager calls go
# straight to the same Python functions and skip the op dispatch (~10 us a call).


def _forward_impl(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    routing: torch.Tensor,
    keep_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped forward: `(out, gate_up [P, 2I] (empty unless kept), sorted_pairs, offsets)`."""
    num_tokens, top_k = top_k_index.shape
    sorted_pairs, offsets = sort_by_expert(top_k_index, gate_up_proj.shape[0])
    act, gate_up = triton_moe.gate_up_forward(x, gate_up_proj, sorted_pairs, offsets, top_k, keep_gate_up)
    down_strides = (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1))  # down[e] as [I, H]
    out = triton_moe.scatter_to_tokens(
        act, down_proj, down_strides, routing, sorted_pairs, offsets, num_tokens, top_k, down_proj.shape[1]
    )
    gate_up = gate_up if keep_gate_up else act.new_empty(0, gate_up_proj.shape[1])
    return out.to(x.dtype), gate_up, sorted_pairs, offsets


def _forward_fake(x, gate_up_proj, down_proj, top_k_index, routing, keep_gate_up):
    num_pairs = top_k_index.numel()
    return (
        x.new_empty(x.shape[0], down_proj.shape[1]),
        x.new_empty(num_pairs if keep_gate_up else 0, gate_up_proj.shape[1], dtype=gate_up_proj.dtype),
        top_k_index.new_empty(num_pairs, dtype=torch.int32),
        top_k_index.new_empty(gate_up_proj.shape[0] + 1, dtype=torch.int32),
    )


def _backward_impl(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    routing: torch.Tensor,
    sorted_pairs: torch.Tensor,
    offsets: torch.Tensor,
    gate_up: torch.Tensor,
    top_k: int,
    need_x: bool,
    need_gate_up: bool,
    need_down: bool,
    need_routing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(grad_x, grad_gate_up_proj, grad_down_proj, grad_routing [P])`, each empty when not needed."""
    meta = (sorted_pairs, offsets, top_k)
    grad_x, grad_gate_up_proj, grad_down_proj, grad_routing = (x.new_empty(0) for _ in range(4))
    if need_x or need_gate_up or need_routing or need_down:
        grad_gu, grad_w, weighted_act = triton_moe.down_backward(
            grad_out, down_proj, gate_up, routing, *meta,
            grad_gate_up=need_x or need_gate_up, grad_routing=need_routing, weighted_act=need_down,
        )  # fmt: skip
        if need_down:
            grad_down_proj = triton_moe.expert_grad(
                grad_out,
                weighted_act,
                down_proj.shape,
                down_proj.dtype,
                *meta,
                left_by_token=True,
                right_by_token=False,
            )
            del weighted_act  # [P, I]: freed before the next weight gradient
        if need_routing:
            grad_routing = grad_w.to(routing.dtype)
        if need_gate_up:
            grad_gate_up_proj = triton_moe.expert_grad(
                grad_gu, x, gate_up_proj.shape, gate_up_proj.dtype, *meta, left_by_token=False, right_by_token=True
            )
        if need_x:
            up_strides = (gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2))  # [2I, H]
            grad_x = triton_moe.scatter_to_tokens(
                grad_gu, gate_up_proj, up_strides, None, sorted_pairs, offsets, x.shape[0], top_k, x.shape[1]
            ).to(x.dtype)
    return grad_x, grad_gate_up_proj, grad_down_proj, grad_routing


def _backward_fake(grad_out, x, gate_up_proj, down_proj, routing, sorted_pairs, offsets, gate_up, top_k, *needs):
    return tuple(
        torch.empty_like(like, memory_format=torch.contiguous_format) if need else x.new_empty(0)
        for like, need in zip((x, gate_up_proj, down_proj, routing), needs, strict=True)
    )


def _decode_fake(x, gate_up_proj, down_proj, top_k_index, top_k_weights, out_dtype):
    return x.new_empty(x.shape[0], down_proj.shape[1], dtype=out_dtype)


def _custom_op(name: str, impl, fake):
    """Register `impl` as `deeptalk_hf::<name>` (schema from its type hints) with `fake` for shape propagation."""
    op = torch.library.custom_op(f"deeptalk_hf::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


_OPS = {
    _forward_impl: _custom_op("moe_experts_forward", _forward_impl, _forward_fake),
    _backward_impl: _custom_op("moe_experts_backward", _backward_impl, _backward_fake),
    triton_moe.decode_forward: _custom_op("moe_experts_decode", triton_moe.decode_forward, _decode_fake),
}


def _run(impl, *args):
    """Call `impl` directly, or through its custom op while `torch.compile` traces."""
    return _OPS[impl](*args) if torch.compiler.is_compiling() else impl(*args)


class FusedMoEExpertsFunction(torch.autograd.Function):
    """SwiGLU experts over the grouped Triton kernels; gradients for hidden states, both weights and routing weights.

    Saved for backward: the inputs (already alive), the routing metadata and the pre-activation `gate_up` `[P, 2I]`.
    The activation `silu(gate) * up` is recomputed from it in the down projection's backward kernel (an elementwise
    cost that spares keeping a second `[P, I]` buffer between forward and backward), which writes it weighted by the
    routing weights for the down projection's gradient: a transient `[P, I]` buffer, freed before the next gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        keep: bool,
    ) -> torch.Tensor:
        routing = top_k_weights.reshape(-1).contiguous()
        out, gate_up, sorted_pairs, offsets = _run(
            _forward_impl, hidden_states, gate_up_proj, down_proj, top_k_index, routing, keep
        )
        ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, routing, sorted_pairs, offsets, gate_up)
        ctx.top_k = top_k_index.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # No second-order gradients: refused, not silently zero. (`once_differentiable` refuses only where `grad_out`
        # has a graph, so a loss linear in the output, as a gradient penalty's, got first-order gradients alone.)
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError(
                "deeptalk_triton has no second-order gradients (a backward with create_graph=True, e.g. a gradient "
                "penalty): use experts_implementation='eager' or 'grouped_mm'"
            )
        need_x, need_gate_up, need_down, _, need_routing, _ = ctx.needs_input_grad
        needs = (need_x, need_gate_up, need_down, need_routing)
        grads = _run(_backward_impl, grad_out, *ctx.saved_tensors, ctx.top_k, *needs)
        grad_x, grad_gate_up_proj, grad_down_proj, grad_routing = (
            grad if need else None for grad, need in zip(grads, needs, strict=True)
        )
        if grad_routing is not None:
            grad_routing = grad_routing.view(-1, ctx.top_k)
        return grad_x, grad_gate_up_proj, grad_down_proj, None, grad_routing, None


def fused_moe_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU Mixture-of-Experts over Triton kernels: `sum_j w[t, j] * down[e] @ (silu(gate[e] x_t) * up[e] x_t)`.

    `hidden_states` `[T, H]`, `gate_up_proj` `[E, 2I, H]` (gate rows first), `down_proj` `[E, H, I]`,
    `top_k_index`/`top_k_weights` `[T, k]`; index `E` marks a skipped slot. Computes in the weights' dtype (the
    autocast dtype under autocast) with fp32 accumulation and returns `hidden_states`' dtype. Differentiable in
    everything but the indices.
    """
    _check_shapes(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)
    num_tokens, top_k = top_k_index.shape
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        # Like `F.linear` in the eager experts: products in the autocast dtype, gradients back to the weights' dtype.
        dtype = torch.get_autocast_dtype(device_type)
        gate_up_proj, down_proj = gate_up_proj.to(dtype), down_proj.to(dtype)
    for name, weight in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # e.g. float64: no tl.dot for it
            raise TypeError(
                f"fused_moe_experts computes in float32, float16 or bfloat16, but {name} is {weight.dtype}: use the "
                "eager experts backend"
            )
    # The kernels' build mode, a constant: compiled graphs read no environment.
    if torch.bfloat16 in (gate_up_proj.dtype, down_proj.dtype) and triton_moe._INTERPRET:
        raise TypeError(
            "Triton's interpreter computes bfloat16 dots wrongly (a known Triton limit): run the kernels in bfloat16 on "
            "a GPU, and test them under TRITON_INTERPRET=1 in float32 or float16"
        )
    x = hidden_states.to(gate_up_proj.dtype)
    tensors = (hidden_states, gate_up_proj, down_proj, top_k_weights)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad and use_decode_path(num_tokens, top_k, gate_up_proj.shape[0]):
        return _run(
            triton_moe.decode_forward, x, gate_up_proj, down_proj, top_k_index, top_k_weights, hidden_states.dtype
        )
    # `keep`: the pre-activation buffer is written and saved only for a backward (not under no_grad/inference).
    return FusedMoEExpertsFunction.apply(x, gate_up_proj, down_proj, top_k_index, top_k_weights, needs_grad).to(
        hidden_states.dtype
    )


def _check_shapes(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> None:
    """The kernels index with these shapes unchecked: a mismatch would read and write out of bounds."""
    given = {
        "hidden_states": hidden_states,
        "gate_up_proj": gate_up_proj,
        "down_proj": down_proj,
        "top_k_index": top_k_index,
        "top_k_weights": top_k_weights,
    }
    ranks = {"hidden_states": 2, "gate_up_proj": 3, "down_proj": 3, "top_k_index": 2, "top_k_weights": 2}
    consistent = all(given[name].dim() == rank for name, rank in ranks.items())
    if consistent:
        num_experts, double_width, hidden = gate_up_proj.shape
        consistent = (
            double_width % 2 == 0
            and tuple(down_proj.shape) == (num_experts, hidden, double_width // 2)
            and tuple(hidden_states.shape) == (top_k_index.shape[0], hidden)
            and top_k_weights.shape == top_k_index.shape
        )
    if not consistent:
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in given.items())
        raise ValueError(
            "fused_moe_experts takes hidden_states [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], top_k_index "
            f"and top_k_weights [T, k]; got {shapes}"
        )
