"""The one exception type for mistakes a user can make (config, data, paths, world size)."""


class UserError(Exception):
    """A problem the user can fix; the message names the field or file and the fix."""
