"""The PyTorch peers of `python -m lm.bench train`: the same architecture as a `ModelConfig`,
in two forms, float32, randomly initialised, in training mode.

- `transformers_model`: transformers' model (GPT2LMHeadModel, LlamaForCausalLM) from
  `lm.convert.hf.config_to_hf`, with `attn_implementation` ('sdpa' by default: PyTorch's fused
  `F.scaled_dot_product_attention`, the fastest transformers offers on a CPU).
- `PlainGPT`: a plain PyTorch model in nanoGPT's form (Karpathy's `model.py`): one fused qkv
  projection, attention by `F.scaled_dot_product_attention(is_causal=True)` with its dropout
  inside it, the GPT-2 init (normal 0.02, output projections 0.02 / sqrt(2 layers), zero
  biases), and for the Llama family RMSNorm, rotary embeddings, SwiGLU and grouped-query heads
  (`enable_gqa`). Written here, not copied.

`make_optimizer` is the optimizer both take: AdamW with torch's fused kernel, weight decay on
matrices only (as `lm.train.optim`).
"""

from __future__ import annotations

import math

from lm.models.transformer import ModelConfig

TORCH_PEERS = ("plain", "transformers")


def transformers_model(config: ModelConfig, attn_implementation: str = "sdpa"):
    """transformers' model of `config`'s architecture, float32, in training mode."""
    import torch
    import transformers

    from lm.convert.hf import config_to_hf

    hf = config_to_hf(config)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, attn_implementation=attn_implementation
    )
    return model.to(torch.float32).train()


def _check_supported(config: ModelConfig) -> None:
    supported = (
        config.architecture == "decoder"
        and config.norm_placement == "pre"
        and config.position in ("learned", "rotary")
        and not (config.num_experts or config.sliding_window or config.qk_norm)
        and not (config.scale_embeddings or config.sublayer_output_norm)
        and config.mlp_dim > 0
    )
    if not supported:
        raise ValueError(
            "PlainGPT covers pre-norm decoders with learned or rotary positions and a dense MLP "
            "(the GPT-2 and Llama families); use the transformers peer for this config"
        )


def plain_model(config: ModelConfig):
    """`PlainGPT` of `config`, float32, in training mode."""
    _check_supported(config)
    return _plain_classes()(config).train()


def _plain_block():
    """The layer class and the norm factory, defined where torch is imported (an optional
    extra)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    activations = {
        "gelu": lambda x: F.gelu(x),
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }

    def norm(c: ModelConfig):
        if c.norm == "rmsnorm":
            return nn.RMSNorm(c.d_model, eps=c.norm_eps)
        return nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.use_bias)

    def rotate(x, cos, sin):  # x [b, heads, t, d], cos/sin [t, d / 2]: Llama's half split
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    class SelfAttention(nn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = c.num_heads, c.kv_heads, c.dim_per_head
            width = (c.num_heads + 2 * c.kv_heads) * c.dim_per_head
            self.qkv = nn.Linear(c.d_model, width, bias=c.use_bias)
            self.out = nn.Linear(c.num_heads * c.dim_per_head, c.d_model, bias=c.use_bias)
            self.out.is_residual_output = True
            self.dropout = c.attention_dropout
            self.residual_dropout = nn.Dropout(c.dropout)

        def forward(self, x, rotary):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split(
                [self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, dim=-1
            )
            q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            if rotary is not None:
                q, k = rotate(q, *rotary), rotate(k, *rotary)
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=True,
                enable_gqa=self.kv_heads != self.heads,
            )
            y = y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
            return self.residual_dropout(self.out(y))

    class MLP(nn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.gated, self.activation = c.mlp_gated, activations[c.mlp_activation]
            self.up = nn.Linear(c.d_model, c.mlp_dim * (2 if c.mlp_gated else 1), bias=c.use_bias)
            self.down = nn.Linear(c.mlp_dim, c.d_model, bias=c.use_bias)
            self.down.is_residual_output = True
            self.dropout = nn.Dropout(c.dropout)

        def forward(self, x):
            h = self.up(x)
            if self.gated:
                gate, h = h.chunk(2, dim=-1)
                h = self.activation(gate) * h
            else:
                h = self.activation(h)
            return self.dropout(self.down(h))

    class Block(nn.Module):
        def __init__(self, c: ModelConfig):
            super().__init__()
            self.attention_norm, self.attention = norm(c), SelfAttention(c)
            self.mlp_norm, self.mlp = norm(c), MLP(c)

        def forward(self, x, rotary):
            x = x + self.attention(self.attention_norm(x), rotary)
            return x + self.mlp(self.mlp_norm(x))

    return Block, norm


def _plain_classes():
    """The model class, defined where torch is imported (an optional extra)."""
    import torch
    from torch import nn

    Block, norm = _plain_block()

    class PlainGPT(nn.Module):
        """Tokens [batch, length] -> logits [batch, length, vocab] (see the module docstring)."""

        def __init__(self, c: ModelConfig):
            super().__init__()
            self.config = c
            self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)
            self.position_embedding = (
                nn.Embedding(c.max_len, c.d_model) if c.position == "learned" else None
            )
            self.dropout = nn.Dropout(c.dropout)
            self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
            self.final_norm = norm(c)
            self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
            if c.tied_embeddings:
                self.head.weight = self.token_embedding.weight
            self.apply(self._init)

        def _init(self, module):
            c = self.config
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = c.init_std
                if getattr(module, "is_residual_output", False):
                    std = c.init_std / math.sqrt(2 * c.num_layers)
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

        def _rotary(self, length: int):
            c = self.config
            half = c.dim_per_head // 2
            inverse = c.rope_base ** (-torch.arange(half, dtype=torch.float32) / half)
            angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse[None]
            return angles.cos(), angles.sin()  # [length, half] each

        def forward(self, tokens):
            x = self.token_embedding(tokens)
            if self.position_embedding is not None:
                x = x + self.position_embedding(torch.arange(tokens.shape[1]))
            rotary = self._rotary(tokens.shape[1]) if self.config.position == "rotary" else None
            x = self.dropout(x)
            for block in self.blocks:
                x = block(x, rotary)
            return self.head(self.final_norm(x))

    return PlainGPT


def make_optimizer(model, opt):
    """torch's fused AdamW with `opt`'s (an `OptimizerConfig`) hyperparameters, decaying the
    matrices only (biases, norms and nothing else of one dimension are left alone)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps, fused=True
    )
