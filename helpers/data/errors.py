"""The one exception type for problems a user can fix: missing, partial or corrupt data."""

from helpers.errors import ProjectError


class DatasetError(ProjectError, RuntimeError):
    """A dataset on disk is missing, incomplete or corrupt.

    The message always says what is wrong (naming the path) and what to do about it.
    """
