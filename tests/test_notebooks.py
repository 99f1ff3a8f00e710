"""The tour runs top to bottom (headless, on CPU at small sizes) and the GPU and TPU
notebooks' own cells run after the tour cells they read, the stored notebooks are what
notebooks/build.py writes, and the benchmark summary the notebooks plot quotes its sources
exactly."""

import json
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SUMMARY = ROOT / "benchmarks" / "results" / "summary.json"
NOTEBOOK_NAMES = ("tour", "gpu", "tpu")
CELL_TIMEOUT_S = 300


def _build_module():
    from notebooks import build    # the repository root is on the path (pytest.ini)
    return build


def _execute(nb, monkeypatch):
    """Runs ``nb`` in a fresh kernel; returns its outputs (raises CellExecutionError naming
    the failing cell)."""
    # The kernel inherits this environment: small sizes, and figures drawn by the
    # inline backend (Agg underneath), so the plotting code really renders.
    monkeypatch.setenv("SPARSEJAX_NOTEBOOK_SIZE", "small")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _stream_text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_tour_notebook_executes_without_errors(monkeypatch):
    outputs = _execute(nbformat.read(NOTEBOOKS / "tour.ipynb", as_version=4), monkeypatch)
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    # activation densities, mask patterns, schedule + losses, per-layer density, speed chart
    assert len(images) >= 5, f"{len(images)} figures rendered"
    text = _stream_text(outputs)
    assert "sizes: small (backend cpu)" in text
    assert "activation sites:" in text                     # the LM's report
    assert "no block-sparse kernel on backend 'cpu'" in text   # lowering says it fell back
    assert "goals met" in text                             # the speed chart read the summary


@pytest.mark.parametrize("kind", ["gpu", "tpu"])
def test_backend_notebook_cells_execute_after_the_tour_cells_they_read(kind, monkeypatch):
    # gpu.ipynb and tpu.ipynb are the tour with a few cells of their own in place of or after
    # the tour's (test_gpu_and_tpu_notebooks_are_the_tour_plus_backend_notes; the tour runs in
    # full above). Each backend's code cells run here after the tour cells they read: the
    # set-up (imports, sizes) and the lowering whose result their timing cell times. The
    # whole tour again per backend would double the suite's largest part for no new line.
    build = _build_module()
    tour = {meta["slot"]: cell for cell, meta in build.read_cells(build.SOURCES / "tour.py")
            if "slot" in meta}
    own = build.read_cells(build.SOURCES / f"{kind}.py")
    own_code = [(cell, meta) for cell, meta in own if cell.cell_type == "code"]
    assert {meta.get("slot") or meta.get("after") for _, meta in own_code} == {"device", "lower_code"}
    replaced = {meta["slot"]: cell for cell, meta in own_code if "slot" in meta}
    after = [cell for cell, meta in own_code if meta.get("after") == "lower_code"]
    nb = nbformat.v4.new_notebook(cells=[replaced["device"], tour["setup"], tour["lower_code"], *after])
    text = _stream_text(_execute(nb, monkeypatch))
    assert "| backend: cpu" in text                           # the backend's device cell
    assert "sizes: small (backend cpu)" in text
    assert "no block-sparse kernel on backend 'cpu'" in text
    assert "XLA dense" in text and "× dense" in text          # the backend's timing cell


def test_stored_notebooks_are_built_from_the_cells_and_have_no_outputs():
    build = _build_module()
    assert build.main(["--check"]) == 0
    for name in NOTEBOOK_NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_build_check_reports_a_stale_notebook(tmp_path, monkeypatch):
    build = _build_module()
    for name in NOTEBOOK_NAMES:
        (tmp_path / f"{name}.ipynb").write_text(build.render(name))
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.main(["--check"]) == 0
    stale = tmp_path / "gpu.ipynb"
    stale.write_text(stale.read_text().replace("GPU notes", "GPU remarks"))
    assert build.main(["--check"]) == 1


def test_gpu_and_tpu_notebooks_are_the_tour_plus_backend_notes():
    build = _build_module()
    tour = [c.source for c in build.notebook("tour").cells]
    for kind, words in (("gpu", ("Mosaic GPU", "nvidia-smi", "Colab")),
                        ("tpu", ("PrefetchScalarGridSpec", "Cloud TPU", "jax[tpu]"))):
        cells = [c.source for c in build.notebook(kind).cells]
        shared = [s for s in tour if s in cells]
        assert len(shared) == len(tour) - 4    # title, backend notes, device check, lowering text
        joined = "\n".join(cells)
        assert all(w in joined for w in words), kind


def test_summary_entries_quote_their_sources():
    entries = json.loads(SUMMARY.read_text())["entries"]
    assert entries
    required = {"benchmark", "case", "goal", "baseline", "device", "jax", "source",
                "command", "quote"}
    for e in entries:
        # A speed entry has "speedup"; a quality entry has "metric" and "value" instead.
        assert required | ({"metric", "value"} if "value" in e else {"speedup"}) <= set(e), e
        source = ROOT / e["source"]
        assert source.is_file(), e["source"]
        text = source.read_text()
        assert e["quote"] in text, (e["source"], e["quote"])
        assert f"`{e['command']}" in text, (e["source"], e["command"])
        if "value" in e:
            assert f"{e['value']:g}" in e["quote"], e
            continue
        assert e["speedup"] > 0 and (e["goal"] is None or e["goal"] > 0)


def test_summary_speedups_are_the_quoted_numbers():
    # Where the recorded number is a speed-up, it appears verbatim in the quote;
    # the one inverted ratio (a time ratio where lower is better) says so.
    for e in json.loads(SUMMARY.read_text())["entries"]:
        if "speedup" not in e:
            continue
        if "note" in e:
            assert "inverse" in e["note"]
            ratio = float(e["quote"].strip("| ").split("|")[-1])
            assert abs(1.0 / ratio - e["speedup"]) < 5e-3, e
        else:
            assert (f"{e['speedup']:.2f}" in e["quote"] or f"{e['speedup']:.1f}" in e["quote"]), e
