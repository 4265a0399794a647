"""The errors a user can act on: each message says what was wrong and what to do."""


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the part and what to do."""
