"""Errors a user can act on.

Every failure that comes from the user's input (a path, a scheme string, a corrupt file,
bad weights) is an ``EdgequantError`` subclass whose message says what was wrong and what
to do. The CLI prints these in one or two lines with exit status 2; anything else is a bug.
"""

from __future__ import annotations


class EdgequantError(Exception):
    """Base class for errors caused by input, with a message meant for the user."""


class SchemeError(EdgequantError, ValueError):
    """An unknown or inconsistent quantization scheme."""


class WeightError(EdgequantError, ValueError):
    """Weights that cannot be quantized (NaN/Inf, wrong shape)."""


class ArtifactError(EdgequantError):
    """A native artifact that is missing, corrupt, or inconsistent with its manifest."""


class ModelLoadError(EdgequantError):
    """A model source that cannot be found, fetched, verified or converted."""


class UnsupportedArchitectureError(ModelLoadError):
    """A model whose architecture edgequant has no tensor-role table for."""


class GGUFError(EdgequantError):
    """A GGUF file that is truncated, corrupt, or uses an unknown tensor type."""


class DataError(EdgequantError):
    """Corpora, calibration sets or tasks that are missing, too short or unknown."""


class EvaluationError(EdgequantError):
    """A measurement that cannot be made as asked (e.g. KLD across different tokenizers)."""


class OutputExistsError(EdgequantError, FileExistsError):
    """An output path exists and ``force`` was not given."""
