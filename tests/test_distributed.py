"""The config's tensor- and expert-parallel plans on two CPU processes (gloo): a training step of a tiny DeepTalk model
under TP, TP+EP and FSDP+EP gives the single-process logits, loss and gradients. The model has speech attention, so
its plan entries (speech q/k/v/o projections, q/k norms) are checked beside the text ones."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed

from deeptalk_hf import DeepTalkForCausalLM

from .conftest import tiny_config

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_parallel_plans_match_one_process(tmp_path):
    # Expert counts divisible by the 2 expert-parallel ranks; shared experts, a dense layer and speech attention for the
    # TP plan.
    model = DeepTalkForCausalLM(
        tiny_config(num_speech_experts=2, shared_expert_intermediate_size=16, speech_attention=True)
    ).train()
    model.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.cat(
        [torch.randint(3, 64, (2, 6), generator=generator), torch.randint(64, 80, (2, 6), generator=generator)], 1
    )
    outputs = model(input_ids, labels=input_ids)
    outputs.loss.backward()
    reference = {
        "input_ids": input_ids,
        "logits": outputs.logits.detach(),
        "loss": outputs.loss.detach(),
        "grads": {name: param.grad for name, param in model.named_parameters()},
    }
    torch.save(reference, tmp_path / "reference.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(WORKER),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for layout in ("tp", "tp+ep", "fsdp+ep"):
        assert result.stdout.count(f"{layout}: ok") == 2, result.stdout
