"""Builds the notebooks in this folder from their plain-Python sources in src/.

    python notebooks/build.py            # writes tour.ipynb, gpu.ipynb, tpu.ipynb
    python notebooks/build.py --check    # exits 1 if a stored notebook differs from its sources

The sources are jupytext "percent" scripts (``# %%`` starts a code cell, ``# %% [markdown]``
a Markdown cell whose lines are comments), so a change to a notebook is a reviewable change
to Python text, and an editor or ``jupytext`` can open them. The notebooks are stored
without outputs; edit src/, never the .ipynb files.

src/tour.py is the tour. gpu.ipynb and tpu.ipynb are the tour with their backend's notes
(which kernels apply, how to check the device, what to expect on Colab or a Cloud TPU VM)
and a timing of the lowered kernels at sizes picked for that device: src/gpu.py and
src/tpu.py hold only those cells, each naming a tour cell by its ``slot`` metadata. A cell
with ``slot="name"`` replaces the tour's cell of that slot (for ``slot="title"``: only its
heading line); a cell with ``after="name"`` is added after it.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = HERE / "src"
NOTEBOOKS = ("tour", "gpu", "tpu")

_CELL_MARK = re.compile(r"^# %%(?: \[(markdown)\])?((?: \w+=\"[^\"]*\")*)\s*$")
_META = re.compile(r'(\w+)="([^"]*)"')


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def read_cells(path: pathlib.Path) -> list[tuple[object, dict]]:
    """The cells of a percent-format script, each with its metadata (``slot``, ``after``)."""
    cells, kind, meta, lines = [], None, {}, None

    def flush():
        if lines is None:
            return
        if kind == "markdown":   # "# text" -> "text", "#" -> ""
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                             for line in lines)
            cells.append((md(text), meta))
        else:
            cells.append((code("\n".join(lines)), meta))

    for line in path.read_text().split("\n"):
        mark = _CELL_MARK.match(line)
        if mark:
            flush()
            kind, meta, lines = mark.group(1), dict(_META.findall(mark.group(2))), []
        elif lines is not None:   # the jupytext header before the first cell is not a cell
            lines.append(line)
    flush()
    return cells


def notebook(kind: str):
    tour = read_cells(SOURCES / "tour.py")
    if kind == "tour":
        cells = [cell for cell, _ in tour]
    else:
        extra = read_cells(SOURCES / f"{kind}.py")
        replace = {meta["slot"]: cell for cell, meta in extra if "slot" in meta}
        after = {meta["after"]: cell for cell, meta in extra if "after" in meta}
        slots = {meta["slot"] for _, meta in tour if "slot" in meta}
        unknown = sorted((set(replace) | set(after)) - slots)
        if unknown:
            raise ValueError(f"src/{kind}.py names slot(s) {unknown} that src/tour.py does not "
                             f"have; use one of {sorted(slots)}")
        cells = []
        for cell, meta in tour:
            slot = meta.get("slot")
            if slot == "title" and slot in replace:   # the backend's heading, the tour's intro
                heading, _, rest = cell.source.partition("\n")
                cell = md(replace[slot].source + "\n" + rest)
            elif slot in replace:
                cell = replace[slot]
            cells.append(cell)
            if slot in after:
                cells.append(after[slot])
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": {"gpu": "GPU", "tpu": "TPU"}.get(kind, "None"),
    })
    # Stable cell ids keep rebuilt notebooks byte-identical (nbformat draws random ones).
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{kind}-{i:02d}"
    return nb


def render(kind: str) -> str:
    return nbformat.writes(notebook(kind)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare the stored notebooks with their sources instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for kind in NOTEBOOKS:
        path = HERE / f"{kind}.ipynb"
        text = render(kind)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
