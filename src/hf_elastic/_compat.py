"""Import paths from before the pipeline layout (hf_elastic 0.1), e.g. `hf_elastic.nls` or `hf_elastic.quantization`.

Each old module name resolves to the module that now holds its public names, with a `FutureWarning` naming the new
path. `hf_elastic.search` and `hf_elastic.export` are packages now and export the same names as before.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED_MODULES = {
    "assets": "models.offline",
    "calibration": "compression.calibration",
    "elastic_lora": "tuners.elastic_lora",
    "elastic_lora.arch": "models.arch",
    "elastic_lora.config": "tuners.elastic_lora.config",
    "hub": "export.hub",
    "nls": "tuners.nls",
    "nls.config": "tuners.nls.config",
    "nls.layer": "tuners.nls.layer",
    "openvino": "export.openvino",
    "quantization": "compression.quantization",
    "search_space": "nas.search_space",
    "sparsity": "compression.sparsity",
    "supernet": "nas",
    "trainer": "nas.trainer",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `hf_elastic.<old name>` as the module object of its new home (the same object, not a copy)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        package, _, name = fullname.partition(".")
        if package != "hf_elastic" or name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = "hf_elastic." + MOVED_MODULES[spec.name.partition(".")[2]]
        warnings.warn(
            f"`{spec.name}` is now `{new}` (the pipeline layout). Import from `{new}` (or from `hf_elastic`); the old "
            "path will be removed in a later release.",
            FutureWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        pass


def install() -> None:
    """Put the finder first on `sys.meta_path`, so that `hf_elastic.nls.layer` never loads a second copy of a file."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
