"""The README's figure: a COVID run's weekly reported cases against the real series, citywide and per borough.

.venv/bin/python docs/covid_figure.py runs/issue8-heuristic docs/covid-spring-2020.png ["literature values"]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from lpm import nyc


def weekly(frame: pd.DataFrame) -> pd.DataFrame:
    """Weekly sums (weeks ending on Sunday) per borough of a (date, borough, value) frame."""
    frame = frame.assign(date=pd.to_datetime(frame["date"]))
    wide = frame.pivot_table(index="date", columns="borough", values="value", aggfunc="sum", observed=True)
    return wide.resample("W-SUN").sum()


def main(run: Path, out: Path, values: str = "defaults") -> None:
    t = pd.read_parquet(run / "trajectory.parquet")
    sim = weekly(t[t["quantity"] == "reported_cases"])
    first, last = pd.to_datetime(t["date"]).min(), pd.to_datetime(t["date"]).max()
    real = nyc.cases_by_day()
    real = real[(real["date"] >= first) & (real["date"] <= last)]
    real = real.assign(borough=real["borough"].map(nyc.BOROUGH_NAMES), value=real["cases"])
    real = weekly(real)
    boroughs = list(sim.columns)
    cols = 3
    rows = -(-(1 + len(boroughs)) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[1 + len(boroughs) :]:
        ax.set_visible(False)
    for ax, name in zip(axes, ["New York City", *boroughs], strict=False):
        s = sim.sum(axis=1) if name == "New York City" else sim[name]
        r = real.sum(axis=1) if name == "New York City" else real[name]
        ax.plot(s.index, s.to_numpy(), label=f"simulated (heuristic policy, {values})")
        ax.plot(r.index, r.to_numpy(), "k--", label="real (NYC DOHMH)")
        ax.set_title(name)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0].set_ylabel("reported cases per week")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"weekly reported COVID-19 cases, {first:%Y-%m-%d} .. {last:%Y-%m-%d}, full city", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
