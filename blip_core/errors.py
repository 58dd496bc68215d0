"""User-facing errors: raised for bad input, printed by the CLI as one line (never a traceback)."""


class UserError(Exception):
    """A mistake in the user's input (paths, URIs, config values, data): reported as one clear line."""
