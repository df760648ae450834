"""Training with transformers' Trainer: the loss it optimises includes the router losses, a training stage (full or
LoRA) leaves every other tensor untouched, and `examples/train_stagewise.py` runs speech -> text -> joint."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments
from transformers.loss.loss_utils import ForCausalLMLoss

from deeptalk_hf import (
    DeepTalkForCausalLM,
    DeepTalkForConditionalGeneration,
    lora_config_for_stage,
    set_training_stage,
)
from deeptalk_hf.modeling_deeptalk import accumulation_share

from .conftest import tiny_config
from .test_audio_model import whisper_audio_config

ROOT = Path(__file__).resolve().parents[1]


def examples(config, count: int = 8, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Rows of text ids then speech ids, with explicit `modality_ids` (which the Trainer must pass on)."""
    generator = torch.Generator().manual_seed(0)
    half = length // 2
    rows = []
    for _ in range(count):
        text = torch.randint(3, config.speech_token_start, (half,), generator=generator)
        speech = torch.randint(config.speech_token_start, config.vocab_size, (length - half,), generator=generator)
        input_ids = torch.cat([text, speech])
        modality_ids = (input_ids >= config.speech_token_start).long()
        rows.append({"input_ids": input_ids, "labels": input_ids, "modality_ids": modality_ids})
    return rows


def trainer_for(model, data, tmp_path, steps: int, accumulation: int = 1, **options) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        # one step per pass over `data`: step 1's logged loss is the loss on all of it
        per_device_train_batch_size=len(data) // accumulation,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **options,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def right_padded(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """The padded batch of `rows`: ids and labels, -100 and a 0 mask on the padding."""
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = labels[i, : len(row)] = torch.tensor(row)
    return {"input_ids": input_ids, "attention_mask": (labels != -100).long(), "labels": labels}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_padding_free_batch_trains_as_its_padded_batch(attn_implementation):
    """transformers' `DataCollatorWithFlattening` (one row, `position_ids` restarting per sequence, no mask): each
    sequence's logits are its own, and the loss (router losses included) and every gradient are the padded batch's."""
    config = tiny_config(router_aux_loss_coef=0.01, router_z_loss_coef=0.001, attn_implementation=attn_implementation)
    model = DeepTalkForCausalLM(config).train()
    start = config.speech_token_start
    rows = [
        torch.randint(3, start, (5,)).tolist(),
        torch.randint(start, config.vocab_size, (7,)).tolist(),
        torch.randint(3, config.vocab_size, (9,)).tolist(),
    ]
    packed = DataCollatorWithFlattening()([{"input_ids": row, "labels": row} for row in rows])
    padded = right_padded(rows)
    outputs = {name: model(**batch, use_cache=False) for name, batch in (("packed", packed), ("padded", padded))}
    sequences = outputs["packed"].logits[0].split([len(row) for row in rows])
    for i, (row, logits) in enumerate(zip(rows, sequences, strict=True)):
        torch.testing.assert_close(logits, outputs["padded"].logits[i, : len(row)])
    for name in ("loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(outputs["packed"], name), getattr(outputs["padded"], name))
    gradients = {}
    for name, output in outputs.items():
        model.zero_grad()
        output.loss.backward()
        gradients[name] = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
    assert gradients["packed"].keys() == gradients["padded"].keys()
    for key, gradient in gradients["packed"].items():
        torch.testing.assert_close(gradient, gradients["padded"][key], msg=key)


@pytest.mark.parametrize("lora", [False, True])
def test_trainer_optimises_the_router_losses_and_respects_the_stage(lora, tmp_path):
    """The loss the Trainer logs at step 1 is the language-model loss plus both router losses at the initial weights;
    after a few steps of the speech stage (AdamW with weight decay), every tensor outside it is bit-identical."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    model = DeepTalkForCausalLM(config)
    data = examples(config)
    batch = {key: torch.stack([row[key] for row in data]) for key in data[0]}
    model.train()
    with torch.no_grad():
        outputs = model(**batch)
    language_model_loss = model.loss_function(outputs.logits, batch["labels"], config.vocab_size)
    router_losses = config.router_aux_loss_coef * outputs.aux_loss + config.router_z_loss_coef * outputs.z_loss
    assert router_losses > 0.05  # well above the logged loss's precision
    before = {name: param.detach().clone() for name, param in model.named_parameters()}

    if lora:
        trained = get_peft_model(model, lora_config_for_stage(model, "speech", r=4))
    else:
        trained = model
        set_training_stage(model, "speech")
    trainer = trainer_for(trained, data, tmp_path, steps=3)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    torch.testing.assert_close(torch.tensor(logged[0]), language_model_loss + router_losses, rtol=1e-4, atol=1e-4)
    assert logged[-1] < logged[0]

    final = trained.merge_and_unload() if lora else trained
    for name, param in final.named_parameters():
        if "speech" in name:
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("audio", [False, True])
def test_label_smoothing_scores_the_next_token(audio, tmp_path):
    """`Trainer` smooths over shifted labels only for causal LMs it knows by name: DeepTalk's scored each position
    against its own token. Reference: torch's smoothed cross-entropy of the next token (step 1 logs the first loss)."""
    model = DeepTalkForConditionalGeneration(whisper_audio_config()) if audio else DeepTalkForCausalLM(tiny_config())
    model.train()
    data = examples(model.config.get_text_config())
    for row in data if audio else ():  # text and speech units only (labels are the same tensor)
        row["input_ids"].masked_fill_(row["input_ids"] == model.config.audio_token_id, 3)
    batch = {key: torch.stack([row[key] for row in data]) for key in ("input_ids", "modality_ids")}
    with torch.no_grad():
        logits = model(**batch).logits
    ids = batch["input_ids"]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), label_smoothing=0.1)
    trainer = trainer_for(model, data, tmp_path, steps=1, label_smoothing_factor=0.1)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_accumulation_keeps_the_router_losses_weight(tmp_path):
    """`Trainer` normalises the language-model loss over the micro-batches a step accumulates and sums their losses:
    the router losses take each micro-batch's share of the labels, so accumulating two halves of a batch of equal
    rows logs the same loss and takes the same step as the whole batch (at full weight they counted twice)."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    data = examples(config, count=1) * 8
    runs = {}
    for accumulation in (1, 2):
        torch.manual_seed(0)  # the same weights for both
        model = DeepTalkForCausalLM(copy.deepcopy(config))
        trainer = trainer_for(model, data, tmp_path / str(accumulation), steps=1, accumulation=accumulation)
        trainer.train()
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[accumulation] = logged[0], dict(model.named_parameters())
    torch.testing.assert_close(torch.tensor(runs[2][0]), torch.tensor(runs[1][0]), rtol=1e-5, atol=1e-5)
    for name, param in runs[1][1].items():
        torch.testing.assert_close(runs[2][1][name], param, msg=name)


def test_a_compute_loss_func_adds_the_router_losses_by_the_documented_share(tmp_path):
    """docs/training.md: a `compute_loss_func` drops the router losses; added back weighted by `accumulation_share`
    they keep their weight whatever the accumulation (at full weight they count G-fold)."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    data = examples(config, count=1) * 8

    def loss_func(outputs, labels, num_items_in_batch):
        loss = ForCausalLMLoss(outputs.logits, labels, config.vocab_size, num_items_in_batch=num_items_in_batch)
        if outputs.aux_loss is None:  # evaluation: eval mode computes no router losses
            return loss
        share = accumulation_share(labels, {"num_items_in_batch": num_items_in_batch})
        return loss + share * (
            config.router_aux_loss_coef * outputs.aux_loss + config.router_z_loss_coef * outputs.z_loss
        )

    runs = {}
    for accumulation, func in ((1, None), (1, loss_func), (2, loss_func)):  # None: the model's own loss
        torch.manual_seed(0)
        model = DeepTalkForCausalLM(copy.deepcopy(config))
        trainer = trainer_for(model, data, tmp_path / f"{accumulation}{func}", steps=1, accumulation=accumulation)
        trainer.compute_loss_func = func
        trainer.train()
        assert trainer.evaluate(data[:2])["eval_loss"] > 0
        runs[accumulation, func] = trainer.state.log_history[0]["loss"], dict(model.named_parameters())
    own = runs[1, None]
    for loss, params in (runs[1, loss_func], runs[2, loss_func]):
        assert loss == pytest.approx(own[0], rel=1e-5)
        for name, param in own[1].items():
            torch.testing.assert_close(params[name], param, msg=name)


def test_accumulation_share_counts_the_labels_trainer_counts():
    """The share is this batch's count of scored labels (shifted by one, -100 left out, or `shift_labels` as given)
    over Trainer's `num_items_in_batch`; 1 without it, 0 (not NaN) when nothing is counted."""
    labels = torch.tensor([[5, 6, -100, -100], [5, 6, 7, 8]])  # scored after the shift: 1 + 3
    assert float(accumulation_share(labels, {"num_items_in_batch": 8})) == 0.5
    assert float(accumulation_share(labels, {"num_items_in_batch": torch.tensor(16)})) == 0.25
    shifted = torch.tensor([[7, -100, -100], [-100, -100, -100]])  # a caller's own shift: 1 label
    assert float(accumulation_share(labels, {"num_items_in_batch": 4, "shift_labels": shifted})) == 0.25
    assert accumulation_share(labels, {}) == 1.0
    assert float(accumulation_share(torch.full((2, 4), -100), {"num_items_in_batch": 0})) == 0.0


def test_a_step_without_labels_leaves_the_weights_finite(tmp_path):
    """A step whose rows have no label (a prompt-only row, its answer truncated away) counts 0 items: the router
    losses' share was 0/0, so their NaN gradient reached every router and `Trainer` wrote NaN into every weight (a
    transformers MoE model takes such a step unharmed)."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    data = [{**row, "labels": torch.full_like(row["labels"], -100)} for row in examples(config, count=2)]
    model = DeepTalkForCausalLM(config)
    trainer_for(model, data, tmp_path, steps=1).train()
    broken = [name for name, param in model.named_parameters() if not param.isfinite().all()]
    assert not broken


@pytest.mark.parametrize("backend", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("modality", ["text", "speech"])
@pytest.mark.parametrize("router_losses", [True, False])
def test_a_one_modality_batch_gives_every_trainable_tensor_a_gradient(backend, modality, router_losses):
    """DDP without `find_unused_parameters` (torch's default; `Trainer`'s with activation checkpointing) fails at the
    next step unless every trainable tensor got a gradient: a text-only or speech-only batch must reach the other
    group's router and experts too, as the grouped backends reach every expert of transformers' MoE models. Their
    gradients are zero, and the loss is bitwise the one computed under `no_grad`, where the other group does not run."""
    coefficients = {} if router_losses else dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    model = DeepTalkForCausalLM(tiny_config(experts_implementation=backend, **coefficients)).train()
    start = model.config.speech_token_start
    low, high = (3, start) if modality == "text" else (start, model.config.vocab_size)
    input_ids = torch.randint(low, high, (2, 8))
    outputs = model(input_ids, labels=input_ids)
    outputs.loss.backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing
    other = "speech_" if modality == "text" else ""
    for layer in model.model.layers:
        if hasattr(layer.mlp, "speech_experts"):
            for param in (
                *getattr(layer.mlp, f"{other}experts").parameters(),
                getattr(layer.mlp, f"{other}gate").weight,
            ):
                assert not param.grad.any()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, labels=input_ids).loss, outputs.loss, rtol=0, atol=0)


def test_resuming_from_a_trainer_checkpoint_restores_every_tensor(tmp_path):
    """`Trainer` reloads a checkpoint with `load_state_dict`, which never sees the experts' conversion mapping: the
    experts saved one by one must still reach the fused tensors, so a resumed run ends where an unbroken one does."""
    config = tiny_config()
    data = examples(config)
    initial = DeepTalkForCausalLM(config)

    def run(folder: str, resume: str | None = None) -> DeepTalkForCausalLM:
        model = copy.deepcopy(initial)
        set_training_stage(model, "speech")
        args = TrainingArguments(
            output_dir=str(tmp_path / folder),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            weight_decay=0.1,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return model

    unbroken = run("unbroken")
    resumed = run("resumed", resume=str(tmp_path / "unbroken" / "checkpoint-2"))
    for (name, expected), param in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.equal(param, expected), name


def test_load_state_dict_takes_experts_saved_one_by_one_in_any_shard(tmp_path):
    source = DeepTalkForCausalLM(tiny_config())
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    shards_of_group = {}
    for index, shard in enumerate(shards):
        for key in load_file(shard):
            if match := re.fullmatch(r"(.*experts)\.\d+\.\w+_proj\.weight", key):
                shards_of_group.setdefault(match[1], set()).add(index)
    assert max(len(found) for found in shards_of_group.values()) > 1  # a group split over shards is set in parts
    model = DeepTalkForCausalLM(tiny_config(initializer_range=0.5))
    for shard in shards:
        model.load_state_dict(load_file(shard), strict=False)
    for (name, expected), param in zip(source.named_parameters(), model.parameters()):
        assert torch.equal(param, expected), name
    # A load of a state dict lacking some experts names them as missing (they are not kept from memory silently).
    state = load_file(shards[0])
    for shard in shards[1:]:
        state |= load_file(shard)
    del (
        state["model.layers.0.mlp.experts.2.up_proj.weight"],
        state["model.layers.2.mlp.speech_experts.0.down_proj.weight"],
    )
    assert sorted(model.load_state_dict(state, strict=False).missing_keys) == [
        "model.layers.0.mlp.experts.2.up_proj.weight",
        "model.layers.2.mlp.speech_experts.0.down_proj.weight",
    ]
    with pytest.raises(RuntimeError, match=r"Missing key.*experts.2.up_proj.weight.*speech_experts.0.down_proj"):
        model.load_state_dict(state)
    # On the meta device with assign=True (as accelerate loads): the experts are the checkpoint's.
    with torch.device("meta"):
        empty = DeepTalkForCausalLM(tiny_config())
    empty.load_state_dict(
        load_file(shards[0]) | {k: v for shard in shards[1:] for k, v in load_file(shard).items()}, assign=True
    )
    assert torch.equal(empty.model.layers[0].mlp.experts.down_proj, source.model.layers[0].mlp.experts.down_proj)
    # The fused tensors with one expert given again one by one: that expert is replaced, nothing is missing.
    patched = source.state_dict() | {"model.layers.0.mlp.experts.1.down_proj.weight": torch.ones(32, 16)}
    model.load_state_dict(patched)
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[1], torch.ones(32, 16))
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[2], source.model.layers[0].mlp.experts.down_proj[2])
    with pytest.raises(ValueError, match=r"speech_experts.3.down_proj.weight: .* holds 3 experts \(0 to 2\)"):
        model.load_state_dict(
            {"model.layers.0.mlp.speech_experts.3.down_proj.weight": torch.zeros(32, 16)}, strict=False
        )
    with pytest.raises(ValueError, match=r"speech_experts.1.down_proj.weight has shape \(16, 32\); this model's"):
        model.load_state_dict(
            {"model.layers.0.mlp.speech_experts.1.down_proj.weight": torch.zeros(16, 32)}, strict=False
        )


def losses_of(stage: str, task: str, output: str) -> tuple[float, float]:
    match = re.search(rf"^{stage} stage:.*\b{task} loss ([\d.]+) -> ([\d.]+)", output, re.MULTILINE)
    assert match, output
    return float(match[1]), float(match[2])


@pytest.mark.parametrize("mode", [[], ["--lora"]], ids=["full", "lora"])
def test_stagewise_example_runs_the_three_stages(mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matrices: one thread is fastest, and shares a busy machine
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_stagewise.py"), "--steps", "20", *mode],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert "text logits after the speech stage: bit-identical" in output
    # the recipe's order (the text model checked right after the speech stage)
    lines = [line.split(":")[0] for line in output.splitlines()]
    assert lines == ["speech stage", "text logits after the speech stage", "text stage", "joint stage"], output
    for stage, task in (("speech", "speech"), ("text", "text"), ("joint", "speech")):
        before, after = losses_of(stage, task, output)
        assert after < before, (stage, task, output)


def test_loading_an_expert_given_again_one_by_one_leaves_the_callers_tensors_alone():
    """`model.load_state_dict(other.state_dict() | {one expert})`: the fused tensor of the dict (the other model's
    own storage) is copied before the expert is written into it, so the other model does not change."""
    source = DeepTalkForCausalLM(tiny_config())
    before = source.model.layers[0].mlp.experts.down_proj.detach().clone()
    model = DeepTalkForCausalLM(tiny_config())
    model.load_state_dict(source.state_dict() | {"model.layers.0.mlp.experts.1.down_proj.weight": torch.ones(32, 16)})
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[1], torch.ones(32, 16))
    # the other experts are the dict's fused tensor's, not what the loading model had
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[[0, 2, 3]], before[[0, 2, 3]])
    assert torch.equal(source.model.layers[0].mlp.experts.down_proj, before)
