"""ViTamin (timm `vitamin_*`, open_clip `ViTamin-*`): a convolutional stem, then timm
VisionTransformer blocks whose MLP is ViTamin's `GeGluMlp` (input norm, gate `w0`, value
`w1`, output `w2`). The tower is a timm VisionTransformer, so the `timm_vit` adapter drives
it; this module adds the MLP layout.

Registered here: MLP kind `timm_geglu`.
"""

from __future__ import annotations

from torch import nn

from ..core.mlp import MLPView, register_mlp_kind


def _example(dim: int, hidden: int) -> nn.Module:
    from timm.models.vitamin import GeGluMlp

    return GeGluMlp(dim, hidden)


@register_mlp_kind("timm_geglu", example=_example)
def _geglu(name: str, m: nn.Module) -> MLPView | None:
    from timm.models.vitamin import GeGluMlp

    if isinstance(m, GeGluMlp):
        # m.norm normalises the MLP's input (embedding dim), not the hidden layer
        return MLPView(name, m, [m.w0, m.w1], m.w2, "timm_geglu")
    return None
