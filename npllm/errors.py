"""The errors npllm shows to users.

Every error a user can cause (a wrong name, a missing file, an unsupported model) is an
:class:`NpllmError`. Its message says what was wrong and what to do; the ``npllm`` command prints
it without a traceback and exits non-zero. Internal invariants use ``assert`` instead, and invalid
arguments to the pure equations raise ``ValueError``.

Catch ``NpllmError`` to handle them all::

    try:
        model = npllm.load("some/name")
    except npllm.errors.NpllmError as e:
        print(e)
"""


class NpllmError(Exception):
    """Base class of the errors whose message is meant for the user (no traceback needed)."""


class ConfigError(NpllmError):
    """config.json is missing, unreadable, or describes a model npllm does not implement."""


class WeightsError(NpllmError):
    """The weight files are missing, unsafe (pickle), corrupt, or do not match config.json."""


class ModelNotFoundError(NpllmError):
    """A model name could not be resolved to a local folder (local path, GGUF file or Hub id)."""


class ArgumentError(NpllmError, ValueError):
    """An argument of npllm's Python API has the wrong type or value (``None`` for a text,
    ``bytes`` for a string, a number for a list of stop strings, ...). Also a ``ValueError``."""


class InputError(NpllmError):
    """The input cannot be read: stdin is closed, a file is missing or is a folder."""


class OutputError(NpllmError):
    """An output file cannot be written: another run is writing it, it is a folder, or it is not
    a file that ``--resume`` can continue."""


class ScoreError(NpllmError):
    """A text that cannot be scored (empty, no continuation, too long, ...).

    ``index`` is its position in the input (None for a single text).
    """

    def __init__(self, message, index=None):
        super().__init__(message)
        self.index = index
