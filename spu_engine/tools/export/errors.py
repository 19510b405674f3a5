"""What every step of an export raises when the run cannot be exported."""


class ExportError(ValueError):
    """The run cannot be exported; the message says why and what to do."""
