"""The config's tensor- and expert-parallel plans on two CPU processes (gloo): a training step of a tiny DeepTalk model
under TP, TP+EP (eager and compiled) and FSDP+EP gives the single-process logits, loss and gradients, for each kind of
attention."""

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


# Variants: per-head projections (with speech attention, so its plan entries are checked), DeepSeek's MLA
# with a low-rank query, OLMoE's q/k norm over the whole projection (the last two keep attention replicated).
ATTENTION = {
    "heads": dict(speech_attention=True),
    "mla": dict(
        kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4
    ),
    "full_qk_norm": dict(qk_norm_type="full", clip_qkv=8.0),
    # not attention: a tied speech head (its table sharded as the text one is) and a speech group smaller than top-k,
    # whose sentinel slots the all-to-all expert dispatch cannot take
    "tied_small_group": dict(tie_word_embeddings=True, num_experts_per_tok=3),
}


def run_workers(path: Path, *args: str) -> subprocess.CompletedProcess:
    """The worker on two CPU processes (gloo), reading the reference saved in `path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*command, str(WORKER), str(path), *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("attention", ATTENTION)
def test_parallel_plans_match_one_process(attention, tmp_path):
    # Expert counts divisible by the 2 expert-parallel ranks; shared experts and a dense layer for the TP plan.
    model = DeepTalkForCausalLM(
        tiny_config(num_speech_experts=2, shared_expert_intermediate_size=16, **ATTENTION[attention])
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
    result = run_workers(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for layout in ("tp", "tp+ep", "fsdp+ep", "tp+ep compiled"):
        assert result.stdout.count(f"{layout}: ok") == 2, result.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_pipeline_stages_route_speech_ids_as_speech(tmp_path):
    """transformers' pipeline parallelism hands the later stages hidden states instead of `input_ids`: the ids'
    modality must reach them, or their MoE layers route speech positions as text (different logits)."""
    model = DeepTalkForCausalLM(tiny_config(num_hidden_layers=4)).eval()
    model.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.cat(
        [torch.randint(3, 64, (2, 6), generator=generator), torch.randint(64, 80, (2, 6), generator=generator)], 1
    )
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": model(input_ids).logits}, tmp_path / "reference.pt")
    result = run_workers(tmp_path, "pp")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("pp: ok") == 2, result.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_data_parallel_takes_a_one_modality_batch(tmp_path):
    """DDP as torch and `Trainer` with activation checkpointing run it (no `find_unused_parameters`), one rank's batch
    text only: the speech group must still get its (zero) gradients there, and the averaged gradients are both
    batches'."""
    model = DeepTalkForCausalLM(tiny_config()).train()
    model.save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 64, (2, 8), generator=generator)
    mixed = torch.cat([text[:, :4], torch.randint(64, 80, (2, 4), generator=generator)], 1)
    (sum(model(batch, labels=batch).loss for batch in (text, mixed)) / 2).backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    torch.save({"batches": [text, mixed], "grads": grads}, tmp_path / "reference.pt")
    result = run_workers(tmp_path, "ddp")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("ddp: ok") == 2, result.stdout
