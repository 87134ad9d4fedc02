"""Model families: one module each holds everything about a family (adapter, MLP
matchers, builder, checkpoint converters, tokenizer). Importing this package registers
them all; a new family is one module here plus one line below."""

from . import (  # noqa: F401  (each module registers itself)
    open_clip,
    timm_beit,
    timm_cait,
    timm_convit,
    timm_eva,
    timm_gemma4,
    timm_naflex,
    timm_parallel,
    timm_refused,
    timm_relpos,
    timm_sam,
    timm_vit,
    timm_vitamin,
    timm_vlm_vit,
    transformers_vision,
)
