"""Routing metadata for the grouped kernels: the (token, slot) pairs sorted by expert and each expert's row range.

Scatter-style rather than block-aligned. The metadata is the stable sort of the `T*k` flattened expert ids
(`sorted_pairs`, exactly `T*k` entries) and `expert_offsets` (`E + 1` entries, expert `e` owns sorted rows
`[offsets[e], offsets[e+1])`). Each GEMM program maps its row-tile id to an expert from these offsets itself, for
whatever `BLOCK_M` its autotuned config uses. A block-aligned layout (vLLM's `moe_align_block_size`) would fix
`BLOCK_M` before the config is chosen, pad every expert to a multiple of it (up to `E * (BLOCK_M - 1)` dead rows that
each kernel must mask) and need one metadata pass per block size; here forward and backward kernels with different
tile shapes share one cheap metadata. Sentinel slots (index `E`) sort to the tail, past `offsets[E]`, so no kernel
ever reads them. Everything stays on the device: `torch.sort` and `torch.searchsorted` have static output sizes, so
nothing waits for the host. The stable sort keeps each expert's tokens in order, which keeps the row gathers local.
"""

import torch


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sorted_pairs, expert_offsets)`, both int32: flat pair ids `t * k + j` grouped by expert, and row offsets.

    Indices must lie in `[0, num_experts]`; `num_experts` marks a skipped slot.
    """
    expert_ids = top_k_index.reshape(-1)
    sorted_experts, sorted_pairs = torch.sort(expert_ids, stable=True)
    boundaries = torch.arange(num_experts + 1, device=expert_ids.device, dtype=sorted_experts.dtype)
    expert_offsets = torch.searchsorted(sorted_experts, boundaries)
    return sorted_pairs.to(torch.int32), expert_offsets.to(torch.int32)
