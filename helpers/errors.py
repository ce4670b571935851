"""The base of every error a user can cause and fix (data, settings, folders, checkpoints,
metrics files): its message is one line saying what is wrong, naming the path, and what to do.
Entry points (pipeline, helpers.train, bench, proof) print it as that line and exit with status 2;
anything else is a bug and keeps its traceback."""


class ProjectError(Exception):
    """A problem the user can fix; str(error) says what and how, in one line."""


class FolderInUse(ProjectError):
    """Another live process holds the folder's lock (helpers.lock)."""


class CheckpointError(ProjectError):
    """A checkpoint file is unreadable, damaged or belongs to another run."""


class OutputError(ProjectError):
    """An output location cannot be written (a file where a folder belongs, read-only, ...)."""


class MetricsError(ProjectError):
    """A metrics file is unreadable, not a metrics object, or no longer matches its checkpoints."""


class SettingsError(ProjectError, ValueError):
    """A setting that does not fit: a parameter out of range, or a checkpoint trained with other settings or data."""
