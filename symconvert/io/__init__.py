"""Artifacts: model directories (``checkpoint``), their metadata (``metadata``), files
(``files``), storage precision (``dtypes``) and exports (``export``: the format registry).

Importing the package registers the export formats; a new format is one line here.
"""

from symconvert.io import export_dense, export_onnx, export_torchscript  # noqa: F401
