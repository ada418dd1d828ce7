"""The one exception type for bad user input: the CLI prints its message as one line, exit 2."""


class UserError(Exception):
    """Bad input from the user (config key, name, path, malformed data).

    The message is one line naming what is wrong and what would be right.
    """
