"""Tiny Hugging Face models for ``scripts/validate_zoo.py``, built from transformers' config classes.

Each factory builds a randomly initialised model (nothing is downloaded) and carries
``memprof_batch`` / ``memprof_loss`` hooks: token batches with padding (an attention mask with
per-sample lengths), labels, and the model's own loss. Usable directly:

    PYTHONPATH=. python -m memprof estimate scripts/zoo_hf.py:bert_padded --batch-size 8

(``hf:`` model references, when they land, build the same models from a name.)
"""

from __future__ import annotations

import torch

SEQ = 64
VOCAB = 1000


def _padded(batch_size: int, device, left: bool = False):
    ids = torch.randint(3, VOCAB, (batch_size, SEQ), device=device)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (batch_size,), device=device)
    positions = torch.arange(SEQ, device=device)[None, :]
    mask = positions >= (SEQ - lengths[:, None]) if left else positions < lengths[:, None]
    return ids, mask.to(torch.int64)


def _model_loss(output, _target):
    return output.loss


def bert_padded():
    """BERT (2 layers, 128 wide) sequence classification over padded batches."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=SEQ,
        num_labels=4,
    )
    return BertForSequenceClassification(config)


def _bert_batch(batch_size, device, dtype):
    ids, mask = _padded(batch_size, device)
    labels = torch.randint(0, 4, (batch_size,), device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, None


bert_padded.memprof_batch = _bert_batch  # type: ignore[attr-defined]
bert_padded.memprof_loss = _model_loss  # type: ignore[attr-defined]


def _causal_batch(batch_size, device, dtype):
    ids, mask = _padded(batch_size, device, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, None


def gpt2_padded():
    """GPT-2 (2 layers, 128 wide) causal LM over left-padded batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=128, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


gpt2_padded.memprof_batch = _causal_batch  # type: ignore[attr-defined]
gpt2_padded.memprof_loss = _model_loss  # type: ignore[attr-defined]


def llama_padded():
    """Llama (2 layers, 128 wide, grouped-query attention) causal LM over left-padded batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(config)


llama_padded.memprof_batch = _causal_batch  # type: ignore[attr-defined]
llama_padded.memprof_loss = _model_loss  # type: ignore[attr-defined]


def mixtral_moe():
    """Mixtral (2 layers, 4 experts, top-2 routing) causal LM: the router's choices size each expert's batch."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ,
        experts_implementation="eager",  # the per-expert loop (index by routing), as most MoE code does
    )
    return MixtralForCausalLM(config)


mixtral_moe.memprof_batch = _causal_batch  # type: ignore[attr-defined]
mixtral_moe.memprof_loss = _model_loss  # type: ignore[attr-defined]


def t5_padded():
    """T5 (2+2 layers, 128 wide) sequence-to-sequence over padded source batches."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=128,
        d_kv=32,
        d_ff=512,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def _t5_batch(batch_size, device, dtype):
    ids, mask = _padded(batch_size, device)
    labels = torch.randint(3, VOCAB, (batch_size, SEQ // 2), device=device)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, None


t5_padded.memprof_batch = _t5_batch  # type: ignore[attr-defined]
t5_padded.memprof_loss = _model_loss  # type: ignore[attr-defined]


def vit_tiny():
    """ViT (4 layers, 192 wide, 64x64 images, 8x8 patches) image classification."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=64,
        patch_size=8,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def _vit_batch(batch_size, device, dtype):
    pixels = torch.randn(batch_size, 3, 64, 64, device=device, dtype=dtype)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    return {"pixel_values": pixels, "labels": labels}, None


vit_tiny.memprof_batch = _vit_batch  # type: ignore[attr-defined]
vit_tiny.memprof_loss = _model_loss  # type: ignore[attr-defined]
