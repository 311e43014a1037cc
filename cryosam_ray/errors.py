"""Typed errors for user input.

Every error that a user's input can cause is one of these, so that the CLI can print a
clear message and a batch can record why one tomogram failed while the others go on.
"""

from __future__ import annotations


class CryoSamError(Exception):
    """Base class of every error cryosam_ray raises on purpose."""


class ConfigError(CryoSamError, ValueError):
    """A config file or flag is invalid (message names the key and what was expected)."""


class _SourceError(CryoSamError):
    """An error about one named input: the message is ``<path>: <reason>``."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Pickled by its two parts, so that it crosses process boundaries (Ray workers) intact;
        # the default would call __init__ with the joined message alone.
        return type(self), (self.path, self.reason)


class TomogramError(_SourceError):
    """A tomogram cannot be used. ``path`` names the file; the message says why."""


class TomogramNotFoundError(TomogramError, FileNotFoundError):
    """The tomogram file or array does not exist."""


class NotAnMrcError(TomogramError, ValueError):
    """The file exists but is not a readable MRC (or zarr) volume."""


class NotAVolumeError(TomogramError, ValueError):
    """The data is not a 3D volume (for example a single 2D image or a 4D stack)."""


class BadVoxelDataError(TomogramError, ValueError):
    """The voxel values are unusable: NaN / infinite values, or constant data."""


class BadVoxelSizeError(TomogramError, ValueError):
    """The header's voxel size is 0, negative or not finite, and none was given."""


class TableError(_SourceError, ValueError):
    """A table (prompts, picks, truth, STAR, copick) is malformed; names the file and the problem."""


class WeightsError(_SourceError):
    """Model weights cannot be found, fetched or loaded; names the source and the reason."""

    @property
    def source(self) -> str:
        return self.path


class PromptError(CryoSamError, ValueError):
    """A prompt cannot be used on its tomogram (outside the volume, unknown tomogram ...)."""


class RunInterrupted(Exception):
    """The run was asked to stop (SIGTERM: Kubernetes or the Jobs API cancelling it).

    Not a CryoSamError: like Ctrl-C (KeyboardInterrupt) it ends the run, it is not one
    tomogram's failure. The exit code is 128 + the signal's number.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum}")

    def __reduce__(self):
        return type(self), (self.signum,)
