"""Error types. A `UserError` is a mistake the user can fix (config, file, workdir).

The CLI prints it as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A user mistake: the message names the field or file and says how to fix it."""
