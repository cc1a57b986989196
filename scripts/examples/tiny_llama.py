"""A Llama-style causal LM from its config alone (no weights, no download), for the fine-tuning levers.

    memprof estimate scripts/examples/tiny_llama.py:build --lora-rank 16 --quantize nf4 --dtype bf16
    memprof compare scripts/examples/tiny_llama.py:build --gpu-memory 1GiB --lora-rank 16 --quantize nf4 \\
        --optimizer adamw8bit --combine

``build(size=...)`` picks the width ("tiny": hidden 128; "small": hidden 512); ``memprof_batch``
makes ``SEQ_LEN`` token ids per sample with the ids as labels (the model's own loss, as HF trains).
Once ``hf:`` references land, ``memprof ... hf:meta-llama/Llama-3.1-8B --seq-len 2048`` does this
for real configurations.
"""

from __future__ import annotations

import torch

SEQ_LEN = 256
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8),
}


def build(size: str = "tiny"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=4096, num_key_value_heads=2, max_position_embeddings=2048, **SIZES[size])
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def memprof_batch(batch_size: int, device, dtype):
    ids = torch.randint(0, 4096, (batch_size, SEQ_LEN), device=device)
    return {"input_ids": ids, "labels": ids}, None


def memprof_loss(output, target):
    return output.loss
