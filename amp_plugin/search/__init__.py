"""What decides the MLP sizes: the greedy binary search (greedy.py), budget mode
(budget.py), the global allocation (allocation.py, knapsack.py), the search measures
(measures/), the validation-state cache (cache.py) and AMPPruner (pruner.py), which drives
them. Built on `amp_plugin.core`; knows no model family by name."""
