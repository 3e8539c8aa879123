"""The scheme registry: adding a scheme is one decorated class in one file."""

from __future__ import annotations

import difflib

from symconvert.errors import UnknownSchemeError
from symconvert.schemes.base import Scheme

_SCHEMES: dict[str, type] = {}
#: listing order (SPEC section 3); schemes registered later are listed after these
_ORDER = ["channel", "spatial", "channel+spatial", "block", "quarter", "eighth", "flip",
          "repeat", "eigen"]


def register_scheme(cls: type) -> type:
    """Class decorator: make ``cls`` reachable as ``get_scheme(cls.name)``."""
    if cls.name in _SCHEMES:
        raise ValueError(f"scheme {cls.name!r} registered twice")
    _SCHEMES[cls.name] = cls
    return cls


def scheme_names() -> list[str]:
    known = [n for n in _ORDER if n in _SCHEMES]
    return known + [n for n in _SCHEMES if n not in known]


def get_scheme(spec: str):
    """Build a scheme from its spec string: ``channel``, ``repeat:4``, ``eigen:16``."""
    if isinstance(spec, Scheme):
        return spec
    name, _, arg = str(spec).strip().partition(":")
    cls = _SCHEMES.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(_SCHEMES), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownSchemeError(
            f"unknown scheme {spec!r}.{hint} Known schemes: {', '.join(_SCHEMES)} "
            "(see `symconvert schemes`)."
        )
    try:
        return cls(arg or None)
    except ValueError as exc:
        raise UnknownSchemeError(f"bad scheme {spec!r}: {exc}") from None


def list_schemes() -> list:
    """One instance of every registered scheme (with a default argument where needed)."""
    out = []
    for cls in (_SCHEMES[n] for n in scheme_names()):
        try:
            out.append(cls(None))
        except ValueError:
            out.append(cls(getattr(cls, "example_arg", None)))
    return out
