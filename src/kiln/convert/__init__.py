"""Import: trained models from other frameworks become a repository version (ONNX + spec)."""

from kiln.convert.importer import ImportConfig, ImportResult, import_model

__all__ = ["ImportConfig", "ImportResult", "import_model"]
