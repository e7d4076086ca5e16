"""deqref: a reference implementation of how deep equilibrium models are trained."""
from .backend import get_backend, set_backend, use_backend
from .heads import LinearHead, cross_entropy, mse
from .layers import ACTIVATIONS, Layer
from .solvers import solve

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "Layer", "LinearHead", "cross_entropy", "get_backend", "mse",
           "set_backend", "solve", "use_backend"]
