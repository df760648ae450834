"""Every transformers experts class behind `@use_experts_implementation` against the table in docs/kernels.md.

The table ("Transformers models checked") says, per model family, whether `deeptalk_triton` gives eager's results or
refuses the family with a `NotImplementedError`. This file reads the table itself and checks each family's experts
module alone (fp32, T=7 tokens, hidden 32, 6 experts, top-2; Triton's interpreter without CUDA), so the doc and the
backend cannot drift apart. Families come from the installed transformers: one found there but not in the table is
skipped with a reason (a new transformers release is a doc update, not a CI failure), and so is one in the table that
this transformers lacks.
"""

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import transformers  # noqa: E402
from huggingface_hub.errors import StrictDataclassError  # noqa: E402
from transformers.configuration_utils import PreTrainedConfig  # noqa: E402

import deeptalk_hf  # noqa: E402,F401  (registers the `deeptalk_triton` experts backend)

from .kernel_cases import assert_close  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
MODELS_DIR = Path(transformers.__file__).parent / "models"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = 1e-4  # fp32, relative to the largest expected magnitude (as in test_kernels.py)
NUM_TOKENS, TOP_K = 7, 2
# Sizes for the config attributes an experts `__init__` reads; the other attributes keep the family's defaults (its
# activation above all).
SIZES = {
    "hidden_size": 32,
    "intermediate_size": 16,
    "moe_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "ffn_hidden_size": 16,
    "num_experts": 6,
    "num_local_experts": 6,
    "n_routed_experts": 6,
    "moe_num_experts": 6,
}
# Features the refused row names, and how the backend's message names them.
FEATURE_MESSAGES = {
    "biases": r"biases \(has_bias=True\)",
    "transposed weights": r"transposed weights \(is_transposed=True\)",
    "_apply_gate": r"custom `_apply_gate`",
    "post-expert norm": r"post-expert norm \(has_post_expert_norm=True\)",
    "no gate": r"no gate \(has_gate=False\)",
    "GELU": r"GELU",
}


def documented_outcomes() -> list[tuple[str, str | None]]:
    """(family, None: same results as eager, or the refused row's reason) per entry of the docs table. The two "same"
    rows (whole model, experts module alone) are one outcome here: this file checks the experts module of each."""
    section = DOC.read_text().split("### Transformers models checked", 1)[1].split("\n## ", 1)[0]
    outcomes: list[tuple[str, str | None]] = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("result", "---"):
            continue
        result, models = cells
        if result.startswith("refused"):
            # "a, b (reason); c (reason)": each group's families share the reason in parentheses ("" if none).
            for group in models.split(";"):
                names, reason = re.fullmatch(r"\s*([^(]+?)\s*(?:\((.+)\))?\s*", group).groups()
                outcomes.extend((name.strip(), reason or "") for name in names.split(","))
        else:
            assert result.startswith("same"), f"unknown row in {DOC.name}: {result!r}"
            # "qwen3_5_moe (text)": a note on the model, not part of the family name.
            outcomes.extend((re.sub(r"\s*\(.*\)", "", name).strip(), None) for name in models.split(","))
    return outcomes


def discovered_experts() -> dict[str, list[tuple[str, str]]]:
    """Family -> [(modeling module, experts class)] for every `@use_experts_implementation` class of the installed
    transformers, found in the source so that collection imports no model."""
    found: dict[str, list[tuple[str, str]]] = {}
    decorated = re.compile(r"^@use_experts_implementation\b(?:\([^)]*\))?\s*\nclass (\w+)", re.MULTILINE)
    for path in sorted(MODELS_DIR.glob("*/modeling_*.py")):
        for name in decorated.findall(path.read_text()):
            module = f"transformers.models.{path.parent.name}.{path.stem}"
            found.setdefault(path.parent.name, []).append((module, name))
    return found


OUTCOMES = dict(documented_outcomes())
EXPERTS = discovered_experts()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors of a few hundred elements: with two threads, torch's thread pool wakes for each tiny op, which made
    eager's loop 100x slower (0.3 s a call) on a loaded two-core runner."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cases():
    for family in sorted(EXPERTS.keys() | OUTCOMES.keys()):
        for module, name in EXPERTS.get(family, [(None, None)]):
            yield pytest.param(family, module, name, id=f"{family}.{name}" if name else family)


def config_classes(experts_class: type, module: str) -> list[type[PreTrainedConfig]]:
    """Configs to try building the experts with: the class `__init__` annotates first (not always the one the model
    passes: Qwen3-Omni's thinker experts get its text config), then the family's config classes, text configs first
    (a multimodal model's experts read its text config)."""
    annotation = inspect.signature(experts_class.__init__).parameters["config"].annotation
    configuration = importlib.import_module(module.replace(".modeling_", ".configuration_"))
    found = sorted(
        (
            c
            for c in vars(configuration).values()
            if inspect.isclass(c) and issubclass(c, PreTrainedConfig) and c.__module__ == configuration.__name__
        ),
        key=lambda c: ("Text" not in c.__name__, c.__name__),
    )
    if inspect.isclass(annotation) and issubclass(annotation, PreTrainedConfig):
        found = [annotation, *(c for c in found if c is not annotation)]
    return found


def tiny(value: object, size: int) -> object:
    """`size` in place of a default size, per entry where the config holds one per modality (ERNIE-VL's)."""
    return [size] * len(value) if isinstance(value, list) else size


def build_experts(module: str, name: str) -> torch.nn.Module:
    """A tiny fp32 experts module with random weights, or a skip saying why none could be built (a config this
    helper cannot fill is not a defect of the backend; the backend runs only later, outside this function)."""
    experts_class = getattr(importlib.import_module(module), name)
    read = set(re.findall(r"config\.(\w+)", inspect.getsource(experts_class.__init__))) & SIZES.keys()
    # Sizes the module takes as arguments (ERNIE-VL's `intermediate_size=None`, the model passes one per modality).
    arguments = {a: SIZES[a] for a in inspect.signature(experts_class.__init__).parameters if a in SIZES}
    errors = []
    for config_class in config_classes(experts_class, module):
        try:
            config = config_class()
            for attribute in read:
                # `vars`: a per-layer attribute (Gemma 4's) raises on `getattr`
                setattr(config, attribute, tiny(vars(config).get(attribute), SIZES[attribute]))
            experts = experts_class(config, **arguments)
        except (AttributeError, TypeError, ValueError, KeyError, RuntimeError, StrictDataclassError) as error:
            errors.append(f"{config_class.__name__}: {type(error).__name__}: {error}")
            continue
        with torch.no_grad():
            for parameter in experts.parameters():
                parameter.normal_(0, 0.2)
        return experts.to(DEVICE, torch.float32)
    pytest.skip(f"cannot build {name} from a default config: {'; '.join(errors)}")


def run(experts: torch.nn.Module, implementation: str, inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """Output and gradients (hidden states, routing weights, every parameter) through one experts backend."""
    experts.config._experts_implementation = implementation
    x, index, weights = inputs
    leaves = [x, weights, *experts.parameters()]
    out = experts(x, index, weights)
    return out, list(torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("family, module, name", cases())
def test_family_matches_the_docs_table(family: str, module: str | None, name: str | None) -> None:
    if family not in OUTCOMES:
        pytest.skip(f"{family}'s {name} uses @use_experts_implementation but is not in {DOC.name}'s table: add it")
    if module is None:
        pytest.skip(f"{family} is in {DOC.name}'s table but not in transformers {transformers.__version__}")
    experts = build_experts(module, name)
    hidden = experts.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_TOKENS, hidden, generator=gen).to(DEVICE).requires_grad_()
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:TOP_K] for _ in range(NUM_TOKENS)])
    weights = torch.rand(NUM_TOKENS, TOP_K, generator=gen).to(DEVICE).requires_grad_()
    grad_out = torch.randn(NUM_TOKENS, hidden, generator=gen).to(DEVICE)
    inputs = [x, index.to(DEVICE), weights]
    reason = OUTCOMES[family]
    if reason is not None:
        features = [message for feature, message in FEATURE_MESSAGES.items() if feature in reason]
        # The message names the class and the features the table gives, and points to the backend that runs it.
        pattern = rf"does not support {name} with " + "".join(f"(?=.*{m})" for m in features) + ".*grouped_mm"
        with pytest.raises(NotImplementedError, match=pattern):
            run(experts, "deeptalk_triton", inputs, grad_out)
        return
    expected, expected_grads = run(experts, "eager", inputs, grad_out)
    out, grads = run(experts, "deeptalk_triton", inputs, grad_out)
    assert_close(out, expected, TOLERANCE, "output")
    names = ["hidden_states", "top_k_weights", *(n for n, _ in experts.named_parameters())]
    for what, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        assert_close(grad, expected_grad, TOLERANCE, f"grad {what}")


def test_docs_table_is_read():
    """The table parses into accepted and refused families, each once: a parser that found nothing would skip every
    family above, and a family in two rows would be checked against the last only."""
    entries = [family for family, _ in documented_outcomes()]
    assert len(entries) == len(OUTCOMES), f"listed twice: {sorted({f for f in entries if entries.count(f) > 1})}"
    refused = {family for family, reason in OUTCOMES.items() if reason is not None}
    assert {"mixtral", "qwen3_moe", "qwen3_vl_moe"} <= OUTCOMES.keys() - refused
    assert {"gpt_oss", "nemotron_h"} <= refused
    assert EXPERTS, f"no @use_experts_implementation class found under {MODELS_DIR}"
