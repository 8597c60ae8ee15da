"""docker/Dockerfile without a Docker engine: parsed with dockerfile-parse and checked for the
properties the deployment relies on (base image, Java 17 in the Spark image, non-root users,
dependency caching, COPY sources that exist and are not excluded by .dockerignore)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
TARGETS = ("app", "spark")


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def of(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]


@cache
def parser(path: Path = REPO / "docker" / "Dockerfile") -> DockerfileParser:
    return DockerfileParser(path=str(path))


@cache
def stages(path: Path = REPO / "docker" / "Dockerfile") -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser(path).structure:
        kind, value = item["instruction"], item["value"]
        if kind == "FROM":
            words = value.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else f"#{len(found)}"
            current = found[name] = Stage(name, words[0])
        elif current is not None and kind != "COMMENT":
            current.instructions.append((kind, value))
    return found


def chain(name: str) -> list[Stage]:
    """The stage and its ancestors, root first."""
    out: list[Stage] = []
    while name in stages():
        out.insert(0, stages()[name])
        name = stages()[name].parent
    return out


def copy_args(value: str) -> tuple[list[str], list[str]]:
    """(flags, paths) of a COPY instruction value; the last path is the destination."""
    words = shlex.split(value)
    return [w for w in words if w.startswith("--")], [w for w in words if not w.startswith("--")]


@cache
def dockerignore() -> tuple[str, ...]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def ignored(path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; a pattern that matches a folder
    excludes everything below it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in dockerignore():
        negated = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatch(p.split("/")[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatch(p, pat) for p in prefixes)
        if hit:
            result = not negated
    return result


def project_packages() -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}


# --------------------------------------------------------------------------------------------------


def test_dockerfiles_exist_and_parse() -> None:
    assert DOCKERFILES, "no docker/Dockerfile*"
    for path in DOCKERFILES:
        assert parser(path).structure, path


def test_targets_used_by_compose_exist() -> None:
    for target in TARGETS:
        assert target in stages()
    assert {"base", "deps"} <= set(stages())


def test_base_image_is_python_311_slim_bookworm() -> None:
    roots = [s.parent for s in stages().values() if s.parent not in stages()]
    assert roots == ["${PYTHON_IMAGE}"]
    assert parser().parent_images[0] == "python:3.11-slim-bookworm"


def test_spark_image_adds_java_17_and_app_image_does_not() -> None:
    def runs(target: str) -> str:
        return "\n".join(v for s in chain(target) for v in s.of("RUN"))

    assert "openjdk-17-jre-headless" in runs("spark")
    assert "--no-install-recommends" in runs("spark")
    assert "rm -rf /var/lib/apt/lists" in runs("spark")
    assert "openjdk" not in runs("app")
    java_home = [v for s in chain("spark") for v in s.of("ENV") if v.startswith("JAVA_HOME=")]
    assert java_home == ["JAVA_HOME=/usr/lib/jvm/java-17"]


@pytest.mark.parametrize("target", TARGETS)
def test_targets_run_as_a_non_root_user(target: str) -> None:
    stage = stages()[target]
    kinds = [kind for kind, _ in stage.instructions]
    assert "USER" in kinds, f"{target} never switches user"
    last_user = len(kinds) - 1 - kinds[::-1].index("USER")
    assert stage.instructions[last_user][1].split(":")[0] not in {"root", "0"}
    assert "RUN" not in kinds[last_user:], "RUN after USER would run unprivileged by accident"
    runs = "\n".join(stage.of("RUN"))
    assert "useradd" in runs and "--uid" in runs


def test_every_copy_source_exists_and_is_in_the_build_context() -> None:
    for path in DOCKERFILES:
        for stage in stages(path).values():
            for value in stage.of("COPY") + stage.of("ADD"):
                flags, paths = copy_args(value)
                if any(f.startswith("--from=") for f in flags):
                    continue
                for source in paths[:-1]:
                    assert list(REPO.glob(source)), f"COPY {source}: not in the repository"
                    assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
                    if (REPO / source).is_dir():
                        for file in (REPO / source).rglob("*.py"):
                            rel = file.relative_to(REPO).as_posix()
                            if "__pycache__" not in rel:
                                assert not ignored(rel), f"{rel} excluded by .dockerignore"


@pytest.mark.parametrize("target", TARGETS)
def test_every_package_is_installed_in_the_image(target: str) -> None:
    copied = {copy_args(v)[1][0].rstrip("/") for v in stages()[target].of("COPY")
              if not copy_args(v)[0]}
    assert project_packages() | {"pyproject.toml"} <= copied
    assert any("pip install --no-deps" in run and "." in run.split() for run in
               stages()[target].of("RUN"))


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    deps = stages()["deps"]
    copies = [copy_args(v)[1][:-1] for v in deps.of("COPY")]
    assert copies == [["pyproject.toml"]], "the dependency stage sees pyproject.toml only"
    kinds = [kind for kind, _ in deps.instructions]
    install = next(i for i, (k, v) in enumerate(deps.instructions)
                   if k == "RUN" and "pip install -r requirements.txt" in v)
    assert kinds.index("COPY") < install
    for target in TARGETS:
        instructions = stages()[target].instructions
        venv = next(i for i, (k, v) in enumerate(instructions)
                    if k == "COPY" and v.startswith(("--from=deps ", "--from=spark-deps ")))
        first_source = next(i for i, (k, v) in enumerate(instructions)
                            if k == "COPY" and copy_args(v)[1][0].rstrip("/") in project_packages())
        assert venv < first_source, f"{target}: source copied before the dependency layer"


def test_requirements_one_liner_splits_the_pyproject_dependencies(tmp_path: Path) -> None:
    """requirements.txt holds every dependency but pyspark, spark-requirements.txt pyspark: the
    two together are exactly pyproject's list (``pip install .`` stays the full install)."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    run = next(v for v in stages()["deps"].of("RUN") if "tomllib" in v)
    result = subprocess.run(["sh", "-c", run], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    app = (tmp_path / "requirements.txt").read_text().splitlines()
    spark = (tmp_path / "spark-requirements.txt").read_text().splitlines()
    assert [d for d in dependencies if d in spark] == spark == ["pyspark==4.3.0"]
    assert app == [d for d in dependencies if d not in spark]


def test_only_the_spark_image_gets_pyspark() -> None:
    """The app image (producer, consumer, dashboard) takes its virtualenv from the stage that
    installs requirements.txt; pyspark comes in a later stage only the spark image uses."""
    assert "spark-requirements" not in " ".join(
        v for v in stages()["deps"].of("RUN") if "pip install" in v)
    assert stages()["spark-deps"].parent == "deps"
    assert "pip install -r spark-requirements.txt" in " ".join(stages()["spark-deps"].of("RUN"))
    venvs = {target: [v.split()[0] for v in stages()[target].of("COPY") if "/opt/venv" in v]
             for target in TARGETS}
    assert venvs == {"app": ["--from=deps"], "spark": ["--from=spark-deps"]}


def test_dockerignore_keeps_local_state_and_tests_out() -> None:
    for path in ("run/logs/producer.log", "parquet_data/alerts/part-0.parquet",
                 ".venv/bin/python", ".git/HEAD", "tests/conftest.py",
                 "benchmarks/results/latest.json", "producer/__pycache__/app.cpython-311.pyc"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "fraudstream/settings.py", "spark_job/__main__.py"):
        assert not ignored(path), path


def test_no_secrets_baked_into_images() -> None:
    for path in DOCKERFILES:
        for stage in stages(path).values():
            for value in stage.of("ENV") + stage.of("ARG"):
                assert not re.search(r"PASSWORD|SECRET|TOKEN", value, re.IGNORECASE), value
