"""Which layers a conversion considers: --include/--exclude/--layers/--min-channels and
the classifier head. Kept apart so that it can be tested (and dry-run) on its own."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from symconvert.errors import SymconvertError
from symconvert.surgery.layers import layer_kinds


def name_pattern(pattern: str):
    """A name test from a glob, or from ``re:REGEX`` (searched in the name)."""
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise SymconvertError(f"bad regular expression in {pattern!r}: {exc}") from None
        return lambda name: regex.search(name) is not None
    return lambda name: fnmatch.fnmatchcase(name, pattern)


def parse_layer_kinds(layers: str | list[str] | None) -> list[str] | None:
    """``--layers conv,linear`` (or a list) → the kinds, each a registered handler's."""
    if not layers:
        return None
    kinds = [k.strip() for k in (layers.split(",") if isinstance(layers, str) else layers)]
    unknown = [k for k in kinds if k not in layer_kinds()]
    if unknown:
        raise SymconvertError(f"unknown layer kind(s) {', '.join(unknown)} in --layers; "
                              f"choose from {', '.join(layer_kinds())}.")
    return kinds


def parse_gates(gates: str | list[str] | None) -> list[str]:
    """``--gates hh,ih`` (or a list) → the recurrent weights to convert (default ``hh``)."""
    if not gates:
        return ["hh"]
    gate_list = [g.strip() for g in (gates.split(",") if isinstance(gates, str) else gates)]
    bad = [g for g in gate_list if g not in ("hh", "ih")]
    if bad:
        raise SymconvertError(f"unknown gate(s) {', '.join(bad)} in --gates; use hh or hh,ih.")
    return gate_list


@dataclass
class Selection:
    """The selection keywords of ``convert``/``inspect`` (mirroring the CLI flags).

    Patterns are globs on the module's qualified name (``layer3.*.conv2``) or, prefixed
    with ``re:``, regular expressions searched in it.
    """

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    layers: list[str] | None = None
    min_channels: int = 0
    include_head: bool = False
    gates: list[str] = field(default_factory=lambda: ["hh"])

    @classmethod
    def build(
        cls,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        layers: str | list[str] | None = None,
        min_channels: int | None = 0,
        include_head: bool = False,
        gates: str | list[str] | None = None,
    ) -> Selection:
        def as_list(value):
            if value is None:
                return []
            return [value] if isinstance(value, str) else list(value)

        return cls(
            include=as_list(include),
            exclude=as_list(exclude),
            layers=parse_layer_kinds(layers),
            min_channels=int(min_channels or 0),
            include_head=include_head,
            gates=parse_gates(gates),
        )

    def to_dict(self) -> dict:
        return {
            "include": self.include,
            "exclude": self.exclude,
            "layers": self.layers,
            "min_channels": self.min_channels,
            "include_head": self.include_head,
            "gates": self.gates,
        }

    def module_reason(self, name: str, kind: str, head: set[str]) -> str | None:
        """Why the selection leaves this module out, or None."""
        if self.layers is not None and kind not in self.layers:
            return f"--layers excludes {kind}"
        if self.include and not any(name_pattern(p)(name) for p in self.include):
            return "not matched by --include"
        for pattern in self.exclude:
            if name_pattern(pattern)(name):
                return f"excluded by {pattern!r}"
        if name in head and not self.include_head:
            return "classifier head (pass --include-head to convert it)"
        return None

    def unmatched_excludes(self, names: list[str]) -> list[str]:
        return [p for p in self.exclude if not any(name_pattern(p)(n) for n in names)]


def head_names(model: nn.Module) -> set[str]:
    """Qualified names of the classifier head.

    timm models name it in ``pretrained_cfg['classifier']`` (a name or a tuple, e.g. the
    distillation heads of DeiT); for anything else the head is the last Linear or Conv
    module registered (torchvision's ``fc``, ``classifier.1``, ``heads.head``,
    squeezenet's final 1x1 conv).
    """
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    if classifier:
        names = [classifier] if isinstance(classifier, str) else list(classifier)
        found = {n for n in names if n in modules}
        # timm heads are sometimes a container (e.g. `head.fc`); include its children
        for n in list(found):
            found.update(f"{n}.{c}" for c, _ in modules[n].named_modules() if c)
        if found:
            return found
    last = None
    for name, module in modules.items():
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            last = name
    return {last} if last is not None else set()
