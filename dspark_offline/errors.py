"""Base of the errors whose message is the whole report (no type name in front of it)."""


class UserError(Exception):
    """A mistake in what the user asked for (parameters, command line); the message names the
    parameter or file and the fix, and entry points print it as ``error: <message>``, exit code 2."""
