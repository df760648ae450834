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
