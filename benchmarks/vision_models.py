r"""The image models of the held-out representative tasks (``resnet_bn``, ``vit_adamw``) and their
augmentation, at the size of scikit-learn's 8x8 digits.

* :class:`DigitsResNet`: a ResNet for small images (3x3 stem, no max-pool), ``len(widths)`` stages
  of ``blocks_per_stage`` basic residual blocks (``benchmarks.probe_models``' block: two 3x3
  convolutions with BatchNorm, a 1x1 projection shortcut where the shape changes), stride 2 at the
  start of every stage but the first, global average pooling, a linear head.
* :class:`DigitsViT`: a Vision Transformer: non-overlapping ``patch x patch`` patches linearly
  embedded, learned position embeddings, pre-LayerNorm encoder blocks (``benchmarks.transformer``'s
  block without its causal mask: bidirectional attention, GELU MLP of width ``4 d``), a final
  LayerNorm and a linear head on the mean of the tokens (or on a learned class token, initialised
  at 0). Initialised as :class:`~benchmarks.transformer.TinyGPT`
  (:func:`~benchmarks.transformer.gpt2_init`).
* :func:`random_translate`: the light augmentation of CIFAR-style recipes (pad, then a random crop
  of the original size), here by at most ``max_shift`` pixels, no flips (digits are not
  flip-invariant). Every draw comes from the generator it is handed, so the minibatch stream of a
  run seed is reproducible.

Example:
    >>> import torch
    >>> x = torch.zeros(5, 1, 8, 8)
    >>> DigitsResNet()(x).shape, DigitsViT()(x).shape
    (torch.Size([5, 10]), torch.Size([5, 10]))
    >>> out = random_translate(torch.arange(64.0).view(1, 1, 8, 8), torch.Generator(), fill=-1.0)
    >>> out.shape, bool(torch.isin(out, torch.arange(64.0)).sum() >= 49)
    (torch.Size([1, 1, 8, 8]), True)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from benchmarks.probe_models import resnet_stages
from benchmarks.transformer import _Block, gpt2_init

__all__ = ["DigitsResNet", "DigitsViT", "random_translate"]


def random_translate(
    images: Tensor, generator: torch.Generator, max_shift: int = 1, fill: float = 0.0
) -> Tensor:
    """Shift each image of ``images`` ``(B, C, H, W)`` by its own random offset in
    ``-max_shift .. max_shift`` pixels along each axis (uniform, drawn from ``generator``); the
    pixels shifted in are ``fill`` (the background's value).

    Equivalent to ``torchvision.transforms.RandomCrop(size, padding=max_shift, fill=fill)`` applied
    per image.
    """
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}; "
            "reshape flat images with images.view(-1, C, H, W)"
        )
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    b, _, h, w = images.shape
    if max_shift == 0:
        return images
    s = max_shift
    padded = F.pad(images, (s, s, s, s), value=fill)
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = offsets[0, :, None] + torch.arange(h)  # (B, H): the crop's rows in the padded image
    cols = offsets[1, :, None] + torch.arange(w)
    batch = torch.arange(b)[:, None, None]
    # Advanced indices around a slice: the result is (B, H, W, C); move the channels back.
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


class DigitsResNet(nn.Module):
    """A small ResNet with BatchNorm on ``(B, in_channels, H, W)`` images.

    Args:
        widths: channels of each stage (the stem has ``widths[0]``).
        blocks_per_stage: basic blocks in each stage.
        in_channels: image channels.
        num_classes: outputs of the linear head.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 1,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        self.layers = resnet_stages(widths[0], widths, blocks_per_stage)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _EncoderBlock(_Block):
    """The pre-LayerNorm transformer block of ``TinyGPT`` with bidirectional attention."""

    def __init__(self, d_model: int, num_heads: int, num_tokens: int) -> None:
        super().__init__(d_model, num_heads, num_tokens)
        # Nothing masked: every token attends to every token.
        self.causal_mask = torch.zeros_like(self.causal_mask)


class DigitsViT(nn.Module):
    """A Vision Transformer on ``(B, in_channels, image_size, image_size)`` images.

    Args:
        image_size: height and width of the images.
        patch: side of the square patches (divides ``image_size``).
        d_model: width of the residual stream (divisible by ``num_heads``).
        num_layers: encoder blocks.
        num_heads: attention heads per block.
        in_channels: image channels.
        num_classes: outputs of the linear head.
        pooling: ``"mean"``: the head reads the mean of the patch tokens (no class token, as in
            small-data ViT recipes and Beyer et al. 2022); ``"cls"``: a learned class token.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch: int = 2,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        in_channels: int = 1,
        num_classes: int = 10,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if image_size % patch:
            raise ValueError(
                f"patch must divide image_size, got patch={patch}, image_size={image_size}"
            )
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got d_model={d_model}, "
                f"num_heads={num_heads}; pick a d_model that is a multiple of num_heads"
            )
        self.patch, self.pooling = patch, pooling
        num_tokens = (image_size // patch) ** 2 + (pooling == "cls")
        self.patch_embed = nn.Linear(in_channels * patch * patch, d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model)) if pooling == "cls" else None
        self.pos_emb = nn.Embedding(num_tokens, d_model)
        self.blocks = nn.ModuleList(
            _EncoderBlock(d_model, num_heads, num_tokens) for _ in range(num_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        gpt2_init(self, self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        b, c, _, _ = x.shape
        p = self.patch
        # (B, C, H, W) -> (B, H/p * W/p, C * p * p), patches in row-major order.
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)
        tokens = self.patch_embed(patches.reshape(b, -1, c * p * p))
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        h = tokens + self.pos_emb.weight
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return self.head(h[:, 0] if self.cls_token is not None else h.mean(dim=1))
