"""Fused Triton grouped-GEMM kernels for SwiGLU experts, exposed as transformers' `"deeptalk_triton"` experts backend.

`register_experts_implementation()` (called by `import deeptalk_hf`) adds `"deeptalk_triton"` to transformers'
`ExpertsInterface`, so `from_pretrained(..., experts_implementation="deeptalk_triton")` and
`model.set_experts_implementation("deeptalk_triton")` work for DeepTalk and for transformers' own MoE models (any
experts module in the common layout: gated, concatenated `[gate; up]`, not transposed, no bias, no post-expert norm,
SiLU). This module imports without Triton; the kernels load on first use.
"""

import importlib.util
import os
import types

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from .reference import moe_experts_reference
from .routing import sort_by_expert

EXPERTS_IMPLEMENTATION = "deeptalk_triton"


# Looked up once: `torch.compile` refuses to trace `importlib.util.find_spec` (torch 2.11 fails a fullgraph compile of
# any model running these kernels on it), and whether Triton is installed does not change while Python runs.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def is_triton_available() -> bool:
    """Whether Triton can be imported (it is a Linux-only dependency)."""
    return _TRITON_FOUND


def _interpreting() -> bool:
    """TRITON_INTERPRET now, read as Triton reads it (its `getenv_bool`, a C++ function compiled code cannot trace)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def _triton_interpreting() -> bool:
    """The mode Triton runs in: it reads TRITON_INTERPRET when it is imported (by whoever imports it first:
    transformers, PEFT, torch's compiler or these kernels), making its own `@jit` library functions interpreted or not."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sigmoid, InterpretedFunction)


def _check_interpreter_mode() -> bool:
    """Whether the kernels run in Triton's interpreter; a clear error where TRITON_INTERPRET changed after Triton was
    imported (Triton then fails inside a kernel)."""
    interpreting, imported_with = _interpreting(), _triton_interpreting()
    if interpreting != imported_with:
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if interpreting else 'off'} now but was {'on' if imported_with else 'off'} "
            "when Triton was imported, which is when Triton reads it: set it before starting Python (before importing "
            "deeptalk_hf, transformers or PEFT)"
        )
    if interpreting:
        import triton
        from packaging.version import Version

        if Version(triton.__version__).release < (3, 7):
            raise RuntimeError(
                f"Triton's interpreter (TRITON_INTERPRET=1) runs these kernels from Triton 3.7 on, found "
                f"{triton.__version__} (older interpreters fail on loops bounded by runtime integers): upgrade Triton, "
                "or use experts_implementation='grouped_mm' on CPU"
            )
    return interpreting


def _unsupported_features(experts: nn.Module) -> list[str]:
    """What, if anything, keeps an experts module off the kernels (they implement one layout)."""
    # Read from the module, not its class: a gate patched onto one module (a bound method) is the module's gate too.
    gate = getattr(experts, "_apply_gate", _default_apply_gate)
    # Not `getattr(gate, "__func__", gate)`: torch 2.15's dynamo takes the default there, so a compiled model's
    # default gate read as custom and `fullgraph=True` failed.
    custom_gate = (gate.__func__ if isinstance(gate, types.MethodType) else gate) is not _default_apply_gate
    act_fn = getattr(experts, "act_fn", None)
    # Most experts hold an activation module; some (LFM2-MoE) hold the function `F.silu` itself.
    silu = isinstance(act_fn, (SiLUActivation, nn.SiLU)) or act_fn is nn.functional.silu
    act_name = getattr(act_fn, "__name__", None) or type(act_fn).__name__
    checks = {
        "no gate (has_gate=False)": not getattr(experts, "has_gate", True),
        "biases (has_bias=True)": getattr(experts, "has_bias", False),
        "transposed weights (is_transposed=True)": getattr(experts, "is_transposed", False),
        "interleaved gate/up rows (is_concatenated=False)": not getattr(experts, "is_concatenated", True),
        "a post-expert norm (has_post_expert_norm=True)": getattr(experts, "has_post_expert_norm", False),
        "a custom `_apply_gate`": custom_gate,
        # A custom gate replaces the default's use of `act_fn` (which such modules often lack): named once, above.
        f"activation {act_name} (only SiLU)": not custom_gate and not silu,
    }
    return [feature for feature, unsupported in checks.items() if unsupported]


def deeptalk_triton_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The `"deeptalk_triton"` experts forward: `self` holds `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]`.

    Raises rather than falling back when it cannot run: a silent fallback would hide a slow path behind the name of
    the fast one (and make benchmarks lie); the error says which backend to pick instead.
    """
    unsupported = _unsupported_features(self)
    if unsupported:
        raise NotImplementedError(
            f"experts_implementation='deeptalk_triton' does not support {type(self).__name__} with "
            f"{', '.join(unsupported)}; use experts_implementation='grouped_mm' for this model."
        )
    return fused_moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)


def triton_is_default(hidden_act: str) -> bool:
    """Whether a DeepTalk model defaults to `"deeptalk_triton"`: CUDA is present, Triton is installed, SiLU experts."""
    return hidden_act in ("silu", "swish") and torch.cuda.is_available() and is_triton_available()


def register_experts_implementation() -> None:
    """Make `"deeptalk_triton"` a valid `experts_implementation` for every model using transformers' interface."""
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, deeptalk_triton_experts_forward)


def fused_moe_experts(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Functional form of the kernels (see `fused_moe.fused_moe_experts`); imports Triton on first call, and raises
    (pointing to `grouped_mm`) where the kernels cannot run."""
    if not is_triton_available():
        raise ImportError(
            "experts_implementation='deeptalk_triton' needs Triton (`pip install triton`, Linux only); "
            "use experts_implementation='grouped_mm' instead."
        )
    if hidden_states.device.type != "cuda" and not _check_interpreter_mode():
        raise RuntimeError(
            f"experts_implementation='deeptalk_triton' runs on CUDA tensors, got {hidden_states.device.type}: move "
            "the model to a GPU, or call `model.set_experts_implementation('grouped_mm')` (or pass "
            "`experts_implementation='grouped_mm'` to `from_pretrained`) to run on this device. TRITON_INTERPRET=1, "
            "set before Triton is imported (before starting Python), runs the kernels on CPU through Triton's (slow) "
            "interpreter, for testing."
        )
    from .fused_moe import fused_moe_experts as run

    return run(hidden_states, gate_up_proj, down_proj, top_k_index, top_k_weights)


__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "deeptalk_triton_experts_forward",
    "fused_moe_experts",
    "is_triton_available",
    "moe_experts_reference",
    "register_experts_implementation",
    "sort_by_expert",
    "triton_is_default",
]
