"""pyproject.toml declares every package tltune/ imports (in functions too), with a version range
that admits constraints.txt's pin; the lean install (no extras) is what the cluster nodes get."""

import ast
import re
import sys
from importlib.metadata import packages_distributions

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def imported_top_level(package=ROOT / "tltune") -> dict[str, set[str]]:
    """Top-level module name -> the files of ``package`` that import it, anywhere in the file."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def third_party(modules) -> set[str]:
    return {m for m in modules if m not in sys.stdlib_module_names and m != "tltune"}


def requirements(specs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = (line.split("==") for line in lines if "==" in line and not line.startswith("#"))
    return {canonicalize_name(name): version.strip() for name, version in pairs}


def test_every_imported_package_is_a_dependency_with_a_range_that_admits_its_pin():
    imports = imported_top_level()
    distributions = packages_distributions()
    declared, pinned = requirements(PYPROJECT["dependencies"]), pins()
    # optional pieces (the trackers of --log-to) are imported only where used, from an extra
    extras = {name: requirement for extra, specs in PYPROJECT["optional-dependencies"].items() if extra != "test"
              for name, requirement in requirements(specs).items()}  # fmt: skip
    missing = {}
    for module in sorted(third_party(imports)):
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        dist = next((n for n in names if n in declared), None) or next((n for n in names if n in extras), None)
        declared_here = declared if dist in declared else extras
        if dist is None:
            missing[module] = sorted(imports[module])
            continue
        requirement = declared_here[dist]
        assert any(s.operator in (">=", "~=", "==") for s in requirement.specifier), f"{requirement}: give a lower bound"
        assert dist in pinned, f"{dist} is not in constraints.txt"
        assert requirement.specifier.contains(pinned[dist], prereleases=True), f"{requirement} excludes the tested {dist}=={pinned[dist]}"
    assert not missing, f"imported by tltune/ but not in pyproject.toml's dependencies: {missing}"


def test_the_scan_sees_imports_inside_functions():
    imports = imported_top_level()
    assert "tltune/raytune/cluster.py" in imports["yaml"]  # only inside a function
    assert {"pyarrow", "torch", "ray", "PIL", "scipy"} <= third_party(imports)


def test_test_tools_are_only_an_extra():
    declared = requirements(PYPROJECT["dependencies"])
    test_extra = requirements(PYPROJECT["optional-dependencies"]["test"])
    assert {"pytest", "moto"} <= set(test_extra) and "server" in test_extra["moto"].extras
    assert not {"pytest", "moto", "flask", "docker", "cfn-lint"} & set(declared), "a lean install has no test tools"


def test_cluster_installs_are_lean():
    cluster = (ROOT / "cluster.yaml").read_text()
    installs = [line for line in cluster.splitlines() if "pip install" in line and "tltune" in line]
    assert installs and not any(re.search(r"tltune\[", line) for line in installs)
    sbatch = (ROOT / "cluster" / "slurm.sbatch").read_text()
    for line in (line for line in sbatch.splitlines() if "pip install" in line):
        assert "-c" in line and "constraints.txt" in line and "[" not in line.partition("pip install")[2], line
