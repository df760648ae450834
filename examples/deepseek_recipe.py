"""The DeepTalk recipe on a DeepSeek-V2-style MoE, end to end on CPU (a tiny random model and synthetic data).

1. import the MoE as a DeepTalk model, with a speech vocabulary appended (`upcycle_moe`);
2. profile the modality load on speech and text batches (`profile_modality_load`);
3. move the experts with the highest rhoA * (1 - rhoT) into the speech group (`assign_modality_experts`);
4. stage "speech": the speech tensors train on speech data (the text model is frozen and stays bit-identical);
5. stage "text": the text experts and router specialise on text data;
6. stage "joint": everything trains on mixed text-speech data.

    python examples/deepseek_recipe.py            # a few seconds on a CPU
    python examples/deepseek_recipe.py --fast     # a smaller model and a few steps (what the test runs)

For a real run the tiny model becomes a checkpoint, e.g. `upcycle_moe("deepseek-ai/DeepSeek-V2-Lite",
speech_vocab_size=...)` (or `deeptalk-upcycle` to convert it on disk first), and the synthetic batches become tokenized
text and speech units (see docs/recipe.md).
"""

import argparse
import tempfile
import time

import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from deeptalk_hf import assign_modality_experts, profile_modality_load, set_training_stage, upcycle_moe

TEXT_VOCAB = 256
SPEECH_VOCAB = 64  # speech units and speech markers, appended after the text vocabulary


def tiny_deepseek_v2(fast: bool) -> DeepseekV2ForCausalLM:
    """A DeepSeek-V2-Lite-shaped model (MLA without q LoRA, shared experts, first layer dense), shrunk."""
    config = DeepseekV2Config(
        vocab_size=TEXT_VOCAB,
        hidden_size=32 if fast else 64,
        intermediate_size=64 if fast else 128,
        moe_intermediate_size=16,
        num_hidden_layers=3 if fast else 4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8 if fast else 16,
        n_shared_experts=2,
        num_experts_per_tok=2 if fast else 4,
        first_k_dense_replace=1,
        max_position_embeddings=128,
    )
    return DeepseekV2ForCausalLM(config)


def sequences(batch: int, length: int, start: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Synthetic learnable data: arithmetic progressions (random start and step) within `[start, start + vocab)`."""
    first = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 5, (batch, 1), generator=generator)
    return start + (first + step * torch.arange(length)) % vocab


def train(model, optimizer, make_batch, steps: int, stage: str) -> None:
    model.train()
    losses = []
    for _ in range(steps):
        input_ids = make_batch()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    print(f"stage {stage}: {steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a smaller model and a few steps per stage")
    parser.add_argument("--output", metavar="DIR", help="save the trained DeepTalk model to DIR")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    steps, batch, length = (4, 4, 16) if args.fast else (40, 8, 32)

    # 1. Import. A saved DeepSeek-V2 checkpoint stands in for "deepseek-ai/DeepSeek-V2-Lite".
    with tempfile.TemporaryDirectory() as directory:
        tiny_deepseek_v2(args.fast).save_pretrained(directory)
        model = upcycle_moe(directory, speech_vocab_size=SPEECH_VOCAB)
    config = model.config
    print(
        f"imported deepseek_v2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{config.num_experts} experts per MoE layer, top-{config.num_experts_per_tok}, speech ids from "
        f"{config.speech_token_start}"
    )

    def speech() -> torch.Tensor:
        return sequences(batch, length, TEXT_VOCAB, SPEECH_VOCAB, generator)

    def text() -> torch.Tensor:
        return sequences(batch, length, 0, TEXT_VOCAB, generator)

    def mixed() -> torch.Tensor:  # a text turn followed by a speech answer
        return torch.cat([text()[:, : length // 2], speech()[:, : length // 2]], dim=1)

    # 2. Profile: how the imported router sends speech and text tokens (modality routing off, as in the source).
    probe = text()
    with torch.no_grad():
        imported_logits = model(probe).logits
    load = profile_modality_load(
        model, [{"input_ids": speech()} for _ in range(4)] + [{"input_ids": text()} for _ in range(4)]
    )

    # 3. Assign: per layer, the experts with the highest rhoA * (1 - rhoT) become speech experts (a quarter of them).
    chosen = assign_modality_experts(model, load, num_speech_experts=config.num_experts // 4)
    print(f"speech experts per MoE layer (source indices): {chosen}")
    config.modality_routing = "none"  # the move is a permutation: with routing off the model is unchanged
    with torch.no_grad():
        difference = (model(probe).logits - imported_logits).abs().max().item()
    if difference > 1e-5:  # fp32: only the summation order of the experts may differ
        raise AssertionError(f"the expert move changed the model: max |logit diff| {difference:.1e}")
    print(f"routing 'none' after assignment: max |logit diff| vs import {difference:.1e}")
    config.modality_routing = "hard"  # from here on each modality uses its own experts

    # One optimizer over every tensor, as users build it: freezing by stage is exact even with weight decay.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    # 4. Speech stage: speech experts, speech router, speech embeddings and output rows.
    with torch.no_grad():
        text_logits = model(probe).logits[..., :TEXT_VOCAB]
    set_training_stage(model, "speech")
    train(model, optimizer, speech, steps, "speech")
    with torch.no_grad():
        unchanged = torch.equal(model(probe).logits[..., :TEXT_VOCAB], text_logits)
    if not unchanged:
        raise AssertionError("the speech stage changed the text model's logits")
    print("text logits after the speech stage: bit-identical")

    # 5. Text stage: the text experts and router only.
    set_training_stage(model, "text")
    train(model, optimizer, text, steps, "text")

    # 6. Joint stage: everything, on text turns with speech answers.
    set_training_stage(model, "joint")
    train(model, optimizer, mixed, steps, "joint")

    if args.output:
        model.save_pretrained(args.output)
        print(f"saved to {args.output}")
    print(f"recipe finished in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
