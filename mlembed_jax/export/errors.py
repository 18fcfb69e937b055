"""The export's error and warning types (shared by its modules and the CLI)."""


class ExportError(ValueError):
    """An export that cannot be done as asked; the message says what and how to fix it."""


class ExportWarning(UserWarning):
    """An export that works but was not trained for, e.g. a depth that is not an MLL exit."""
