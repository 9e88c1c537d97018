"""Synthetic populations built from real marginals (the recipes in ``populations/``).

The NYC recipe: borough × age band × sex cell sizes from the health department's group table (age and
sex are only published as separate borough marginals, so within a borough they are combined as
independent); each cell gets its exact share of ``agents`` (largest remainder); ZIP areas are dealt out
within each borough in proportion to their population; labor-force membership is drawn per agent with
an age profile scaled to each borough's labor force in the recipe's month. O(N) tensor work throughout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lpm import nyc
from lpm.errors import InputError, validation_message
from lpm.paths import project_root
from lpm.population import Population, smallest_int_dtype


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


def synthesize(name: str = "nyc", *, agents: int | None = None, seed: int = 0) -> Population:
    """See :meth:`Population.synthesize`."""
    recipe = Recipe.load(recipe_path(name))
    cells = cell_sizes(recipe)
    city = float(cells.sum())
    n = round(city) if agents is None else int(agents)
    if n <= 0:
        raise InputError(f"agents must be positive, got {agents}")
    boroughs, ages = list(recipe.boroughs), list(recipe.age_groups)
    B, A, S = cells.shape
    gen = torch.Generator().manual_seed(int(seed))

    # 1. borough × age × sex: exact shares, agents laid out cell by cell.
    counts = torch.from_numpy(allocate(cells.ravel(), n))
    cell_of_agent = torch.repeat_interleave(torch.arange(B * A * S, dtype=torch.int32), counts)
    borough = (cell_of_agent // (A * S)).to(torch.uint8)
    age_group = ((cell_of_agent // S) % A).to(torch.uint8)
    sex = (cell_of_agent % S).to(torch.uint8)
    del cell_of_agent

    # 2. single-year age, uniform within the band.
    bounds = torch.tensor(list(recipe.age_groups.values()), dtype=torch.int16)
    low, width = bounds[:, 0], bounds[:, 1] - bounds[:, 0] + 1
    u = torch.rand(n, generator=gen)
    age = (low[age_group.long()] + (u * width[age_group.long()]).to(torch.int16)).to(torch.uint8)

    # 3. ZIP area within borough: exact shares per borough, dealt out in random order.
    zips = nyc.zip_areas()
    zip_labels = zips["zip"].tolist()
    zip_code = torch.empty(n, dtype=smallest_int_dtype(0, len(zip_labels) - 1))
    per_borough = counts.view(B, A * S).sum(1)
    start = 0
    for b, code in enumerate(boroughs):  # loop over 5 boroughs, not over agents
        rows = np.flatnonzero(zips["borough"].to_numpy() == code)
        size = int(per_borough[b])
        if size == 0:
            continue
        if len(rows) == 0:
            raise InputError(
                f"{nyc.data_dir() / 'data-by-modzcta.csv'}: no ZIP area in borough {code} (column BOROUGH_GROUP)"
            )
        k = torch.from_numpy(allocate(zips["population"].to_numpy()[rows], size))
        deal = torch.repeat_interleave(torch.from_numpy(rows).to(zip_code.dtype), k)
        zip_code[start : start + size] = deal[torch.randperm(size, generator=gen)]
        start += size

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
    rate_t = torch.from_numpy(rate.astype(np.float32)).ravel()
    labor = torch.rand(n, generator=gen) < rate_t[borough.long() * A + age_group.long()]

    return Population(
        {
            "borough": borough,
            "zip": zip_code,
            "age_group": age_group,
            "age": age,
            "sex": sex,
            "labor_force": labor,
        },
        {
            "borough": list(recipe.boroughs.values()),
            "zip": zip_labels,
            "age_group": ages,
            "sex": recipe.sexes,
        },
        meta={
            "recipe": name,
            "agents": n,
            "seed": int(seed),
            "city_population": round(city),
            "scale": n / city,
        },
    )
