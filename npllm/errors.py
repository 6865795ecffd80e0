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


class InputError(NpllmError, ValueError):
    """The arguments of a call do not fit the model: token ids out of the vocabulary, more
    positions than its context, a mask or targets of the wrong shape."""
