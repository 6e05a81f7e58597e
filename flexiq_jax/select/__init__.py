"""Channel selection: which feature channels each layer lowers to 4 bits at each ratio level.

Model-agnostic host-side numpy (jax.numpy only for `counts_at_ratio`, which runs inside the
quantized apply on the table `fill_table` builds). A layer l of the L lowerable layers stores one
channel `order` (lowered first; `ordering`) and one count per ratio level; selectors return
counts (K, L) int32, nested across levels and on the MAC budget at each (conventions and the
tolerance in `budget`); between levels `interpolate` fills in channels exactly in MACs.
The evolutionary search's score runs the quantized model, so it lives above this package
(`flexiq_jax.fitness`): the quantize package uses `fill_table` and `counts_at_ratio` from here.
"""

from flexiq_jax.select.budget import (budget_tolerance, check_problem, counts_for_uniform_ratio,
                                      repair_to_budget)
from flexiq_jax.select.evolutionary import SearchResult, evolutionary_search
from flexiq_jax.select.lowerable import LowerableLayers, channel_orders
from flexiq_jax.select.interpolate import counts_at_ratio, counts_at_ratio_np, fill_table
from flexiq_jax.select.ordering import (DEFAULT_RTOL, channel_order, order_to_rank, random_order,
                                        range_bins)
from flexiq_jax.select.plotting import plot_search_history
from flexiq_jax.select.registry import SELECTORS, get_selector, select
from flexiq_jax.select.selectors import (global_channel_sequence, select_greedy_by_range,
                                         select_random, select_uniform)

__all__ = [
    "DEFAULT_RTOL", "LowerableLayers", "channel_orders", "SELECTORS", "SearchResult", "budget_tolerance", "channel_order",
    "check_problem", "counts_at_ratio", "counts_at_ratio_np", "counts_for_uniform_ratio",
    "evolutionary_search", "fill_table", "get_selector", "global_channel_sequence",
    "order_to_rank", "plot_search_history", "random_order", "range_bins",
    "repair_to_budget", "select", "select_greedy_by_range", "select_random", "select_uniform",
]
