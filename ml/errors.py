"""Errors that speak to the user. The CLI prints their message as one line and exits non-zero."""


class CrmError(Exception):
    """A problem the user can act on: wrong input, missing file, unreachable database."""


class WarehouseUnavailable(CrmError):
    """The warehouse cannot be reached."""


class InputFileError(CrmError):
    """A file that is missing, unreadable, or of an unknown shape."""
