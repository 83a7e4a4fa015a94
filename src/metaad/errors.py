"""metaad's own errors: each message names the file, field or setting and what is wrong.

The apps print them as one block without a traceback (:mod:`metaad.apps.cli`); data errors are
:class:`metaad.data.errors.DataError`.
"""

import signal


class MetaadError(ValueError):
    """A mistake in a config, a checkpoint, a run folder or a launch, explained in its message."""


class ConfigError(MetaadError):
    """A setting with a wrong type or value; the message names it (``model.optimizer.lr``)."""


class CheckpointError(MetaadError):
    """A file that is not a readable metaad checkpoint, or one trained with another config."""


class RunFolderError(MetaadError):
    """A run folder that belongs to another run, or cannot be written."""


class TrainingError(MetaadError):
    """Training that cannot go on (a diverging loss); the message says at which step and what to change."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: a stop, not an error
    """The run was stopped by ``signum``; ``str()`` is what the app prints (how to resume).

    A ``BaseException``, as ``KeyboardInterrupt`` is, so that no ``except Exception`` on the way
    (Lightning's, Hydra's, metaad's) takes it for a failure.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum
