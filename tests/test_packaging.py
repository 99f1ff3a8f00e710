"""setup.py ships every subpackage of the three roots (sparsejax/, compiler/, models/)."""

import os
import pathlib
import runpy

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
