import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lpm import nyc
from lpm.errors import InputError
from lpm.population import PARQUET_KEY, Population, smallest_int_dtype
from lpm.synthesis import Recipe, allocate, cell_sizes, chunk_seed, household_mixes, recipe_path, synthesize


def _real_cells() -> pd.DataFrame:
    recipe = Recipe.load(recipe_path("nyc"))
    cells = cell_sizes(recipe)
    idx = pd.MultiIndex.from_product(
        [list(recipe.boroughs.values()), list(recipe.age_groups), recipe.sexes],
        names=["borough", "age_group", "sex"],
    )
    return pd.Series(cells.ravel(), index=idx, name="population")


def test_population_size_from_rates_matches_the_zip_table():
    # population = count / rate per 100k × 100,000; the ZIP table's denominators sum to the same city
    cells = _real_cells()
    assert cells.sum() == pytest.approx(nyc.zip_areas()["population"].sum(), rel=0.01)
    assert cells.sum() == pytest.approx(8.33e6, rel=0.01)
    # the README's worked example: Brooklyn, age 0-4 ≈ 182,900
    assert cells.sort_index().loc[("Brooklyn", "0-4")].sum() == pytest.approx(
        48_646 / 26_593.27 * 100_000, rel=1e-9
    )


def test_full_city_marginals_match_real_shares(city):
    real = _real_cells()
    frame = city.to_pandas()
    n = len(city)
    assert n == round(real.sum()) == nyc.city_population() == 8_336_817
    for by in (["borough", "age_group"], ["borough", "sex"]):
        want = real.groupby(level=by).sum() / real.sum()
        got = frame.groupby(by, observed=True).size() / n
        # largest-remainder allocation: each cell is within one agent of its exact share
        np.testing.assert_allclose(got.reindex(want.index).to_numpy(), want.to_numpy(), atol=1.5 / n * 2)


def test_zip_shares_within_borough(city):
    zips = nyc.zip_areas()
    frame = city.to_pandas()
    got = frame.groupby("zip", observed=True).size()
    for code, name in nyc.BOROUGH_NAMES.items():
        rows = zips[zips["borough"] == code]
        in_b = frame["borough"] == name
        share_real = rows.set_index("zip")["population"] / rows["population"].sum()
        share_got = got.reindex(share_real.index, fill_value=0) / in_b.sum()
        np.testing.assert_allclose(share_got.to_numpy(), share_real.to_numpy(), atol=2.0 / in_b.sum())
        # every agent's ZIP lies in its own borough
        assert set(frame.loc[in_b, "zip"].astype(str)) <= set(rows["zip"])


def test_labor_force_matches_january_2020(city):
    lf = nyc.labor_force()
    target = lf[lf["date"] == "2020-01-01"].set_index("borough")["labor_force"]
    frame = city.to_pandas()
    got = frame.groupby("borough", observed=True)["labor_force"].sum()
    for code, name in nyc.BOROUGH_NAMES.items():
        expected = target[code]
        # Bernoulli draws: a few standard deviations (sqrt(n p (1-p)) < sqrt(n)/2)
        assert abs(got[name] - expected) < 5 * np.sqrt(expected), (name, got[name], expected)
    young = frame["age_group"].isin(["0-4", "5-12"])
    assert not frame.loc[young, "labor_force"].any()


def test_smaller_population_keeps_shares_and_size():
    pop = Population.synthesize("nyc", agents=50_000, seed=3)
    assert len(pop) == 50_000
    real = _real_cells()
    got = pop.to_pandas().groupby("borough", observed=True).size() / 50_000
    want = real.groupby(level="borough").sum() / real.sum()
    np.testing.assert_allclose(got.reindex(want.index), want, atol=1e-4)


def test_smallest_dtypes_and_ages_within_bands(small_pop):
    for col in ("borough", "zip", "age_group", "age", "sex"):
        assert small_pop[col].dtype == torch.uint8, col
    assert small_pop["labor_force"].dtype == torch.bool
    # 20,000 agents: about 7,600 households and 500 workplaces need 16 bits, about 110 classes 8
    assert small_pop["household"].dtype == small_pop["workplace"].dtype == torch.int16
    assert small_pop["school"].dtype == torch.uint8
    assert small_pop.nbytes / len(small_pop) == 6 + 2 + 1 + 2
    frame = small_pop.to_pandas()
    lo = frame["age_group"].astype(str).str.extract(r"^(\d+)")[0].astype(int)
    assert (frame["age"] >= lo).all()


def test_same_seed_same_population_other_seed_differs():
    a = Population.synthesize("nyc", agents=30_000, seed=11)
    b = Population.synthesize("nyc", agents=30_000, seed=11)
    c = Population.synthesize("nyc", agents=30_000, seed=12)
    for col in a.columns:
        assert torch.equal(a[col], b[col]), col
    assert not torch.equal(a["age"], c["age"])  # (ZIP codes are laid out ZIP area by ZIP area)


def test_parquet_round_trip_is_exact(tmp_path, small_pop):
    path = small_pop.save(tmp_path / "pop.parquet")
    back = Population.load(path)
    assert back.columns == small_pop.columns
    for col in small_pop.columns:
        assert back[col].dtype == small_pop[col].dtype
        assert torch.equal(back[col], small_pop[col])
        if small_pop.is_categorical(col):
            assert back.labels(col) == small_pop.labels(col)
    assert back.meta == small_pop.meta
    pd.testing.assert_frame_equal(back.to_pandas(), small_pop.to_pandas())


def test_parquet_opens_in_pandas_with_labels_and_loads_as_codes(tmp_path, small_pop):
    """Categorical columns are dictionary-encoded: pandas shows labels (every label kept, in order),
    Population.load gives the uint8 codes back."""
    path = small_pop.save(tmp_path / "p.parquet")
    frame = pd.read_parquet(path)
    for name in ("borough", "zip", "age_group", "sex"):
        assert list(frame[name].cat.categories) == small_pop.labels(name), name
        assert (frame[name].cat.codes.to_numpy() == small_pop[name].numpy()).all(), name
    assert frame["borough"].iloc[0] == "Bronx" and frame["age"].dtype == np.uint8
    again = Population.load(path)
    assert again["zip"].dtype == torch.uint8 and torch.equal(again["zip"], small_pop["zip"])


def test_foreign_parquet_is_refused(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    with pytest.raises(InputError, match=r"foreign\.parquet.*not an lpm population.*lpm\.population"):
        Population.load(path)


def test_corrupt_parquet_is_refused(tmp_path, small_pop):
    path = small_pop.save(tmp_path / "pop.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"pop\.parquet"):
        Population.load(path)
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(InputError, match=r"text\.parquet.*not a readable Parquet"):
        Population.load(tmp_path / "text.parquet")


def test_codes_outside_labels_are_refused(tmp_path):
    header = {
        "format_version": 1,
        "labels": {"sex": ["female", "male"]},
        "dtypes": {"sex": "uint8"},
        "meta": {},
    }
    table = pa.table({"sex": np.array([0, 1, 5], dtype=np.uint8)})
    table = table.replace_schema_metadata({PARQUET_KEY: json.dumps(header).encode()})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet.*'sex'.*outside"):
        Population.load(tmp_path / "bad.parquet")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="nothere.parquet"):
        Population.load(tmp_path / "nothere.parquet")


def test_allocate_is_exact_and_proportional():
    counts = allocate(np.array([1.0, 2.0, 3.0, 0.0]), 1000)
    assert counts.sum() == 1000 and counts[3] == 0
    assert abs(counts[2] / counts[0] - 3) < 0.01


def test_unknown_recipe_and_bad_size():
    with pytest.raises(InputError, match="unknown population recipe 'mars'"):
        Population.synthesize("mars")
    with pytest.raises(InputError, match=r"agents: 0 is out of range; this machine runs 1 to [\d,]+ agents"):
        Population.synthesize("nyc", agents=0)
    with pytest.raises(InputError, match=r"seed: -1 is out of range; seeds are 0 to"):
        Population.synthesize("nyc", agents=10, seed=-1)


def test_population_api(small_pop):
    assert len(small_pop) == 20_000
    assert small_pop.labels("borough") == ["Bronx", "Brooklyn", "Manhattan", "Queens", "Staten Island"]
    with pytest.raises(KeyError, match="no column 'income'"):
        small_pop["income"]
    with pytest.raises(KeyError, match="not categorical"):
        small_pop.labels("age")
    counts = small_pop.counts("sex")
    assert counts["agents"].sum() == 20_000


# -- households, schools, workplaces -----------------------------------------------------------------


def _per_household(pop: Population, values: torch.Tensor, reduce: str) -> torch.Tensor:
    h = pop["household"].long()
    out = torch.zeros(int(h.max()) + 1, dtype=values.dtype)
    return out.scatter_reduce(0, h, values, reduce, include_self=False)


def test_households_hold_the_sizes_and_composition_drawn(city):
    """Per borough, the households' mean size and share of people living alone are the ACS's (DP02, summed
    over the borough's areas); every household has an adult and lies in one ZIP area; ids are dense and
    the columns are laid out household by household."""
    h = city["household"].long()
    sizes = torch.bincount(h)
    assert city.meta["households"] == sizes.shape[0] and bool((sizes > 0).all())
    assert bool((h[1:] >= h[:-1]).all())  # household by household
    assert city["household"].dtype == torch.int32  # 3.2 M households
    age, z = city["age"].long(), city["zip"].long()
    assert bool((_per_household(city, (age >= 18).long(), "sum") >= 1).all())
    assert torch.equal(_per_household(city, z, "amin"), _per_household(city, z, "amax"))
    borough = _per_household(city, city["borough"].long(), "amax")
    acs = nyc.households_by_area().groupby("borough")[list(nyc.HOUSEHOLD_COUNTS)].sum()
    codes = {label: code for code, label in Recipe.load(recipe_path("nyc")).boroughs.items()}
    for b, label in enumerate(city.labels("borough")):
        row, mine = acs.loc[codes[label]], sizes[borough == b].double()
        assert float(mine.mean()) == pytest.approx(row["people_in_households"] / row["households"], rel=0.01)
        alone = row["householders_living_alone"] / row["households"]
        assert float((mine == 1).double().mean()) == pytest.approx(alone, rel=0.02), label
    # children live with one or two parents and the other households are larger: sizes 1 .. about 12
    assert int(sizes.max()) < 20


def test_schools_and_workplaces_are_clusters_within_a_borough(small_pop):
    recipe = Recipe.load(recipe_path("nyc"))
    age, school, work = small_pop["age"], small_pop["school"].long(), small_pop["workplace"].long()
    low, high = recipe.school_ages
    assert torch.equal(school > 0, (age >= low) & (age <= high))
    assert torch.equal(work > 0, small_pop["labor_force"])
    for ids, size, key in (
        (school, recipe.school_size, "schools"),
        (work, recipe.workplace_size, "workplaces"),
    ):
        members = torch.bincount(ids[ids > 0])[1:]
        assert small_pop.meta[key] == members.shape[0] and bool((members > 0).all())
        assert int(members.max()) == size
        assert float(members.double().mean()) > 0.95 * size  # only each borough's last cluster is smaller
        b = small_pop["borough"].long()[ids > 0]
        slots = torch.zeros(members.shape[0] + 1, dtype=torch.long)
        first = slots.scatter_reduce(0, ids[ids > 0], b, "amin", include_self=False)
        last = slots.scatter_reduce(0, ids[ids > 0], b, "amax", include_self=False)
        assert torch.equal(first, last) and int(last.max()) == 4


def _set(row: int, field: str, value):
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame[field] = frame[field].astype(object)
        frame.loc[row, field] = value
        return frame

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.drop(columns="households"), r"missing column\(s\) households"),
        (_set(3, "householders_living_alone", -5), "field householders_living_alone is negative"),
        (_set(0, "people_in_households", "many"), "field people_in_households is not a number"),
        (_set(2, "householders", 1), "field householders differs from field households"),
        (_set(1, "area", "XX0101"), "field area starts with no borough code"),
        (
            _set(4, "householders_living_alone_65_and_over", 10**6),
            "field householders_living_alone_65_and_over exceeds field householders_living_alone",
        ),
        # half of Staten Island's neighborhoods missing: the sizes no longer add up to its population
        (
            lambda f: f.drop(index=f.index[f["area"].str.startswith("SI")][::2]),
            r"field people_in_households sums to [\d,]+ in borough SI, \d+% of its population",
        ),
    ],
)
def test_bad_household_file_is_refused_naming_the_file_and_field(tmp_path, edit, message):
    frame = pd.read_csv(nyc.data_dir() / "households-by-area.csv", dtype={"area": str})
    path = tmp_path / "households-by-area.csv"
    edit(frame).to_csv(path, index=False)
    with pytest.raises(InputError, match=f"{path}: {message}"):
        nyc.households_by_area(path)


# -- bad values in a population file ---------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return Population.synthesize("nyc", agents=500, seed=0).save(
        tmp_path_factory.mktemp("good") / "pop.parquet"
    )


def _rewritten(good: Path, out: Path, name: str, values: pa.Array, **header_changes) -> Path:
    """``good`` with column ``name`` replaced by ``values``, the lpm schema metadata kept (and changed)."""
    table = pq.read_table(good)
    header = json.loads(table.schema.metadata[PARQUET_KEY])
    for key, change in header_changes.items():
        header[key].update(change)
    table = table.set_column(table.column_names.index(name), name, values)
    pq.write_table(table.replace_schema_metadata({PARQUET_KEY: json.dumps(header).encode()}), out)
    return out


def _with(values: np.ndarray, rows: dict[int, object]) -> list:
    out = values.tolist()
    for row, value in rows.items():
        out[row] = value
    return out


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        # a negative age used to read back as 251, a null one as 0
        (
            "age",
            lambda v: pa.array(_with(v, {3: -3, 9: 300})),
            r"2 of 500 rows are outside 0\.\.255: -3 \(row 3\), 300 \(row 9\)",
        ),
        (
            "age",
            lambda v: pa.array(_with(v, {4: None, 7: None}), pa.uint8()),
            r"2 of 500 rows are missing \(null\): at rows 4, 7",
        ),
        (
            "age",
            lambda v: pa.array([str(x) for x in _with(v, {5: "abc"})]),
            r"1 of 500 rows are text, not numbers: 'abc' \(row 5\)",
        ),
        (
            "age",
            lambda v: pa.array(_with(v.astype(float), {2: 20.5, 8: float("nan")})),
            r"2 of 500 rows are not whole numbers: 20\.5 \(row 2\), nan \(row 8\)",
        ),
        (
            "labor_force",
            lambda v: pa.array(_with(v.astype(np.int64), {1: 2})),
            r"1 of 500 rows are not flags .*: 2 \(row 1\)",
        ),
        (
            "labor_force",
            lambda v: pa.array(["yes"] * len(v)),
            r"500 of 500 rows are text, not flags .*'yes' \(row 0\)",
        ),
        (
            "household",
            lambda v: pa.array(_with(v.astype(np.int64), {0: -1})),
            r"1 of 500 rows are outside 0\.\.255: -1 \(row 0\)",
        ),
        (
            "sex",
            lambda v: pa.array(_with(np.array(["female"] * len(v)), {6: "other"})),
            r"1 of 500 rows are not among its labels: 'other' \(row 6\)",
        ),
        (
            "sex",
            lambda v: pa.array(_with(v.astype(np.int64), {6: None}), pa.uint8()),
            r"1 of 500 rows are missing \(null\): at rows 6",
        ),
    ],
)
def test_bad_values_in_a_population_file_are_refused(tmp_path, good_file, name, make, message):
    values = Population.load(good_file)[name].numpy()  # codes of a categorical column
    path = _rewritten(good_file, tmp_path / "bad.parquet", name, make(values))
    with pytest.raises(InputError, match=rf"bad\.parquet: column '{name}'.*{message}") as err:
        Population.load(path)
    assert err.value.hint


def test_values_that_fit_load_whatever_their_parquet_type(tmp_path, good_file):
    """Whole floats in an integer column, 0/1 in a flag column, labels written as text: read as they mean."""
    good = Population.load(good_file)
    for name, values in [
        ("age", pa.array(good["age"].numpy().astype(float))),
        ("labor_force", pa.array(good["labor_force"].numpy().astype(np.int64))),
        ("sex", pa.array([good.labels("sex")[c] for c in good["sex"].tolist()])),
    ]:
        back = Population.load(_rewritten(good_file, tmp_path / f"{name}.parquet", name, values))
        assert back[name].dtype == good[name].dtype and torch.equal(back[name], good[name]), name


def test_a_dtype_too_small_for_the_values_is_refused(tmp_path, good_file):
    ages = pa.array(np.arange(500) * 1000)
    path = _rewritten(good_file, tmp_path / "f16.parquet", "age", ages, dtypes={"age": "float16"})
    with pytest.raises(
        InputError, match=r"f16\.parquet: column 'age' \(dtype float16\): \d+ of 500 rows are outside"
    ):
        Population.load(path)


def test_duplicate_labels_are_refused(tmp_path, good_file):
    stored = pq.read_table(good_file).column("borough")
    labels = ["Bronx", "Bronx", "Manhattan", "Queens", "Staten Island"]
    path = _rewritten(good_file, tmp_path / "dup.parquet", "borough", stored, labels={"borough": labels})
    with pytest.raises(
        InputError, match=r"dup\.parquet: field 'labels\.borough': .*column 'borough' repeat 'Bronx'"
    ):
        Population.load(path)
    with pytest.raises(InputError, match=r"labels of column 'sex' repeat 'male'"):
        Population({"sex": torch.tensor([0, 1], dtype=torch.uint8)}, {"sex": ["male", "male"]})


def test_constructor_names_codes_outside_the_labels():
    codes = torch.tensor([0, 1, 2, 1, 7], dtype=torch.uint8)
    with pytest.raises(
        InputError,
        match=r"column 'sex': 2 of 5 rows hold codes outside 0\.\.1 \(2 labels\): 2 \(row 2\), 7 \(row 4\)",
    ):
        Population({"sex": codes}, {"sex": ["female", "male"]})


def test_twice_the_city_keeps_shares_household_structure_and_cluster_sizes(city):
    """16.7 M agents (2.003 × the real city) against the full city, same seed: the borough × age band ×
    sex shares agree to the rounding of the largest-remainder allocation; per borough the mean household
    size is the ACS's up to the rounding of each ZIP area's household count, and the distribution of
    household sizes agrees within sampling noise; classes and workplaces keep their size and their number
    scales with N; ``meta["scale"]`` is N / city; ids stay in the smallest dtype that fits and the other
    columns keep their dtypes (18 bytes per agent). Beyond the city's size the population is built in
    chunks of at most the city's size (here 3), each keeping the shares up to its own rounding and its own
    partial last classes and workplaces per borough."""
    n = 16_700_000
    big = Population.synthesize("nyc", agents=n, seed=city.meta["seed"])
    c = city.meta["city_population"]
    chunks = big.meta["chunks"]
    assert chunks == 3 and "chunks" not in city.meta  # 16.7 M is 2.003 cities: 3 chunks of 5.57 M
    assert len(big) == big.meta["agents"] == n and big.meta["city_population"] == c == len(city)
    # scale is N over the unrounded sum of the real cells, which city_population rounds to the nearest agent
    assert big.meta["scale"] == pytest.approx(n / c, rel=0.5 / c)
    r = big.meta["scale"]
    recipe = Recipe.load(recipe_path("nyc"))

    # shares: every cell is within one agent per chunk of its exact share at either size (largest
    # remainder), so a share summing k of the 5 × 10 × 2 cells differs by less than chunks × k / N + k / city
    # between the sizes
    def cell_shares(pop: Population) -> np.ndarray:
        cell = (pop["borough"].long() * 10 + pop["age_group"].long()) * 2 + pop["sex"].long()
        return (torch.bincount(cell, minlength=100).double() / len(pop)).numpy().reshape(5, 10, 2)

    got, want = cell_shares(big), cell_shares(city)
    for axes in ((), (1, 2), (0, 2), (0, 1)):  # cells, borough, age band, sex
        k = int(np.prod([got.shape[a] for a in axes]))
        np.testing.assert_allclose(
            got.sum(axis=axes), want.sum(axis=axes), rtol=0, atol=chunks * k / n + k / c
        )

    # households: ids dense and laid out household by household at 16.7 M too
    mixes = household_mixes(list(recipe.boroughs))
    dist = {}
    for pop in (city, big):
        h = pop["household"].long()
        assert bool((h[1:] >= h[:-1]).all())
        sizes = torch.bincount(h)
        assert pop.meta["households"] == sizes.shape[0] and bool((sizes > 0).all())
        borough = _per_household(pop, pop["borough"].long(), "amax")
        area = _per_household(pop, pop["zip"].long(), "amax")
        for b, mix in enumerate(mixes):
            mine = sizes[borough == b]
            # each of the borough's z ZIP areas makes round(agents / mean_size) households, so the borough
            # has within z / 2 households of agents / mean_size: its mean size is within
            # mean_size × z / (2 × households) of the ACS's (measured: at most 21 % of that bound)
            z = torch.unique(area[borough == b]).numel()
            bound = mix.mean_size * z / (2 * mine.shape[0])
            assert abs(float(mine.double().mean()) - mix.mean_size) <= bound, (pop.meta["agents"], b)
        dist[pop.meta["agents"]] = torch.bincount(sizes.clamp(max=9), minlength=10)[1:].double()
    # share of households of size 1..8 and 9+: people living alone are a fixed share of each area's
    # households; the sizes of families (1 + binomial children) and of other households (2 + binomial
    # adults) are random, so each share differs by about sigma = sqrt(p (1 - p) (1 / H + 1 / H')) between
    # the sizes (H ≈ 3.2 M and 6.4 M households, sigma ≈ 3e-4 at p = 0.23; measured on seeds 1, 2, 3
    # and 7: at most 2.4 sigma). 9+ lumps a tail of a few thousand households.
    h_city, h_big = dist[c].sum(), dist[n].sum()
    p_city, p_big = dist[c] / h_city, dist[n] / h_big
    pooled = (dist[c] + dist[n]) / (h_city + h_big)
    sigma = torch.sqrt(pooled * (1 - pooled) * (1 / h_city + 1 / h_big))
    assert bool(((p_big - p_city).abs() <= 5 * sigma).all()), (p_city, p_big, sigma)

    # schools and workplaces: per borough and chunk ceil(members / size) clusters, all full but the last
    low, high = recipe.school_ages
    counted = {}
    for pop in (city, big):
        parts = pop.meta.get("chunks", 1)
        chunk = torch.repeat_interleave(
            torch.arange(parts), torch.from_numpy(allocate(np.ones(parts), len(pop)))
        )
        borough = pop["borough"].long() + 5 * chunk
        for key, ids, member, size in (
            ("schools", pop["school"], (pop["age"] >= low) & (pop["age"] <= high), recipe.school_size),
            ("workplaces", pop["workplace"], pop["labor_force"], recipe.workplace_size),
        ):
            assert torch.equal(ids > 0, member)
            members = torch.bincount(ids[member].long())[1:]
            per_borough = torch.bincount(borough[member], minlength=5 * parts)
            assert pop.meta[key] == members.shape[0] == int(((per_borough + size - 1) // size).sum())
            assert int(members.max()) == size and int((members < size).sum()) <= 5 * parts, key
            assert ids.dtype == smallest_int_dtype(0, pop.meta[key]) == torch.int32, key
            counted[pop.meta["agents"], key] = (pop.meta[key], int(member.sum()))
    # clusters(N) - r × clusters(city) lies within 5 × (chunks + r) (the partial last clusters) of
    # (members(N) - r × members(city)) / size; pupils are whole age bands (20 cells: under 20 agents from
    # their share at each size), labor-force members Bernoulli draws (5 sigma, variance at most N / 4 +
    # r² × city / 4): about 12 classes and 900 workplaces of 94,600 and 429,000 (measured: 1.3 and 76)
    spread = {
        "schools": 20 * (1 + r) / recipe.school_size,
        "workplaces": 5 * np.sqrt((n + r * r * c) / 4) / recipe.workplace_size,
    }
    for key, slack in spread.items():
        assert abs(counted[n, key][0] - r * counted[c, key][0]) <= 5 * (chunks + r) + slack, (key, counted)

    # dtypes: household ids in the smallest dtype for 6.4 M households (int32), the other columns as at city
    # size, so the bytes per agent are unchanged
    assert big["household"].dtype == smallest_int_dtype(0, big.meta["households"] - 1) == torch.int32
    assert big.columns == city.columns
    for col in city.columns:
        assert big[col].dtype == city[col].dtype, col
    assert big.nbytes / n == city.nbytes / c == 6 + 4 * 3


def test_a_population_in_chunks_is_its_chunks_laid_end_to_end(capsys):
    """``chunk_agents`` builds a population as chunks of (nearly) equal size, chunk k drawn alone with the
    seed ``chunk_seed(seed, k)``: each slice is that chunk's own population, its household, school and
    workplace ids shifted past the chunks before it (0 stays "no school" / "no workplace"); households stay
    contiguous; ids in the smallest dtype of the whole; a population no larger than a chunk is the plain
    one; a progress bar reports the chunks."""
    n, seed = 50_000, 4
    whole = synthesize("nyc", agents=n, seed=seed, chunk_agents=20_000, progress=True)
    assert "synthesize 50,000 agents" in capsys.readouterr().err
    sizes = allocate(np.ones(3), n).tolist()
    assert whole.meta["chunks"] == 3 and sizes == [16_667, 16_667, 16_666]
    start, shift = 0, dict.fromkeys(("household", "school", "workplace"), 0)
    for k, size in enumerate(sizes):
        part = synthesize("nyc", agents=size, seed=chunk_seed(seed, k))
        for col in part.columns:
            got, own = whole[col][start : start + size].long(), part[col].long()
            if col in shift:
                own = torch.where(own > 0, own + shift[col], 0) if col != "household" else own + shift[col]
            assert torch.equal(got, own), (k, col)
        shift["household"] += part.meta["households"]
        shift["school"] += part.meta["schools"]
        shift["workplace"] += part.meta["workplaces"]
        start += size
    assert (whole.meta["households"], whole.meta["schools"], whole.meta["workplaces"]) == tuple(
        shift.values()
    )
    h = whole["household"].long()
    assert (
        bool((h[1:] - h[:-1] <= 1).all() and (h[1:] >= h[:-1]).all()) and int(h[-1]) == shift["household"] - 1
    )
    assert whole["household"].dtype == smallest_int_dtype(0, shift["household"] - 1) == torch.int16
    assert whole["workplace"].dtype == smallest_int_dtype(0, shift["workplace"])
    again = synthesize("nyc", agents=n, seed=seed, chunk_agents=20_000)
    assert all(torch.equal(whole[c], again[c]) for c in whole.columns)
    plain, one_chunk = (
        synthesize("nyc", agents=n, seed=seed),
        synthesize("nyc", agents=n, seed=seed, chunk_agents=n),
    )
    assert "chunks" not in one_chunk.meta and all(torch.equal(plain[c], one_chunk[c]) for c in plain.columns)
    with pytest.raises(InputError, match=r"chunk_agents: 0 is out of range"):
        synthesize("nyc", agents=n, chunk_agents=0)
