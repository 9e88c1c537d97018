"""Prompt templates: loading, validation errors that name the file and variable, literal rendering."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lpm.archetype import ArchetypeSpec
from lpm.backend import Backend
from lpm.decision import Decider
from lpm.errors import InputError
from lpm.prompt import PromptTemplate

ROW = {"age_group": "20-29", "sex": "female", "borough": "Bronx"}
CONTEXT = {"week": 10.4, "cases": 2345, "cases_change": -12.3456}


def spec_with_prompt(tmp_path, text: str) -> ArchetypeSpec:
    spec = ArchetypeSpec.load("covid_isolation")
    path = tmp_path / "prompt.yaml"
    path.write_text(text)
    return spec.model_copy(update={"prompt": path})


@pytest.mark.parametrize("name", ["covid_isolation", "labor_work"])
def test_shipped_prompts_load(name):
    spec = ArchetypeSpec.load(name)
    prompt = PromptTemplate.load(spec)
    assert prompt.variables <= set(spec.attribute_names) | set(spec.context)
    assert set(spec.attribute_names) <= prompt.variables


def test_render_rounds_context_and_uses_labels():
    prompt = PromptTemplate.load(ArchetypeSpec.load("covid_isolation"))
    messages = prompt.render(ROW, CONTEXT)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "week 10 since" in user and "2300 cases" in user and "-12%" in user
    assert "You are female, aged 20-29, living in Bronx." in user
    assert "{" not in user


def test_values_with_braces_and_quotes_render_literally():
    prompt = PromptTemplate.load(ArchetypeSpec.load("covid_isolation"))
    row = {"age_group": "{week} {0} {{x}}", "sex": "she said \"hi\" 'ok'", "borough": "}{"}
    user = prompt.render(row, CONTEXT)[1]["content"]
    assert "aged {week} {0} {{x}}, living in }{." in user
    assert "You are she said \"hi\" 'ok'," in user


def test_literal_braces_in_template(tmp_path):
    spec = spec_with_prompt(tmp_path, "system: 'Answer as {{\"action\": ...}}'\nuser: 'You are {sex}.'\n")
    messages = PromptTemplate.load(spec).render(ROW, {})
    assert messages[0]["content"] == 'Answer as {"action": ...}'
    assert messages[1]["content"] == "You are female."


def test_unknown_variable_names_file_and_variable(tmp_path):
    spec = spec_with_prompt(tmp_path, "system: hi\nuser: 'You are {sex} with {income}.'\n")
    with pytest.raises(InputError) as info:
        PromptTemplate.load(spec)
    assert str(tmp_path / "prompt.yaml") in str(info.value)
    assert "{income}" in str(info.value)
    assert "age_group" in info.value.hint and "cases" in info.value.hint


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("system: hi\n", "field 'user' is missing"),
        ("user: hi\n", "field 'system' is missing"),
        ("system: hi\nuser: there\nassistant: x\n", "field 'assistant': unknown key"),
        ("system: hi\nuser: [1, 2]\n", "field 'user' must be non-empty text"),
        ("system: [unclosed\n", "not valid YAML"),
        ("- a list\n", "must be a YAML mapping"),
        ("system: hi\nuser: 'a {sex'\n", "field 'user'"),
        ("system: hi\nuser: 'a {sex.upper}'\n", "not a plain name"),
        ("system: hi\nuser: 'a {cases:,}'\n", "not a plain name"),
    ],
)
def test_bad_prompt_files_name_the_field(tmp_path, text, needle):
    spec = spec_with_prompt(tmp_path, text)
    with pytest.raises(InputError) as info:
        PromptTemplate.load(spec)
    assert str(tmp_path / "prompt.yaml") in str(info.value)
    assert needle in str(info.value)


def test_missing_context_value_is_named():
    prompt = PromptTemplate.load(ArchetypeSpec.load("covid_isolation"))
    with pytest.raises(InputError, match="context variable 'cases_change' has no value"):
        prompt.render(ROW, {"week": 1, "cases": 10})


def test_bad_context_value_is_named():
    prompt = PromptTemplate.load(ArchetypeSpec.load("covid_isolation"))
    with pytest.raises(InputError, match="'cases'"):
        prompt.render(ROW, {**CONTEXT, "cases": float("nan")})


def test_missing_attribute_is_named():
    prompt = PromptTemplate.load(ArchetypeSpec.load("covid_isolation"))
    with pytest.raises(InputError, match="attribute 'borough'"):
        prompt.render({"age_group": "20-29", "sex": "female"}, CONTEXT)


# -- context values: declared names only, numbers where the variable rounds ---------------------------


def test_an_undeclared_context_name_is_named_with_the_declared_ones():
    spec = ArchetypeSpec.load("covid_isolation")
    with pytest.raises(InputError) as info:
        spec.check_context({**CONTEXT, "casess": 10}, given="--context")
    message = str(info.value)
    assert message.startswith("--context casess=10: ") and "covid_isolation.yaml" in message
    assert "no context variable 'casess' (did you mean 'cases'?)" in message
    assert info.value.hint == "its context variables: week, cases, cases_change"


def test_text_where_the_variable_rounds_numbers_is_refused():
    spec = ArchetypeSpec.load("covid_isolation")
    with pytest.raises(InputError) as info:
        PromptTemplate.load(spec).render(ROW, {**CONTEXT, "cases": "lots"})
    message = str(info.value)
    assert message.startswith("context cases=lots: context variable 'cases' of ")
    assert "'lots' is not a number, but the variable rounds numbers (round: {'significant': 2})" in message
    assert "round: null" in message and "reported COVID-19 cases" in info.value.hint
    with pytest.raises(InputError, match=r"cases=\[1, 2\]: .*\[1, 2\] is not a number"):
        spec.check_context({"cases": [1, 2]})
    # text stays allowed where nothing is rounded
    labor = ArchetypeSpec.load("labor_work")
    assert labor.check_context({"month": "April 2020", "cases": 12345}) == {
        "month": "April 2020",
        "cases": 12000,
    }


def test_the_decider_refuses_bad_context_before_asking():
    class Counting(Backend):
        model = "counting"
        calls = 0

        async def choose(self, messages, actions, decoding=None):
            Counting.calls += 1
            raise AssertionError("no request should be sent")

    spec = ArchetypeSpec.load("covid_isolation")
    decider = Decider(Counting(), progress=False)
    for context, needle in (({**CONTEXT, "casess": 10}, "casess"), ({**CONTEXT, "cases": "lots"}, "'lots'")):
        with pytest.raises(InputError, match=needle):
            decider.decide(spec, [ROW], context)
    assert Counting.calls == 0


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lpm", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


def test_cli_refuses_bad_context_before_a_server_starts(tmp_path):
    """No server is reachable at the URL: the errors come before anything is asked."""
    url = ["--llm-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--cache", "off"]
    decide = ["decide", "covid_isolation", "-p", str(tmp_path / "none.parquet"), *url]
    good = ["--context", "week=10", "--context", "cases_change=5"]
    for extra, needle in [
        (["--context", "casess=10"], "--context casess=10: "),
        (["--context", "cases=lots"], "--context cases=lots: context variable 'cases' of "),
        ([], "--context: the prompt of "),
    ]:
        res = _cli(tmp_path, *decide, *good, *extra)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = _cli(tmp_path, "probe", "covid_isolation", "--vary", "cases=10,lots", *url)
    assert res.returncode == 2 and "--vary cases=lots: context variable 'cases'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "probe-covid_isolation").exists()
