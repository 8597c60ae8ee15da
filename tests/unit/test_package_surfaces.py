"""What each package exports and what it may depend on.

- Every library module says what it exports (``__all__``), and every name it lists exists.
- The dashboard, the consumer, the producer and the shared ``fraudstream`` package reach no Spark
  code, by any import path, at module level or inside a function: the ``app`` image installs
  them without pyspark. Checked statically over the whole import closure (a lazy import inside a
  rarely-taken branch counts too), and once for real in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from fraudstream.testing import REPO_ROOT

PACKAGES = ("fraudstream", "spark_job", "producer", "consumer", "dashboard")
#: Packages the app image ships without pyspark.
SPARK_FREE = ("fraudstream", "producer", "consumer", "dashboard")
SPARK_MODULES = ("pyspark", "spark_job")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
#: Modules that are programs or Streamlit pages, not import surfaces.
SCRIPTS = {name for name in SOURCES
           if name.endswith("__main__") or name.startswith("dashboard.screens")
           or name == "dashboard.app" or SOURCES[name].name == "__init__.py"}
LIBRARY = sorted(set(SOURCES) - SCRIPTS)


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its file (absolute imports only: the project
    uses no relative ones)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(SOURCES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in SOURCES)
    return found


def closure(start: str) -> dict[str, str]:
    """Each module reachable from ``start`` through project modules, with the module that
    imports it (to name the path in a failure)."""
    parent = {start: ""}
    todo = [start]
    while todo:
        current = todo.pop()
        for imported in imports_of(current):
            prefixes = [".".join(imported.split(".")[:i + 1])
                        for i in range(imported.count(".") + 1)]
            for module in prefixes:
                if module not in parent:
                    parent[module] = current
                    if module in SOURCES:
                        todo.append(module)
    return parent


def path_to(parent: dict[str, str], module: str) -> str:
    chain = [module]
    while parent[chain[-1]]:
        chain.append(parent[chain[-1]])
    return " <- ".join(chain)


def test_the_packages_have_modules() -> None:
    assert len(LIBRARY) > 40 and "fraudstream.testing" in LIBRARY


@pytest.mark.parametrize("name", LIBRARY)
def test_every_library_module_lists_what_it_exports(name: str) -> None:
    tree = ast.parse(SOURCES[name].read_text())
    listed = [node for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert listed, f"{name} has no __all__"
    exported = ast.literal_eval(listed[0].value)
    assert exported and len(exported) == len(set(exported))
    defined = {n.name for n in tree.body
               if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    defined |= {n.target.id for n in tree.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    defined |= {a.asname or a.name for n in tree.body
                if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    assert not set(exported) - defined, f"{name} exports undefined names"


@pytest.mark.parametrize("start", sorted(name for name in SOURCES if name.startswith(SPARK_FREE)))
def test_no_spark_code_is_reachable(start: str) -> None:
    parent = closure(start)
    spark = sorted(m for m in parent if m.split(".")[0] in SPARK_MODULES)
    assert not spark, f"{start} reaches Spark: {path_to(parent, spark[0])}"


def test_importing_the_dashboard_data_layer_loads_no_spark() -> None:
    modules = sorted(name for name in LIBRARY if name.startswith(SPARK_FREE))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {SPARK_MODULES!r})\n"
            "print(loaded); sys.exit(1 if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_static_check_sees_spark_where_it_is() -> None:
    """The closure finds pyspark behind the detector, and not behind the quality CLI (a thin
    wrapper over fraudstream.quality)."""
    assert any(m.startswith("pyspark") for m in closure("spark_job.app"))
    assert not any(m.startswith("pyspark") for m in closure("spark_job.quality"))
    assert importlib.import_module("spark_job.quality").main is not None
