"""The one exception type for mistakes a user can fix."""


class UserError(Exception):
    """A bad config, a bad record or a missing file.

    The CLI prints the message (no traceback) and exits with code 2, so the message must say what
    is wrong, where (file, record index, field) and how to fix it.
    """
