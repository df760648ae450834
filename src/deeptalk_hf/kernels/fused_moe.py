"""The fused experts computation as one autograd function over the Triton kernels of `triton_moe`."""

import torch

from . import triton_moe
from .routing import sort_by_expert


def use_decode_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Per-pair kernels pay one read of an expert's weights per (token, slot); grouped kernels one per distinct expert
    plus the sort and an fp32 buffer. Below ~E/4 pairs few pairs share an expert, so the per-pair kernels win."""
    return num_tokens == 1 or 0 < num_tokens * top_k <= num_experts // 4


class FusedMoEExpertsFunction(torch.autograd.Function):
    """SwiGLU experts over the grouped Triton kernels; gradients for hidden states, both weights and routing weights.

    Saved for backward: the inputs (already alive), the routing metadata and the pre-activation `gate_up` `[P, 2I]`.
    The activation `silu(gate) * up` is recomputed from it in the backward kernels, an elementwise cost that spares
    keeping a second `[P, I]` buffer.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        num_experts = gate_up_proj.shape[0]
        routing = top_k_weights.reshape(-1).contiguous()
        sorted_pairs, offsets = sort_by_expert(top_k_index, num_experts)
        keep = any(ctx.needs_input_grad)
        act, gate_up = triton_moe.gate_up_forward(hidden_states, gate_up_proj, sorted_pairs, offsets, top_k, keep)
        down_strides = (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1))  # down[e] as [I, H]
        out = triton_moe.scatter_to_tokens(
            act, down_proj, down_strides, routing, sorted_pairs, offsets, num_tokens, top_k, down_proj.shape[1]
        )
        ctx.save_for_backward(hidden_states, gate_up_proj, down_proj, routing, sorted_pairs, offsets, gate_up)
        ctx.top_k = top_k
        return out.to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden_states, gate_up_proj, down_proj, routing, sorted_pairs, offsets, gate_up = ctx.saved_tensors
        need_x, need_gate_up, need_down, _, need_routing = ctx.needs_input_grad
        top_k = ctx.top_k
        meta = (routing, sorted_pairs, offsets, top_k)
        grad_x = grad_gate_up_proj = grad_down_proj = grad_routing = None
        if need_down:
            grad_down_proj = triton_moe.expert_grad(
                grad_out, gate_up, down_proj.shape, down_proj.dtype, *meta,
                left_by_token=True, right_by_token=False, right_swiglu=True,
            )  # fmt: skip
        if need_x or need_gate_up or need_routing:
            grad_gu, grad_w = triton_moe.down_backward(
                grad_out, down_proj, gate_up, *meta, grad_gate_up=need_x or need_gate_up, grad_routing=need_routing
            )
            if need_routing:
                grad_routing = grad_w.to(routing.dtype).view(-1, top_k)
            if need_gate_up:
                grad_gate_up_proj = triton_moe.expert_grad(
                    grad_gu, hidden_states, gate_up_proj.shape, gate_up_proj.dtype, *meta,
                    left_by_token=False, right_by_token=True, right_swiglu=False,
                )  # fmt: skip
            if need_x:
                up_strides = (gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2))  # [2I, H]
                grad_x = triton_moe.scatter_to_tokens(
                    grad_gu, gate_up_proj, up_strides, None, sorted_pairs, offsets,
                    hidden_states.shape[0], top_k, hidden_states.shape[1],
                ).to(hidden_states.dtype)  # fmt: skip
        return grad_x, grad_gate_up_proj, grad_down_proj, None, grad_routing


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
    num_tokens, top_k = top_k_index.shape
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        # Like `F.linear` in the eager experts: products in the autocast dtype, gradients back to the weights' dtype.
        dtype = torch.get_autocast_dtype(device_type)
        gate_up_proj, down_proj = gate_up_proj.to(dtype), down_proj.to(dtype)
    x = hidden_states.to(gate_up_proj.dtype)
    tensors = (hidden_states, gate_up_proj, down_proj, top_k_weights)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad and use_decode_path(num_tokens, top_k, gate_up_proj.shape[0]):
        return triton_moe.decode_forward(x, gate_up_proj, down_proj, top_k_index, top_k_weights, hidden_states.dtype)
    return FusedMoEExpertsFunction.apply(x, gate_up_proj, down_proj, top_k_index, top_k_weights).to(
        hidden_states.dtype
    )
