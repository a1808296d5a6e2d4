"""Write docs/ett.md (the table) and docs/ett.png (predictions against actual values)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def plot(path: Path, z: np.ndarray, series: dict[str, np.ndarray], bounds: tuple, published: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, val_end, test_end = bounds
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), dpi=110)
    start = val_end + 5400  # two weeks from the middle of the test
    rows = np.arange(start, start + 336)
    for ax, col in zip(axes[:2], (6, 0), strict=True):
        ax.plot(rows, z[rows, col], color="black", lw=1.6, label="actual")
        ax.plot(
            rows,
            series["streamlstm"][rows, col],
            color="tab:red",
            lw=1.1,
            label="streamlstm (predicted 1 h ahead)",
        )
        ax.plot(
            rows,
            series["persistence"][rows, col],
            color="tab:grey",
            lw=0.9,
            ls="--",
            label="persistence",
        )
        ax.set_ylabel(f"{COLUMNS[col]} (z-score)")
        ax.set_xlim(rows[0], rows[-1])
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_title("ETTh2 online test: two weeks, one step ahead")
    axes[1].set_xlabel("row (hour)")
    test = np.arange(val_end, test_end)
    for name, color in (
        ("streamlstm", "tab:red"),
        ("persistence", "tab:grey"),
        ("river LinearRegression", "tab:blue"),
    ):
        err = ((series[name][test] - z[test]) ** 2).mean(1)
        axes[2].plot(test, np.cumsum(err) / np.arange(1, len(err) + 1), color=color, label=name)
    shown = [(n, v) for n, v in published.items() if n in ("FSNet", "OneNet", "LSTD")]
    for i, (name, value) in enumerate(sorted(shown, key=lambda item: item[1])):
        axes[2].axhline(value, color="tab:green", lw=0.6, ls=":")
        axes[2].text(test[-1], value + 0.035 * i, f" {name} {value}", fontsize=7, va="center")
    axes[2].set_ylabel("cumulative MSE")
    axes[2].set_xlabel("test row")
    axes[2].set_xlim(test[0], test[-1] + 900)
    axes[2].set_ylim(0, 1.0)
    axes[2].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(rows: dict[str, tuple[float, float]], published: dict) -> list[str]:
    lines = ["| method | MSE | MAE |", "|---|---:|---:|"]
    lines += [
        f"| {name.replace('|', '/')} | {mse:.3f} | {mae:.3f} |" for name, (mse, mae) in rows.items()
    ]
    lines += [
        f"| {name} (published) | {value:.3f} | |"
        for name, value in published.items()
        if not name.startswith("persistence")
    ]
    return lines


def write_report(
    docs: Path, text: str, z: np.ndarray, series: dict, bounds: tuple, published: dict
):
    docs.mkdir(parents=True, exist_ok=True)
    plot(docs / "ett.png", z, series, bounds, published)
    (docs / "ett.md").write_text(text)
