"""Symmetry schemes: pure maps between free parameters and full weights.

Each scheme lives in one file with its eligibility rule, free-parameter count, pack and
unpack; the planner, the report and the checkpoint all ask the scheme.
"""

from symconvert.schemes import block, eigen, spatial, square  # noqa: F401  (registration)
from symconvert.schemes.base import Scheme
from symconvert.schemes.registry import get_scheme, list_schemes, register_scheme, scheme_names

__all__ = ["Scheme", "get_scheme", "list_schemes", "register_scheme", "scheme_names"]
