"""The two errors every entry point turns into one line (engine/cli.py): here, apart from what raises them,
so that a light script (results.py) says them without loading torch."""


class UserError(Exception):
    """A mistake in the user's flags, files or folders: the message is one line, with the fix."""


class SaveError(Exception):
    """A file could not be written (a full or read-only disk): one line naming it; the previous
    version of it, if any, is intact."""
