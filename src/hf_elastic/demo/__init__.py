"""`hf-elastic demo`: the whole pipeline, offline, on SmolLM2-135M and Amazon fine-food reviews shipped here."""

from .run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
