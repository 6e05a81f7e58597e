"""Serve stage: choosing the 4-bit ratio at run time from the load (the quantized apply takes it
as an argument, so a change never recompiles), with a latency model fitted online from measured
batch times; a real-clock serving loop and seeded arrival traces for experiments."""

from flexiq_jax.serve.controller import OnlineLatencyModel, RatioController, simulate_load
from flexiq_jax.serve.server import count_compilations, serve_realtime
from flexiq_jax.serve.traces import diurnal_arrivals, diurnal_rate, onoff_arrivals, poisson_arrivals
