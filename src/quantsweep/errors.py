"""The one error hierarchy of the package.

A `QuantsweepError` is an expected failure: bad input, an engine run that did not finish, files
that do not fit together. Its message is one line that names the input (file, config key,
imatrix entry or tensor), so the CLI prints it as it is and exits 1. Any other exception is a
bug in quantsweep: the CLI lets its traceback through and exits 2.
"""

from __future__ import annotations


class QuantsweepError(Exception):
    """An expected failure, phrased for the user in one line that names the input."""


class ConfigError(QuantsweepError):
    """The workflow config is invalid (names the key)."""


class RecipeError(QuantsweepError):
    """A recipe is invalid or does not fit the model (names the file and the key)."""


class GGUFFormatError(QuantsweepError):
    """The file is not a readable GGUF (names the file and the offset or tensor)."""


class ImatrixFormatError(QuantsweepError):
    """An unreadable imatrix (names the file and the offset or entry)."""


class ImatrixError(QuantsweepError):
    """The imatrix lacks, or has wrongly sized, data for a tensor that needs it."""


class PlanError(QuantsweepError):
    """The engine would refuse or abort quantizing a tensor (names the tensor)."""


class EngineError(QuantsweepError):
    """Building or adopting the engine failed (names the source or the command)."""


class EngineOutputError(QuantsweepError):
    """An engine log lacks the lines a successful run prints."""


class StepError(QuantsweepError):
    """A pipeline step failed; the message names the log to read."""


class ReportError(QuantsweepError):
    """Evaluation records that cannot be put in one table (names the record)."""


class TinyModelError(QuantsweepError):
    """The demo model cannot be generated from these settings or this text."""


class ConvertError(QuantsweepError):
    """A Hugging Face checkpoint that cannot be converted, or a converter that failed."""


class PublishError(QuantsweepError):
    """A published folder that fails a check, or a sweep that cannot be published (names the file)."""
