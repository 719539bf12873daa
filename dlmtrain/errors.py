"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, bad argument).

    The message should say what is wrong, where, and how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
