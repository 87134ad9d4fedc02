"""timm's parallel block layouts.

`ParallelThingsBlock` (`vit_*_18x2_224`): each block runs two attentions and two MLPs side
by side; both MLPs are ordinary timm `Mlp`s in `blocks.N.ffns.K.mlp` and are searched like
any block MLP (two MLPs share one block's cached states).

`ParallelScalingBlock` (`vit_*_xp_*`) and `DiffParallelScalingBlock` (`vit_dpwee_*`) fuse
the MLP into the attention's linears; they are refused with the reason.

Registered here: the two fused layouts as unsupported.
"""

from __future__ import annotations

from ..core.adapter import register_unsupported

_FUSED = ("one linear (in_proj) computes q, k, v and the MLP's hidden layer together, and "
          "one linear (out_proj) projects attention and MLP outputs together, so an MLP "
          "hidden neuron has no linear of its own to be removed from")
register_unsupported("timm.models.vision_transformer.ParallelScalingBlock",
                     f"timm's ParallelScalingBlock (vit_*_xp_*): {_FUSED}")
register_unsupported("timm.models.vision_transformer.DiffParallelScalingBlock",
                     f"timm's DiffParallelScalingBlock (vit_dpwee_*): {_FUSED}")
