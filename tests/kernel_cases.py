"""Shared helpers of the kernel tests (CPU/interpreter and GPU): cases, non-contiguous layouts, comparisons."""

import torch
from transformers import (
    Lfm2MoeConfig,
    Lfm2MoeForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item() if expected.numel() else 0.0


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, baseline: torch.Tensor | None = None
) -> None:
    """Error within `tol` of the largest expected magnitude, or (with `baseline`, the same computation by another
    backend in the same dtype) at most twice the baseline's: a sum that cancels loses more than `tol` of its own size
    in any low-precision backend."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error, allowed = max_error(actual, expected), tol * max(scale, 1e-6)
    if baseline is not None and error > allowed:
        allowed = 2 * max_error(baseline, expected)
        what = f"{what} (twice the same-dtype baseline's error {allowed / 2:.3e})"
    assert error <= allowed, f"{what}: max error {error:.3e} > {tol:.0e} x max |expected| {scale:.3e}"


def make_routing(
    num_tokens: int, num_experts: int, top_k: int, num_used: int, sentinel_rate: float, gen
) -> torch.Tensor:
    """`[T, k]` indices: distinct experts among the first `num_used` (leaving the others idle), spare slots and a
    random share of the rest set to the sentinel `num_experts`."""
    index = torch.full((num_tokens, top_k), num_experts, dtype=torch.long)
    real = min(top_k, num_used)
    for t in range(num_tokens):
        index[t, :real] = torch.randperm(num_used, generator=gen)[:real]
    index[torch.rand(num_tokens, top_k, generator=gen) < sentinel_rate] = num_experts
    return index


def strided(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout: every other column of a wider buffer, a transposed buffer, or
    ("padded") the corner of a buffer one longer in every dimension whose spare elements are NaN (integers: 0), so a
    read past the end of any dimension poisons the result even where the value read is multiplied by a masked 0."""
    if layout == "padded":
        fill = float("nan") if tensor.is_floating_point() else 0
        wide = torch.full([n + 1 for n in tensor.shape], fill, dtype=tensor.dtype, device=tensor.device)
        corner = wide[tuple(slice(0, n) for n in tensor.shape)]
        corner.copy_(tensor)
        return corner
    if layout == "sliced":
        wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype, device=tensor.device)
        wide[..., ::2] = tensor
        return wide[..., ::2]
    return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)


def build_case(case: dict, dtype: torch.dtype, device: torch.device):
    """`((x, gate_up_proj, down_proj, top_k_index, top_k_weights), grad_out)` for a case dict; `trainable` says
    which inputs require grad."""
    gen = torch.Generator().manual_seed(case["seed"])
    t, h, i, e, k = (case[n] for n in ("num_tokens", "hidden", "inter", "num_experts", "top_k"))
    x = torch.randn(t, h, generator=gen)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    index = make_routing(t, e, k, case["num_used"], case["sentinel_rate"], gen)
    weights = torch.rand(t, k, generator=gen)
    grad_out = torch.randn(t, h, generator=gen)
    tensors = [x, gate_up, down, index, weights, grad_out]
    tensors = [a.to(device, dtype if a.is_floating_point() else a.dtype) for a in tensors]
    if case["layout"] != "contiguous":
        tensors = [strided(a, case["layout"]) for a in tensors]
    x, gate_up, down, index, weights, grad_out = tensors
    trainable = {
        "all": (x, gate_up, down, weights),
        "frozen_experts": (x, weights),
        "router_only": (weights,),
        "gate_up_only": (gate_up,),
        "down_only": (down,),
        "hidden_only": (x,),
        "none": (),
    }
    for a in trainable[case["trainable"]]:
        a.requires_grad_()
    return (x, gate_up, down, index, weights), grad_out


def outputs_and_grads(fn, inputs, grad_out):
    """`fn(*inputs)` and the gradients of `<out, grad_out>` for the inputs that require grad."""
    out = fn(*inputs)
    leaves = [a for a in inputs if a.requires_grad]
    return out, list(torch.autograd.grad(out, leaves, grad_out)) if leaves else []


def upcast(inputs, dtype: torch.dtype = torch.float64):
    """High-precision leaf copies (same requires_grad) of the floating inputs: the reference's inputs."""
    return [a.detach().to(dtype).requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in inputs]


def logits_and_grads(model, input_ids):
    """Logits and every parameter gradient of a fixed linear loss on them."""
    model.zero_grad()
    logits = model(input_ids).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1], device=logits.device)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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


def tiny_lfm2_moe() -> Lfm2MoeForCausalLM:
    # Its experts hold the function `F.silu` as `act_fn`, not an activation module.
    config = Lfm2MoeConfig(
        vocab_size=48, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, num_dense_layers=0,
        layer_types=["conv", "full_attention"],
    )  # fmt: skip
    return Lfm2MoeForCausalLM(config)


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
    "lfm2_moe": tiny_lfm2_moe,
    "deeptalk_hard": lambda: tiny_deeptalk("hard"),
    "deeptalk_none": lambda: tiny_deeptalk("none"),
}


def check_model_matches_eager(name: str, device: torch.device, tol: float = 1e-4) -> None:
    """fp32 logits and all parameter gradients of `MODELS[name]` with `deeptalk_triton` equal eager's."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    model.set_experts_implementation("eager")
    vocab = model.config.vocab_size
    # A mixed batch: DeepTalk's speech block is the last 16 ids, so each row holds text and speech tokens.
    input_ids = torch.cat([torch.randint(0, vocab - 16, (2, 4)), torch.randint(vocab - 16, vocab, (2, 3))], 1)
    input_ids = input_ids.to(device)
    eager_logits, eager_grads = logits_and_grads(model, input_ids)
    model.set_experts_implementation("deeptalk_triton")
    assert model.config._experts_implementation == "deeptalk_triton"
    logits, grads = logits_and_grads(model, input_ids)
    assert_close(logits, eager_logits, tol, "logits")
    assert grads.keys() == eager_grads.keys()
    assert any("experts.gate_up_proj" in n for n in grads)
    for n in grads:
        assert_close(grads[n], eager_grads[n], tol, n)
