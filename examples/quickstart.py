"""Quickstart: a tiny random DeepTalk model, no download needed.

Builds a DeepTalk model with text and speech experts, saves it as safetensors, loads it back through
`AutoModelForCausalLM` (registered by `import deeptalk_hf`), and generates from a mixed text/speech prompt with the
KV cache and a streamer.

    python examples/quickstart.py
"""

import tempfile

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import deeptalk_hf
from deeptalk_hf import DeepTalkConfig


class PrintIds(BaseStreamer):
    """Prints each new token id as `generate` produces it, marking speech ids."""

    def __init__(self, speech_start: int):
        self.speech_start, self.prompt_seen = speech_start, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            print(f"<s{token - self.speech_start}>" if token >= self.speech_start else token, end=" ", flush=True)

    def end(self) -> None:
        print()


def main() -> None:
    torch.manual_seed(0)
    config = DeepTalkConfig(
        vocab_size=1024 + 256,  # 1024 text ids, then a 256-id speech block (units + markers)
        speech_vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        mlp_only_layers=[0],  # first layer dense, as in DeepSeek-V2
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,  # text experts per MoE layer
        num_speech_experts=[2, 2, 0],  # speech experts per MoE layer (0: speech uses the text experts there)
        num_experts_per_tok=2,
        modality_routing="hard",
        eos_token_id=None,
    )
    model = deeptalk_hf.DeepTalkForCausalLM(config)
    print(
        f"DeepTalk model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"speech ids from {config.speech_token_start}"
    )

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)  # safetensors
        model = AutoModelForCausalLM.from_pretrained(directory)  # no trust_remote_code
    print(f"reloaded as {type(model).__name__}")

    text = torch.randint(0, config.speech_token_start, (1, 6))
    speech = torch.randint(config.speech_token_start, config.vocab_size, (1, 6))
    prompt = torch.cat([text, speech], dim=1)
    print("generated:", end=" ")
    output = model.generate(prompt, max_new_tokens=16, do_sample=False, streamer=PrintIds(config.speech_token_start))
    out = model(output, labels=output, output_router_logits=True)
    print(
        f"loss {out.loss.item():.3f}, aux {out.aux_loss.item():.3f}, "
        f"{len(out.router_logits)} MoE layers routed {output.shape[1]} tokens"
    )


if __name__ == "__main__":
    main()
