"""`hf-elastic demo`: the whole pipeline, offline, on SmolLM2-135M and the fine-food reviews shipped in the package."""

from .config import DemoConfig
from .run import run_demo

__all__ = ["DemoConfig", "run_demo"]
