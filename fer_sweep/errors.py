"""One exception type for mistakes a user can fix (bad data, bad settings, unreachable store).

The entry points catch it and print its message alone, without a traceback, because the
message already names the problem and the fix.
"""


class FerSweepError(Exception):
    """A user-fixable problem; its message says what is wrong and what to do."""


class DataError(FerSweepError):
    """The dataset is missing, malformed or inconsistent."""


class ConfigError(FerSweepError):
    """A setting is out of range or inconsistent with another."""
