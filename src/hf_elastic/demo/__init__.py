"""`hf-elastic demo`: the whole pipeline, offline, on SmolLM2-135M and Amazon fine-food reviews shipped here."""

from .config import DemoConfig
from .run import run_demo

__all__ = ["DemoConfig", "run_demo"]
