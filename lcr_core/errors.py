"""The one exception type a user sees: its message is a single line naming the file, field or value."""


class LCRError(Exception):
    """Bad input or configuration, reported as one line without a traceback by the `lcr` CLI."""
