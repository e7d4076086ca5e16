"""deqref: a reference implementation of how deep equilibrium models are trained."""
from .backend import get_backend, set_backend, use_backend
from .gradients import Gradient, SingularMatrixError, estimate
from .heads import LinearHead, cross_entropy, mse
from .layers import ACTIVATIONS, Layer
from .solvers import ConvergenceWarning, solve

__version__ = "0.1.0"
__all__ = ["ACTIVATIONS", "ConvergenceWarning", "Gradient", "Layer", "LinearHead",
           "SingularMatrixError", "cross_entropy", "estimate", "get_backend", "mse", "set_backend",
           "solve", "use_backend"]
