"""The one family of errors svdrank raises on bad input.

The CLI catches :class:`SvdrankError` in one place and prints its message as a
single line with exit code 2; anything else escaping is a bug.
"""


class SvdrankError(Exception):
    """Bad input or usage that the user can fix; the message says how."""


class CheckpointError(SvdrankError):
    """A checkpoint file or directory cannot be read as safetensors."""


class PairingError(SvdrankError):
    """Base and tuned checkpoints have no layers in common."""


class NumericalError(SvdrankError):
    """A layer's update cannot be decomposed (NaN or Inf entries)."""


class AnalysisFileError(SvdrankError):
    """An analysis file or rank config is missing, corrupt or of another schema."""


class UsageError(SvdrankError):
    """An option value is out of range or options contradict each other."""


class OutputError(SvdrankError):
    """An output cannot be written (read-only folder, full disk, a file where a folder goes)."""


class SvdrankWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it on one line."""
