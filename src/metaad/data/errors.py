"""The one error type of the data layer (its own module so every data module can raise it)."""


class DataError(ValueError):
    """Bad data or a bad data setting; the message names the file, field or setting."""
