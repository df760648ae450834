"""Plain torch reference for the experts computation: the independent oracle the Triton kernels are tested against.

It takes a different road from every backend (no sorting, no gather, no per-expert loop): all experts run on all
tokens and a dense `[T, E]` combine matrix built from the routing picks the results. That is wasteful but short enough
to check by eye, and autograd gives every gradient, including the routing weights'. It computes in the dtype it is
given, so tests pass float32/float64 copies to get a high-precision answer.
"""

import torch
import torch.nn.functional as F


def moe_experts_reference(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """`out[t] = sum_j w[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t]))` with `e = top_k_index[t, j]`.

    Shapes: `hidden_states` `[T, H]`, `gate_up_proj` `[E, 2I, H]` (gate rows first), `down_proj` `[E, H, I]`,
    `top_k_index`/`top_k_weights` `[T, k]`. An index equal to `E` is a skipped slot (no output, no gradient).
    """
    num_experts = gate_up_proj.shape[0]
    # [T, E + 1]: the routing weight of each (token, expert); the sentinel column is dropped.
    combine = torch.einsum("tk,tke->te", top_k_weights, F.one_hot(top_k_index, num_experts + 1).to(top_k_weights))
    gate, up = torch.einsum("th,eih->eti", hidden_states, gate_up_proj).chunk(2, dim=-1)
    expert_out = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down_proj)
    return torch.einsum("te,eth->th", combine[:, :num_experts].to(expert_out), expert_out)
