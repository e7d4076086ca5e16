"""Gradient estimators: the exact implicit gradient and its cheaper estimates."""
from .base import Gradient
from .implicit import adjoint_dense, implicit_dense

__all__ = ["Gradient", "adjoint_dense", "implicit_dense"]
