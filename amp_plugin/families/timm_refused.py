"""timm transformers that no adapter drives, each refused with what sets its layout apart,
so a user learns why rather than only that (`amp.UnsupportedModel`). Adding an adapter for
one of them is a family module of its own; its line here then goes.

Registered here: reasons for XCiT, LeViT, PiT, CrossViT, TNT and VOLO.
"""

from __future__ import annotations

from ..core.adapter import register_unsupported

_REASONS = {
    "timm.models.xcit.Xcit":
        "XCiT's blocks use cross-covariance attention with a convolutional local patch "
        "interaction, then class-attention blocks",
    "timm.models.levit.Levit":
        "LeViT's stages shrink the token grid with attention-subsample blocks, and its MLPs "
        "are LinearNorm pairs (linear + BatchNorm) rather than linears AMP's MLP kinds match",
    "timm.models.pit.PoolingVisionTransformer":
        "PiT pools the token grid with a strided convolution between its transformer stages",
    "timm.models.crossvit.CrossVit":
        "CrossViT runs two token branches of different patch sizes joined by cross-attention",
    "timm.models.tnt.TNT":
        "TNT nests an inner transformer over pixel tokens inside every block (two token sets, "
        "two MLPs per block)",
    "timm.models.volo.VOLO":
        "VOLO's first stage runs outlook attention on a (B, H, W, C) grid and downsamples "
        "before its transformer and class-attention stages",
}
for qualified_name, reason in _REASONS.items():
    register_unsupported(qualified_name, f"{reason}; no adapter drives it")
