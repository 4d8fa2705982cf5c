"""Model definitions and loaders."""

from radixserve.models.loader import ModelLoadError, default_model_path

__all__ = ["ModelLoadError", "default_model_path"]
