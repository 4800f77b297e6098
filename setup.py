"""Build step of the wheel: the model-card template lives in the repository's top-level `model_cards/templates/`
(where a reader looks for it); `build_py` copies it into `hf_elastic/export/model_cards/` of the package."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATES = Path(__file__).parent / "model_cards" / "templates"
PACKAGED_TEMPLATES = ("hf_elastic_card.md",)  # what `hf_elastic.export.model_card` renders


class BuildPyWithCardTemplates(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "hf_elastic" / "export" / "model_cards"
        self.mkpath(str(target))
        for name in PACKAGED_TEMPLATES:
            if not (TEMPLATES / name).is_file():
                raise FileNotFoundError(f"Card template {str(TEMPLATES / name)!r} is missing; the wheel needs it.")
            self.copy_file(str(TEMPLATES / name), str(target / name))


setup(cmdclass={"build_py": BuildPyWithCardTemplates})
