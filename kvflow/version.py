"""kvflow's version: the installed distribution's, so pyproject.toml is its one owner."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvflow")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
