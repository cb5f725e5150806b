"""The errors a user can fix: every job prints one as one line on stderr and exits with code 2 (`config.run_cli`)."""


class EbdError(Exception):
    """An error the user can fix (bad config, missing file, bad input): printed as one line, exit code 2."""


class ConfigError(EbdError):
    """A config (a file, a --set, a flag) that does not validate."""
