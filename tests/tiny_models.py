"""Tiny random-initialised models from the real config classes of each supported family."""

from __future__ import annotations

import torch
import transformers as T

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": (T.LlamaConfig, {}),
    "mistral": (T.MistralConfig, {}),
    "qwen2": (T.Qwen2Config, {}),
    "qwen3": (T.Qwen3Config, {"head_dim": 16}),  # heads x head_dim = 64 != hidden 32
    "qwen3_moe": (T.Qwen3MoeConfig, {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": (T.Gemma2Config, {"head_dim": 16}),
    "gemma3_text": (T.Gemma3TextConfig, {"head_dim": 16}),
    "phi3": (T.Phi3Config, {}),
    "olmo2": (T.Olmo2Config, {}),
    "apertus": (T.ApertusConfig, {}),  # xIELU MLP without a gate
    # per-layer embeddings: a third writer per layer (per_layer_projection, behind its own post-norm)
    "gemma4_text": (
        T.Gemma4TextConfig,
        {"head_dim": 16, "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 96},
    ),
}


def tiny_model(family: str, seed: int = 0, **config: int) -> T.PreTrainedModel:
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cls(**{**COMMON, **extra, **config}), dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm gains and biases, so mistakes cannot hide behind ones/zeros
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()
