"""symconvert: make pretrained PyTorch networks smaller by imposing weight symmetry.

    model = symconvert.create_model("timm:resnet50")
    model, plan = symconvert.convert(model, "channel")
    symconvert.save(model, "r50-channel")
    dense = symconvert.fold(symconvert.load("r50-channel"))
"""


from symconvert import models  # noqa: E402,F401  (registers symconvert's timm models)
from symconvert.errors import SymconvertError  # noqa: E402
from symconvert.io.checkpoint import save  # noqa: E402
from symconvert.io.loading import load, read_metadata  # noqa: E402
from symconvert.models.sources import create_model  # noqa: E402
from symconvert.schemes import get_scheme, list_schemes  # noqa: E402
from symconvert.surgery.api import convert, inspect  # noqa: E402
from symconvert.surgery.calib_costs import calibrated_costs  # noqa: E402
from symconvert.surgery.calibrate import calibrate  # noqa: E402
from symconvert.surgery.config import ConvertConfig  # noqa: E402
from symconvert.surgery.convert import fold  # noqa: E402
from symconvert.surgery.plan import Plan, count_parameters  # noqa: E402
from symconvert.version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "ConvertConfig",
    "Plan",
    "SymconvertError",
    "calibrate",
    "calibrated_costs",
    "convert",
    "count_parameters",
    "create_model",
    "fold",
    "get_scheme",
    "inspect",
    "list_schemes",
    "load",
    "read_metadata",
    "save",
]
