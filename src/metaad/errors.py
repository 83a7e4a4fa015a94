"""metaad's own errors: each message names the file, field or setting and what is wrong.

The apps print them as one block without a traceback (:mod:`metaad.apps.cli`); data errors are
:class:`metaad.data.errors.DataError`.
"""


class MetaadError(ValueError):
    """A mistake in a config, a checkpoint, a run folder or a launch, explained in its message."""


class ConfigError(MetaadError):
    """A setting with a wrong type or value; the message names it (``model.optimizer.lr``)."""


class CheckpointError(MetaadError):
    """A file that is not a readable metaad checkpoint, or one trained with another config."""


class RunFolderError(MetaadError):
    """A run folder that belongs to another run, or cannot be written."""
