"""The metadata of a model directory is data: its schema and the trust boundary.

A directory records how to rebuild its architecture (``source``) and which tensors are
symmetric (``layers``). Before anything is built from it:

* ``validate(raw)`` checks it against a pydantic schema. What shapes the model is checked
  strictly: ``format_version``, ``source`` (library, name, num_classes, kwargs of plain
  JSON scalars and lists, no key that makes timm/torchvision read a file), ``layers``
  ({name: {scheme, shape, groups, aliases, tensor}} with registered schemes, positive
  shapes of at most ``MAX_ELEMENTS`` elements), ``aliases`` and ``sha256``. Anything
  else is a ``CheckpointError`` (exit 2).
* ``check_trusted(meta, trust_code)`` refuses a recorded ``py:`` source (it would import
  and call code named by the file) unless the user opted in (``--trust-code`` /
  ``trust_code=True``). Factories shipped in ``symconvert.models`` are symconvert's own
  code and always allowed. ``timm``/``torchvision`` names must be registered models. An
  ``hf`` source records its transformers config: it must name a transformers architecture
  and no code (``auto_map``, Hub kernels) — refused even with ``--trust-code``
  (``symconvert.models.hf.check_config``).

Extension points for later stages: every top-level key other than the model-shaping
ones is kept as is (``convert``, ``finetune``, ``parent``, ``calibration``, ``lm``,
``versions``, ...), and so is every extra key of a per-layer record (``output_error``,
per-layer mixed schemes write their own ``scheme`` per record already). ``dtype``, when
present, must be a float dtype name. A stage that needs its own keys validated adds a
model to ``STAGE_MODELS`` (``{"key": PydanticModel}``).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import math
import re
from collections.abc import Iterator
from typing import Any, Literal

import timm
import torchvision
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from symconvert.errors import CheckpointError, SymconvertError, UnknownSchemeError
from symconvert.models.hf import check_config
from symconvert.schemes import get_scheme

#: the largest tensor a recorded shape may describe (2**31 elements: 8 GiB of fp32)
MAX_ELEMENTS = 2**31
MAX_DIMS = 8
#: kwargs that make timm or torchvision read a file or fetch weights
FILE_KWARGS = frozenset({
    "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained",
    "pretrained_strict", "cache_dir", "file", "url", "hf_hub_id", "hf_hub_filename",
    "weights", "weights_backbone", "model_dir", "state_dict", "checkpoint", "overlay",
})
_FILE_SUFFIXES = ("_path", "_file", "_url", "_dir", "_checkpoint")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
_HF_HUB = re.compile(r"^hf-hub:[A-Za-z0-9_.\-]{1,96}/[A-Za-z0-9_.\-]{1,96}(@[A-Za-z0-9_.\-]{1,64})?$")
_PY_NAME = re.compile(r"^[A-Za-z_][\w.]{0,200}:[A-Za-z_]\w{0,100}$")
DTYPES = ("float32", "bfloat16", "float16")
TRUST_CODE_HELP = ("Allow a model directory whose metadata records a py:module:function "
                   "source to import and call that code. Only for directories you trust; "
                   "without it such a directory is refused (exit 2).")

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr | None
# JSON scalars and lists of them (two levels deep); never objects
KwargValue = Scalar | list[Scalar] | list[list[Scalar]]


class SourceRecord(BaseModel):
    """How to rebuild the architecture (``create_model_from_source``)."""

    model_config = ConfigDict(extra="allow")

    library: Literal["timm", "torchvision", "py", "hf"]
    name: StrictStr = Field(max_length=300)
    num_classes: StrictInt | None = Field(default=None, ge=1, le=10_000_000)
    kwargs: dict[StrictStr, KwargValue] = Field(default_factory=dict)
    pretrained: StrictBool = False
    weights: StrictStr | None = None

    @field_validator("kwargs")
    @classmethod
    def _no_file_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in kwargs:
            low = key.lower()
            if not re.fullmatch(r"[A-Za-z_]\w{0,100}", key):
                raise ValueError(f"kwarg name {key!r} is not an identifier")
            if low in FILE_KWARGS or low.endswith(_FILE_SUFFIXES):
                raise ValueError(f"kwarg {key!r} would make the model library read a file "
                                 "or fetch weights; a model directory may not ask for that")
        return kwargs

    @model_validator(mode="after")
    def _name_shape(self) -> SourceRecord:
        if self.library == "hf":
            config = getattr(self, "config", None)
            if not isinstance(config, dict) or any(ord(c) < 32 for c in self.name):
                raise ValueError("an hf source records its transformers config as an object")
        elif self.library == "py":
            if not _PY_NAME.match(self.name):
                raise ValueError(f"py name {self.name!r} is not package.module:function")
        elif self.name.startswith("hf-hub:"):
            if self.library != "timm" or not _HF_HUB.match(self.name):
                raise ValueError(f"name {self.name!r} is not a hf-hub:ORG/NAME")
        elif not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} has characters no registered model has")
        return self


def tensor_name(name: str) -> str:
    """A recorded tensor name must be a dotted module path (``layer1.0.conv1.weight``)."""
    if len(name) > 500 or not re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", name):
        raise ValueError(f"tensor name {name!r} is not a dotted module path")
    return name


class LayerRecord(BaseModel):
    """One converted tensor. Extra keys (``output_error``, calibration figures) are kept."""

    model_config = ConfigDict(extra="allow")

    scheme: StrictStr = Field(max_length=100)
    shape: list[StrictInt] = Field(min_length=1, max_length=MAX_DIMS)
    groups: StrictInt = Field(default=1, ge=1)
    aliases: list[StrictStr] = Field(default_factory=list)
    tensor: StrictStr | None = None

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, aliases: list[str]) -> list[str]:
        return [tensor_name(a) for a in aliases]

    @field_validator("shape")
    @classmethod
    def _bounded(cls, shape: list[int]) -> list[int]:
        if any(s < 1 for s in shape):
            raise ValueError(f"shape {shape} has a dimension below 1")
        if math.prod(shape) > MAX_ELEMENTS:
            raise ValueError(f"shape {shape} has {math.prod(shape):,} elements, more than the "
                             f"{MAX_ELEMENTS:,} a recorded tensor may have")
        return shape

    @model_validator(mode="after")
    def _scheme_fits(self) -> LayerRecord:
        try:
            scheme = get_scheme(self.scheme)
        except UnknownSchemeError as exc:
            raise ValueError(str(exc)) from None
        if self.groups > self.shape[0] or self.shape[0] % self.groups:
            raise ValueError(f"groups {self.groups} does not divide the {self.shape[0]} outputs")
        reason = scheme.check(tuple(self.shape), self.groups)
        if reason is not None:
            raise ValueError(f"scheme {self.scheme!r} cannot hold shape {self.shape} "
                             f"(groups {self.groups}): {reason}")
        return self


class Metadata(BaseModel):
    """A model directory's metadata; unknown top-level keys are later stages' records."""

    model_config = ConfigDict(extra="allow")

    format_version: Literal[1]
    source: SourceRecord
    layers: dict[StrictStr, LayerRecord] = Field(default_factory=dict)
    aliases: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: StrictStr | None = None
    versions: dict[StrictStr, StrictStr] | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        if value is not None and value.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"dtype {value!r}: expected one of {', '.join(DTYPES)}")
        return value

    @field_validator("layers", "aliases")
    @classmethod
    def _names(cls, value: dict) -> dict:
        for key, item in value.items():
            tensor_name(key)
            if isinstance(item, str):  # an alias's kept tensor
                tensor_name(item)
        return value


#: stages that want their own top-level key validated: {"key": PydanticModel}
STAGE_MODELS: dict[str, type[BaseModel]] = {}


def validate(raw: Any, where: str = "the model directory") -> dict[str, Any]:
    """``raw`` checked against the schema; returns it unchanged (a plain dict)."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"the metadata of {where} is a {type(raw).__name__}, not an object")
    try:
        Metadata.model_validate(raw)
        for key, model in STAGE_MODELS.items():
            if key in raw:
                model.model_validate(raw[key])
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()[:4])
        raise CheckpointError(f"the metadata of {where} does not validate ({problems}). It "
                              "was not written by symconvert, or was edited.") from None
    return raw


# ----------------------------------------------------------------------------- trust

_TRUST: contextvars.ContextVar[bool] = contextvars.ContextVar("symconvert_trust_code",
                                                              default=False)


@contextlib.contextmanager
def trusting_code(trust: bool = True) -> Iterator[None]:
    """Within the block, ``load`` accepts recorded ``py:`` sources (the CLI's
    ``--trust-code``). It only widens: ``trusting_code(False)`` inside a trusting block
    keeps trusting."""
    token = _TRUST.set(bool(trust) or _TRUST.get())
    try:
        yield
    finally:
        _TRUST.reset(token)


def trust_code_default() -> bool:
    return _TRUST.get()


def builtin_py(name: str) -> bool:
    """A ``py:`` factory shipped with symconvert itself (``symconvert.models.*``, public)."""
    module, _, attr = name.partition(":")
    if not (module == "symconvert.models" or module.startswith("symconvert.models.")):
        return False

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return attr in getattr(mod, "__all__", ()) and callable(getattr(mod, attr, None))


def check_trusted(meta: dict[str, Any], trust_code: bool | None = None,
                  where: str = "the model directory") -> None:
    """Refuse to build what ``meta`` records unless it is data only (or trusted)."""
    trust = trust_code_default() if trust_code is None else trust_code
    source = meta["source"]
    library, name = source["library"], source["name"]
    if library == "py":
        if trust or builtin_py(name):
            return
        module, _, function = name.partition(":")
        raise CheckpointError(
            f"{where} records a py: source: loading it would import the Python module "
            f"{module!r} and call {function!r}, i.e. run code the directory names. symconvert "
            "never does that on its own. If you trust whoever made this directory, pass "
            "--trust-code (Python: symconvert.load(DIR, trust_code=True)).")
    if library == "hf":
        try:
            check_config(source["config"], f"{where} (its recorded transformers config)")
        except ImportError:
            raise CheckpointError(f"{where} records a transformers model: pip install "
                                  "'symconvert[hf]'.") from None
        except SymconvertError as exc:
            raise CheckpointError(str(exc)) from None
    elif library == "timm":
        if name.startswith("hf-hub:"):
            return

        if not timm.is_model(name.split(".")[0]):
            raise CheckpointError(f"{where} records timm:{name}, which is not a registered "
                                  "timm model.")
    elif library == "torchvision":
        if name not in torchvision.models.list_models():
            raise CheckpointError(f"{where} records torchvision:{name}, which is not a "
                                  "registered torchvision model.")


__all__ = ["DTYPES", "FILE_KWARGS", "MAX_ELEMENTS", "Metadata", "LayerRecord", "STAGE_MODELS",
           "SourceRecord", "builtin_py", "check_trusted", "tensor_name", "trust_code_default",
           "trusting_code", "validate"]
