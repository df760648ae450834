"""DeepTalk's training recipe on CPU in seconds: speech stage -> text stage -> joint stage, with transformers' Trainer.

A tiny random DeepTalk model learns two synthetic tasks: "speech" (text words followed by their speech units, two
units per word from a fixed table, as a TTS tokenizer would give them; the loss covers the units) and "text"
(arithmetic sequences of word ids). Each stage is one `Trainer` run over the tensors that stage trains:

- `speech`: the speech experts, speech routers and speech embeddings/output rows, on speech data. Text experts, text
  router, attention and text embeddings are frozen, so under hard routing the text model's logits stay
  bit-identical (the script checks it);
- `text`: the text experts and text router, on text data;
- `joint`: everything, on both.

By default each stage trains its tensors in full (`set_training_stage`); with `--lora` each stage gets a LoRA adapter
for the same tensors (`lora_config_for_stage`), merged into the model before the next stage.

    python examples/train_stagewise.py [--lora] [--steps 40]
"""

import argparse
import tempfile

import torch
from peft import get_peft_model
from transformers import PrinterCallback, Trainer, TrainingArguments

from deeptalk_hf import DeepTalkConfig, DeepTalkForCausalLM, lora_config_for_stage, set_training_stage

TEXT_VOCAB, SPEECH_VOCAB = 64, 16
PAD, EOS, BOS, SEP = 0, 1, 2, 3
WORDS = range(4, TEXT_VOCAB)


def speech_units(word: int) -> list[int]:
    """The two speech-unit ids a fixed, made-up "TTS tokenizer" gives a word."""
    return [TEXT_VOCAB + (5 * word) % SPEECH_VOCAB, TEXT_VOCAB + (11 * word + 3) % SPEECH_VOCAB]


def speech_example(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`BOS w1..w4 SEP units EOS`; only the units and EOS are predicted."""
    words = torch.tensor(WORDS)[torch.randint(len(WORDS), (4,), generator=generator)].tolist()
    prompt = [BOS, *words, SEP]
    answer = [unit for word in words for unit in speech_units(word)] + [EOS]
    input_ids = torch.tensor(prompt + answer)
    labels = input_ids.clone()
    labels[: len(prompt)] = -100
    return {"input_ids": input_ids, "labels": labels}


def text_example(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`BOS` then 14 words of an arithmetic sequence (wrapping around the word ids)."""
    start, step = torch.randint(len(WORDS), (2,), generator=generator).tolist()
    words = [WORDS[(start + i * (step % 5 + 1)) % len(WORDS)] for i in range(14)]
    input_ids = torch.tensor([BOS, *words])
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def make_data(make, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [make(generator) for _ in range(count)]


def run_stage(model, stage: str, train_data, eval_data, args: argparse.Namespace, output_dir: str):
    """One stage: its trainable tensors (or LoRA adapter), a `Trainer` run, losses before and after."""
    if args.lora:
        config = lora_config_for_stage(model, stage, r=8, lora_alpha=16)
        trained = get_peft_model(model, config)
    else:
        set_training_stage(model, stage)
        trained = model
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=(2e-2 if args.lora else 5e-3) if args.lr is None else args.lr,  # LoRA takes larger steps
        weight_decay=0.01,  # freezing is exact all the same: frozen tensors have no gradient, so AdamW skips them
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=trained, args=training_args, train_dataset=train_data)
    trainer.remove_callback(PrinterCallback)  # this script prints its own summary
    before = trainer.evaluate(eval_data)
    trainer.train()
    after = trainer.evaluate(eval_data)
    model = trained.merge_and_unload() if args.lora else trained
    return model, {task: (before[f"eval_{task}_loss"], after[f"eval_{task}_loss"]) for task in eval_data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter per stage instead of full tensors")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per stage")
    parser.add_argument("--lr", type=float, default=None, help="defaults to 5e-3, or 2e-2 with --lora")
    args = parser.parse_args()
    if args.steps < 1 or (args.lr is not None and args.lr < 0):
        parser.error("--steps must be at least 1 and --lr at least 0")

    torch.manual_seed(0)
    config = DeepTalkConfig(
        vocab_size=TEXT_VOCAB + SPEECH_VOCAB, speech_vocab_size=SPEECH_VOCAB, hidden_size=32, intermediate_size=64,
        moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_speech_experts=2, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=PAD,
        eos_token_id=EOS, bos_token_id=BOS, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
    )  # fmt: skip
    model = DeepTalkForCausalLM(config)
    speech, text = make_data(speech_example, 256, seed=1), make_data(text_example, 256, seed=2)
    eval_data = {"speech": make_data(speech_example, 64, seed=3), "text": make_data(text_example, 64, seed=4)}
    probe = torch.stack([example["input_ids"] for example in eval_data["text"][:8]])  # text-only inputs

    with tempfile.TemporaryDirectory() as output_dir:
        for stage, train_data in (("speech", speech), ("text", text), ("joint", speech + text)):
            with torch.no_grad():
                text_logits = model.eval()(probe).logits[..., : config.speech_token_start]
            model, losses = run_stage(model, stage, train_data, eval_data, args, output_dir)
            summary = ", ".join(f"{task} loss {before:.3f} -> {after:.3f}" for task, (before, after) in losses.items())
            print(f"{stage} stage: {summary}")
            if stage == "speech":
                with torch.no_grad():
                    unchanged = torch.equal(model.eval()(probe).logits[..., : config.speech_token_start], text_logits)
                print(f"text logits after the speech stage: {'bit-identical' if unchanged else 'CHANGED'}")


if __name__ == "__main__":
    main()
