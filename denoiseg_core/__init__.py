"""denoiseg: joint self-supervised denoising and few-shot segmentation (DenoiSeg) in PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("denoiseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
