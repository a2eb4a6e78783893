"""User-facing errors: entry points print ``error: <message>`` on one line and exit non-zero."""


class SwarmError(Exception):
    """A problem the user can fix; the message says what to fix. Never shown with a traceback."""
