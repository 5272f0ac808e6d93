"""A GPT-style decoder for next-token prediction, as an ``nn.Sequential`` of blocks.

Blocks, in order (the units a cut respects):
- embedding: token embedding + learned position embedding, (B, T) tokens -> (B, T, W);
- ``depth`` pre-norm decoder blocks: h + attn(LN(h)), then h + MLP(LN(h)), (B, T, W) -> same;
- head: final LayerNorm and the LM head, (B, T, W) -> logits (B, T, V).
So every cut carries (B, T, W) activations (a per-token SG or DFA works position by position).

Every projection (query/key/value, attention output, MLP, LM head) is an ``nn.Linear``, so
method=fa swaps each for its feedback-alignment twin; what FA leaves as backprop is the
parameter-free attention itself (softmax of q k^T times v), LayerNorm and the embeddings
(they are no Linear; the embeddings' input gradient is never used anyway).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dni_dist.errors import ConfigError

MLP_RATIO = 4  # hidden width of each block's MLP, in multiples of the model width
EMBEDDING_STD = 0.02  # small embeddings: the residual stream starts near the blocks' scale


class TokenEmbedding(nn.Module):
    """Tokens (B, T) -> token + position embeddings (B, T, W)."""

    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small embeddings; also what re-initialising a block materialised from the meta
        device calls (models/reinit.py), after the embeddings' own reset."""
        nn.init.normal_(self.tokens.weight, std=EMBEDDING_STD)
        nn.init.normal_(self.positions.weight, std=EMBEDDING_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long()  # planning passes float zeros of the input's shape; data is integer
        where = torch.arange(tokens.shape[1], device=tokens.device)
        return self.tokens(tokens) + self.positions(where)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t sees positions <= t only."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(h).split(width, dim=2)
        # (B, T, W) -> (B, heads, T, W / heads)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm residual block: attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, MLP_RATIO * width), nn.GELU(), nn.Linear(MLP_RATIO * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h))
        return h + self.mlp(self.mlp_norm(h))


def build_transformer(depth: int, width: int, heads: int, input_shape: tuple[int, ...], vocab: int) -> nn.Sequential:
    """The decoder for token sequences of shape (T,) over ``vocab`` token values."""
    if len(input_shape) != 1:
        raise ConfigError(
            f"model.kind='transformer' needs token sequences (T,) as input, got input shape {tuple(input_shape)}; "
            "use data.name=text"
        )
    if heads < 1 or width % heads:
        raise ConfigError(f"model.width={width} must be a multiple of model.heads={heads}")
    blocks: list[nn.Module] = [TokenEmbedding(vocab, input_shape[0], width)]
    blocks += [DecoderBlock(width, heads) for _ in range(depth)]
    blocks.append(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab)))
    return nn.Sequential(*blocks)
