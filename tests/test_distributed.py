"""The config's tensor- and expert-parallel plans on two CPU processes (gloo): a training step of a tiny DeepTalk model
under TP, TP+EP (eager and compiled) and FSDP+EP gives the single-process logits, loss and gradients, for each kind of
attention; so do the training stages on those layouts, and a LoRA adapter added before FSDP2 shards the model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from peft import PeftModel, get_peft_model

from deeptalk_hf import DeepTalkForCausalLM, lora_config_for_stage, set_training_stage

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


def _save_speech_model_and_batches(path: Path) -> list[torch.Tensor]:
    """A tiny model with speech experts, a shared expert and speech attention saved in `path`, and two mixed batches
    (one per rank where ranks take a batch each)."""
    DeepTalkForCausalLM(
        tiny_config(num_speech_experts=2, shared_expert_intermediate_size=16, speech_attention=True)
    ).save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    text, speech = (
        torch.randint(3, 64, (2, 2, 6), generator=generator),
        torch.randint(64, 80, (2, 2, 6), generator=generator),
    )
    return list(torch.cat([text, speech], 2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_training_stages_under_parallel_plans(tmp_path):
    """`set_training_stage` on a TP, TP+EP and FSDP+EP model, the stages in turn with an optimizer step each: the
    trainable set, loss and gradients are one process's (frozen tensors get none and stay bit-equal). FSDP ranks take a
    batch each, so their gradients must be the mean of both batches'."""
    batches = _save_speech_model_and_batches(tmp_path)
    reference = {"batches": batches}
    for key, rank_batches in (("shared", batches[:1]), ("per_rank", batches)):
        model = DeepTalkForCausalLM.from_pretrained(tmp_path).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        reference[key] = {}
        for stage in ("speech", "text", "joint"):
            trainable = set(set_training_stage(model, stage))
            loss = sum(model(batch, labels=batch).loss for batch in rank_batches) / len(rank_batches)
            loss.backward()
            grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            after = {name: param.detach().clone() for name, param in model.named_parameters()}
            reference[key][stage] = {"trainable": trainable, "loss": loss.detach(), "grads": grads, "after": after}
    torch.save(reference, tmp_path / "reference.pt")
    result = run_workers(tmp_path, "stages")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for layout in ("tp", "tp+ep", "fsdp+ep"):
        for stage in ("speech", "text", "joint"):
            assert result.stdout.count(f"stages {layout} {stage}: ok") == 2, result.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_lora_added_before_fsdp_sharding(tmp_path):
    """The joint stage's adapter (attention, dense MLP, shared experts, routers, both experts groups, speech tables in
    full), added before FSDP2 shards the model, a batch per rank: one process's logits and averaged gradients, and the
    adapter saved from rank 0 loads back. (Added after sharding, PEFT's LoRA fails or is not averaged: the helper
    refuses a sharded model, see `test_training_stages_under_parallel_plans`.)"""
    batches = _save_speech_model_and_batches(tmp_path)
    model = DeepTalkForCausalLM.from_pretrained(tmp_path)
    get_peft_model(model, lora_config_for_stage(model, "joint", r=4, init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter"
    )
    peft_model = PeftModel.from_pretrained(
        DeepTalkForCausalLM.from_pretrained(tmp_path), tmp_path / "adapter", is_trainable=True
    )
    peft_model.train()
    logits = []
    for batch in batches:
        outputs = peft_model(batch, labels=batch)
        (outputs.loss / 2).backward()
        logits.append(outputs.logits.detach())
    grads = {name: param.grad.clone() for name, param in peft_model.named_parameters() if param.grad is not None}
    torch.optim.SGD(peft_model.parameters(), lr=0.1).step()
    with torch.no_grad():
        after = peft_model.eval()(batches[0]).logits
    torch.save({"batches": batches, "logits": logits, "grads": grads, "after": after}, tmp_path / "reference.pt")
    result = run_workers(tmp_path, "lora")
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert result.stdout.count("lora: ok") == 2, result.stdout
