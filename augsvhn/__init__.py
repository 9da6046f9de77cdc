"""Labelled synthetic SVHN digits from class-conditional score-based diffusion models."""

__version__ = "0.1.0"

__all__ = ["SyntheticSVHN", "__version__"]


def __getattr__(name):
    # Import the dataset lazily so that `import augsvhn` stays cheap for the CLI.
    if name == "SyntheticSVHN":
        from augsvhn.dataset import SyntheticSVHN

        return SyntheticSVHN
    raise AttributeError(f"module 'augsvhn' has no attribute {name!r}")
