"""The package layout: the public API, the old import paths, imports that point down the pipeline, module sizes."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import hf_elastic
from hf_elastic._compat import MOVED_MODULES

PACKAGE = Path(hf_elastic.__file__).parent
# Each stage may import from the stages before it only.
PIPELINE = [
    "utils",
    "devices",
    "version",
    "data",
    "models",
    "compression",
    "tuners",
    "nas",
    "search",
    "export",
    "demo",
    "cli",
]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _internal_imports(name: str, path: Path) -> list[str]:
    """Modules of hf_elastic (dotted, relative to the package; '' for the package itself) imported by a file.

    Every import counts, also those under `if TYPE_CHECKING:` and inside functions; `from . import x` counts as an
    import of the module `x` where there is one.
    """
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    modules = {module for module, _ in _modules()}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_elastic":
            base = node.module.removeprefix("hf_elastic").removeprefix(".")
        else:
            if isinstance(node, ast.Import):
                found += [a.name.removeprefix("hf_elastic.") for a in node.names if a.name.startswith("hf_elastic.")]
            continue
        found.append(base)
        found += [f"{base}.{a.name}".lstrip(".") for a in node.names if f"{base}.{a.name}".lstrip(".") in modules]
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the hf_elastic modules it imports, without a module's imports of its own packages.

    Those are left out (e.g. `from . import __doc__` in `cli/parser.py`): Python initialises a package before its
    modules, so such an import cannot start a circle; at module level it would fail at once instead.
    """
    return {
        name: {t for t in _internal_imports(name, path) if t and not name.startswith(t + ".")}
        for name, path in _modules()
    }


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of an import graph: each set of modules that reach each other (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


@pytest.mark.parametrize(("name", "path"), [m for m in _modules() if m[0].split(".")[0] in PIPELINE])
def test_imports_point_down_the_pipeline(name: str, path: Path) -> None:
    stage = PIPELINE.index(name.split(".")[0])
    for target in _internal_imports(name, path):
        if target == "" and name.split(".")[0] in ("demo", "cli"):
            continue  # the entry points use the public API
        assert target, f"{name} imports the hf_elastic package itself; import the module that defines the name"
        assert PIPELINE.index(target.split(".")[0]) <= stage, f"{name} imports {target}, a later stage"


def test_no_modules_import_each_other_in_a_circle(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nfrom . import importance\nif TYPE_CHECKING:\n"
        "    from .supernet import SuperNetwork\ndef f():\n    from ..search import heuristics\n"
    )
    found = _internal_imports("nas.probe", source)  # type-only and function-level imports count too
    assert sorted(found) == ["nas", "nas.importance", "nas.supernet", "search", "search.heuristics"]
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e.f"}, "e.f": {"d"}}
    assert _import_cycles(graph) == [["a", "b", "c"]]
    assert _import_cycles(graph | {"d": {"e"}, "e.f": {"b"}}) == [["a", "b", "c", "d", "e", "e.f"]]
    graph = _import_graph()
    assert "nas.supernet" not in graph["nas.costs"] | graph["nas.importance"] | graph["nas.geometry"]
    assert _import_cycles(graph) == [], "these modules import each other in a circle"


@pytest.mark.parametrize(("name", "path"), _modules())
def test_no_module_is_over_600_lines(name: str, path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 600, name


def test_public_api() -> None:
    for name in hf_elastic.__all__:
        assert getattr(hf_elastic, name) is not None, name
    assert hf_elastic.search is importlib.import_module("hf_elastic.search")  # the package, not the function
    assert hf_elastic.search.SearchResult is hf_elastic.SearchResult


def test_renamed_functions_warn_and_forward() -> None:
    with pytest.warns(FutureWarning, match="hf_elastic.search_subnetworks"):
        old_search = hf_elastic.search.search
    assert old_search is hf_elastic.search_subnetworks
    space = hf_elastic.SearchSpace([])
    with pytest.warns(FutureWarning, match="search_subnetworks"), pytest.raises(ValueError, match="no dimensions"):
        hf_elastic.search(space, lambda config: 0.0, progress=False)
    with pytest.warns(FutureWarning, match="optimize_for_inference"):
        assert hf_elastic.accelerate is hf_elastic.optimize_for_inference
    with pytest.warns(FutureWarning, match="optimize_for_inference"):
        from hf_elastic.export import accelerate
    assert accelerate is hf_elastic.optimize_for_inference


def test_old_module_paths_import_the_same_objects() -> None:
    code = (
        "import importlib, sys, warnings\n"
        f"moved = {dict(MOVED_MODULES)!r}\n"
        "for old, new in moved.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module('hf_elastic.' + old)\n"
        "    assert module is importlib.import_module('hf_elastic.' + new), (old, module)\n"
        "    assert any(w.category is FutureWarning and 'hf_elastic.' + new in str(w.message) for w in caught), old\n"
        "objects = {id(m): m for n, m in sys.modules.items() if n.startswith('hf_elastic')}.values()\n"
        "files = [m.__file__ for m in objects]\n"
        "assert len(files) == len(set(files)), 'a file was loaded twice'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_from_imports_keep_working() -> None:
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from hf_elastic.nls import NLSConfig, ElasticLoraLinear\n"
        "from hf_elastic.nls.layer import ElasticLoraLinear as L\n"
        "from hf_elastic.tuners.nls.layer import ElasticLoraLinear as M\n"
        "assert L is M is ElasticLoraLinear\n"
        "from hf_elastic.quantization import QuantLinear, quantize, save_quantized, load_quantized, gptq_quantize\n"
        "from hf_elastic.openvino import export_openvino, load_openvino, ir_weight_sparsity, FP32_CPU_CONFIG\n"
        "from hf_elastic.hub import CardInfo, build_model_card, push_to_hub, prepare_upload_folder\n"
        "from hf_elastic.search import SearchResult, LossEvaluator, pareto_front, search\n"
        "from hf_elastic.export import export_subnetwork, load_exported, accelerate\n"
        "from hf_elastic.elastic_lora.arch import ARCH_SPECS, find_width_layers\n"
        "from hf_elastic.nas import COMPRESSION_COSTS, compression_costs\n"
        "import hf_elastic\n"
        "assert QuantLinear is hf_elastic.QuantLinear and SearchResult is hf_elastic.SearchResult\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
