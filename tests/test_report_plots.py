"""Report plots a reader can read: labelled axes, a lone evaluation drawn as bars, a heatmap large enough
with its colour bar labelled beside it, and an all-zero layer explained."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from memefx.report.run import plot_midas_curves, plot_midas_heatmap, plot_threshold_curve


def _table(path, epoch=0, zero_last=True):
    rows = []
    for layer in (0, 1):
        for head in range(4):
            for block in ("text", "image", "cross", "special"):
                value = 0.0 if (zero_last and layer == 1 and block != "special") else 0.01 * (head + 1)
                rows.append({"id": "00001", "epoch": epoch, "stage": "test", "layer": layer, "head": head,
                             "block": block, "score": "attattr", "sum": value, "count": 4.0})
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def test_heatmap_size_labels_and_the_zero_layer_note(tmp_path, monkeypatch):
    said = []
    original = Figure.text
    monkeypatch.setattr(Figure, "text", lambda self, x, y, s, *a, **k: said.append(s) or original(self, x, y, s, *a, **k))
    out = plot_midas_heatmap(_table(tmp_path / "test_ckpt_epoch2.parquet"), tmp_path)
    width, height = Image.open(out).size
    assert width >= 550 and height >= 350
    assert any("layer 1: exactly 0" in s and "[CLS]" in s for s in said)
    said.clear()
    plot_midas_heatmap(_table(tmp_path / "b.parquet", zero_last=False), tmp_path)
    assert not said  # nothing to explain


def test_one_evaluation_is_drawn_as_bars_with_values(tmp_path, monkeypatch):
    import matplotlib.axes

    bars, labels = [], []
    original_bar, original_set = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.set
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: bars.append(a) or original_bar(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "set", lambda self, **k: labels.append(k) or original_set(self, **k))
    path = _table(tmp_path / "test_ckpt_epoch2.parquet", epoch=2)
    assert plot_midas_curves({("test", 2, True): path}, tmp_path).is_file()
    assert bars and list(bars[0][0]) == ["cross", "image", "special", "text"]
    assert any(k.get("ylabel") == "block mean of attention x gradient" for k in labels)
    assert any("weights of epoch 2" in k.get("title", "") for k in labels)


def test_threshold_curve_says_what_tau_is(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.set
    monkeypatch.setattr(matplotlib.axes.Axes, "set", lambda self, **k: labels.append(k) or original(self, **k))
    curve = [{"tau": t, "mean": 0.3 + t / 10, "n": 5} for t in (-1.0, 0.0, 0.5)]
    miate = {"split": "dev_seen", "shared_image": {"mean": 0.3, "threshold_curve": curve}}
    assert plot_threshold_curve(miate, tmp_path).is_file()
    assert any("miATE_g >= tau" in k.get("xlabel", "") and "miATE_g >= tau" in k.get("title", "") for k in labels)
