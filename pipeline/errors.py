"""The base class of every error a stage reports as one line (no traceback): bad params, data,
checkpoints, results files or output folders. Each layer defines its own subclass."""


class UserError(ValueError):
    """Bad input or environment; the message names the file, key or value and what was expected."""
