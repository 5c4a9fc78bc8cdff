"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (a recipe, a path, a flag) that they can fix."""
