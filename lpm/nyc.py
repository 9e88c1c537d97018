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


def _read_csv(name: str, required: list[str], *, path: Path | None = None, **kwargs) -> pd.DataFrame:
    path = data_dir() / name if path is None else Path(path)
    if not path.is_file():
        shipped = path.parent == data_dir()
        raise InputError(
            f"{path}: {'missing NYC data file' if shipped else 'no such file'}",
            hint="restore it from the repository" if shipped else "check the path",
        )
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
def borough_population() -> pd.Series:
    """Residents per borough (index: borough code), the sums of the age-band populations of
    :func:`population_by_group`."""
    table = population_by_group()
    return table[table["group"] == "Age"].groupby("borough")["population"].sum()


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


#: Count columns of households-by-area.csv that the synthesis reads (whole numbers >= 0).
HOUSEHOLD_COUNTS = (
    "people_in_households",
    "households",
    "householders",
    "householders_living_alone",
    "householders_living_alone_65_and_over",
    "family_households_with_own_children_under_18",
    "married_couple_families_with_own_children_under_18",
)
#: (part, whole) pairs of household counts: a row whose part exceeds its whole is refused.
HOUSEHOLD_PARTS = (
    ("householders_living_alone", "households"),
    ("householders_living_alone_65_and_over", "householders_living_alone"),
    ("family_households_with_own_children_under_18", "households"),
    ("married_couple_families_with_own_children_under_18", "family_households_with_own_children_under_18"),
)
#: Largest relative gap allowed between a borough's people in households and its population from
#: group-data-by-boro.csv (group quarters hold about 2-3 %; the two sources differ in vintage).
HOUSEHOLD_POPULATION_GAP = 0.10


@cache
def households_by_area(path: Path | None = None) -> pd.DataFrame:
    """Household composition per neighborhood tabulation area (ACS DP02) from households-by-area.csv.

    Columns: area (NTA code), borough (its first two letters), the counts :data:`HOUSEHOLD_COUNTS`
    (int64) and average_household_size (float; empty where an area has no households). ``path`` reads
    another copy of the table (tests). Refused with an :class:`InputError` naming the file and the field:
    a missing column; a count that is missing, not a whole number or negative; an area code of no
    borough; householders other than households; people_in_households off households ×
    average_household_size by more than its two decimals allow (0.006 × households + 1); a part (living
    alone, …) larger than its whole (:data:`HOUSEHOLD_PARTS`); and a borough whose people in households
    differ from its population (:func:`population_by_group`) by more than
    :data:`HOUSEHOLD_POPULATION_GAP`: a household file whose sizes do not add up to the population.
    """
    name = "households-by-area.csv"
    required = ["area", *HOUSEHOLD_COUNTS, "average_household_size"]
    frame = _read_csv(name, required, path=path, dtype={"area": str})
    where = data_dir() / name if path is None else Path(path)
    area = frame["area"].fillna("(empty)").astype(str)
    out = pd.DataFrame({"area": area, "borough": area.str[:2]})
    _refuse(where, "area", area, ~out["borough"].isin(BOROUGH_CODES), "starts with no borough code")
    for col in [*HOUSEHOLD_COUNTS, "average_household_size"]:
        values = pd.to_numeric(frame[col], errors="coerce")
        _refuse(where, col, area, values.isna() & frame[col].notna(), "is not a number", frame[col])
        _refuse(where, col, area, values < 0, "is negative", values)
        if col != "average_household_size":
            _refuse(where, col, area, values.isna(), "is missing")
            _refuse(where, col, area, values % 1 != 0, "is not a whole number", values)
            values = values.astype("int64")
        out[col] = values
    households, average = out["households"], out["average_household_size"]
    _refuse(where, "average_household_size", area, average.isna() & (households > 0), "is missing")
    _refuse(
        where,
        "householders",
        area,
        out["householders"] != households,
        "differs from field households",
        out["householders"].astype(str) + " householders, " + households.astype(str) + " households",
    )
    people = out["people_in_households"]
    _refuse(
        where,
        "people_in_households",
        area,
        (people - households * average.fillna(0.0)).abs() > 0.006 * households + 1,
        "differs from households × average_household_size by more than rounding to 2 decimals allows",
        people.astype(str) + " ≠ " + households.astype(str) + " × " + average.astype(str),
    )
    for part, whole in HOUSEHOLD_PARTS:
        _refuse(where, part, area, out[part] > out[whole], f"exceeds field {whole}", out[part])
    residents = borough_population()
    in_households = people.groupby(out["borough"]).sum()
    for code in BOROUGH_CODES:
        have, want = int(in_households.get(code, 0)), float(residents.get(code, 0.0))
        if abs(have - want) > HOUSEHOLD_POPULATION_GAP * want:
            raise InputError(
                f"{where}: field people_in_households sums to {have:,} in borough {code}, "
                f"{have / want:.0%} of its population {want:,.0f} (group-data-by-boro.csv): the household "
                f"sizes do not add up to the population (at most {HOUSEHOLD_POPULATION_GAP:.0%} may differ)"
            )
    return out


def _refuse(
    path: Path, field: str, area: pd.Series, bad: pd.Series, what: str, value: pd.Series | None = None
) -> None:
    """Raise an :class:`InputError` naming ``path``, ``field`` and the first areas (with their ``value``)
    where ``bad`` holds."""
    rows = bad.to_numpy().nonzero()[0]
    if not len(rows):
        return
    shown = [area.iloc[i] + ("" if value is None else f" ({value.iloc[i]})") for i in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    raise InputError(f"{path}: field {field} {what} in area(s) {', '.join(shown)}{more}")


def _numbers(frame: pd.DataFrame, columns: list[str], path: Path, *, key: str) -> None:
    """Every value of ``columns`` a number >= 0; else an :class:`InputError` naming the file, the field
    and the first bad row (by its ``key`` column)."""
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna() | (values < 0)
        if bad.any():
            first = frame.loc[bad.idxmax()]
            what = "is not a number" if pd.isna(values[bad.idxmax()]) else "is negative"
            raise InputError(
                f"{path}: field {col!r} {what} ({first[col]!r} at {key} {first[key]!r}; {int(bad.sum())} such row(s))",
                hint="counts and rates are numbers >= 0",
            )
        frame[col] = values


@cache
def labor_force(path: Path | None = None) -> pd.DataFrame:
    """Monthly labor force per borough (BLS LAUS): borough, date (month start), labor_force, employed,
    unemployed, unemployment_rate (percent). ``path``: a file of the same format instead of the shipped
    ``labor-force-by-borough.csv`` (checked: columns, borough codes, months, numbers >= 0)."""
    path = data_dir() / "labor-force-by-borough.csv" if path is None else Path(path)
    cols = ["labor_force", "employed", "unemployed", "unemployment_rate"]
    frame = _read_csv(path.name, ["borough", "year", "month", *cols], path=path)
    unknown = sorted(set(frame["borough"].astype(str)) - set(BOROUGH_CODES))
    if unknown:
        raise InputError(
            f"{path}: field 'borough' has unknown value(s) {unknown}",
            hint=f"borough codes: {', '.join(BOROUGH_CODES)}",
        )
    _numbers(frame, ["year", "month", *cols], path, key="borough")
    try:
        frame["date"] = pd.to_datetime(
            dict(year=frame["year"].astype(int), month=frame["month"].astype(int), day=1)
        )
    except (ValueError, OverflowError) as exc:
        raise InputError(f"{path}: fields 'year' and 'month' do not make dates ({exc})") from None
    twice = frame.duplicated(["borough", "date"])
    if twice.any():
        row = frame[twice].iloc[0]
        raise InputError(f"{path}: borough {row['borough']} has {row['date']:%Y-%m} more than once")
    return frame[["borough", "date", *cols]]


@cache
def tests_by_day(path: Path | None = None) -> pd.Series:
    """People tested citywide per day (molecular tests by specimen date), a float64 Series indexed by
    date, from the health department's ``tests.csv`` (``DATE`` as MM/DD/YYYY, ``TOTAL_TESTS``), shipped as
    ``tests-by-day.csv``; checked: columns, dates (each once), counts numbers >= 0."""
    path = data_dir() / "tests-by-day.csv" if path is None else Path(path)
    frame = _read_csv(path.name, ["DATE", "TOTAL_TESTS"], path=path)
    if frame.empty:
        raise InputError(f"{path}: no rows")
    date = pd.to_datetime(frame["DATE"], format="%m/%d/%Y", errors="coerce")
    if date.isna().any():
        raise InputError(
            f"{path}: field 'DATE' is not a date MM/DD/YYYY ({frame.loc[date.isna(), 'DATE'].iloc[0]!r})"
        )
    if date.duplicated().any():
        raise InputError(f"{path}: field 'DATE': {date[date.duplicated()].iloc[0]:%m/%d/%Y} twice")
    _numbers(frame, ["TOTAL_TESTS"], path, key="DATE")
    return pd.Series(
        pd.to_numeric(frame["TOTAL_TESTS"]).to_numpy(float), index=pd.DatetimeIndex(date)
    ).sort_index()


@cache
def cases_by_day(path: Path | None = None) -> pd.DataFrame:
    """Daily confirmed + probable cases per borough: date, borough (code), cases. Tidy (long) form.

    ``path``: a file in the health department's format (``cases-by-day.csv``: ``date_of_interest`` as
    MM/DD/YYYY and ``<BX|BK|MN|QN|SI>_CASE_COUNT``, ``..._PROBABLE_CASE_COUNT``) instead of the shipped
    one; checked: columns, dates (each once), counts numbers >= 0."""
    path = data_dir() / "cases-by-day.csv" if path is None else Path(path)
    cols = [f"{b}_CASE_COUNT" for b in BOROUGH_CODES] + [f"{b}_PROBABLE_CASE_COUNT" for b in BOROUGH_CODES]
    frame = _read_csv(path.name, ["date_of_interest", *cols], path=path)
    if frame.empty:
        raise InputError(f"{path}: no rows")
    date = pd.to_datetime(frame["date_of_interest"], format="%m/%d/%Y", errors="coerce")
    if date.isna().any():
        bad = frame.loc[date.isna(), "date_of_interest"].iloc[0]
        raise InputError(f"{path}: field 'date_of_interest' is not a date MM/DD/YYYY ({bad!r})")
    if date.duplicated().any():
        raise InputError(
            f"{path}: field 'date_of_interest': {date[date.duplicated()].iloc[0]:%m/%d/%Y} twice"
        )
    _numbers(frame, cols, path, key="date_of_interest")
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
