"""Benchmark (issue 8): does DeepTalk's modality-expert recipe keep a small LM's text ability while it learns speech?

    python benchmarks/forgetting.py [--fast] [--seed 0] [--threads 1] [--out benchmarks/results] [--name NAME]
        [--joint-text-fraction 0.25] [--text-steps 0] [--speech-also PATTERN ...] [--num-speech-experts 4]
        [--strategy paper] [--num-experts 16] [--expert-size 16] [--top-k 4] [--lr 1e-3] [--speech-lr-scale 1]
        [--speech-attention] [--split-study]
    python benchmarks/forgetting.py --collect RUN.json [RUN.json ...] [--out DIR] [--name NAME]

The paper (arXiv 2506.21864) reports a 5.5% text-ability drop for DeepTalk against > 20% for GLM-4-Voice-style dense
training. This is the same question at toy scale, on CPU, with everything generated and seeded:

1. A synthetic language: a hidden Markov source (a topic fixed per sentence x a sparse chain of syntactic roles, each
   (topic, role) emitting a few words of its role's class). Its exact next-token distribution is computable, so the
   benchmark reports the Bayes-optimal perplexity beside the models'.
2. A synthetic TTS "tokenizer": every word has a fixed pronunciation of 2-3 speech units from a small shared
   inventory, and each unit is lengthened (repeated) with some probability. A speech sample is
   `BOS words . SOS units EOS`; the speech-task loss is the cross-entropy of the units and EOS given the text.
3. A MoE LM and a dense LM with the same active MLP width are pre-trained on the same text; then each learns speech
   with the same data, batches, order, optimizer, schedule and number of updates:
   `align` (speech rows only, every arm) -> `speech` (TTS samples, loss on the speech answer) -> optionally `text`
   (text-corpus windows) -> `joint` (TTS samples with loss on text and speech, plus a share of text-corpus windows in
   every batch), as
   (a) dense full fine-tuning, (b) PureMoE (all experts, no split), (c) a random modality split trained by stages,
   (d) DeepTalk: profile the load after `align`, move the experts with the highest rho_A * (1 - rho_T) into the
   speech group, train by stages.

Each arm reports its text perplexity change against its own pre-trained model and its held-out speech loss, under the
softmax of the text block and of the speech block (the JSON has both under the full vocabulary too). Results:
`forgetting.json`, `forgetting.md` (the table) and `forgetting.png` (curves) in `--out`; `--fast` runs tiny sizes
(for the tests) and writes `forgetting_fast.*`; every other option adds its setting to the name
(`--seed 1 --lr 0.002` writes `forgetting_finetune_lr0.002_seed1.*`) unless `--name` is given. `--collect` reads
runs that differ only in `--lr` and compares the arms at equal speech loss (`forgetting_matched_speech.{json,md}`).
`--split-study` asks whether the choice of experts matters: it measures what each expert's removal costs text, the
text cost of (d)'s split against an oracle's and 64 random draws', and runs the oracle split (e) and two more random
draws (c2, c3) through the same stages. docs/forgetting.md explains the design and the results.
"""

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from run_info import check_output

from deeptalk_hf import (
    DeepTalkConfig,
    DeepTalkForCausalLM,
    add_speech_attention,
    assign_modality_experts,
    move_speech_experts,
    profile_modality_load,
    set_training_stage,
    training_stage_parameters,
)

# Text ids: specials, then the words. Speech-block offsets: units, then silence and the speech markers.
PAD, BOS, PERIOD, FIRST_WORD = 0, 1, 2, 3
ARMS = {
    "dense": "(a) dense, full fine-tuning",
    "pure_moe": "(b) PureMoE, all experts",
    "random_split": "(c) random split + stages",
    "deeptalk": "(d) DeepTalk: load split + stages",
}
# `--split-study` adds these arms: the split that costs text least, and two more random draws.
STUDY_ARMS = {
    "oracle_split": "(e) text-cost oracle split + stages",
    "random_split_2": "(c2) random split, 2nd draw + stages",
    "random_split_3": "(c3) random split, 3rd draw + stages",
}
TITLES = ARMS | STUDY_ARMS
RANDOM_DRAWS = 64  # random splits whose text cost `--split-study` measures
IGNORE = -100


@dataclass(frozen=True)
class Settings:
    """Sizes, steps and learning rates; `FULL` is the committed run, `FAST` the tests'.

    The MoE mirrors the paper's base model (DeepSeek-V2-Lite: fine-grained routed experts plus a shared expert) at toy
    size; the dense model's MLP is as wide as the MoE's active width, `top_k * expert_size + shared_expert_size`.
    """

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 16  # routed experts per layer in the pre-trained MoE
    num_speech_experts: int = 4  # per layer, moved out of them by the split arms
    top_k: int = 4
    expert_size: int = 16
    shared_expert_size: int = 32  # always on for every token; a text tensor (frozen in the speech stage)
    topics: int = 4
    roles: int = 8
    words_per_role: int = 16
    units: int = 32
    repeat_prob: float = 0.2  # a unit is lengthened (emitted twice) with this probability
    seq_len: int = 64
    batch_size: int = 32
    pretrain_steps: int = 1500
    align_steps: int = 100
    speech_steps: int = 400
    text_steps: int = 0  # a text phase between the speech and joint phases (text-corpus windows)
    joint_steps: int = 400
    speech_also: tuple[str, ...] = ()  # parameter-name patterns the split arms also train in the speech phase
    strategy: str = "paper"  # arm (d)'s `assign_modality_experts` strategy: "paper" or "adaptive"
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    speech_lr_scale: float = 1.0  # speech tensors' learning rate ÷ the others' in every phase after align
    speech_attention: bool = False  # the split arms also get speech attention projections (`add_speech_attention`)
    split_study: bool = False  # also measure what the choice of experts costs text (`split_study`) and run STUDY_ARMS
    paired_sentences: int = 4000  # the paired (TTS) corpus is small, as paired speech data is
    joint_text_fraction: float = 0.25  # share of each joint-phase batch that is text-corpus windows
    eval_text_windows: int = 128
    eval_speech_samples: int = 256
    profile_batches: int = 8
    eval_every: int = 50
    seed: int = 0


FULL = Settings()
FAST = Settings(
    hidden_size=32,
    num_layers=2,
    num_experts=4,
    num_speech_experts=2,
    top_k=2,
    expert_size=16,
    shared_expert_size=16,
    topics=2,
    roles=4,
    words_per_role=8,
    units=12,
    seq_len=40,
    batch_size=8,
    pretrain_steps=30,
    align_steps=4,
    speech_steps=10,
    joint_steps=10,
    paired_sentences=200,
    eval_text_windows=16,
    eval_speech_samples=16,
    profile_batches=2,
    eval_every=10,
)


# ---------------------------------------------------------------------------------------------------------- data
def _draw(cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of `cdf` (rows of cumulative probabilities), vectorised."""
    return (cdf < rng.random((cdf.shape[0], 1))).sum(1).clip(max=cdf.shape[1] - 1)


@dataclass
class Language:
    """A hidden Markov source: topic (fixed per sentence) x syntactic role; sentences end with PERIOD.

    The topic makes word choice depend on the whole sentence so far (evidence accumulates), the role chain gives
    local syntax; both are hidden, so a model has to infer them, and `optimal_nll` computes the exact predictive
    distribution (forward algorithm) as a floor for the perplexities.
    """

    start: np.ndarray  # [roles]
    transition: np.ndarray  # [roles, roles]
    stop: np.ndarray  # [roles]
    emission: np.ndarray  # [topics, roles, words]

    @classmethod
    def generate(cls, settings: Settings, rng: np.random.Generator) -> "Language":
        roles, words = settings.roles, settings.roles * settings.words_per_role
        start = np.zeros(roles)
        start[: max(1, roles // 4)] = 1.0
        transition = np.zeros((roles, roles))
        for role in range(roles):
            successors = rng.choice(roles, size=min(3, roles), replace=False)
            transition[role, successors] = rng.dirichlet(np.ones(len(successors)))
        stop = np.where(np.arange(roles) >= roles // 2, rng.uniform(0.15, 0.45, roles), 0.0)
        emission = np.zeros((settings.topics, roles, words))
        support = max(2, settings.words_per_role * 3 // 8)  # each (topic, role) uses a few of its class's words
        for topic in range(settings.topics):
            for role in range(roles):
                chosen = role * settings.words_per_role + rng.choice(settings.words_per_role, support, replace=False)
                emission[topic, role, chosen] = rng.dirichlet(np.ones(support))
        return cls(start / start.sum(), transition, stop, emission)

    @property
    def num_topics(self) -> int:
        return self.emission.shape[0]

    def sentences(self, count: int, rng: np.random.Generator, max_words: int = 64) -> list[np.ndarray]:
        """`count` sentences as text ids ending with PERIOD (the rare ones longer than `max_words` are dropped)."""
        topic = rng.integers(self.num_topics, size=count)
        role = _draw(np.cumsum(np.broadcast_to(self.start, (count, len(self.start))), 1), rng)
        emission_cdf, transition_cdf = np.cumsum(self.emission, -1), np.cumsum(self.transition, -1)
        words = np.full((count, max_words), -1)
        length = np.zeros(count, dtype=int)
        alive = np.arange(count)
        for position in range(max_words):
            words[alive, position] = FIRST_WORD + _draw(emission_cdf[topic[alive], role[alive]], rng)
            stops = rng.random(len(alive)) < self.stop[role[alive]]
            length[alive[stops]] = position + 1
            alive = alive[~stops]
            role[alive] = _draw(transition_cdf[role[alive]], rng)
        return [np.append(row[:n], PERIOD) for row, n in zip(words, length) if n]

    def optimal_nll(self, window: np.ndarray) -> np.ndarray:
        """Exact -log p(token | previous tokens) for tokens 1.. of a `BOS sentence sentence ...` window."""
        topics, roles = self.num_topics, len(self.start)
        emission = self.emission.reshape(topics * roles, -1)
        stop = np.tile(self.stop, topics)
        block = np.kron(np.eye(topics), self.transition)  # the topic never changes within a sentence
        fresh = np.repeat(1.0 / topics, topics)[:, None] * self.start[None, :]
        prior = fresh.reshape(-1)  # state distribution before the next word
        posterior = None  # state distribution after the last word (None: at a sentence start)
        losses = []
        for token in window[1:]:
            if posterior is None:
                prob = prior @ emission[:, token - FIRST_WORD] if token >= FIRST_WORD else 0.0
            elif token == PERIOD:
                prob = posterior @ stop
            else:
                prior = (posterior * (1 - stop)) @ block
                prob = prior @ emission[:, token - FIRST_WORD]
            losses.append(-math.log(max(prob, 1e-300)))
            if token == PERIOD:
                posterior, prior = None, fresh.reshape(-1)
            else:
                joint = prior * emission[:, token - FIRST_WORD]
                posterior = joint / max(joint.sum(), 1e-300)
        return np.array(losses)


@dataclass
class Lexicon:
    """A TTS tokenizer's view of the words: a fixed unit sequence per word (units shared between words), each unit
    lengthened at random. PERIOD is silence."""

    pronunciations: dict[int, tuple[int, ...]]
    units: int
    repeat_prob: float

    @classmethod
    def generate(cls, settings: Settings, rng: np.random.Generator) -> "Lexicon":
        words = settings.roles * settings.words_per_role
        seen: set[tuple[int, ...]] = set()
        pronunciations = {}
        for word in range(FIRST_WORD, FIRST_WORD + words):
            while (units := tuple(rng.integers(settings.units, size=rng.integers(2, 4)).tolist())) in seen:
                pass  # unique pronunciations, so the speech determines the text
            seen.add(units)
            pronunciations[word] = units
        return cls(pronunciations, settings.units, settings.repeat_prob)

    @property
    def speech_vocab_size(self) -> int:
        return self.units + 3  # units, silence, SOS, EOS

    @property
    def silence(self) -> int:
        return self.units

    @property
    def sos(self) -> int:
        return self.units + 1

    @property
    def eos(self) -> int:
        return self.units + 2

    def speak(self, sentence: np.ndarray, rng: np.random.Generator) -> list[int]:
        """Speech-block offsets of a sentence's units (PERIOD is silence)."""
        units = []
        for word in sentence.tolist():
            for unit in self.pronunciations.get(word, (self.silence,)):
                units.extend([unit, unit] if rng.random() < self.repeat_prob else [unit])
        return units


@dataclass
class Corpus:
    """Every batch of every phase, built once, so all arms see exactly the same data in the same order."""

    text_vocab_size: int
    speech_vocab_size: int
    pretrain: list[dict[str, torch.Tensor]]
    align: list[dict[str, torch.Tensor]]
    speech: list[dict[str, torch.Tensor]]
    text: list[dict[str, torch.Tensor]]
    joint: list[dict[str, torch.Tensor]]
    eval_text: dict[str, torch.Tensor]
    eval_speech: dict[str, torch.Tensor]
    profile: list[dict[str, torch.Tensor]]
    optimal_text_ppl: float
    paired_train: int = 0
    paired_eval: int = 0


def _text_windows(language: Language, count: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` windows `BOS sentence sentence ...` cut at `seq_len` (each window starts at a sentence)."""
    pool = iter(language.sentences(count * seq_len // 4 + 64, rng))
    windows = np.empty((count, seq_len), dtype=np.int64)
    for row in windows:
        tokens = [BOS]
        while len(tokens) < seq_len:
            sentence = next(pool, None)
            if sentence is None:
                pool = iter(language.sentences(count + 64, rng))
                continue
            tokens.extend(sentence.tolist())
        row[:] = tokens[:seq_len]
    return torch.from_numpy(windows)


def _paired(
    sentences: list[np.ndarray], lexicon: Lexicon, text_vocab: int, seq_len: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TTS samples `BOS words . SOS units EOS`, right-padded: ids, attention mask, and where the speech answer is
    (the units and EOS, whose loss is the speech task)."""
    ids = np.full((len(sentences), seq_len), PAD, dtype=np.int64)
    answer = np.zeros((len(sentences), seq_len), dtype=bool)
    for row, sentence in enumerate(sentences):
        speech = [text_vocab + u for u in lexicon.speak(sentence, rng)] + [text_vocab + lexicon.eos]
        tokens = [BOS, *sentence.tolist(), text_vocab + lexicon.sos, *speech]
        ids[row, : len(tokens)] = tokens
        answer[row, len(sentence) + 2 : len(tokens)] = True
    ids_t = torch.from_numpy(ids)
    return ids_t, (ids_t != PAD).long(), torch.from_numpy(answer)


def _fits(sentence: np.ndarray, lexicon: Lexicon, seq_len: int) -> bool:
    """Whether a sentence's TTS sample fits `seq_len` even with every unit lengthened."""
    units = sum(len(lexicon.pronunciations.get(w, (0,))) for w in sentence.tolist())
    return 1 + len(sentence) + 1 + 2 * units + 1 <= seq_len


def build_corpus(settings: Settings) -> Corpus:
    """The language, the lexicon and every batch, from `settings.seed`.

    Each use draws from its own random stream, so changing one phase (its length, the joint phase's text share) leaves
    the language, the pre-training data, the other phases and the held-out sets as they were.
    """
    streams = np.random.SeedSequence(settings.seed).spawn(9)
    source, pretrain_rng, eval_rng, paired_rng, align_rng, speech_rng, joint_rng, profile_rng, text_rng = (
        np.random.default_rng(stream) for stream in streams
    )
    language = Language.generate(settings, source)
    lexicon = Lexicon.generate(settings, source)
    text_vocab = FIRST_WORD + settings.roles * settings.words_per_role
    batch, seq_len = settings.batch_size, settings.seq_len

    def text_batches(count: int, size: int, rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:
        windows = _text_windows(language, count * size, seq_len, rng)
        return [
            {"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()} for w in windows.split(size)
        ]

    pretrain = text_batches(settings.pretrain_steps, batch, pretrain_rng)
    eval_windows = _text_windows(language, settings.eval_text_windows, seq_len, eval_rng)
    optimal = float(np.mean(np.concatenate([language.optimal_nll(w) for w in eval_windows.numpy()])))

    # The paired corpus: sentences whose TTS sample fits; held-out transcripts never occur in training.
    wanted = settings.paired_sentences + settings.eval_speech_samples
    fitting = [s for s in language.sentences(4 * wanted, paired_rng) if _fits(s, lexicon, seq_len)]
    train_sentences = fitting[: settings.paired_sentences]
    seen = {s.tobytes() for s in train_sentences}
    eval_sentences = [s for s in fitting[settings.paired_sentences :] if s.tobytes() not in seen]
    eval_sentences = eval_sentences[: settings.eval_speech_samples]

    def tts_batches(
        steps: int, size: int, answer_only: bool, rng: np.random.Generator
    ) -> list[dict[str, torch.Tensor]]:
        """`steps` batches from the paired corpus (reshuffled each epoch); labels on the speech answer only, or on
        every non-pad token (text and speech)."""
        epochs = -(-steps * size // len(train_sentences))
        order = np.concatenate([rng.permutation(len(train_sentences)) for _ in range(epochs)])[: steps * size]
        ids, mask, answer = _paired([train_sentences[i] for i in order], lexicon, text_vocab, seq_len, rng)
        labels = ids.masked_fill(~answer if answer_only else mask == 0, IGNORE)
        return [
            {"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(ids.split(size), mask.split(size), labels.split(size))
        ]

    align = tts_batches(settings.align_steps, batch, True, align_rng)
    speech = tts_batches(settings.speech_steps, batch, True, speech_rng)
    text = text_batches(settings.text_steps, batch, text_rng) if settings.text_steps else []
    # Joint phase: TTS samples with loss on text and speech, plus (optionally) text-corpus windows in every batch.
    replay = round(settings.joint_text_fraction * batch)
    joint = tts_batches(settings.joint_steps, batch - replay, False, joint_rng)
    if replay:
        windows = text_batches(settings.joint_steps, replay, joint_rng)
        joint = [{k: torch.cat([t[k], b[k]]) for k in b} for t, b in zip(windows, joint)]
    eval_ids, eval_mask, eval_answer = _paired(eval_sentences, lexicon, text_vocab, seq_len, eval_rng)
    # The load is profiled on speech-phase samples and on text-corpus windows (both modalities, as the paper does).
    profile = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in speech[: settings.profile_batches]]
    profile += [
        {k: b[k] for k in ("input_ids", "attention_mask")}
        for b in text_batches(settings.profile_batches, batch, profile_rng)
    ]
    return Corpus(
        text_vocab_size=text_vocab,
        speech_vocab_size=lexicon.speech_vocab_size,
        pretrain=pretrain,
        align=align,
        speech=speech,
        text=text,
        joint=joint,
        eval_text={"input_ids": eval_windows},
        eval_speech={"input_ids": eval_ids, "attention_mask": eval_mask, "answer": eval_answer},
        profile=profile,
        optimal_text_ppl=math.exp(optimal),
        paired_train=len(train_sentences),
        paired_eval=len(eval_sentences),
    )


# -------------------------------------------------------------------------------------------------------- models
def pretrain_config(settings: Settings, text_vocab: int, dense: bool, **overrides) -> DeepTalkConfig:
    """A text-only LM; the dense one has every layer in `mlp_only_layers` and an MLP as wide as top_k experts."""
    fields = dict(
        vocab_size=text_vocab,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.top_k * settings.expert_size + settings.shared_expert_size,
        moe_intermediate_size=settings.expert_size,
        shared_expert_intermediate_size=settings.shared_expert_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        head_dim=settings.hidden_size // settings.num_heads,
        num_experts=settings.num_experts,
        num_speech_experts=0,
        num_experts_per_tok=settings.top_k,
        norm_topk_prob=True,
        mlp_only_layers=list(range(settings.num_layers)) if dense else [],
        max_position_embeddings=settings.seq_len,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=PERIOD,
    )
    return DeepTalkConfig(**{**fields, **overrides})


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: DeepTalkForCausalLM,
    phases: list[tuple[str, list[dict[str, torch.Tensor]]]],
    lr: float,
    stage: Callable[[str], None] = lambda phase: None,
    on_step: Callable[[int], None] = lambda step: None,
    speech_lr_scale: float = 1.0,
) -> None:
    """One AdamW and one LR schedule over all `phases` (name, batches); `stage(name)` sets what trains in a phase.

    Freezing is `requires_grad=False` on whole tensors (`set_training_stage`), which AdamW skips entirely: frozen
    tensors are neither updated nor decayed. `on_step(done)` runs before the first and after every update.
    `speech_lr_scale` multiplies the learning rate of the speech tensors (the library's `"speech"` stage) in every
    arm; beyond the speech vocabulary rows only the split arms have any, so only they can learn speech faster than
    their text tensors change.
    """
    total = sum(len(batches) for _, batches in phases)
    speech = set(training_stage_parameters(model, "speech")) if speech_lr_scale != 1.0 else set()
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in speech]},
        {"params": [p for n, p in model.named_parameters() if n in speech], "lr": lr * speech_lr_scale},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = _schedule(optimizer, total)
    model.train()
    done = 0
    on_step(done)
    for name, batches in phases:
        stage(name)
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            on_step(done)


@torch.no_grad()
def evaluate(model: DeepTalkForCausalLM, corpus: Corpus, chunk: int = 64) -> dict[str, float]:
    """Held-out text perplexity and speech-task loss (NaN for a model without speech vocabulary), each under the softmax over its own vocabulary block (what a
    decoder that knows its output modality sees), and both under the full vocabulary.

    Text: every next-token prediction of the held-out windows. Speech: the units and EOS of held-out TTS samples.
    """
    training = model.training
    model.eval()
    start = corpus.text_vocab_size
    sums = dict.fromkeys(("speech", "speech_full"), 0.0)
    counts = {"speech": 0}
    sums["text"], sums["text_full"], counts["text"] = _text_sums(
        model, corpus.eval_text["input_ids"].split(chunk), start
    )
    speech = [corpus.eval_speech[k].split(chunk) for k in ("input_ids", "attention_mask", "answer")]
    for ids, mask, answer in zip(*speech) if model.config.speech_vocab_size else ():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        picked = answer[:, 1:]
        target = ids[:, 1:][picked]
        chosen = logits[picked]
        sums["speech"] += F.cross_entropy(chosen[:, start:], target - start, reduction="sum").item()
        sums["speech_full"] += F.cross_entropy(chosen, target, reduction="sum").item()
        counts["speech"] += target.numel()
    model.train(training)
    return {
        "text_ppl": math.exp(sums["text"] / counts["text"]),
        "text_ppl_full_vocab": math.exp(sums["text_full"] / counts["text"]),
        "speech_loss": sums["speech"] / counts["speech"] if counts["speech"] else math.nan,
        "speech_loss_full_vocab": sums["speech_full"] / counts["speech"] if counts["speech"] else math.nan,
    }


@torch.no_grad()
def _text_sums(
    model: DeepTalkForCausalLM, windows: Iterable[torch.Tensor], text_vocab: int
) -> tuple[float, float, int]:
    """Summed next-token cross-entropy of text windows under the text block's softmax and under the full vocabulary,
    and the number of predictions."""
    text = full = 0.0
    count = 0
    for ids in windows:
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:].reshape(-1)
        text += F.cross_entropy(logits[..., :text_vocab].reshape(-1, text_vocab), target, reduction="sum").item()
        full += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, reduction="sum").item()
        count += target.numel()
    return text, full, count


def _trainable_summary(model: DeepTalkForCausalLM) -> dict[str, int]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "tensors": len(trainable),
        "parameters": sum(p.numel() for _, p in trainable),
        "text_tensors": sum("speech" not in n for n, _ in trainable),
    }


def _text_state(model: DeepTalkForCausalLM) -> dict[str, torch.Tensor]:
    """Copies of every text tensor (every parameter whose name lacks `speech`, per the library's naming rule)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "speech" not in n}


@dataclass
class ArmResult:
    """One arm: its metrics at each point (pre-trained, after `align`, after the split, after the speech phase,
    final), what trained in each phase, and, for the split arms, which experts became speech experts."""

    arm: str
    title: str
    pretrained: dict[str, float]
    after_align: dict[str, float]
    after_split: dict[str, float]
    after_speech: dict[str, float]
    final: dict[str, float]
    trainable: dict[str, dict[str, int]]
    text_tensors_changed_in_speech_phase: bool
    speech_expert_ids: list[list[int]] | None = None
    moved_text_share: list[float] | None = None  # per layer: the moved experts' share of the text assignments
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def change(self, point: str = "final") -> float:
        """Text perplexity change (%) at `point` against the arm's own pre-trained model."""
        return 100.0 * (getattr(self, point)["text_ppl"] / self.pretrained["text_ppl"] - 1.0)


def pretrain(settings: Settings, corpus: Corpus, dense: bool) -> DeepTalkForCausalLM:
    """Pre-train a text-only LM on the text corpus (the same batches for the MoE and the dense model)."""
    torch.manual_seed(settings.seed)
    model = DeepTalkForCausalLM(pretrain_config(settings, corpus.text_vocab_size, dense))
    train(model, [("pretrain", corpus.pretrain)], settings.pretrain_lr)
    return model


def add_speech(model: DeepTalkForCausalLM, corpus: Corpus, settings: Settings) -> None:
    """Extend the vocabulary with the speech block and align its rows on the speech task, everything else frozen.

    Every arm gets this phase (same batches, same updates). Besides being the usual first step, it gives speech
    tokens real embeddings before the load is profiled: with the fresh rows (all at the text mean) the router would
    see nearly the same input for every unit.
    """
    model.resize_speech_vocab(corpus.speech_vocab_size)
    train(model, [("align", corpus.align)], settings.finetune_lr, stage=lambda _: set_training_stage(model, "speech"))


Split = Callable[[DeepTalkForCausalLM], list[list[int]]]  # moves a model's speech experts, returns their ids


def splits(
    settings: Settings, load, counts: int | list[int], oracle: list[list[int]] | None = None
) -> dict[str, Split]:
    """How each split arm chooses its speech experts: (c) at random, (d) by load, and with `--split-study` (e) the
    `oracle` ids and (c2), (c3) the first two of `split_study`'s random draws."""
    chosen = {
        "random_split": _assigner(load, counts, "random", settings.seed),
        "deeptalk": _assigner(load, counts, settings.strategy, settings.seed),
    }
    if oracle is not None:

        def move_oracle(model: DeepTalkForCausalLM) -> list[list[int]]:
            move_speech_experts(model, oracle)
            return oracle

        chosen["oracle_split"] = move_oracle
        chosen |= {f"random_split_{draw + 2}": _random_draw(settings, load, counts, draw) for draw in range(2)}
    return chosen


def _assigner(load, counts: int | list[int], strategy: str, seed: int) -> Split:
    """`assign_modality_experts` with these arguments, as a `Split`."""
    count = None if strategy == "adaptive" else counts  # adaptive picks its own counts
    return lambda model: assign_modality_experts(model, load, num_speech_experts=count, strategy=strategy, seed=seed)


def _random_draw(settings: Settings, load, counts: int | list[int], draw: int) -> Split:
    """`split_study`'s random draw number `draw`, seeded apart from arm (c)'s draw (which uses `settings.seed`)."""
    return _assigner(load, counts, "random", 1000 * (settings.seed + 1) + draw)


def run_arm(
    arm: str,
    model: DeepTalkForCausalLM,
    reference: dict[str, dict[str, float]],
    corpus: Corpus,
    settings: Settings,
    load=None,
    split: Split | None = None,
) -> ArmResult:
    """Teach `model` (pre-trained, speech rows aligned) speech as `arm`: `split` (the split arms), then speech and
    joint phases.

    All arms run the same two phases under one optimizer and schedule. Staged arms train the library's `"speech"`
    stage (speech tensors only) in the speech phase; the others train everything throughout.
    """
    started = time.perf_counter()
    chosen = moved = None
    if split is not None:
        chosen = split(model)
        if settings.speech_attention:
            add_speech_attention(model)
        moved = [float(load.rho_text[i][ids].sum()) for i, ids in enumerate(chosen)]
    trainable: dict[str, dict[str, int]] = {}
    text_at_start: dict[str, dict[str, torch.Tensor]] = {}
    curve: dict[int, dict[str, float]] = {}
    phases = [("speech", corpus.speech), ("text", corpus.text), ("joint", corpus.joint)]
    phases = [(name, batches) for name, batches in phases if batches]
    ends = np.cumsum([len(batches) for _, batches in phases]).tolist()
    total = ends[-1]

    def stage(phase: str) -> None:
        if chosen is None:
            set_training_stage(model, "joint")
        else:
            set_training_stage(model, phase, also=settings.speech_also if phase == "speech" else ())
        trainable[phase] = _trainable_summary(model)
        text_at_start[phase] = _text_state(model)

    def on_step(done: int) -> None:
        if done % settings.eval_every == 0 or done in ends:
            curve[done] = evaluate(model, corpus)

    train(model, phases, settings.finetune_lr, stage, on_step, settings.speech_lr_scale)
    before, after = text_at_start["speech"], text_at_start[phases[1][0]]
    return ArmResult(
        arm=arm,
        title=TITLES[arm],
        pretrained=reference["pretrained"],
        after_align=reference["after_align"],
        after_split=curve[0],
        after_speech=curve[settings.speech_steps],
        final=curve[total],
        trainable=trainable,
        text_tensors_changed_in_speech_phase=any(not torch.equal(before[n], after[n]) for n in before),
        speech_expert_ids=chosen,
        moved_text_share=moved,
        curve=[{"step": step, **metrics} for step, metrics in sorted(curve.items())],
        seconds=time.perf_counter() - started,
    )


def split_study(model: DeepTalkForCausalLM, corpus: Corpus, settings: Settings, load, counts: int | list[int]) -> dict:
    """What the choice of speech experts costs text at the split itself, before any training.

    - `single_expert_text_cost`: per MoE layer and expert, the rise of the text loss (nats per token, on the profile's
      text windows) when that expert alone leaves the text group;
    - `oracle_ids`: per layer, the experts with the lowest single costs (as many as (d) moves): what a rule that knew
      each expert's worth to text would choose (greedily), which no profile of the load can see;
    - `after_split_text_change_pct`: held-out text perplexity change right after the split for (d)'s choice, the
      oracle's and `RANDOM_DRAWS` random draws (the first two are arms (c2) and (c3)).
    """
    layers = model.config.moe_layers
    text_windows = [batch["input_ids"] for batch in corpus.profile[settings.profile_batches :]]  # its text half
    held_out = corpus.eval_text["input_ids"].split(64)
    training = model.training
    model.eval()  # the candidates are copies, so they are in eval mode too

    def text_loss(candidate: DeepTalkForCausalLM) -> float:
        total, _, count = _text_sums(candidate, text_windows, corpus.text_vocab_size)
        return total / count

    def held_out_ppl(candidate: DeepTalkForCausalLM) -> float:
        total, _, count = _text_sums(candidate, held_out, corpus.text_vocab_size)
        return math.exp(total / count)

    base = text_loss(model)
    costs = []
    for index, layer in enumerate(layers):
        row = []
        for expert in range(sum(model.config.layer_experts(layer))):
            candidate = copy.deepcopy(model)
            move_speech_experts(candidate, [[expert] if i == index else [] for i in range(len(layers))])
            row.append(text_loss(candidate) - base)
        costs.append(row)
    per_layer = [counts] * len(layers) if isinstance(counts, int) else counts
    oracle = [sorted(sorted(range(len(row)), key=row.__getitem__)[:count]) for row, count in zip(costs, per_layer)]

    def change(split: Split) -> float:
        candidate = copy.deepcopy(model)
        split(candidate)
        return 100.0 * (held_out_ppl(candidate) / before - 1.0)

    before = held_out_ppl(model)
    chosen = splits(settings, load, counts, oracle)
    study = {
        "single_expert_text_cost": costs,
        "oracle_ids": oracle,
        "after_split_text_change_pct": {
            "deeptalk": change(chosen["deeptalk"]),
            "oracle": change(chosen["oracle_split"]),
            "random_draws": [change(_random_draw(settings, load, counts, d)) for d in range(RANDOM_DRAWS)],
        },
    }
    model.train(training)
    return study


def run(
    settings: Settings, out_dir: Path | None = None, name: str = "forgetting", log: Callable[[str], None] = print
) -> dict:
    """The whole benchmark: data, both pre-trainings, the four arms; writes `name`.* when `out_dir` is given."""
    started = time.perf_counter()
    corpus = build_corpus(settings)
    log(
        f"data: {len(corpus.pretrain)} pre-training batches, {corpus.paired_train} paired sentences "
        f"({corpus.paired_eval} held out), Bayes-optimal text ppl {corpus.optimal_text_ppl:.3f}"
    )
    references, models = {}, {}
    for kind in ("dense", "moe"):
        begin = time.perf_counter()
        model = pretrain(settings, corpus, dense=kind == "dense")
        pretrained = evaluate(model, corpus)
        add_speech(model, corpus, settings)
        references[kind] = {"pretrained": pretrained, "after_align": evaluate(model, corpus)}
        models[kind] = model
        log(
            f"{kind}: pre-trained text ppl {pretrained['text_ppl']:.3f}, after align speech loss "
            f"{references[kind]['after_align']['speech_loss']:.3f} ({time.perf_counter() - begin:.0f} s)"
        )
    load = profile_modality_load(models["moe"], corpus.profile)
    counts: int | list[int] = settings.num_speech_experts
    if settings.strategy == "adaptive":  # the random split moves as many experts per layer as (d) will
        counts = [len(ids) for ids in assign_modality_experts(copy.deepcopy(models["moe"]), load, strategy="adaptive")]
    study = split_study(models["moe"], corpus, settings, load, counts) if settings.split_study else None
    chosen = splits(settings, load, counts, study and study["oracle_ids"])
    arms: dict[str, ArmResult] = {}
    names = [*ARMS, *(STUDY_ARMS if study else ())]
    last = {"dense" if arm == "dense" else "moe": arm for arm in names}  # the last arm of a kind needs no copy
    for arm in names:
        kind = "dense" if arm == "dense" else "moe"
        model = models[kind] if last[kind] == arm else copy.deepcopy(models[kind])
        arms[arm] = result = run_arm(arm, model, references[kind], corpus, settings, load, chosen.get(arm))
        log(
            f"{result.title}: text ppl {result.change():+.1f}%, speech loss {result.final['speech_loss']:.3f} "
            f"({result.seconds:.0f} s)"
        )
    results = summarize(settings, corpus, arms, load, time.perf_counter() - started)
    if study:
        results["split_study"] = study
    if out_dir is not None:
        write_results(results, Path(out_dir), name)
    return results


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (`platform.processor()` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(settings: Settings, corpus: Corpus, arms: dict[str, ArmResult], load, seconds: float) -> dict:
    """The JSON record: settings, machine, data, every arm, and the goal checks."""
    dense, deeptalk = arms["dense"], arms["deeptalk"]
    goal = {
        "deeptalk_text_change_at_most_a_third_of_dense": deeptalk.change() <= dense.change() / 3,
        # "equal or better": within 1% of the dense arm's held-out speech loss, or below it.
        "deeptalk_speech_loss_equal_or_better_than_dense": deeptalk.final["speech_loss"]
        <= 1.01 * dense.final["speech_loss"],
        "deeptalk_text_change_below_pure_moe": deeptalk.change() < arms["pure_moe"].change(),
        "deeptalk_text_change_below_random_split": deeptalk.change() < arms["random_split"].change(),
    }
    goal["met"] = all(goal.values())
    return {
        "benchmark": "forgetting",
        "settings": asdict(settings),
        "wall_seconds": round(seconds, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "data": {
            "text_vocab_size": corpus.text_vocab_size,
            "speech_vocab_size": corpus.speech_vocab_size,
            "optimal_text_ppl": corpus.optimal_text_ppl,
            "paired_train_sentences": corpus.paired_train,
            "paired_eval_sentences": corpus.paired_eval,
        },
        "profile": {
            "layers": load.layers,
            "rho_speech": [r.tolist() for r in load.rho_speech],
            "rho_text": [r.tolist() for r in load.rho_text],
        },
        "arms": {
            name: asdict(arm)
            | {
                "text_ppl_change_pct": arm.change(),
                "text_ppl_change_after_speech_pct": arm.change("after_speech"),
                "text_ppl_change_after_split_pct": arm.change("after_split"),
            }
            for name, arm in arms.items()
        },
        "goal": goal,
    }


def table(results: dict) -> str:
    """The markdown table of the arms."""
    lines = [
        "| arm | trained in speech phase | text ppl: pre-trained → final | Δ text ppl after split | "
        "Δ after speech phase | **Δ final** | speech loss after speech phase | **speech loss final** |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for arm in results["arms"].values():
        trained = arm["trainable"]["speech"]
        if arm["speech_expert_ids"] is None:
            what = "everything"
        else:
            what = " + ".join(["speech tensors", *(f"`{p}`" for p in results["settings"]["speech_also"])])
        lines.append(
            f"| {arm['title']} | {what} ({trained['parameters']:,} params) | "
            f"{arm['pretrained']['text_ppl']:.3f} → {arm['final']['text_ppl']:.3f} | "
            f"{arm['text_ppl_change_after_split_pct']:+.1f}% | {arm['text_ppl_change_after_speech_pct']:+.1f}% | "
            f"**{arm['text_ppl_change_pct']:+.1f}%** | {arm['after_speech']['speech_loss']:.3f} | "
            f"**{arm['final']['speech_loss']:.3f}** |"
        )
    return "\n".join(lines) + "\n"


def matched_speech(runs: list[dict]) -> dict:
    """Every arm's final text change at (d)'s final speech loss, over runs that differ only in the learning rate
    (the `--split-study` arms too, where the runs have them).

    A learning rate trades speech for text differently in each arm, so one shared rate favours some arm; the goal's
    "at equal or better speech loss" compares arms on their trade-off curves instead: each arm's (speech loss, text
    change) points over the runs, linearly interpolated (never extrapolated: None outside an arm's range).
    """
    # A run written before a setting existed ran with its default.
    defaults = json.loads(json.dumps({f.name: f.default for f in fields(Settings)}))
    fixed = [{k: v for k, v in {**defaults, **run["settings"]}.items() if k != "finetune_lr"} for run in runs]
    if any(f != fixed[0] for f in fixed):
        raise ValueError("matched_speech: the runs must differ in `finetune_lr` only")
    runs = sorted(runs, key=lambda run: run["settings"]["finetune_lr"])
    curves = {
        arm: sorted(
            (run["arms"][arm]["final"]["speech_loss"], run["arms"][arm]["text_ppl_change_pct"]) for run in runs
        )
        for arm in runs[0]["arms"]  # the same arms in every run: `split_study` is one of the fixed settings
    }
    rows = []
    for run in runs:
        speech, change = (
            run["arms"]["deeptalk"]["final"]["speech_loss"],
            run["arms"]["deeptalk"]["text_ppl_change_pct"],
        )
        row = {"lr": run["settings"]["finetune_lr"], "speech_loss": speech, "deeptalk": change}
        for arm, points in curves.items():
            if arm != "deeptalk":
                losses, changes = zip(*points)
                inside = losses[0] <= speech <= losses[-1]
                row[arm] = float(np.interp(speech, losses, changes)) if inside else None
        rows.append(row)
    return {"settings": fixed[0], "rows": rows}


def matched_speech_table(matched: dict) -> str:
    """The markdown table of `matched_speech`: (d)'s runs, and every arm's text change at (d)'s speech loss."""
    others = [arm for arm in TITLES if arm in matched["rows"][0] and arm != "deeptalk"]

    def cell(value: float | None) -> str:
        return "outside its runs" if value is None else f"{value:+.1f}%"

    lines = [
        "| learning rate | (d) speech loss | (d) Δ text | "
        + " | ".join(f"{TITLES[arm].split()[0]} Δ text at that speech loss" for arm in others)
        + " | (d) ÷ (a) |",
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in others) + " | ---: |",
    ]
    for row in matched["rows"]:
        ratio = "–" if row["dense"] is None else f"{row['deeptalk'] / row['dense']:.2f}"
        lines.append(
            f"| {row['lr']:g} | {row['speech_loss']:.3f} | {row['deeptalk']:+.1f}% | "
            + " | ".join(cell(row[arm]) for arm in others)
            + f" | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Text perplexity change and speech loss along the speech and joint phases, and the final trade-off."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.2), layout="constrained")
    change_axes, speech_axes, final_axes = figure.subplots(1, 3)
    settings = results["settings"]
    boundaries = [settings["speech_steps"], settings["speech_steps"] + settings["text_steps"]]
    for arm in results["arms"].values():
        steps = [point["step"] for point in arm["curve"]]
        pre = arm["pretrained"]["text_ppl"]
        change_axes.plot(
            steps, [100 * (p["text_ppl"] / pre - 1) for p in arm["curve"]], marker=".", label=arm["title"]
        )
        speech_axes.plot(steps, [p["speech_loss"] for p in arm["curve"]], marker=".", label=arm["title"])
        point = (arm["final"]["speech_loss"], arm["text_ppl_change_pct"])
        final_axes.scatter(*point, s=60, label=arm["title"])
        final_axes.annotate(arm["title"].split()[0], point, textcoords="offset points", xytext=(6, 4))
    for axes in (change_axes, speech_axes):
        for boundary in sorted(set(boundaries)):
            axes.axvline(boundary, color="grey", linestyle=":", linewidth=1)
        phases = "speech | text | joint" if settings["text_steps"] else "speech | joint"
        axes.set_xlabel(f"fine-tuning update ({phases} phase)")
    change_axes.axhline(0, color="black", linewidth=0.5)
    change_axes.set_ylabel("text perplexity change vs pre-trained (%)")
    speech_axes.set_ylabel("held-out speech-task loss (nats/unit)")
    final_axes.set_xlabel("final speech-task loss (nats/unit)")
    final_axes.set_ylabel("final text perplexity change (%)")
    final_axes.axhline(0, color="black", linewidth=0.5)
    speech_axes.legend(fontsize=8)
    figure.suptitle("Forgetting while learning speech (lower is better in every panel)")
    figure.savefig(path, dpi=110)


def write_results(results: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    goal = results["goal"]
    summary = (
        f"{table(results)}\nGoal (d's text change ≤ 1/3 of (a)'s at equal or better speech loss; (d) below (b) and (c)): "
        f"{'met' if goal['met'] else 'not met'} — "
        + ", ".join(f"{k}: {v}" for k, v in goal.items() if k != "met")
        + f"\n\nWall time {results['wall_seconds']:.0f} s, {results['machine']['torch_threads']} torch thread(s), "
        f"{results['machine']['processor']}; Bayes-optimal text ppl {results['data']['optimal_text_ppl']:.3f}.\n"
    )
    if "split_study" in results:
        summary += split_study_line(results["split_study"])
    (out_dir / f"{name}.md").write_text(summary, encoding="utf-8")
    plot(results, out_dir / f"{name}.png")


def split_study_line(study: dict) -> str:
    """One sentence on `split_study`: the text cost of (d)'s split against the oracle's and the random draws'."""
    change = study["after_split_text_change_pct"]
    draws = np.array(change["random_draws"])
    return (
        f"\nSplit study: held-out text ppl change right after the split: (d) {change['deeptalk']:+.1f}%, oracle "
        f"{change['oracle']:+.1f}%, {len(draws)} random draws median {np.median(draws):+.1f}% (range "
        f"{draws.min():+.1f}% to {draws.max():+.1f}%); (d)'s split costs less than {(draws > change['deeptalk']).sum()} "
        f"of the {len(draws)} draws.\n"
    )


def _default_name(settings: Settings, base: Settings) -> str:
    """`forgetting[_fast]` plus every setting that differs from `base`, so no ablation overwrites the main run."""
    name = "forgetting" + ("_fast" if base is FAST else "")
    for setting in fields(Settings):
        value, default = getattr(settings, setting.name), getattr(base, setting.name)
        if setting.name == "seed" or value == default:
            continue
        if setting.name == "joint_text_fraction":
            name += f"_text{value:g}"
        elif isinstance(value, bool):  # the flags are off by default
            name += f"_{setting.name}"
        elif isinstance(value, tuple):  # glob patterns: a digest of them keeps the name a plain file name
            name += f"_{setting.name}-{hashlib.sha256(chr(0).join(value).encode()).hexdigest()[:8]}"
        else:
            name += f"_{setting.name}{value:g}" if isinstance(value, float) else f"_{setting.name}{value}"
    return name + (f"_seed{settings.seed}" if settings.seed else "")


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes and few steps (the tests' mode)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the language, the data and every model (>= 0)")
    parser.add_argument("--joint-text-fraction", type=float, help="share of text-corpus windows in joint batches")
    parser.add_argument("--text-steps", type=int, help="updates of the text phase between speech and joint")
    parser.add_argument(
        "--speech-also", nargs="*", help="parameter-name patterns the split arms also train in the speech phase"
    )
    parser.add_argument("--num-speech-experts", type=int, help="experts per layer the split arms move to speech")
    parser.add_argument("--num-experts", type=int, help="routed experts per layer of the pre-trained MoE")
    parser.add_argument("--expert-size", type=int, help="width of each routed expert")
    parser.add_argument("--top-k", type=int, help="experts per token (the dense MLP stays top_k * expert_size wide)")
    parser.add_argument("--strategy", choices=("paper", "adaptive"), help="how arm (d) picks its speech experts")
    parser.add_argument("--lr", type=float, help="peak learning rate of every phase after pre-training (all arms)")
    parser.add_argument(
        "--speech-lr-scale", type=float, help="speech tensors' learning rate ÷ the others' in every phase after align"
    )
    parser.add_argument(
        "--speech-attention",
        action="store_true",
        help="the split arms also get speech copies of the attention projections, trained as speech tensors",
    )
    parser.add_argument(
        "--split-study",
        action="store_true",
        help="also measure what the choice of speech experts costs text, and run a text-cost oracle split (e) and two "
        "more random splits (c2, c3)",
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="compare earlier runs at equal speech loss; runs nothing",
    )
    parser.add_argument("--name", help="result file stem (default: from the options)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings depend on it)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder of the result files (NAME.json, .md, .png)",
    )
    args = parser.parse_args(argv)
    check_output(parser, "--out", args.out, folder=True)  # before the pre-training, which takes long
    if args.name is not None and (args.name in ("", ".", "..") or Path(args.name).name != args.name):
        parser.error(f"--name {args.name!r} is a file stem (NAME.json, .md, .png); name their folder with --out")
    if args.collect:
        name = args.name or "forgetting_matched_speech"
        if (args.out / f"{name}.json").resolve() in {path.resolve() for path in args.collect}:
            parser.error(f"--collect: --name {name} in --out {args.out} would replace a collected run; name another")
        runs = []
        for path in args.collect:
            try:
                runs.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as error:
                parser.error(f"--collect: cannot read {path}: {error}")
            if not isinstance(runs[-1], dict) or runs[-1].get("benchmark") != "forgetting":
                parser.error(f"--collect: {path} is not a results file of this benchmark")
        try:
            matched = matched_speech(runs)
        except ValueError as error:
            parser.error(str(error))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}.json").write_text(json.dumps(matched, indent=1) + "\n", encoding="utf-8")
        markdown = matched_speech_table(matched)
        (args.out / f"{name}.md").write_text(markdown, encoding="utf-8")
        print(markdown)
        return
    if importlib.util.find_spec("matplotlib") is None:  # the curves (NAME.png) are written after the whole run
        parser.error("the curves (NAME.png) need matplotlib: pip install 'deeptalk-hf[plot]'")
    if args.text_steps is not None and args.text_steps < 0:
        parser.error(f"--text-steps must be at least 0, got {args.text_steps}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    for option in ("lr", "speech_lr_scale"):
        if getattr(args, option) is not None and not getattr(args, option) > 0:
            parser.error(f"--{option.replace('_', '-')} must be positive, got {getattr(args, option)}")
    torch.set_num_threads(args.threads)
    base = FAST if args.fast else FULL
    settings = replace(base, seed=args.seed)
    if args.joint_text_fraction is not None:
        settings = replace(settings, joint_text_fraction=args.joint_text_fraction)
    if args.text_steps is not None:
        settings = replace(settings, text_steps=args.text_steps)
    if args.speech_also is not None:
        settings = replace(settings, speech_also=tuple(args.speech_also))
    if args.strategy is not None:
        settings = replace(settings, strategy=args.strategy)
    for option in ("num_speech_experts", "num_experts", "expert_size", "top_k"):
        if getattr(args, option) is not None:
            settings = replace(settings, **{option: getattr(args, option)})
    if args.lr is not None:
        settings = replace(settings, finetune_lr=args.lr)
    if args.speech_lr_scale is not None:
        settings = replace(settings, speech_lr_scale=args.speech_lr_scale)
    for flag in ("speech_attention", "split_study"):
        if getattr(args, flag):
            settings = replace(settings, **{flag: True})
    # Checked before the pre-training, which takes long.
    replay = round(settings.joint_text_fraction * settings.batch_size)
    if not (0 <= settings.joint_text_fraction and replay < settings.batch_size):
        parser.error(
            f"--joint-text-fraction {settings.joint_text_fraction} must leave TTS samples in each joint batch of "
            f"{settings.batch_size} (a share in [0, 1) that rounds below the whole batch)"
        )
    if not 0 <= settings.num_speech_experts < settings.num_experts:
        parser.error(
            f"--num-speech-experts {settings.num_speech_experts} must be in [0, {settings.num_experts}) (the experts "
            "per layer)"
        )
    if not 1 <= settings.top_k <= settings.num_experts - settings.num_speech_experts:
        parser.error(
            f"--top-k {settings.top_k} must be in [1, {settings.num_experts - settings.num_speech_experts}] (at most "
            "the text experts a split arm keeps)"
        )
    # The patterns must match the split arms' model, checked on a skeleton of it (no weights).
    with torch.device("meta"):
        split = settings.num_speech_experts
        skeleton = DeepTalkForCausalLM(
            pretrain_config(
                settings,
                64,
                dense=False,
                num_experts=settings.num_experts - split,
                num_speech_experts=split,
                speech_vocab_size=8,
            )
        )
        if settings.speech_attention:
            add_speech_attention(skeleton)
    try:
        training_stage_parameters(skeleton, "speech", also=settings.speech_also)
    except ValueError as error:
        parser.error(f"--speech-also: {error}")
    name = args.name or _default_name(settings, base)
    results = run(settings, args.out, name)
    print(table(results))
    print("goal met" if results["goal"]["met"] else f"goal not met: {results['goal']}")


if __name__ == "__main__":
    main()
