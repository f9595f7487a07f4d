"""A hybrid segmentation network: conv encoder, ViT bottleneck, conv decoder with skips."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from securefed.errors import ConfigError, DataError

__all__ = ["ViTUNet"]


class ViTUNet(nn.Module):
    """Conv encoder, transformer bottleneck and conv decoder with skip connections (2D or 3D).

    The layout follows TransUNet (Chen et al. 2021, "TransUNet: Transformers Make Strong
    Encoders for Medical Image Segmentation"): convolutions extract local features at full
    and reduced resolution, a ViT (Dosovitskiy et al. 2021) mixes them globally at the
    coarsest level, and a U-Net decoder upsamples back with skip connections. The blocks
    are MONAI's (``UnetResBlock``, ``PatchEmbeddingBlock``, ``TransformerBlock``).

    Every layer is chosen so that Opacus computes exact per-sample gradients:

    - GroupNorm and LayerNorm only (no BatchNorm: it mixes examples of a batch).
    - No in-place operation on a layer output (Opacus' backward hooks forbid it), hence
      :class:`~securefed.models.monai_blocks.OutOfPlaceUnetResBlock`.
    - Upsampling is parameter-free interpolation followed by convolution, not a transposed
      convolution, because Opacus 1.6 has no grad sampler for ``ConvTranspose``.
    - The learnable positional embedding is a parameter held directly by MONAI's
      ``PatchEmbeddingBlock``; Opacus computes its per-sample gradient through its functorch
      fallback, which re-runs the block's forward under ``vmap``. Dropout is fixed to 0
      everywhere: ``vmap`` refuses random operations, and a re-run would draw another mask
      than the real forward anyway (DP-SGD's noise already regularises).
    - MONAI's ``TransformerBlock`` always creates a ``norm_cross_attn`` LayerNorm, unused
      without cross-attention. An unused trainable parameter never receives a per-sample
      gradient and Opacus' optimizer refuses to step, so it is replaced by ``nn.Identity``.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: Input channels (modalities).
        out_channels: Output channels (segmentation classes, background included).
        img_size: Spatial input shape; the positional embeddings are sized to it, so every
            side must be divisible by ``2**depth * patch_size``.
        feature_size: Channels at full resolution; they double at each encoder level.
        depth: Number of stride-2 encoder levels before the transformer.
        patch_size: Patch side of the embedding on the coarsest feature map.
        hidden_size: Transformer width.
        num_layers: Transformer blocks.
        num_heads: Attention heads; must divide ``hidden_size``.
        mlp_dim: Width of each transformer block's MLP.
        num_groups: GroupNorm groups; must divide ``feature_size``.

    Raises:
        ConfigError: An argument is out of range or ``img_size`` does not divide evenly.

    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        img_size: Sequence[int],
        feature_size: int = 16,
        depth: int = 3,
        patch_size: int = 2,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 256,
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock, UpSample
        from monai.networks.layers import Conv

        from securefed.models.monai_blocks import OutOfPlaceUnetResBlock

        img_size = tuple(int(s) for s in img_size)
        if spatial_dims not in (2, 3):
            raise ConfigError(f"`spatial_dims` must be 2 or 3 (got {spatial_dims}).")
        if len(img_size) != spatial_dims:
            raise ConfigError(
                f"`image_shape` must have {spatial_dims} sides for spatial_dims={spatial_dims} "
                f"(got {img_size})."
            )
        if depth < 1 or patch_size < 1 or num_layers < 1:
            raise ConfigError(
                "`depth`, `patch_size` and `num_layers` must be at least 1 "
                f"(got {depth}, {patch_size}, {num_layers})."
            )
        multiple = self.size_multiple(depth=depth, patch_size=patch_size)
        if any(s <= 0 or s % multiple for s in img_size):
            raise ConfigError(
                f"vit-unet needs every side of `image_shape` to be a positive multiple of "
                f"{multiple} (2**depth * patch_size; got {img_size})."
            )
        if feature_size % num_groups:
            raise ConfigError(
                f"`feature_size` must be divisible by `num_groups` "
                f"(got {feature_size} % {num_groups} != 0)."
            )
        if hidden_size % num_heads:
            raise ConfigError(
                f"`hidden_size` must be divisible by `num_heads` "
                f"(got {hidden_size} % {num_heads} != 0)."
            )

        self.img_size = img_size
        self.hidden_size = hidden_size
        self.grid = tuple(s // multiple for s in img_size)
        norm = ("group", {"num_groups": num_groups})
        # Not in place: see securefed.models.compat.
        act = ("leakyrelu", {"inplace": False, "negative_slope": 0.01})
        widths = [feature_size * 2**i for i in range(depth + 1)]

        self.encoders = nn.ModuleList()
        prev = in_channels
        for i, w in enumerate(widths):
            self.encoders.append(
                OutOfPlaceUnetResBlock(
                    spatial_dims,
                    prev,
                    w,
                    kernel_size=3,
                    stride=1 if i == 0 else 2,
                    norm_name=norm,
                    act_name=act,
                )
            )
            prev = w

        self.embed = PatchEmbeddingBlock(
            in_channels=widths[-1],
            img_size=tuple(s // 2**depth for s in img_size),
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            dropout_rate=0.0,
            spatial_dims=spatial_dims,
        )
        self.blocks = nn.ModuleList()
        for _ in range(num_layers):
            block = TransformerBlock(
                hidden_size=hidden_size,
                mlp_dim=mlp_dim,
                num_heads=num_heads,
                dropout_rate=0.0,
                qkv_bias=True,
            )
            block.norm_cross_attn = nn.Identity()
            self.blocks.append(block)
        self.norm = nn.LayerNorm(hidden_size)

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        prev, scale = hidden_size, patch_size
        for w in reversed(widths):
            self.ups.append(
                UpSample(
                    spatial_dims,
                    prev,
                    prev,
                    scale_factor=scale,
                    mode="nontrainable",
                    pre_conv=None,
                    interp_mode="linear",
                    align_corners=False,
                )
            )
            self.decoders.append(
                OutOfPlaceUnetResBlock(
                    spatial_dims,
                    prev + w,
                    w,
                    kernel_size=3,
                    stride=1,
                    norm_name=norm,
                    act_name=act,
                )
            )
            prev, scale = w, 2
        self.head = Conv[Conv.CONV, spatial_dims](feature_size, out_channels, kernel_size=1)

    @staticmethod
    def size_multiple(*, depth: int = 3, patch_size: int = 2) -> int:
        """What every side of the input must be divisible by."""
        return 2**depth * patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x`` of shape (N, C, *img_size) into logits (N, out_channels, *img_size).

        Raises:
            DataError: The spatial shape of ``x`` is not ``img_size``.

        """
        if tuple(x.shape[2:]) != self.img_size:
            raise DataError(
                f"vit-unet was built for image_shape {self.img_size}, got input of spatial "
                f"shape {tuple(x.shape[2:])}."
            )
        skips = []
        h = x
        for encoder in self.encoders:
            h = encoder(h)
            skips.append(h)
        tokens = self.embed(h)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        # PatchEmbeddingBlock flattens the patch grid row-major; this is its inverse.
        h = tokens.transpose(1, 2).reshape(x.shape[0], self.hidden_size, *self.grid)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            h = decoder(torch.cat([up(h), skip], dim=1))
        return self.head(h)
