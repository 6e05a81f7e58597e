"""Layer-wise mixed precision: the practical post-training algorithm of Pandey et al. 2023 (AIMET's
Automatic Mixed Precision), also usable as a FlexiQ selector over per-layer 4-bit ratios.

* `candidates`: 'W8A8'-style candidates, quantizer groups (and how residual adds are treated).
* `apply`: the layer-wise fake-quant apply with per-layer bits as traced data (one compilation).
* `search`: phase 1 sensitivity list, phase 2 Pareto list, phase 3 binary/interpolation/brute force.
* `amp`: the three phases with their results cached in the workdir.
* `driver`: wired to a model (layer-wise bits; FlexiQ ratios); `plots`: PNG plots.
"""

from flexiq_jax.layerwise.candidates import Candidate, parse_candidate, parse_candidates, quantizer_groups
from flexiq_jax.layerwise.search import (binary_search, brute_force_search, interpolation_search, pareto_list,
                                         sensitivity_list)

__all__ = ["Candidate", "binary_search", "brute_force_search", "interpolation_search", "pareto_list",
           "parse_candidate", "parse_candidates", "quantizer_groups", "sensitivity_list"]
