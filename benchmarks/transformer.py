r"""A small GPT-style decoder and the AdamW recipe it is commonly trained with (``gpt_adamw``).

The model is the GPT-2 / nanoGPT layout at toy size: token and learned position embeddings,
``num_layers`` pre-LayerNorm blocks (causal multi-head self-attention, written out as a masked
softmax, then a GELU MLP of width ``4 d``), a final LayerNorm and an untied linear head without
bias. No dropout. Weights are initialised as in GPT-2: normal with std 0.02, the two residual
projections of each block scaled by :math:`1/\sqrt{2L}`, biases 0, LayerNorm at (1, 0).

:func:`adamw_param_groups` splits the parameters the way common recipes do (nanoGPT, Hugging Face
``Trainer``, OLMo): weight decay on the weight matrices of the linear layers (attention, MLP,
head) only, none on biases, LayerNorm parameters or the embeddings.

Example:
    >>> import torch
    >>> model = TinyGPT(vocab_size=256, context=8, d_model=16, num_layers=1, num_heads=2)
    >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
    torch.Size([3, 8, 256])
    >>> [len(g["params"]) for g in adamw_param_groups(model, weight_decay=0.1)]
    [12, 5]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["TinyGPT", "adamw_param_groups", "gpt2_init", "lm_cross_entropy"]


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, context: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        mask = torch.ones(context, context, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)  # True: masked out
        self.ln_1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_proj = nn.Linear(d_model, d_model)
        self.ln_2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.mlp_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        # Explicit masked softmax, not F.scaled_dot_product_attention: its fused CPU and CUDA
        # kernels have no double backward, and the curvature probe needs Hessian-vector products.
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // h))
        att = att.masked_fill(self.causal_mask[:t, :t], float("-inf"))
        y = att.softmax(dim=-1) @ v
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """A GPT-style decoder LM: ``(batch, T)`` token ids to ``(batch, T, vocab_size)`` logits.

    Args:
        vocab_size: number of token ids.
        context: the longest sequence (the number of learned positions).
        d_model: width of the residual stream (divisible by ``num_heads``).
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
    """

    def __init__(
        self, vocab_size: int, context: int, d_model: int, num_layers: int, num_heads: int
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got d_model={d_model}, "
                f"num_heads={num_heads}; pick a d_model that is a multiple of num_heads"
            )
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, num_heads, context) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        gpt2_init(self, self.blocks)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(
                f"sequence length {t} exceeds the model's context {self.context}; "
                "pass sequences of at most that many tokens"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt2_init(model: nn.Module, blocks: nn.ModuleList) -> None:
    r"""Initialise ``model`` as GPT-2: every linear and embedding weight normal with std 0.02,
    linear biases 0, and the two residual projections of each of the ``L = len(blocks)`` blocks
    with std :math:`0.02/\sqrt{2L}`. LayerNorm keeps its (1, 0)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    for block in blocks:
        for proj in (block.attn_proj, block.mlp_proj):
            nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(blocks)))


def lm_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over all positions.

    ``logits`` has shape ``(B, T, V)``, ``targets`` shape ``(B, T)``.
    """
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: ``[no decay, decay]``.

    Decayed: the ``weight`` of every :class:`~torch.nn.Linear`. Not decayed: everything else
    (biases, LayerNorm, embeddings). Order follows ``model.named_parameters()`` within each group.
    """
    decay_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad
    }
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": weight_decay},
    ]
