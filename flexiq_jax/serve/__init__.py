"""Serve stage: choosing the 4-bit ratio at run time from the load (the quantized apply takes it
as an argument, so a change never recompiles)."""

from flexiq_jax.serve.controller import RatioController, poisson_arrivals, simulate_load
