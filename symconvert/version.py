"""The package version (``symconvert.__version__``), where every module can read it."""

__version__ = "0.1.0"
