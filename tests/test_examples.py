"""The README's main job, `examples/quickstart.py`, runs end to end on CPU without downloads."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "reloaded as DeepTalkForCausalLM" in result.stdout
    assert "generated:" in result.stdout and "MoE layers routed" in result.stdout


def test_quickstart_reloads_through_the_auto_class_and_routes_every_moe_layer(monkeypatch, capsys):
    """What the quickstart prints is what it did: the generating model is the one `AutoModelForCausalLM` loaded from
    the saved folder (not the model built in memory), and its three MoE layers (four layers, the first dense) routed
    the 12 prompt tokens and the 16 generated ones."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_example", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    loaded = []
    real = quickstart.AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(quickstart.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    generated = []
    real_generate = quickstart.deeptalk_hf.DeepTalkForCausalLM.generate

    def generate(self, *args, **kwargs):
        generated.append(self)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(quickstart.deeptalk_hf.DeepTalkForCausalLM, "generate", generate)
    quickstart.main()
    output = capsys.readouterr().out
    assert len(loaded) == 1 and generated == loaded
    assert "reloaded as DeepTalkForCausalLM" in output and "3 MoE layers routed 28 tokens" in output
    streamed = next(line for line in output.splitlines() if line.startswith("generated:")).split()[1:]
    assert len(streamed) == 16  # the new tokens only, as generate yields them (not the prompt)
