"""Experiments: one module per figure or table; ``EXPERIMENTS`` maps names to them."""
from . import solver_traces

EXPERIMENTS = {"solver_traces": solver_traces}
