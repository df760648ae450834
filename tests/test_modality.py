"""Modality-load profiling, expert assignment (a pure permutation) and training stages (exact freezing)."""

import copy
import json
import re
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, DataCollatorWithFlattening

import deeptalk_hf  # noqa: F401  (registers the Auto classes)
from deeptalk_hf import (
    DeepTalkConfig,
    DeepTalkForCausalLM,
    DeepTalkForConditionalGeneration,
    DeepTalkModel,
    ModalityLoad,
    add_speech_attention,
    assign_modality_experts,
    move_speech_experts,
    profile_modality_load,
    set_training_stage,
    training_stage_parameters,
)
from deeptalk_hf.modality import speech_expert_counts

from .conftest import tiny_config

TEXT_VOCAB, SPEECH_VOCAB = 64, 16


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Order-one weights (norms around 1): distinct experts and routers that actually route."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.5 * noise)
    return model


def make_model(tmp_path_factory, **overrides) -> DeepTalkForCausalLM:
    """A tiny random DeepTalk model, saved and loaded back through `AutoModelForCausalLM.from_pretrained`."""
    fields = dict(
        vocab_size=TEXT_VOCAB + SPEECH_VOCAB,
        speech_vocab_size=SPEECH_VOCAB,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_speech_experts=2,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=True,
        shared_expert_intermediate_size=16,
        use_qk_norm=False,
        max_position_embeddings=64,
    )
    fields.update(overrides)
    path = tmp_path_factory.mktemp("deeptalk")
    randomize(DeepTalkForCausalLM(DeepTalkConfig(**fields))).save_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model


def mixed_batch(seed: int = 0, batch: int = 3, seq: int = 12):
    """Sequences of text ids then speech ids, right-padded to different lengths."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, TEXT_VOCAB, (batch, seq), generator=generator)
    speech = torch.randint(TEXT_VOCAB, TEXT_VOCAB + SPEECH_VOCAB, (batch, seq), generator=generator)
    split = torch.randint(2, seq - 2, (batch, 1), generator=generator)
    input_ids = torch.where(torch.arange(seq) < split, text, speech)
    lengths = torch.tensor([seq, seq - 3, seq - 5][:batch])
    attention_mask = (torch.arange(seq) < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory)


def logits(model, input_ids, routing):
    model.config.modality_routing = routing
    try:
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        model.config.modality_routing = "hard"


# Profiling


def test_profile_counts_add_up(model):
    batches = [mixed_batch(0), mixed_batch(1)]
    model.train()
    model.model.layers[0].eval()  # a module in another mode than the model keeps it too
    modes = {name: module.training for name, module in model.named_modules()}
    load = profile_modality_load(model, batches)
    assert model.config.modality_routing == "hard"  # restored, as every module's mode
    assert modes == {name: module.training for name, module in model.named_modules()}
    valid = sum(b["attention_mask"].sum() for b in batches)
    speech = sum(((b["input_ids"] >= TEXT_VOCAB) & b["attention_mask"].bool()).sum() for b in batches)
    assert load.speech_tokens == speech and load.text_tokens == valid - speech
    assert load.layers == [0, 2] and load.num_experts == [6, 6] and load.top_k == 2
    for i in range(2):
        assert load.speech_counts[i].sum() == load.speech_tokens * 2
        assert load.text_counts[i].sum() == load.text_tokens * 2
        assert torch.isclose(load.speech_mass[i].sum(), torch.tensor(float(load.speech_tokens), dtype=torch.float64))
        assert torch.isclose(load.rho_speech[i].sum(), torch.tensor(1.0, dtype=torch.float64))
        assert torch.isclose(load.rho_text[i].sum(), torch.tensor(1.0, dtype=torch.float64))
        assert (load.speech_counts[i] > 0).sum() > 1  # the random router spreads tokens


def test_profile_switches_routing_and_mode_around_the_forwards_only(model):
    """`batches` may run the model itself (answers generated lazily, batch by batch): it sees the model as its caller
    left it (hard routing, its modes), not the profile's settings, and the load is that of the same batches given
    as a list."""
    batches = [mixed_batch(0), mixed_batch(1)]
    model.train()
    seen = []

    def lazily():
        for batch in batches:
            seen.append((model.config.modality_routing, model.training, torch.is_grad_enabled()))
            yield batch

    load = profile_modality_load(model, lazily())
    assert seen == [("hard", True, True)] * 2
    assert load == profile_modality_load(model, batches)


def test_profile_runs_the_head_on_one_position_only(model, monkeypatch):
    """Profiling reads the router logits only: full `[batch, seq, vocab]` logits (gigabytes per batch with a 150k
    vocabulary) are not computed, and the load is the one the router logits of a full forward give."""
    batches = [mixed_batch(0), mixed_batch(1)]
    full = type(model).forward

    def forward(self, *args, **kwargs):
        outputs = full(self, *args, **kwargs)
        rows.append(outputs.logits.shape[1])
        return outputs

    rows = []
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: full(self, *a, **{**k, "logits_to_keep": 0}))
    reference = profile_modality_load(model, batches)
    monkeypatch.setattr(type(model), "forward", forward)
    load = profile_modality_load(model, batches)
    assert rows == [1, 1]
    for name in ("speech_counts", "text_counts", "speech_mass", "text_mass"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(load, name), getattr(reference, name), strict=True))


def test_profile_counts_top_k_slots_and_runs_without_dropout(tmp_path_factory):
    """The load's top_k is the model's; a layer with fewer experts than top-k counts each real expert once per token
    (the spare slots are no expert); dropout is off while profiling, so a batch's load does not change run to run."""
    batches = [mixed_batch(0)]
    for top_k, experts in ((1, 4), (3, 1)):  # (3, 1): two experts in all (one text, one speech) for three slots
        small = make_model(
            tmp_path_factory,
            num_experts=experts,
            num_speech_experts=1,
            num_experts_per_tok=top_k,
            norm_topk_prob=False,
        )
        load = profile_modality_load(small, batches)
        assert load.top_k == top_k and load.num_experts == [experts + 1] * 2
        for counts, tokens in ((load.speech_counts, load.speech_tokens), (load.text_counts, load.text_tokens)):
            assert all(layer.sum() == tokens * min(top_k, experts + 1) for layer in counts)
    noisy = make_model(tmp_path_factory, attention_dropout=0.5).train()
    assert profile_modality_load(noisy, batches) == profile_modality_load(noisy, batches)


def test_profile_excludes_padding_and_follows_modality_ids(model):
    batch = mixed_batch(2)
    load = profile_modality_load(model, [batch])
    repadded = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 5))
    again = profile_modality_load(model, [repadded])
    assert all(torch.equal(a, b) for a, b in zip(load.text_counts, again.text_counts, strict=True))
    # Explicit modality ids win over the id block: all-text ids marked as speech count as speech.
    ids = torch.randint(0, TEXT_VOCAB, (1, 10))
    marked = profile_modality_load(model, [{"input_ids": ids[0].tolist(), "modality_ids": [1] * 10}])
    assert marked.speech_tokens == 10 and marked.text_tokens == 0


def test_profile_of_a_packed_batch_is_the_profile_of_its_sequences(model):
    """A padding-free batch (transformers' `DataCollatorWithFlattening`: one row, `position_ids` restarting at each
    sequence) is profiled as its sequences one by one: they do not attend to each other."""
    batch = mixed_batch(3)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    packed = DataCollatorWithFlattening()([{"input_ids": row} for row in rows])
    expected = profile_modality_load(model, [{"input_ids": row} for row in rows]).to_dict()
    got = profile_modality_load(model, [packed]).to_dict()
    assert got["speech_counts"] == expected["speech_counts"] and got["text_counts"] == expected["text_counts"]
    for key in ("speech_mass", "text_mass"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(expected[key]))
    with pytest.raises(ValueError, match=re.escape("batch 0: position_ids (1, 3) does not match input_ids")):
        profile_modality_load(model, [dict(packed, position_ids=packed["position_ids"][:, :3])])
    with pytest.raises(ValueError, match=re.escape("batch 0: position_ids must be integers, got torch.float32")):
        profile_modality_load(model, [dict(packed, position_ids=packed["position_ids"].float())])


def test_profile_is_a_hand_run_of_the_router():
    """Counts and mass equal a plain-torch run of each router over the recorded MLP inputs, padding excluded, on a
    split model with DeepSeek-V3 routing (source order, correction bias, group limit)."""
    config = tiny_config(
        num_experts=[5, 6],
        num_speech_experts=[3, 2],
        num_experts_per_tok=3,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
    )
    model = randomize(DeepTalkForCausalLM(config)).eval()
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(0.2 * torch.randn(buffer.shape))
    move_speech_experts(model, [[7, 1, 3], [6, 0]])
    batch = mixed_batch(4)
    load = profile_modality_load(model, [batch])
    inputs = {}
    hooks = [
        model.model.layers[layer].mlp.register_forward_hook(
            lambda _, args, __, layer=layer: inputs.update({layer: args[0]})
        )
        for layer in config.moe_layers
    ]
    model.config.modality_routing = "none"  # as profiling runs it
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    valid = batch["attention_mask"].reshape(-1).bool()
    is_speech = batch["input_ids"].reshape(-1) >= config.speech_token_start
    for i, layer in enumerate(config.moe_layers):
        block = model.model.layers[layer].mlp
        order = config.expert_order(layer)  # the source index of each row of [gate; speech_gate]
        weight, bias = torch.zeros(8, 32), torch.zeros(8)
        weight[order] = torch.cat([block.gate.weight, block.speech_gate.weight]).detach()
        bias[order] = torch.cat([block.gate.e_score_correction_bias, block.speech_gate.e_score_correction_bias])
        scores = (inputs[layer].reshape(-1, 32) @ weight.T).sigmoid()
        choice = scores + bias
        groups = choice.view(-1, 4, 2).sum(-1).topk(2, dim=-1).indices  # a group's score: its two experts' sum
        kept = torch.zeros(choice.shape[0], 4, dtype=torch.bool).scatter_(1, groups, True).repeat_interleave(2, 1)
        picks = choice.masked_fill(~kept, -torch.inf).topk(3, dim=-1).indices
        for modality, selected in (("speech", valid & is_speech), ("text", valid & ~is_speech)):
            counts = torch.bincount(picks[selected].reshape(-1), minlength=8)
            assert torch.equal(getattr(load, f"{modality}_counts")[i], counts)
            mass = (scores / scores.sum(-1, keepdim=True))[selected].sum(0).double()
            torch.testing.assert_close(getattr(load, f"{modality}_mass")[i], mass, rtol=1e-6, atol=1e-6)


def test_load_json_round_trip_and_validation(model, tmp_path):
    # Several batches: masses summed over them are float64 values that float32 cannot hold.
    load = profile_modality_load(model, [mixed_batch(0), mixed_batch(1), mixed_batch(2)])
    load.save(tmp_path / "profiles" / "load.json")  # a folder that does not exist yet
    load.save(tmp_path / "profiles" / "load.json")  # and over an existing file
    assert [path.name for path in (tmp_path / "profiles").iterdir()] == ["load.json"]  # no partial file left
    with pytest.raises(IsADirectoryError):  # a failed save leaves nothing behind either
        load.save(tmp_path / "profiles")
    assert [path.name for path in tmp_path.iterdir()] == ["profiles"]
    written = json.loads((tmp_path / "profiles" / "load.json").read_text())
    assert (written["format"], written["version"]) == ("deeptalk-modality-load", 1)
    assert written["speech_counts"] == [counts.tolist() for counts in load.speech_counts]
    again = ModalityLoad.load(tmp_path / "profiles" / "load.json")
    assert again.layers == load.layers and again.speech_tokens == load.speech_tokens
    for name in ("speech_counts", "text_counts", "speech_mass", "text_mass"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(load, name), getattr(again, name), strict=True))
    assert again.to_dict() == load.to_dict() and again == load  # `==` compares the tensors (it raised)
    assert again != profile_modality_load(model, [mixed_batch(0)]) and again != load.to_dict()
    (tmp_path / "other.json").write_text('{"layers": []}')
    with pytest.raises(ValueError, match="not a DeepTalk modality load"):
        ModalityLoad.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="one value per expert"):
        ModalityLoad([0], 1, [[1, 2]], [[1]], [[0.5, 0.5]], [[1.0]])
    with pytest.raises(ValueError, match="text_counts holds negative or non-finite values"):
        ModalityLoad([0], 1, [[1, 2]], [[-1, 2]], [[0.5, 0.5]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="wrap a single batch in a list"):
        profile_modality_load(model, mixed_batch(0))
    # A corrupt or foreign file is refused by name, never read approximately (a fractional count truncated).
    saved = load.to_dict()
    for change, message in [
        ({"speech_counts": [[1.7] * 6, [1] * 6]}, "speech_counts must hold whole assignment counts"),
        ({"version": 99}, "version 1"),
        ({"version": True}, "version=True"),
        ({"version": 1.0}, "version=1.0"),
        ({"text_counts": [[True] * 6, [1] * 6]}, "text_counts must hold whole assignment counts"),
        ({"text_counts": [[True, 2, 3, 1, 1, 1], [1] * 6]}, "text_counts must hold whole assignment counts"),
        ({"speech_mass": [[[0.5] * 6], [0.5] * 6]}, "speech_mass must hold one list of numbers per layer"),
        ({"speech_counts": [[[1] * 3] * 2, [1] * 6]}, "speech_counts must hold one list of numbers per layer"),
        ({"top_k": 0}, "top_k=0 must be an integer >= 1"),
        ({"speech_tokens": -5}, "speech_tokens=-5 must be an integer >= 0"),
        ({"extra": 1}, "unknown fields extra"),
        ({"speech_counts": [[1, None] * 3, [1] * 6]}, "speech_counts must hold numbers per layer and expert"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps(saved | change))
        with pytest.raises(ValueError, match=re.escape(message)):
            ModalityLoad.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "text_mass"}))
    with pytest.raises(ValueError, match=re.escape("bad.json is not a modality load: missing fields text_mass")):
        ModalityLoad.load(tmp_path / "bad.json")
    # Integers of any kind are stored as ints, which `save` can write.
    numpy_load = ModalityLoad(
        [np.int64(0)], torch.tensor(1), [[1, 0]], [[0, 1]], [[1.0, 0.0]], [[0.0, 1.0]], np.int32(1), 1
    )
    numpy_load.save(tmp_path / "numpy.json")
    assert ModalityLoad.load(tmp_path / "numpy.json").to_dict() == numpy_load.to_dict()
    with pytest.raises(ValueError, match="layers=5 must be decoder-layer indices"):
        ModalityLoad(5, 1, [[1, 0]], [[0, 1]], [[1.0, 0.0]], [[0.0, 1.0]])
    for text in (b"\xff{}", b"{", b"[" * 100_000 + b"]" * 100_000):  # not UTF-8, not JSON, nested too deep
        (tmp_path / "bad.json").write_bytes(text)
        with pytest.raises(ValueError, match="bad.json is not a DeepTalk modality load"):
            ModalityLoad.load(tmp_path / "bad.json")


def test_profiling_a_model_that_is_not_deeptalk_is_refused_by_name():
    """A Qwen3-MoE source (recipe step 2 before step 1) failed with an AttributeError on a DeepTalk config field."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    source = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match="measures a DeepTalk LLM, got a Qwen3MoeForCausalLM: import the MoE first"):
        profile_modality_load(source, [{"input_ids": torch.tensor([[1, 2, 3]])}])


def test_profiling_refuses_malformed_batches_by_number(model):
    good = mixed_batch(0)
    speech = (good["input_ids"] >= TEXT_VOCAB).long()
    for batch, message in [
        ({"input_ids": torch.full((2, 3), TEXT_VOCAB + SPEECH_VOCAB)}, "input_ids has ids outside [0, 80)"),
        ({"input_ids": torch.full((2, 3), -1)}, "input_ids has ids outside [0, 80)"),
        ({"input_ids": []}, "input_ids must be non-empty integer ids"),
        (dict(good, attention_mask=good["attention_mask"].T), "attention_mask (12, 3) does not match input_ids"),
        (dict(good, attention_mask=good["attention_mask"][:, 1:]), "attention_mask (3, 11) does not match input_ids"),
        (dict(good, modality_ids=speech.reshape(-1)), "modality_ids (1, 36) does not match input_ids"),
        (dict(good, modality_ids=2 * speech), "modality_ids must hold 0/1 values"),
        (dict(good, attention_mask=good["attention_mask"] / 2), "attention_mask must hold 0/1 values"),
        ({"input_ids": good["input_ids"].to(torch.complex64)}, "input_ids must be non-empty integer ids"),
        ({"input_ids": good["input_ids"] > 0}, "input_ids must be non-empty integer ids"),
        ({"input_ids": [[1, 2], [3]]}, "input_ids is not a tensor"),
        ({"ids": good["input_ids"]}, "expected a dict with input_ids"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"batch 1: {message}")):
            profile_modality_load(model, [good, batch])
    # Any integer dtype holds ids (the embedding takes int32/int64 only); a 1-d mask goes with 1-d ids.
    ids = good["input_ids"]
    expected = profile_modality_load(model, [{"input_ids": ids}]).to_dict()
    assert profile_modality_load(model, [{"input_ids": ids.to(torch.int16)}]).to_dict() == expected
    row = {"input_ids": ids[0], "attention_mask": torch.ones(ids.shape[1], dtype=torch.long)}
    assert (
        profile_modality_load(model, [row]).to_dict()
        == profile_modality_load(model, [{"input_ids": ids[:1]}]).to_dict()
    )


def test_plot_needs_the_plot_extra(model, tmp_path, monkeypatch):
    load = profile_modality_load(model, [mixed_batch(0)])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"deeptalk-hf\[plot\]"):
        load.plot(tmp_path / "load.png")


def test_plot_writes_a_png(model, tmp_path):
    pytest.importorskip("matplotlib")
    load = profile_modality_load(model, [mixed_batch(0)])
    load.plot(tmp_path / "load.png")
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="covers no MoE layer"):
        ModalityLoad([], 1, [], [], [], [], 0, 0).plot(tmp_path / "none.png")
    load.plot(tmp_path / "load.SVG")  # the suffix names the format, in either case
    assert b"<svg" in (tmp_path / "load.SVG").read_bytes()[:500]
    for name in ("load", "load.xyz"):  # matplotlib would write `load.png` for the first
        with pytest.raises(ValueError, match=r"name an image file ending in one of .*\.png"):
            load.plot(tmp_path / name)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["load.SVG", "load.png"]


# Assignment


def hand_made_load(speech_counts, text_counts, layers=(0, 2)) -> ModalityLoad:
    return ModalityLoad(
        layers=list(layers)[: len(speech_counts)],
        top_k=1,
        speech_counts=speech_counts,
        text_counts=text_counts,
        speech_mass=[[0.0] * len(c) for c in speech_counts],
        text_mass=[[0.0] * len(c) for c in text_counts],
        speech_tokens=int(sum(speech_counts[0])),
        text_tokens=int(sum(text_counts[0])),
    )


def test_paper_rule_on_hand_made_loads(tmp_path_factory):
    from deeptalk_hf.modality import _choose_speech_experts

    # ρA = [.4, .3, .2, .1]; ρT = [.7, .0, .1, .2]: ρA·(1−ρT) = [.12, .30, .18, .08] ranks 1, 2, 0, 3 (ρA alone: 0 first).
    load = hand_made_load([[40, 30, 20, 10], [10, 10, 40, 40]], [[70, 0, 10, 20], [25, 25, 25, 25]])
    generator = torch.Generator()
    assert _choose_speech_experts(load, 0, 1, "paper", generator) == [1]
    assert _choose_speech_experts(load, 0, 2, "paper", generator) == [1, 2]
    assert _choose_speech_experts(load, 0, 3, "paper", generator) == [0, 1, 2]
    # Equal scores: the lowest index wins.
    assert _choose_speech_experts(load, 1, 1, "paper", generator) == [2]
    # Adaptive: experts with ρA > ρT (layer 0: experts 1 and 2; layer 1: 2 and 3).
    assert _choose_speech_experts(load, 0, None, "adaptive", generator) == [1, 2]
    assert _choose_speech_experts(load, 1, None, "adaptive", generator) == [2, 3]
    uniform = hand_made_load([[1, 1, 1, 1]], [[1, 1, 1, 1]])
    assert _choose_speech_experts(uniform, 0, None, "adaptive", generator) == [0]  # at least one speech expert
    # An expert both modalities use heavily scores high but leans to text: adaptive leaves it (paper's rule takes it).
    shared = hand_made_load([[45, 12, 3, 40]], [[50, 10, 20, 20]])
    assert _choose_speech_experts(shared, 0, None, "adaptive", generator) == [1, 3]
    assert _choose_speech_experts(shared, 0, 2, "paper", generator) == [0, 3]
    leaning = hand_made_load([[4, 3, 2, 1]], [[1, 1, 1, 7]])
    assert _choose_speech_experts(leaning, 0, None, "adaptive", generator) == [0, 1, 2]  # all but one text expert
    # A modality without tokens has zero shares (not NaN), and with no text the paper's rule ranks by speech alone.
    silent = hand_made_load([[0, 0, 0, 0]], [[1, 2, 3, 4]])
    assert torch.equal(silent.rho_speech[0], torch.zeros(4, dtype=torch.float64)) and silent.scores[0].isfinite().all()
    assert hand_made_load([[1, 5, 3, 0]], [[0, 0, 0, 0]]).ranked(0) == [1, 2, 0, 3]
    drawn = _choose_speech_experts(load, 0, 2, "random", torch.Generator().manual_seed(7))
    assert drawn == _choose_speech_experts(load, 0, 2, "random", torch.Generator().manual_seed(7)) and len(drawn) == 2

    # Through the public function, on a model whose two MoE layers have 4 experts each.
    model = make_model(tmp_path_factory, num_experts=4, num_speech_experts=0)
    chosen = assign_modality_experts(model, load, num_speech_experts=[2, 1])
    assert chosen == [[1, 2], [2]]
    assert model.config.speech_expert_ids == [[1, 2], [2]]
    assert model.config.num_experts == [2, 3] and model.config.num_speech_experts == [2, 1]


def test_paper_rule_ties_are_exact():
    """Scores equal as numbers tie, whatever their float rounding: the lowest index wins."""
    from deeptalk_hf.modality import _choose_speech_experts

    # ρA·(1−ρT) is 7/100 for experts 0 and 1, but in floats 0.1·(1−0.3) rounds below 0.07·(1−0).
    load = hand_made_load([[10, 7, 83, 0]], [[3, 0, 0, 7]])
    assert load.scores[0][0] < load.scores[0][1]
    assert load.ranked(0) == [2, 0, 1, 3]
    assert _choose_speech_experts(load, 0, 2, "paper", torch.Generator()) == [0, 2]


def test_assignment_errors(model):
    load = profile_modality_load(model, [mixed_batch(0)])
    with pytest.raises(ValueError, match="strategy"):
        assign_modality_experts(model, load, strategy="best")
    with pytest.raises(ValueError, match="at least one text expert"):
        assign_modality_experts(model, load, num_speech_experts=6)
    with pytest.raises(ValueError, match="at least one text expert"):  # checked before profiling, as the CLI does
        speech_expert_counts(model.config, [1, 6])
    for counts in ([1], [1, 1, 1]):  # one count per MoE layer
        with pytest.raises(ValueError, match="for each of the 2 MoE layers"):
            speech_expert_counts(model.config, counts)
    with pytest.raises(ValueError, match=r"order of config.moe_layers \[0, 2\], not a mapping"):
        speech_expert_counts(model.config, {0: 2, 2: 1})  # its keys [0, 2] were taken as the counts
    with pytest.raises(ValueError, match=r"one per MoE layer in the order of config.moe_layers \[0, 2\], not a set"):
        speech_expert_counts(model.config, {3, 1})  # read as [1, 3]
    with pytest.raises(ValueError, match="profile this model"):
        assign_modality_experts(model, hand_made_load([[1, 1]], [[1, 1]]), num_speech_experts=1)
    other_layers = hand_made_load([[1] * 6] * 2, [[1] * 6] * 2, layers=(0, 1))  # the right sizes, other layers
    with pytest.raises(ValueError, match=r"MoE layers \[0, 1\].*layers \[0, 2\].*profile this model"):
        assign_modality_experts(copy.deepcopy(model), other_layers, num_speech_experts=1)
    text_only = profile_modality_load(model, [{"input_ids": torch.randint(0, TEXT_VOCAB, (1, 8))}])
    with pytest.raises(ValueError, match="no speech tokens"):
        assign_modality_experts(model, text_only, num_speech_experts=1)
    with pytest.raises(ValueError, match="adaptive"):
        assign_modality_experts(model, load, strategy="adaptive", num_speech_experts=1)
    for seed in (None, 2.5, "7"):  # int(2.5) and int("7") would pass
        with pytest.raises(ValueError, match=f"seed={seed!r} must be an integer"):
            assign_modality_experts(copy.deepcopy(model), load, strategy="random", num_speech_experts=1, seed=seed)
    other_sizes = hand_made_load([[1] * 5] * 2, [[1] * 5] * 2)  # the model's layers, 5 experts where it has 6
    with pytest.raises(ValueError, match=r"with \[5, 5\] experts but the model has layers \[0, 2\] with \[6, 6\]"):
        assign_modality_experts(copy.deepcopy(model), other_sizes, num_speech_experts=1)
    for count in (
        1.5,
        [1.0, 1],
        True,
        np.float32(2.5),
        Fraction(2),
        np.bool_(True),
        torch.tensor(2.0),
        [2, True],
        "2",
    ):
        with pytest.raises(ValueError, match="whole expert counts"):
            assign_modality_experts(copy.deepcopy(model), load, num_speech_experts=count)
    # Integers of any kind (numpy, 0-d tensors and arrays), alone or one per layer, are counts.
    expected = assign_modality_experts(copy.deepcopy(model), load, num_speech_experts=2)
    for count in (np.int64(2), torch.tensor(2), np.array(2), [np.int32(2), torch.tensor(2)], torch.tensor([2, 2])):
        assert assign_modality_experts(copy.deepcopy(model), load, num_speech_experts=count) == expected


def test_adaptive_needs_two_experts_in_every_layer():
    """One speech and one text expert at least: a layer of one expert cannot be split (it got no speech expert)."""
    model = DeepTalkForCausalLM(tiny_config(num_experts=[1, 4], num_speech_experts=0))
    load = hand_made_load([[3], [4, 3, 2, 1]], [[3], [1, 1, 1, 7]])
    with pytest.raises(ValueError, match="adaptive' needs at least 2 experts"):
        assign_modality_experts(model, load, strategy="adaptive")


def test_a_model_without_speech_experts_needs_a_count(tmp_path_factory):
    """An imported MoE has none: the default (the model's current counts) would silently move no expert."""
    model = make_model(tmp_path_factory, num_speech_experts=0)
    load = profile_modality_load(model, [mixed_batch(0)])
    with pytest.raises(ValueError, match="no speech experts yet"):
        assign_modality_experts(model, load)
    chosen = assign_modality_experts(model, load, num_speech_experts=1)
    assert chosen == [[int(scores.argmax())] for scores in load.scores]


@settings(max_examples=8, deadline=None)
@given(draws=st.lists(st.permutations(range(6)), min_size=2, max_size=2), counts=st.tuples(*[st.integers(0, 5)] * 2))
def test_move_speech_experts_is_the_move_of_assignment(model, draws, counts):
    """Given ids, `move_speech_experts` builds the same model, bit for bit, as an assignment that chose those ids."""
    ids = [list(draw[:count]) for draw, count in zip(draws, counts, strict=True)]
    # A load whose paper-rule ranking puts exactly the wanted experts first.
    speech = [[2 if expert in wanted else 1 for expert in range(6)] for wanted in ids]
    load = hand_made_load(speech, [[1] * 6] * 2, layers=model.config.moe_layers)
    assigned, moved = copy.deepcopy(model), copy.deepcopy(model)
    assert assign_modality_experts(assigned, load, num_speech_experts=list(counts)) == [sorted(i) for i in ids]
    move_speech_experts(moved, [list(reversed(i)) for i in ids])  # any order in, source order recorded
    assert moved.config.to_dict() == assigned.config.to_dict()
    expected = assigned.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in moved.state_dict().items())
    assert moved.state_dict().keys() == expected.keys()


def test_moved_experts_keep_the_requires_grad_of_their_group(model):
    """Re-splitting a model in the speech stage keeps the stage: the new text experts and router stay frozen, the new
    speech ones keep training (each new tensor takes the flag of the group it replaces)."""
    moved = copy.deepcopy(model)
    trainable = set(set_training_stage(moved, "speech"))
    move_speech_experts(moved, [[0, 3, 5], [1]])
    block = moved.model.layers[0].mlp
    assert block.speech_experts.gate_up_proj.requires_grad and not block.experts.gate_up_proj.requires_grad
    for name, param in moved.named_parameters():
        assert param.requires_grad is (name in trainable), name


def test_move_speech_experts_errors(model):
    for ids, problem in (
        ([[0]], "2 MoE layers"),
        ([[0, 0], []], "distinct"),
        ([[6], []], r"\[0, 6\)"),
        ([list(range(6)), []], "at least one text expert"),
        ([[0.9, 2.5], []], "must be integer expert indices"),  # not truncated to 0 and 2
        ([[True], []], "must be integer expert indices"),
        (["ab", []], "must be integer expert indices"),
        ({0: [1], 2: [0]}, "one list per MoE layer, in the order of config.moe_layers \\[0, 2\\], not a mapping"),
        ({(4, 5), (0,)}, "not a set \\(it has no order\\)"),  # iterated in hash order, not as written
    ):
        moved = copy.deepcopy(model)
        with pytest.raises(ValueError, match=problem):
            move_speech_experts(moved, ids)
        # Refused before anything moves: the model and its config are as they were.
        assert moved.config.to_dict() == model.config.to_dict()
        assert moved.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in moved.state_dict().items())


def test_an_audio_models_experts_move_in_its_language_model():
    """`assign_modality_experts` / `move_speech_experts` take the audio model (its LLM's experts move, the shared
    config records it); profiling asks for the LLM by name (it measures id batches; it failed on a missing field)."""
    from .test_audio_model import whisper_audio_config

    audio = DeepTalkForConditionalGeneration(whisper_audio_config())
    llm = copy.deepcopy(audio.language_model)
    start = audio.config.text_config.speech_token_start
    batches = [{"input_ids": torch.tensor([[3, 4, 5, start, start + 1, start + 2]])}]
    with pytest.raises(ValueError, match="pass the audio model's language_model"):
        profile_modality_load(audio, batches)
    load = profile_modality_load(audio.language_model, batches)
    assert assign_modality_experts(audio, load, num_speech_experts=1) == assign_modality_experts(
        llm, load, num_speech_experts=1
    )
    assert audio.config.text_config.speech_expert_ids == llm.config.speech_expert_ids
    for name, tensor in llm.state_dict().items():
        assert torch.equal(tensor, audio.language_model.state_dict()[name]), name


def test_the_base_model_that_automodel_loads_is_profiled_and_split(model, tmp_path):
    """`AutoModel.from_pretrained` gives a `DeepTalkModel`: it profiles as its causal-LM wrapper does and its experts
    move to the same tensors (both were an AttributeError on the missing `.model`)."""
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is DeepTalkModel
    batches = [mixed_batch(seed) for seed in range(2)]
    expected, load = profile_modality_load(model, batches), profile_modality_load(base, batches)
    assert load.to_dict() == expected.to_dict()
    assert profile_modality_load(torch.compile(base, backend="eager"), batches).to_dict() == expected.to_dict()
    causal = copy.deepcopy(model)
    assert assign_modality_experts(base, load, num_speech_experts=2) == assign_modality_experts(
        causal, expected, num_speech_experts=2
    )
    for field in ("num_experts", "num_speech_experts", "speech_expert_ids"):
        assert getattr(base.config, field) == getattr(causal.config, field)
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, causal.model.state_dict()[name]), name


def assert_same_logits(actual, expected):
    """Equal up to float32 summation order: moving experts between groups regroups their sums (logits here are of
    order 10, so rounding reaches 1e-5; a wrong permutation changes them by order 1)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


# No shrinking: each example runs the model a few times, and a failing example is already small.
@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    first=st.tuples(st.sampled_from(["paper", "random", "adaptive"]), st.integers(0, 5), st.integers(0, 100)),
    second=st.tuples(st.sampled_from(["paper", "random"]), st.integers(0, 5), st.integers(0, 100)),
)
def test_assignment_is_a_pure_permutation(model, first, second):
    """With routing off the logits do not change, also when a split model is split again (orders compose)."""
    model = copy.deepcopy(model)
    batches = [mixed_batch(0), mixed_batch(1)]
    ids = batches[0]["input_ids"]
    before = logits(model, ids, "none")
    load = profile_modality_load(model, batches)
    original = {}
    for layer in model.config.moe_layers:
        block = model.model.layers[layer].mlp
        original[layer] = torch.cat([block.experts.gate_up_proj, block.speech_experts.gate_up_proj]).detach().clone()
    for strategy, count, seed in (first, second):
        chosen = assign_modality_experts(
            model, load, strategy=strategy, seed=seed, num_speech_experts=None if strategy == "adaptive" else count
        )
        assert_same_logits(logits(model, ids, "none"), before)
        for layer, speech_ids in zip(model.config.moe_layers, chosen, strict=True):
            block = model.model.layers[layer].mlp
            text_ids = [s for s in range(6) if s not in speech_ids]
            assert torch.equal(block.experts.gate_up_proj, original[layer][text_ids])
            if speech_ids:
                assert torch.equal(block.speech_experts.gate_up_proj, original[layer][speech_ids])
                storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
                assert len(storages) == len(list(block.parameters()))  # no group is a view of another
            else:
                assert not hasattr(block, "speech_experts")
        # The load is in source order, so profiling the split model measures the same thing.
        again = profile_modality_load(model, batches)
        assert all(torch.equal(a, b) for a, b in zip(again.speech_counts, load.speech_counts, strict=True))


def test_split_model_survives_save_and_from_pretrained(model, tmp_path):
    model = copy.deepcopy(model)
    ids = mixed_batch(0)["input_ids"]
    before = logits(model, ids, "none")
    load = profile_modality_load(model, [mixed_batch(0)])
    assign_modality_experts(model, load, num_speech_experts=[3, 1])
    assign_modality_experts(model, load, strategy="random", num_speech_experts=2, seed=5)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.speech_expert_ids == model.config.speech_expert_ids
    assert reloaded.config.num_experts == model.config.num_experts == [4, 4]
    assert_same_logits(logits(reloaded, ids, "none"), before)
    assert torch.equal(logits(reloaded, ids, "hard"), logits(model, ids, "hard"))


# Training stages


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def train_steps(model, optimizer, steps: int = 3):
    model.train()
    for step in range(steps):
        batch = mixed_batch(step)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_speech_then_text_stage_with_adamw(tmp_path_factory):
    model = make_model(tmp_path_factory)
    # One optimizer over every tensor, as users do: frozen tensors must stay exact despite weight decay and moments.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    text_only = torch.randint(0, TEXT_VOCAB, (2, 10))
    text_logits = logits(model, text_only, "hard")[..., :TEXT_VOCAB]

    trainable = set(set_training_stage(model, "speech"))
    assert trainable == {name for name, _ in model.named_parameters() if "speech" in name}
    before = snapshot(model)
    train_steps(model, optimizer)
    after = snapshot(model)
    for name in before:
        if "speech" in name:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"text tensor {name} moved"
    assert torch.equal(logits(model, text_only, "hard")[..., :TEXT_VOCAB], text_logits)

    trainable = set(set_training_stage(model, "text"))
    assert trainable == {
        name
        for name in after
        if name.endswith(("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    }
    assert len(trainable) == 6  # two MoE layers: router, gate_up, down
    train_steps(model, optimizer)
    final = snapshot(model)
    for name in after:
        assert torch.equal(after[name], final[name]) != (name in trainable), name


@pytest.mark.parametrize("tie", [False, True])
def test_resizing_the_speech_vocab_keeps_the_stage(tie):
    """New speech tables take the frozen/trainable setting of the ones they replace (of the text tables when there were
    none), as transformers' `resize_token_embeddings` does: a stage keeps training exactly its tensors."""
    for stage in ("speech", "text"):
        model = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=tie))
        trainable = set(set_training_stage(model, stage))
        model.resize_speech_vocab(20)
        assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable, stage
    for frozen in (False, True):
        model = DeepTalkForCausalLM(tiny_config(speech_vocab_size=0, tie_word_embeddings=tie))
        model.requires_grad_(not frozen)
        model.resize_speech_vocab(20)
        assert model.model.speech_embed_tokens.weight.requires_grad is model.speech_lm_head.weight.requires_grad
        assert model.speech_lm_head.weight.requires_grad is not frozen


def test_joint_align_and_also(tmp_path_factory):
    model = make_model(tmp_path_factory)
    everything = {name for name, _ in model.named_parameters()}
    assert set(set_training_stage(model, "joint")) == everything
    with pytest.raises(ValueError, match="no(ne)?.*audio encoder|audio encoder.*none"):
        set_training_stage(model, "align")
    with pytest.raises(ValueError, match="stage='listen'"):
        set_training_stage(model, "listen")
    with pytest.raises(ValueError, match="matches no parameter"):
        set_training_stage(model, "text", also=("*.attention.*",))
    # A tied tensor may be named by any of its names: a tied head is the embeddings.
    tied = DeepTalkForCausalLM(tiny_config(tie_word_embeddings=True))
    assert "model.embed_tokens.weight" in set_training_stage(tied, "text", also=("lm_head.weight",))
    assert tied.lm_head.weight.requires_grad
    # One pattern passed as a string is named as such, not read as one pattern per character ("*" would match all).
    with pytest.raises(TypeError, match=r"also='\*\.self_attn\.\*' is one string.*also=\('\*\.self_attn\.\*',\)"):
        set_training_stage(model, "speech", also="*.self_attn.*")
    # Patterns from a generator are read once: the same tensors as from a list (the check used them up before).
    patterns = [f"model.layers.{layer}.self_attn.q_proj.*" for layer in range(model.config.num_hidden_layers)]
    listed = set_training_stage(model, "speech", also=patterns)
    assert set_training_stage(model, "speech", also=(pattern for pattern in patterns)) == listed
    assert any("self_attn.q_proj" in name for name in listed)
    with pytest.raises(TypeError, match="also=None must be a sequence of glob patterns"):
        set_training_stage(model, "speech", also=None)
    # A model without speech tensors (an imported MoE before assignment) or without MoE layers: the call says why.
    bare = DeepTalkForCausalLM(tiny_config(speech_vocab_size=0, num_speech_experts=0))
    with pytest.raises(ValueError, match="stage 'speech' leaves nothing.*no speech tensors.*resize_speech_vocab"):
        set_training_stage(bare, "speech")
    dense = DeepTalkForCausalLM(tiny_config(mlp_only_layers=[0, 1, 2]))
    with pytest.raises(ValueError, match="stage 'text' leaves nothing.*no text experts or text router"):
        set_training_stage(dense, "text")
    trainable = set(set_training_stage(model, "text", also=("*.self_attn.q_proj.*",)))
    assert {name for name in trainable if "q_proj" in name} == {
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)
    }

    # A model with an audio encoder and a speech connector (as the audio issue will add them); the encoder's own
    # parameter names may say "speech" (e.g. SeamlessM4T's `speech_encoder`): it stays frozen all the same.
    model.model.audio_encoder = nn.ModuleDict({"speech_encoder": nn.Linear(4, 4)})
    model.model.speech_connector = nn.Linear(4, 32)
    assert set(set_training_stage(model, "align")) == {"model.speech_connector.weight", "model.speech_connector.bias"}
    for stage in ("speech", "joint"):
        trainable = set(set_training_stage(model, stage))
        assert "model.speech_connector.weight" in trainable
        assert not any("audio_encoder" in name for name in trainable)
    assert model.model.audio_encoder.speech_encoder.weight.requires_grad is False


@pytest.mark.parametrize("model_class", [DeepTalkForCausalLM, DeepTalkModel])
def test_stages_read_names_inside_the_deeptalk_model_not_a_wrappers_attribute(model_class):
    """A DeepTalk model (the causal LM, or the bare `DeepTalkModel` that `AutoModel` gives) held by a user's module
    under a name that says "speech": each stage trains the same tensors as on the bare model, under the wrapper's names
    (before, the speech stage trained every tensor and the text stage none); the wrapper's own tensors follow the rules
    by their own names."""
    model = model_class(tiny_config())
    wrapper = nn.Module()
    wrapper.speech_llm = model
    wrapper.speech_head = nn.Linear(2, 2)  # outside the model: a speech tensor by its own name
    head = {"speech_head.weight", "speech_head.bias"}
    for stage, extra in (("speech", head), ("text", set()), ("joint", head)):
        bare = {f"speech_llm.{name}" for name in training_stage_parameters(model, stage)}
        assert set(training_stage_parameters(wrapper, stage)) == bare | extra, stage
        if stage == "speech":  # and not every tensor of the model: its text attention stays out
            assert not any(".self_attn.q_proj." in name for name in bare)


def test_freezing_drops_stale_gradients(tmp_path_factory):
    model = make_model(tmp_path_factory)
    set_training_stage(model, "joint")
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.0), steps=1)
    model(**mixed_batch(0), labels=mixed_batch(0)["input_ids"]).loss.backward()
    set_training_stage(model, "speech")
    assert all(param.grad is None for name, param in model.named_parameters() if "speech" not in name)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_assignment_on_deepseek_routing_keeps_the_source_function(version):
    """Group-limited top-k and V3's correction bias (which moves with its expert) survive profiling and assignment."""
    from .test_modeling import deepseek_pair

    source, model = deepseek_pair(version)
    batches = [{"input_ids": torch.randint(0, 97, (2, 9)), "modality_ids": (torch.rand(2, 9) < 0.5).long()}]
    load = profile_modality_load(model, batches)
    assert int((load.speech_counts[0] + load.text_counts[0]).sum()) == 18 * model.config.num_experts_per_tok
    moved = assign_modality_experts(model, load, num_speech_experts=3)
    assert all(len(ids) == 3 for ids in moved)
    model.config.modality_routing = "none"
    input_ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (model(input_ids).logits - source(input_ids).logits).abs().max() <= 1e-5
    if version == "v3":
        bias = model.model.layers[1].mlp.speech_gate.e_score_correction_bias
        expected = source.model.layers[1].mlp.gate.e_score_correction_bias[moved[0]]
        assert torch.equal(bias, expected)


def test_data_parallel_wrappers_are_profiled_through_and_refused_for_changes(model):
    """(Distributed)DataParallel keeps the parameters and trainable set it was built with: profiling reads through it,
    what changes them is refused by name (torch's own error came steps later, about unused parameters)."""
    wrapped = nn.DataParallel(model)  # no GPU: a plain wrapper, the same attributes as DistributedDataParallel's
    batches = [mixed_batch(0)]
    through, bare = profile_modality_load(wrapped, batches), profile_modality_load(model, batches)
    assert all(map(torch.equal, through.speech_counts + through.text_counts, bare.speech_counts + bare.text_counts))
    for change in (
        lambda: move_speech_experts(wrapped, [[0]] * len(model.config.moe_layers)),
        lambda: assign_modality_experts(wrapped, through, num_speech_experts=1),
        lambda: set_training_stage(wrapped, "speech"),
        lambda: add_speech_attention(wrapped),
    ):
        with pytest.raises(ValueError, match="on a DataParallel.*bare model"):
            change()


def test_moving_offloaded_experts_is_refused(tmp_path_factory):
    """accelerate's offloading leaves meta placeholders in the model: regrouped, the experts would hold no weights."""
    offloaded = make_model(tmp_path_factory)
    layer = offloaded.config.moe_layers[-1]
    offloaded.model.layers[layer].mlp.experts.to("meta")
    before = copy.deepcopy(offloaded.config.to_dict())
    with pytest.raises(ValueError, match=rf"MoE layers \[{layer}\] are offloaded.*without offloading"):
        move_speech_experts(offloaded, [[0]] * len(offloaded.config.moe_layers))
    assert offloaded.config.to_dict() == before  # nothing moved
