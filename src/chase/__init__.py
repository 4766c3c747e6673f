"""chase: channel-aware dynamic sparse training for PyTorch."""

from chase.sparsifier import MEST, SET, RigL, Sparsifier, Static, StepInfo

__version__ = "0.1.0"

__all__ = ["MEST", "SET", "RigL", "Sparsifier", "Static", "StepInfo", "__version__"]
