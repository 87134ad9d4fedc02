"""timm's parallel block layouts.

`ParallelThingsBlock` (`vit_*_18x2_224`): each block runs two attentions and two MLPs side
by side; both MLPs are ordinary timm `Mlp`s in `blocks.N.ffns.K.mlp` and are searched like
any block MLP (two MLPs share one block's cached states).

`ParallelScalingBlock` (`vit_*_xp_*`, `vit_pwee_*`) and `DiffParallelScalingBlock`
(`vit_dpwee_*`) fuse the MLP into the attention's linears: `in_proj` computes the MLP's
hidden layer and q, k, v together (`in_split`, the MLP's rows first), the MLP's bias is
`mlp_bias` (or part of `in_proj.bias`), and the hidden activation goes through `mlp_act`
and `mlp_drop` into `mlp_out_proj`, or into the last columns of `out_proj`, which takes
`cat(attention, MLP)`. A neuron is therefore its row of `in_proj`, its `mlp_bias` entry and
its column of the output: scored and masked at the input of `mlp_drop`, pruned by slicing
those (`FusedMLPView`), with `in_split` updated.

Registered here: MLP kind `timm_parallel_fused` (both fused blocks).
"""

from __future__ import annotations

from torch import nn

from ..core.mlp import FusedMLPView, register_mlp_kind

_SHARED = "rows of in_proj shared with q, k and v"


def _resize(block: nn.Module, size: int) -> None:
    block.in_split = [size, *block.in_split[1:]]


def _fused_example(dim: int, hidden: int) -> nn.Module:
    from timm.models.vision_transformer import DiffParallelScalingBlock

    # the most fused layout: attention and MLP share in_proj and out_proj
    return DiffParallelScalingBlock(dim, num_heads=2, mlp_ratio=hidden / dim, qkv_bias=False)


@register_mlp_kind("timm_parallel_fused", example=_fused_example)
def _timm_parallel_fused(name: str, m: nn.Module) -> FusedMLPView | None:
    from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock

    if not isinstance(m, (ParallelScalingBlock, DiffParallelScalingBlock)):
        return None
    separate = getattr(m, "mlp_out_proj", None)
    output = separate if separate is not None else m.out_proj
    # out_proj's first columns take the attention output (the block's width); the MLP's
    # rows come first in in_proj
    return FusedMLPView(
        name, m, [m.in_proj], output, "timm_parallel_fused", hidden_tap=m.mlp_drop,
        input_offset=0, output_offset=0 if separate is not None else m.in_proj.in_features,
        hidden_params=("mlp_bias",) if m.mlp_bias is not None else (), resize=_resize,
        shared=_SHARED + ("" if separate is not None else
                          "; columns of out_proj shared with the attention output"))
