"""setup.py ships every subpackage of the three roots (sparsejax/, compiler/, models/), and
``import sparsejax`` loads the library apart from the training run."""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _package_dirs(monkeypatch) -> dict:
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.chdir(ROOT)
    return runpy.run_path(str(ROOT / "setup.py"))["PACKAGE_DIRS"]


def test_every_folder_with_an_init_is_a_package(monkeypatch):
    dirs = _package_dirs(monkeypatch)
    roots = {"sparsejax": "sparsejax", "compiler": "sparsejax.compiler",
             "models": "sparsejax.models"}
    expected = {}
    for folder, name in roots.items():
        for here, subdirs, files in os.walk(ROOT / folder):
            rel = pathlib.Path(here).relative_to(ROOT / folder)
            # the development symlinks sparsejax/compiler and sparsejax/models are not walked
            subdirs[:] = [d for d in subdirs if not (pathlib.Path(here) / d).is_symlink()
                          and d != "__pycache__"]
            if "__init__.py" in files:
                dotted = ".".join((name, *rel.parts))
                expected[dotted] = str(pathlib.PurePosixPath(folder, *rel.parts))
    assert "sparsejax.compiler.passes" in expected
    assert dirs == expected


def test_import_sparsejax_loads_no_training_code():
    # A fresh interpreter: this process has long imported sparsejax.training for other tests.
    probe = ("import json, sys, sparsejax; "
             "print(json.dumps({'loaded': sorted(m for m in sys.modules if m.split('.')[0] in "
             "('orbax', 'matplotlib', 'tensorboardX') or m.startswith('sparsejax.training')), "
             "'missing': [n for n in sparsejax.__all__ if not hasattr(sparsejax, n)]}))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loaded"] == []     # no presets, data, checkpoints or logs (nor orbax, matplotlib)
    assert result["missing"] == []    # every name in __all__ exists


# The layers of docs/architecture.md, lowest first: math, rules, kernels and optimizers; the
# compiler; the public transform (and the one-shot driver built on it); training and processes.
def _layer(module: str) -> int:
    if module.startswith(("sparsejax.training", "sparsejax.distributed")):
        return 4
    if module in ("sparsejax", "sparsejax.sparsify", "sparsejax.oneshot") or module.startswith(
            ("sparsejax.oneshot.driver", "sparsejax.oneshot.training")):
        return 3
    if module.startswith("sparsejax.compiler"):
        return 2
    return 1


def _modules() -> dict:
    roots = {"sparsejax": ROOT / "sparsejax", "sparsejax.compiler": ROOT / "compiler",
             "sparsejax.models": ROOT / "models"}
    found = {}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder)
            if package == "sparsejax" and rel.parts[0] in ("compiler", "models"):
                continue     # development symlinks to the roots above
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def test_imports_point_down_only():
    """No module imports one of a higher layer (function-local imports included)."""
    import ast

    modules = _modules()
    upward = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                    "sparsejax"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("sparsejax")]
            else:
                continue
            upward += [f"{name} -> {t}" for t in targets
                       if t in modules and name != "sparsejax" and _layer(t) > _layer(name)]
    assert len(modules) > 50
    assert upward == []
