"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or environment: the message says what and where, no traceback is shown."""
