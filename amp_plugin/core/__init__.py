"""The AMP algorithm's parts: criteria, MLP views, adapters protocol, Taylor importance,
model construction and serialization, cost counting and the Torch-Pruning integration.
Knows no model family by name; what decides the sizes lives in `amp_plugin.search`."""
