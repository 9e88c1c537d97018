import math

import pytest
import torch
import yaml

from lpm.archetype import ArchetypeSpec, RoundRule
from lpm.errors import InputError
from lpm.paths import project_root


def _write_spec(tmp_path, **changes):
    raw = yaml.safe_load((project_root() / "archetypes" / "covid_isolation.yaml").read_text())
    raw.update(changes)
    for key, value in list(raw.items()):
        if value is None:
            del raw[key]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", ["covid_isolation", "labor_work"])
def test_shipped_specs_load(name):
    spec = ArchetypeSpec.load(name)
    assert spec.prompt.is_file()
    assert spec.attribute_names == ["age_group", "sex", "borough"]
    assert len(spec.actions) == 2


def test_grouping_equals_pandas_groupby(small_pop):
    spec = ArchetypeSpec.load("covid_isolation")
    g = spec.group(small_pop)
    frame = small_pop.to_pandas()
    gb = frame.groupby(spec.attribute_names, observed=True)
    assert g.k == gb.ngroups == 100
    assert torch.equal(g.ids.long(), torch.tensor(gb.ngroup().to_numpy()))
    assert g.counts.tolist() == gb.size().tolist()
    expected = gb.size().reset_index()
    for col in spec.attribute_names:
        assert g.table[col].tolist() == expected[col].astype(str).tolist()
    assert g.ids.dtype == torch.int8  # smallest signed dtype holding -1..K-1


def test_members_filter_marks_others_minus_one(small_pop):
    spec = ArchetypeSpec.load("labor_work")
    g = spec.group(small_pop)
    lf = small_pop["labor_force"]
    assert bool((g.ids[~lf] == -1).all()) and bool((g.ids[lf] >= 0).all())
    assert int(g.counts.sum()) == int(lf.sum())
    frame = small_pop.to_pandas()[lambda f: f["labor_force"]]
    assert g.k == frame.groupby(spec.attribute_names, observed=True).ngroups
    assert "0-4" not in set(g.table["age_group"])  # empty combinations are never listed


def test_numeric_attribute_with_bins(tmp_path, small_pop):
    path = _write_spec(
        tmp_path,
        attributes=[
            {"name": "age", "bins": [0, 18, 65, 200], "labels": ["child", "adult", "senior"]},
            "borough",
        ],
    )
    spec = ArchetypeSpec.load(path)
    g = spec.group(small_pop)
    age = small_pop["age"].long()
    band = torch.bucketize(age, torch.tensor([18, 65]), right=True)
    combined = band * 5 + small_pop["borough"].long()
    _, inverse = torch.unique(combined, return_inverse=True)
    assert torch.equal(g.ids.long(), inverse)
    assert set(g.table["age"]) == {"child", "adult", "senior"}


def test_bins_not_covering_values(tmp_path, small_pop):
    path = _write_spec(tmp_path, attributes=[{"name": "age", "bins": [18, 65]}])
    with pytest.raises(InputError, match=r"spec\.yaml.*attributes\[0\]\.bins.*outside"):
        ArchetypeSpec.load(path).group(small_pop)


def test_unknown_attribute_names_file_and_field(tmp_path, small_pop):
    path = _write_spec(tmp_path, attributes=["age_group", "income"])
    spec = ArchetypeSpec.load(path)
    with pytest.raises(InputError, match=r"spec\.yaml: field 'attributes\[1\]'.*no attribute 'income'"):
        spec.group(small_pop)


def test_numeric_without_bins_and_categorical_with_bins(tmp_path, small_pop):
    with pytest.raises(InputError, match="numeric; give it bins"):
        ArchetypeSpec.load(_write_spec(tmp_path, attributes=["age"])).check(small_pop)
    with pytest.raises(InputError, match="categorical; drop its bins"):
        ArchetypeSpec.load(_write_spec(tmp_path, attributes=[{"name": "sex", "bins": [0, 1, 2]}])).check(
            small_pop
        )


def test_missing_prompt_file(tmp_path):
    path = _write_spec(tmp_path, prompt="nowhere.yaml")
    with pytest.raises(InputError, match=r"spec\.yaml: field 'prompt'.*nowhere\.yaml does not exist"):
        ArchetypeSpec.load(path)


def test_unknown_key(tmp_path):
    path = _write_spec(tmp_path, colour="blue")
    with pytest.raises(InputError, match=r"spec\.yaml: field 'colour': unknown key"):
        ArchetypeSpec.load(path)


def test_wrong_type(tmp_path):
    path = _write_spec(tmp_path, actions="isolate")
    with pytest.raises(InputError, match=r"spec\.yaml: field 'actions'.*valid list.*'isolate'"):
        ArchetypeSpec.load(path)
    path = _write_spec(tmp_path, cadence="hourly")
    with pytest.raises(InputError, match=r"field 'cadence'"):
        ArchetypeSpec.load(path)


def test_bad_members(tmp_path, small_pop):
    spec = ArchetypeSpec.load(_write_spec(tmp_path, members={"borough": "Atlantis"}))
    with pytest.raises(InputError, match=r"members\.borough.*Atlantis"):
        spec.group(small_pop)


def test_not_yaml_and_unknown_name(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed")
    with pytest.raises(InputError, match=r"broken\.yaml: not valid YAML"):
        ArchetypeSpec.load(path)
    with pytest.raises(InputError, match="no such archetype spec"):
        ArchetypeSpec.load("no_such_spec")


def test_round_rules():
    assert RoundRule(significant=2).apply(2345.6) == 2300
    assert RoundRule(significant=2).apply(-0.0456) == -0.046
    assert RoundRule(decimals=1).apply(4.26) == 4.3
    assert RoundRule(decimals=0).apply(10.2) == 10
    with pytest.raises(ValueError, match="exactly one"):
        RoundRule(significant=2, decimals=1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # "nan" used to make an archetype labelled "nan-119"
        (
            {"attributes": [{"name": "age", "bins": [0, "nan", 120]}]},
            r"field 'attributes\.0\.bins': bin edge 1 is not a number \(nan\).*\.inf",
        ),
        (
            {"attributes": [{"name": "age", "bins": [0, "abc", 120]}]},
            r"field 'attributes\.0\.bins\.1': .*valid number.*'abc'",
        ),
        # context `sex` used to replace the archetype's sex in the prompt
        (
            {"context": {"sex": {"description": "the sex everyone is told"}}},
            r"field 'context': context variable 'sex' has the name of attribute 'sex'",
        ),
        # " isolate" used to be accepted and never match an answer
        (
            {"actions": [" isolate", "go out"]},
            r"field 'actions': action ' isolate' begins or ends with a space.*'isolate'",
        ),
        (
            {"context": {"week": {"description": "week", "probe": ["early", "late"]}}},
            r"field 'context\.week': probe values \['early', 'late'\] are text.*round: null",
        ),
    ],
)
def test_bad_spec_values_name_the_field_and_value(tmp_path, changes, message):
    path = _write_spec(tmp_path, **changes)
    with pytest.raises(InputError, match=rf"spec\.yaml: {message}"):
        ArchetypeSpec.load(path)


def test_open_ended_bins_are_allowed(tmp_path, small_pop):
    spec = ArchetypeSpec.load(
        _write_spec(tmp_path, attributes=[{"name": "age", "bins": [-math.inf, 18, math.inf]}])
    )
    assert spec.group(small_pop).k == 2
    assert spec.attributes[0].labels == ["under 18", "18+"]


def test_text_context_values_only_where_nothing_is_rounded():
    spec = ArchetypeSpec.load("labor_work")
    assert spec.context["month"].render("April 2020") == "April 2020"
    assert spec.context["cases"].render(12345) == 12000
    for value in ("lots", True):
        with pytest.raises(ValueError, match=rf"{value!r} is not a number, but .*round: null"):
            spec.context["cases"].render(value)
