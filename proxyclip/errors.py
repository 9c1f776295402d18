"""Errors that reach a user as one clear line (the CLI prints them and exits non-zero)."""


class ProxyCLIPError(Exception):
    """A problem the user can fix; the message says what to do."""


class WeightsError(ProxyCLIPError):
    """Pretrained weights are missing or cannot be loaded."""


class ImageError(ProxyCLIPError):
    """An input image cannot be read or used."""


class ClassNamesError(ProxyCLIPError):
    """A class list is empty, malformed or has duplicates."""


class OutputError(ProxyCLIPError):
    """An output file cannot be written (disk full, folder removed, no permission): the run stops."""
