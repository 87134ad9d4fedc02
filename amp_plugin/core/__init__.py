"""The AMP algorithm: criteria, MLP views, adapters protocol, Taylor importance, the
adaptive search and its Torch-Pruning integration. Knows no model family by name."""
