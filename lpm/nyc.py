"""Readers of the real New York City tables in ``populations/nyc/`` (sources in its README.md).

Every reader returns a tidy pandas frame and raises :class:`InputError` naming the file and the
column when a table is missing a field it needs.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd

from lpm.errors import InputError
from lpm.paths import project_root

BOROUGH_CODES = ("BX", "BK", "MN", "QN", "SI")
BOROUGH_NAMES = {"BX": "Bronx", "BK": "Brooklyn", "MN": "Manhattan", "QN": "Queens", "SI": "Staten Island"}


def data_dir() -> Path:
    return project_root() / "populations" / "nyc"


def _read_csv(name: str, required: list[str], **kwargs) -> pd.DataFrame:
    path = data_dir() / name
    if not path.is_file():
        raise InputError(f"{path}: missing NYC data file", hint="restore it from the repository")
    try:
        frame = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot parse ({exc})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


@cache
def population_by_group() -> pd.DataFrame:
    """Residents per borough and subgroup (``group`` is ``Age`` or ``Sex``) from group-data-by-boro.csv.

    Population = case count / case rate per 100,000 × 100,000. Columns: borough (code), group,
    subgroup, population (float).
    """
    cols = [f"{b}_CASE_COUNT" for b in BOROUGH_CODES] + [f"{b}_CASE_RATE" for b in BOROUGH_CODES]
    frame = _read_csv("group-data-by-boro.csv", ["group", "subgroup", *cols])
    rows = []
    for b in BOROUGH_CODES:
        part = frame[["group", "subgroup"]].copy()
        part["borough"] = b
        part["population"] = frame[f"{b}_CASE_COUNT"] / frame[f"{b}_CASE_RATE"] * 100_000
        rows.append(part)
    out = pd.concat(rows, ignore_index=True)
    return out[out["group"].isin(["Age", "Sex"])].dropna(subset=["population"]).reset_index(drop=True)


@cache
def city_population() -> int:
    """Residents of the city: the sum of the age-band populations of :func:`population_by_group`
    (8,336,817), the size of the full synthetic population and the denominator of rates per 100,000."""
    table = population_by_group()
    return round(float(table.loc[table["group"] == "Age", "population"].sum()))


@cache
def zip_areas() -> pd.DataFrame:
    """ZIP areas (MODZCTA) with borough code and population (POP_DENOMINATOR), from data-by-modzcta.csv."""
    frame = _read_csv(
        "data-by-modzcta.csv",
        ["MODIFIED_ZCTA", "BOROUGH_GROUP", "POP_DENOMINATOR"],
        dtype={"MODIFIED_ZCTA": str},
    )
    by_name = {v: k for k, v in BOROUGH_NAMES.items()}
    unknown = sorted(set(frame["BOROUGH_GROUP"]) - set(by_name))
    if unknown:
        raise InputError(
            f"{data_dir() / 'data-by-modzcta.csv'}: column BOROUGH_GROUP has unknown value(s) {unknown}"
        )
    return pd.DataFrame(
        {
            "zip": frame["MODIFIED_ZCTA"].astype(str),
            "borough": frame["BOROUGH_GROUP"].map(by_name),
            "population": frame["POP_DENOMINATOR"].astype(float),
        }
    )


@cache
def labor_force() -> pd.DataFrame:
    """Monthly labor force per borough (BLS LAUS): borough, date (month start), labor_force, employed,
    unemployed, unemployment_rate (percent)."""
    frame = _read_csv(
        "labor-force-by-borough.csv",
        ["borough", "year", "month", "labor_force", "employed", "unemployed", "unemployment_rate"],
    )
    frame["date"] = pd.to_datetime(dict(year=frame["year"], month=frame["month"], day=1))
    return frame[["borough", "date", "labor_force", "employed", "unemployed", "unemployment_rate"]]


@cache
def cases_by_day() -> pd.DataFrame:
    """Daily confirmed + probable cases per borough: date, borough (code), cases. Tidy (long) form."""
    cols = [f"{b}_CASE_COUNT" for b in BOROUGH_CODES] + [f"{b}_PROBABLE_CASE_COUNT" for b in BOROUGH_CODES]
    frame = _read_csv("cases-by-day.csv", ["date_of_interest", *cols])
    date = pd.to_datetime(frame["date_of_interest"], format="%m/%d/%Y")
    parts = [
        pd.DataFrame(
            {
                "date": date,
                "borough": b,
                "cases": frame[f"{b}_CASE_COUNT"] + frame[f"{b}_PROBABLE_CASE_COUNT"],
            }
        )
        for b in BOROUGH_CODES
    ]
    return pd.concat(parts, ignore_index=True)
