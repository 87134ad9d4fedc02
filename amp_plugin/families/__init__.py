"""Model families: one module each holds everything about a family (adapter, MLP
matchers, builder, checkpoint converters, tokenizer). Importing this package registers
them all; a new family is one module here plus one line below."""

from . import open_clip, timm_eva, timm_vit  # noqa: F401  (each module registers itself)
