"""Issue 17 · the loss plot: smoothed line over the raw one, eval losses as markers, plain log ticks."""

from __future__ import annotations

import math

import pytest

from lorakit.train.report import loss_figure, plot_loss, smooth, smoothing_weight


def test_smooth_is_the_debiased_ema():
    xs = [4.0, 2.0, 3.0, 1.0, 0.5]
    w = 0.6
    want = []
    for t in range(1, len(xs) + 1):  # closed form: Σ (1-w) w^(t-i) x_i / (1 - w^t)
        num = sum((1 - w) * w ** (t - i) * xs[i - 1] for i in range(1, t + 1))
        want.append(num / (1 - w ** t))
    assert smooth(xs, w) == pytest.approx(want)
    assert smooth(xs, 0.0) == xs
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # debiased: a constant stays constant


def test_smoothing_weight():
    assert smoothing_weight(10) == 0.0 and smoothing_weight(0) == 0.0
    assert smoothing_weight(300) == pytest.approx(1 - 20 / 300)


def test_figure_layers(tmp_path):
    history = [{"step": s, "loss": 5 * math.exp(-s / 40) + 0.1} for s in range(1, 201)]
    history[99]["eval_loss"] = 1.0
    fig = loss_figure(history, "t", [(0, 5.0), (200, 0.3)])
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0] == "train loss" and labels[1].startswith("train loss, smoothed")
    ev = ax.get_lines()[2]
    assert ev.get_label() == "eval loss" and ev.get_linestyle() == "None" and ev.get_marker() == "o"
    assert list(ev.get_xdata()) == [0, 100, 200]
    assert ax.get_yscale() == "log"
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ticks and all("10^" not in t and "$" not in t for t in ticks)  # plain numbers
    plot_loss(history, tmp_path / "loss.png", "t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_flat_run_is_linear_and_unsmoothed():
    fig = loss_figure([{"step": s, "loss": 1.0 + 0.01 * s} for s in range(1, 6)], "t")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["train loss"] and ax.get_yscale() == "linear"
