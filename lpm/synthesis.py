"""Synthetic populations built from real marginals (the recipes in ``populations/``).

The NYC recipe: borough × age band × sex cell sizes from the health department's group table (age and
sex are only published as separate borough marginals, so within a borough they are combined as
independent); each cell gets its exact share of ``agents`` (largest remainder); ZIP areas are dealt out
within each borough in proportion to their population; labor-force membership is drawn per agent with
an age profile scaled to each borough's labor force in the recipe's month. O(N) tensor work throughout.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lpm import nyc
from lpm.errors import InputError, validation_message
from lpm.paths import project_root
from lpm.population import Population, smallest_int_dtype
from lpm.progress import count_bar

#: Agents younger than this are children: they live with at least one adult.
ADULT_AGE = 18
#: Agents this old or older fill the share of people living alone aged 65+ (ACS's age cut).
SENIOR_AGE = 65


class LaborForceRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    year: int = Field(description="year of the labor-force month the population matches")
    month: int = Field(ge=1, le=12, description="month (1-12)")
    participation: dict[str, float] = Field(description="relative participation per age band, 0..1")

    @field_validator("participation")
    @classmethod
    def _rates(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"rates must be in [0, 1], got {bad}")
        return value


class Recipe(BaseModel):
    """A population recipe (``populations/<name>/recipe.yaml``)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    boroughs: dict[str, str]
    age_groups: dict[str, tuple[int, int]]
    sexes: list[str]
    labor_force: LaborForceRecipe
    school_ages: tuple[int, int] = Field(
        (5, 17), description="youngest and oldest age (years, inclusive) of the agents at school"
    )
    school_size: int = Field(25, ge=1, le=10_000, description="pupils per class cluster")
    workplace_size: int = Field(20, ge=1, le=100_000, description="labor-force members per workplace cluster")

    @field_validator("school_ages")
    @classmethod
    def _ages(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1] <= 120:
            raise ValueError(
                f"must be [youngest, oldest] with 0 <= youngest <= oldest <= 120, got {list(value)}"
            )
        return value

    @classmethod
    def load(cls, path: Path) -> Recipe:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"{path}: cannot read recipe ({exc})") from None
        try:
            recipe = cls.model_validate(raw)
        except ValidationError as exc:
            raise InputError(f"{path}: {validation_message(exc)}") from None
        missing = set(recipe.age_groups) - set(recipe.labor_force.participation)
        if missing:
            raise InputError(f"{path}: field 'labor_force.participation' lacks age band(s) {sorted(missing)}")
        return recipe


def recipe_path(name: str) -> Path:
    path = project_root() / "populations" / name / "recipe.yaml"
    if not path.is_file():
        known = sorted(p.parent.name for p in (project_root() / "populations").glob("*/recipe.yaml"))
        raise InputError(
            f"unknown population recipe {name!r} (no {path})", hint=f"known recipes: {', '.join(known)}"
        )
    return path


def allocate(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` exactly (largest remainder)."""
    weights = np.asarray(weights, dtype=np.float64)
    quota = weights / weights.sum() * total
    counts = np.floor(quota).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        counts[np.argsort(-(quota - counts), kind="stable")[:short]] += 1
    return counts


def cell_sizes(recipe: Recipe) -> np.ndarray:
    """Residents per (borough, age band, sex) cell, shape (B, A, S), in recipe order."""
    table = nyc.population_by_group()
    boroughs, ages, sexes = list(recipe.boroughs), list(recipe.age_groups), recipe.sexes
    by_age = table[table["group"] == "Age"].pivot(index="borough", columns="subgroup", values="population")
    by_sex = table[table["group"] == "Sex"].pivot(index="borough", columns="subgroup", values="population")
    by_sex.columns = [c.lower() for c in by_sex.columns]
    for needed, have, what in ((ages, by_age.columns, "age band"), (sexes, by_sex.columns, "sex")):
        missing = [x for x in needed if x not in have]
        if missing:
            raise InputError(
                f"{nyc.data_dir() / 'group-data-by-boro.csv'}: no {what} row(s) {missing} (column subgroup)"
            )
    age = by_age.loc[boroughs, ages].to_numpy()
    sex = by_sex.loc[boroughs, sexes].to_numpy()
    sex_share = sex / sex.sum(axis=1, keepdims=True)
    return age[:, :, None] * sex_share[:, None, :]


@dataclass(frozen=True)
class HouseholdMix:
    """A borough's household composition: ACS DP02 counts summed over its neighborhood areas."""

    mean_size: float  # people in households / households
    alone: float  # share of households of one person (householders living alone / households)
    alone_senior: float  # share of those aged 65+ (householders living alone 65 and over / living alone)
    with_children: float  # share of households that are families with own children under 18
    two_adults: float  # share of those headed by a married couple (married-couple families with children)


def household_mixes(boroughs: list[str]) -> list[HouseholdMix]:
    """The :class:`HouseholdMix` of each borough code in ``boroughs`` (nyc.households_by_area, which
    checks that every borough has households)."""
    table = nyc.households_by_area().groupby("borough")[list(nyc.HOUSEHOLD_COUNTS)].sum()
    mixes = []
    for code in boroughs:
        row = table.loc[code]
        households, with_children = row["households"], row["family_households_with_own_children_under_18"]
        alone = row["householders_living_alone"]
        mixes.append(
            HouseholdMix(
                mean_size=row["people_in_households"] / households,
                alone=alone / households,
                alone_senior=row["householders_living_alone_65_and_over"] / max(alone, 1),
                with_children=with_children / households,
                two_adults=row["married_couple_families_with_own_children_under_18"] / max(with_children, 1),
            )
        )
    return mixes


def area_households(age: torch.Tensor, mix: HouseholdMix, gen: torch.Generator) -> torch.Tensor:
    """The household of each agent of one ZIP area: (n,) int64 ids 0..h-1 for ``age`` (n,) in years.

    Ids ``0..a-1`` are people living alone, then ``f`` families with children, then ``o`` other
    households; every id has at least one member. With ``h = round(n / mix.mean_size)`` households:

    * ``f = round(h × with_children)`` families (at least one if the area has children): one adult
      each, a second adult in ``round(f × two_adults)`` of them, one child (< 18) each and the other
      children dealt uniformly at random among the families (so 1 + a binomial number of children);
    * ``a = round(h × alone)`` people living alone, the first ``round(a × alone_senior)`` aged 65+;
    * ``o = h - f - a`` other households of two adults each, the remaining adults dealt uniformly at
      random among them: 2 + a binomial (about Poisson) number with mean (remaining adults) / o - 2.

    Parents and people living alone under 65 are drawn from the adults aged 18-64 first, and only then
    from the seniors left; all draws are random within their age group. Every agent gets a household
    and the area's mean size is ``n / h``, the borough's mean up to rounding. Where the area's agents do
    not allow the types exactly, fewer households of a type are made, in the order families, living
    alone, second parents, others (never fewer than one family if there are children and an adult), and
    a last odd adult lives alone; an area of children only (a borough with fewer adults than ZIP areas)
    is one household.

    What it approximates: households hold people of one ZIP area; children live only with one or two
    parents, so the adults who in reality live in families besides the parents (grown children,
    grandparents) land in the other households, which are therefore larger than the ACS's; the other
    households mix family and non-family households; the composition is the borough's in every ZIP area.
    """
    n, device = age.shape[0], age.device
    order = torch.randperm(n, generator=gen, device=device)
    child, senior = age[order] < ADULT_AGE, age[order] >= SENIOR_AGE
    children, seniors, younger = order[child], order[senior], order[~child & ~senior]
    n_children = children.shape[0]
    n_adults = n - n_children
    out = torch.zeros(n, dtype=torch.int64, device=device)
    if n_adults == 0:
        return out
    h = max(1, round(n / mix.mean_size))
    families = min(max(round(h * mix.with_children), int(n_children > 0)), n_children, n_adults)
    left = n_adults - families
    alone = min(round(h * mix.alone), left)
    left -= alone
    second = min(round(families * mix.two_adults), left)
    left -= second
    other = min(max(h - families - alone, 1), left // 2)
    if other == 0:  # at most one adult left: it lives alone
        alone, left = alone + left, 0
    old = min(round(alone * mix.alone_senior), seniors.shape[0])
    # adults in the order they fill places: seniors living alone, then 18-64, then the other seniors
    queue = torch.cat([seniors[:old], younger, seniors[old:]])
    fam = alone + torch.arange(families, device=device)
    out[queue[:old]] = torch.arange(old, device=device)
    out[queue[old : old + families]] = fam
    out[queue[old + families : old + families + second]] = fam[:second]
    start = old + families + second
    out[queue[start : start + alone - old]] = torch.arange(old, alone, device=device)
    rest = queue[start + alone - old :]  # empty if other == 0, as the children are if families == 0
    rest = rest[torch.randperm(rest.shape[0], generator=gen, device=device)]
    first_other = alone + families
    out[rest[: 2 * other]] = first_other + torch.arange(2 * other, device=device) // 2
    out[rest[2 * other :]] = first_other + torch.randint(
        max(other, 1), (rest.shape[0] - 2 * other,), generator=gen, device=device
    )
    out[children[:families]] = fam
    out[children[families:]] = alone + torch.randint(
        max(families, 1), (n_children - families,), generator=gen, device=device
    )
    return out


def deal_places(counts: torch.Tensor, adult: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Agents in the order of ``n`` places dealt ``counts`` (Z,) at a time: (n,) int64 indices into
    ``adult`` (n,) bool; the first ``counts[0]`` are place 0's. Random, except that each place with
    agents gets an adult where the adults suffice (so no ZIP area is left with children only)."""
    n, device = adult.shape[0], adult.device
    first = torch.cumsum(counts, 0) - counts
    used = torch.nonzero(counts > 0).squeeze(1)
    adults = torch.nonzero(adult).squeeze(1)
    adults = adults[torch.randperm(adults.shape[0], generator=gen, device=device)]
    g = min(used.shape[0], adults.shape[0])
    slots = first[used[torch.randperm(used.shape[0], generator=gen, device=device)[:g]]]
    out = torch.empty(n, dtype=torch.int64, device=device)
    out[slots] = adults[:g]
    free_slot = torch.ones(n, dtype=torch.bool, device=device)
    free_slot[slots] = False
    free_agent = torch.ones(n, dtype=torch.bool, device=device)
    free_agent[adults[:g]] = False
    rest = torch.nonzero(free_agent).squeeze(1)
    out[free_slot] = rest[torch.randperm(rest.shape[0], generator=gen, device=device)]
    return out


def deal_clusters(member: torch.Tensor, size: int, first: int, gen: torch.Generator) -> torch.Tensor:
    """Cluster ids ``first + 1, first + 2, …`` dealt at random to the agents where ``member`` (n,) bool
    holds, ``size`` agents each (the last cluster may be smaller); 0 for the others. (n,) int32."""
    idx = torch.nonzero(member).squeeze(1)
    idx = idx[torch.randperm(idx.shape[0], generator=gen, device=member.device)]
    out = torch.zeros(member.shape[0], dtype=torch.int32, device=member.device)
    out[idx] = (first + 1 + torch.arange(idx.shape[0], device=member.device) // size).to(torch.int32)
    return out


#: Most agents a population may hold: agent indices are int32.
MAX_AGENTS = 2**31 - 1
#: Bytes per agent a COVID run holds at full city (population, state, index tensors, buffers; README's
#: benchmark: 18 + 75), for the memory check before a population is built.
BYTES_PER_AGENT = 100
#: Seeds are torch generator seeds (int64).
MAX_SEED = 2**63 - 1


def check_agents(n: int, device: str | torch.device = "cpu") -> None:
    """Refuse an agent count outside 1..MAX_AGENTS or one the memory of ``device`` cannot hold (at
    ``BYTES_PER_AGENT``; the host's for the CPU, the GPU's own for a GPU), giving the range."""
    device = torch.device(device)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    most = min(MAX_AGENTS, memory // BYTES_PER_AGENT)
    where = f"the GPU {device}" if device.type == "cuda" else "this machine"
    if not 1 <= n <= most:
        why = (
            f"at about {BYTES_PER_AGENT} bytes per agent a run needs {n * BYTES_PER_AGENT / 2**30:,.0f} GiB "
            f"and {where} has {memory / 2**30:,.0f} GiB"
            if n > most and most < MAX_AGENTS
            else "agent indices are 32-bit"
        )
        raise InputError(f"agents: {n:,} is out of range; {where} runs 1 to {most:,} agents ({why})")


def check_seed(seed: int) -> None:
    """Refuse a seed that torch's generator cannot take (0..2**63-1)."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"seed: {seed} is out of range; seeds are 0 to {MAX_SEED} (2**63 - 1)")


#: Columns of cluster ids (0 = none for school and workplace); a chunked population offsets them per chunk.
ID_COLUMNS = ("household", "school", "workplace")


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk ``chunk`` of a population built in chunks from ``seed`` (0..2**63-1)."""
    words = np.random.SeedSequence([int(seed), int(chunk)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & MAX_SEED


def synthesize(
    name: str = "nyc",
    *,
    agents: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    chunk_agents: int | None = None,
    progress: bool = False,
) -> Population:
    """See :meth:`Population.synthesize`."""
    recipe = Recipe.load(recipe_path(name))
    cells = cell_sizes(recipe)
    city = float(cells.sum())
    n = round(city) if agents is None else int(agents)
    device = torch.device(device)
    check_seed(seed)
    chunk = round(city) if chunk_agents is None else int(chunk_agents)
    if chunk < 1:
        raise InputError(f"chunk_agents: {chunk_agents} is out of range; a chunk holds at least 1 agent")
    check_agents(n, device)
    if n <= chunk:
        columns, made = _synthesize_part(
            recipe, cells, n, torch.Generator(device).manual_seed(int(seed)), device
        )
        chunks = 1
    else:
        columns, made, chunks = _synthesize_chunks(recipe, cells, n, int(seed), chunk, device, progress)
    return Population(
        columns,
        {
            "borough": list(recipe.boroughs.values()),
            "zip": nyc.zip_areas()["zip"].tolist(),
            "age_group": list(recipe.age_groups),
            "sex": recipe.sexes,
        },
        meta={
            "recipe": name,
            "agents": n,
            "seed": int(seed),
            "city_population": round(city),
            "scale": n / city,
            "households": made["household"],
            "schools": made["school"],
            "workplaces": made["workplace"],
            **({"chunks": chunks} if chunks > 1 else {}),
        },
    )


def _synthesize_chunks(
    recipe: Recipe, cells: np.ndarray, n: int, seed: int, chunk: int, device: torch.device, show: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """``n`` agents as ``ceil(n / chunk)`` populations of (nearly) equal size, each built alone with the
    generator seed :func:`chunk_seed` ``(seed, k)`` on ``device`` and copied into columns preallocated
    there, its household, school and workplace ids shifted past the chunks before it. So no more than one
    chunk's temporaries are held at a time (about 70 bytes per agent of a chunk), and the columns never
    pass through host memory when ``device`` is a GPU. Each chunk keeps the recipe's shares, so the
    whole keeps them up to one agent per cell and chunk; households, schools and workplaces never span two
    chunks, and agents stay laid out household by household. ``show``: a progress bar on stderr."""
    parts = allocate(np.ones(-(-n // chunk)), n).tolist()
    columns: dict[str, torch.Tensor] = {}
    made = dict.fromkeys(ID_COLUMNS, 0)
    start = 0
    bar = count_bar() if show else contextlib.nullcontext()
    with bar:
        task = bar.add_task(f"synthesize {n:,} agents", total=len(parts), unit="chunks") if show else None
        for k, size in enumerate(parts):
            _synthesize_chunk(recipe, cells, seed, k, size, start, device, columns, made, n)
            start += size
            if show:
                bar.update(task, advance=1)
    for key in ID_COLUMNS:
        highest = made[key] - 1 if key == "household" else made[key]
        columns[key] = columns[key].to(smallest_int_dtype(0, highest))
    return columns, made, len(parts)


def _synthesize_chunk(
    recipe: Recipe,
    cells: np.ndarray,
    seed: int,
    k: int,
    size: int,
    start: int,
    device: torch.device,
    columns: dict[str, torch.Tensor],
    made: dict[str, int],
    n: int,
) -> None:
    """Chunk ``k`` (``size`` agents from agent ``start``) into ``columns`` (allocated for ``n`` agents at
    the first chunk), its ids shifted past ``made`` (updated)."""
    gen = torch.Generator(device).manual_seed(chunk_seed(seed, k))
    part, part_made = _synthesize_part(recipe, cells, size, gen, device)
    if not columns:
        columns.update(
            (key, torch.empty(n, dtype=torch.int32 if key in ID_COLUMNS else col.dtype, device=device))
            for key, col in part.items()
        )
    for key, col in part.items():
        target = columns[key][start : start + size]
        if key == "household":
            torch.add(col.to(torch.int32), made[key], out=target)
        elif key in ID_COLUMNS:  # 0 stays "none"
            target.copy_(torch.where(col > 0, col.to(torch.int32) + made[key], 0))
        else:
            target.copy_(col)
    for key in ID_COLUMNS:
        made[key] += part_made[key]


def _synthesize_part(
    recipe: Recipe, cells: np.ndarray, n: int, gen: torch.Generator, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One population of ``n`` agents drawn with ``gen`` on ``device``: its columns and the number of
    households, schools and workplaces it made."""
    boroughs, ages = list(recipe.boroughs), list(recipe.age_groups)
    B, A, S = cells.shape

    # 1. borough × age × sex: exact shares, agents laid out cell by cell.
    counts = torch.from_numpy(allocate(cells.ravel(), n)).to(device)
    cell_of_agent = torch.repeat_interleave(torch.arange(B * A * S, dtype=torch.int32, device=device), counts)
    borough = (cell_of_agent // (A * S)).to(torch.uint8)
    age_group = ((cell_of_agent // S) % A).to(torch.uint8)
    sex = (cell_of_agent % S).to(torch.uint8)
    del cell_of_agent

    # 2. single-year age, uniform within the band.
    bounds = torch.tensor(list(recipe.age_groups.values()), dtype=torch.int16, device=device)
    low, width = bounds[:, 0], bounds[:, 1] - bounds[:, 0] + 1
    u = torch.rand(n, generator=gen, device=device)
    age = (low[age_group.long()] + (u * width[age_group.long()]).to(torch.int16)).to(torch.uint8)

    # 3. ZIP area within borough: exact shares per borough, dealt out in random order (each ZIP area
    #    with agents gets an adult first); by_zip lists the agents ZIP area by ZIP area.
    zips = nyc.zip_areas()
    zip_code = torch.empty(n, dtype=smallest_int_dtype(0, len(zips) - 1), device=device)
    per_borough = counts.view(B, A * S).sum(1).tolist()
    first_agent = np.cumsum(per_borough) - per_borough  # boroughs are contiguous
    by_zip = torch.empty(n, dtype=torch.int64, device=device)
    zip_sizes = []  # (ZIP row, agents) in by_zip order
    for b, code in enumerate(boroughs):  # loop over 5 boroughs, not over agents
        rows = np.flatnonzero(zips["borough"].to_numpy() == code)
        start, size = int(first_agent[b]), int(per_borough[b])
        if size == 0:
            continue
        if len(rows) == 0:
            raise InputError(
                f"{nyc.data_dir() / 'data-by-modzcta.csv'}: no ZIP area in borough {code} (column BOROUGH_GROUP)"
            )
        k = allocate(zips["population"].to_numpy()[rows], size)
        k_t = torch.from_numpy(k).to(device)
        agents = start + deal_places(k_t, age[start : start + size] >= ADULT_AGE, gen)
        zip_code[agents] = torch.repeat_interleave(torch.from_numpy(rows).to(device, zip_code.dtype), k_t)
        by_zip[start : start + size] = agents
        zip_sizes += [(b, int(c)) for c in k if c > 0]

    # 4. labor force: age profile scaled to each borough's labor force in the recipe month.
    lf = nyc.labor_force()
    month = lf[
        (lf["date"].dt.year == recipe.labor_force.year) & (lf["date"].dt.month == recipe.labor_force.month)
    ]
    target = month.set_index("borough")["labor_force"].reindex(boroughs)
    if target.isna().any():
        raise InputError(
            f"{nyc.data_dir() / 'labor-force-by-borough.csv'}: no labor_force for "
            f"{recipe.labor_force.year}-{recipe.labor_force.month:02d} in borough(s) {list(target[target.isna()].index)}"
        )
    profile = np.array([recipe.labor_force.participation[a] for a in ages])
    residents = cells.sum(axis=2)  # (B, A)
    scale = target.to_numpy() / (residents * profile[None, :]).sum(axis=1)
    rate = np.clip(profile[None, :] * scale[:, None], 0.0, 1.0)
    rate_t = torch.from_numpy(rate.astype(np.float32)).ravel().to(device)
    labor = torch.rand(n, generator=gen, device=device) < rate_t[borough.long() * A + age_group.long()]

    # 5. households, ZIP area by ZIP area; perm lists the agents household by household.
    mixes = household_mixes(boroughs)
    perm = torch.empty(n, dtype=torch.int64, device=device)
    household_sizes = []
    start = 0
    for b, size in zip_sizes:  # loop over ZIP areas, not over agents
        agents = by_zip[start : start + size]
        local = area_households(age[agents], mixes[b], gen)
        perm[start : start + size] = agents[torch.sort(local, stable=True).indices]
        household_sizes.append(torch.bincount(local))
        start += size
    del by_zip
    sizes = torch.cat(household_sizes)
    H = sizes.shape[0]
    household = torch.repeat_interleave(
        torch.arange(H, dtype=smallest_int_dtype(0, H - 1), device=device), sizes
    )

    # 6. schools and workplaces: clusters dealt at random within each borough.
    low_age, high_age = recipe.school_ages
    members = {
        "school": ((age >= low_age) & (age <= high_age), recipe.school_size),
        "workplace": (labor, recipe.workplace_size),
    }
    clusters = {key: torch.zeros(n, dtype=torch.int32, device=device) for key in members}
    made = {"household": H, **dict.fromkeys(members, 0)}
    for b in range(B):  # loop over 5 boroughs
        part = slice(int(first_agent[b]), int(first_agent[b] + per_borough[b]))
        for key, (member, size) in members.items():
            clusters[key][part] = deal_clusters(member[part], size, made[key], gen)
            made[key] += -(-int(member[part].sum()) // size)
    del members

    # 7. one permutation lays every column out household by household.
    columns = {"borough": borough, "zip": zip_code, "age_group": age_group, "age": age, "sex": sex}
    columns["labor_force"] = labor
    columns = {name: col[perm] for name, col in columns.items()}
    columns["household"] = household
    for key, ids in clusters.items():
        columns[key] = ids[perm].to(smallest_int_dtype(0, made[key]))
    return columns, made
