"""``lpm probe`` and the run's decision spread: sweeps, batching, the verdict, files, report section."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd
import pytest
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.backend import Answer, Backend, OpenAIBackend
from lpm.cache import ResponseCache
from lpm.cli import main
from lpm.cli.probe import parse_vary
from lpm.decision import Decider
from lpm.errors import InputError
from lpm.probe import NEAR_CONSTANT, attribute_labels, decision_spread, plan, plot, probe
from lpm.prompt import PromptTemplate
from lpm.report import spread_section

SMALL = {"week": [4, 8], "cases": [100, 3000, 30000], "cases_change": [0]}


@pytest.fixture(scope="module")
def spec() -> ArchetypeSpec:
    return ArchetypeSpec.load("covid_isolation")


@pytest.fixture(scope="module")
def labels(spec, small_pop) -> dict[str, list[str]]:
    return attribute_labels(spec, small_pop)


class Fixed(Backend):
    """Answers every prompt with the same distribution: a model whose answers ignore the situation."""

    model = "fixed"

    async def choose(self, messages: list[dict[str, str]], actions: Sequence[str], decoding=None) -> Answer:
        return Answer([0.9, 0.1], "logprobs", "isolate")


def fake_decider(server: FakeServer, cache: ResponseCache | None = None) -> Decider:
    """Reads the first token: one request per distinct prompt, answers that differ by prompt."""
    backend = OpenAIBackend(server.url, server.model, backoff=0.01)
    return Decider(backend, cache, progress=False, scoring="first-token")


def test_plan_base_is_the_middle_of_each_sweep(spec, labels):
    base, sweeps = plan(spec, labels)
    assert [s.name for s in sweeps] == ["week", "cases", "cases_change", "age_group", "sex", "borough"]
    assert [s.kind for s in sweeps] == ["context"] * 3 + ["attribute"] * 3
    assert sweeps[1].values == [10, 100, 1000, 3000, 10000, 30000, 60000]  # the spec's probe values, as ints
    assert sweeps[3].values == labels["age_group"] and len(labels["age_group"]) == 10
    assert base == {
        "week": 8,
        "cases": 3000,
        "cases_change": 0,
        "age_group": "25-34",
        "sex": "female",
        "borough": "Manhattan",
    }
    base, sweeps = plan(spec, labels, base={"cases": 100, "sex": "male"}, vary={"cases": [5, 50.5, 5]})
    assert base["cases"] == 100 and base["sex"] == "male" and sweeps[1].values == [5, 50.5]


def test_labels_are_those_of_members(small_pop):
    labor = ArchetypeSpec.load("labor_work")
    ages = attribute_labels(labor, small_pop)["age_group"]
    assert "0-4" not in ages and "25-34" in ages  # no labor-force member is a toddler


def test_probe_sweeps_and_batches_one_request_per_distinct_prompt(spec, small_pop, tmp_path):
    template = PromptTemplate.load(spec)
    with FakeServer() as server:
        decider = fake_decider(server, ResponseCache(tmp_path))
        calls = []
        decide = decider.decide
        decider.decide = lambda s, rows, ctx, **kw: calls.append(len(rows)) or decide(s, rows, ctx, **kw)
        result = probe(spec, decider, population=small_pop, vary=SMALL)
        sent = server.requests
        again = probe(spec, fake_decider(server, ResponseCache(tmp_path)), population=small_pop, vary=SMALL)
        assert server.requests == sent  # the second probe is answered by the cache
    table = result.table
    assert list(table.columns) == ["variable", "kind", "value", "action", "probability", "mode", "cached"]
    sizes = table.groupby("variable", sort=False).size().to_dict()
    assert sizes == {"week": 4, "cases": 6, "cases_change": 2, "age_group": 20, "sex": 4, "borough": 10}
    sums = table.groupby(["variable", "value"])["probability"].sum()
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-6)
    # each situation's prompt, rendered here: one request per distinct prompt, one decide call per context
    prompts, contexts = set(), set()
    for s in result.sweeps:
        for value in s.values:
            point = {**result.base, s.name: value}
            ctx = {c: point[c] for c in spec.context}
            prompts.add(json.dumps(template.render(point, ctx)))
            contexts.add(tuple(ctx.values()))
    assert sent == result.requests == len(prompts) == 1 + 9 + 1 + 4 + 1 + 2  # base, other labels, contexts
    assert len(calls) == len(contexts) == 4 and sorted(calls) == [1, 1, 1, 15]
    week8 = table[(table["variable"] == "week") & (table["value"] == 8) & (table["action"] == "isolate")]
    ctx = {**{c: result.base[c] for c in spec.context}, "week": 8}
    want = FakeServer.expected(template.render(result.base, ctx), spec.actions)[0]
    assert week8["probability"].item() == pytest.approx(want, abs=1e-6)
    assert result.informative and "vary by up to" in result.verdict()
    assert again.cached == result.requests  # one answer per distinct prompt, each from the cache
    assert again.requests == 0 and again.table["cached"].all()


def test_near_constant_answers_get_that_verdict(spec, small_pop, tmp_path):
    result = probe(spec, Decider(Fixed(), None, progress=False), population=small_pop, vary=SMALL)
    assert not result.informative and result.largest[0] == pytest.approx(0.0, abs=1e-6)
    assert result.verdict().startswith("answers vary by at most 0.000 across all probed situations")
    assert "near-constant" in result.verdict()
    summary = result.summary()
    assert summary["informative"] is False and summary["threshold"] == NEAR_CONSTANT
    assert summary["variables"]["cases"]["range"] == {"isolate": 0.0, "go out": 0.0}
    assert plot(result, tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("items", "needle"),
    [
        (["cases"], "expected NAME=v1,v2"),
        (["=1,2"], "expected NAME=v1,v2"),
        (["cases="], "expected NAME=v1,v2"),
        (["cases=1", "cases=2"], "given twice"),
        (["cases=1,inf"], "must be finite"),
    ],
)
def test_bad_vary_options(items, needle):
    with pytest.raises(InputError, match=needle):
        parse_vary(items)


def test_vary_parses_numbers_and_text():
    assert parse_vary(["cases=10, 1e3", "month=April 2020,May 2020"]) == {
        "cases": [10, 1000.0],
        "month": ["April 2020", "May 2020"],
    }


def test_bad_names_and_values_name_the_spec(spec, labels, tmp_path):
    with pytest.raises(InputError, match="vary names 'nope', which is neither"):
        plan(spec, labels, vary={"nope": [1]})
    with pytest.raises(InputError, match="base names 'nope'"):
        plan(spec, labels, base={"nope": 1})
    with pytest.raises(InputError, match="'Mars' is not a label of attribute 'borough'"):
        plan(spec, labels, vary={"borough": ["Mars"]})
    with pytest.raises(InputError, match="not a label"):
        plan(spec, labels, base={"sex": "other"})
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nprompt: covid_isolation.yaml\nattributes: [age_group, sex, borough]\n"
        "actions: [isolate, go out]\ncontext:\n  week: {description: weeks}\n"
        "  cases: {description: cases, probe: [1, 10]}\n  cases_change: {description: percent}\n"
    )
    mine = ArchetypeSpec.load(path)
    with pytest.raises(InputError, match=r"mine\.yaml: field 'context.week.probe'") as err:
        plan(mine, labels)
    assert "--vary week=" in err.value.hint
    base, _ = plan(mine, labels, vary={"week": [1, 2, 3], "cases_change": [5]})
    assert base["week"] == 2
    path.write_text(path.read_text().replace("probe: [1, 10]", "probe: [1, .inf]"))
    with pytest.raises(InputError, match="context.cases.probe.*finite"):
        ArchetypeSpec.load(path)


def test_cli_writes_three_files_and_refuses_a_full_folder(tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", "covid_isolation", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    args += ["--vary", "week=4,8", "--vary", "cases=100,30000", "--vary", "cases_change=0"]
    args += ["--vary", "age_group=25-34,75+", "--base", "borough=Bronx"]
    with FakeServer() as server:
        code = main([*args, "--llm-url", server.url])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "verdict: answers vary by" in printed.out and "25-34 (base)" in printed.out
        assert sorted(p.name for p in out.iterdir()) == ["probe.csv", "probe.json", "probe.png"]
        table = pd.read_csv(out / "probe.csv")
        assert len(table) == 2 * (2 + 2 + 1 + 2 + 2 + 5)
        summary = json.loads((out / "probe.json").read_text())
        assert summary["base"]["borough"] == "Bronx" and summary["model"] == server.model
        # the default, whole-action scoring: a tokenization per action and two completions per prompt
        assert 4 * summary["requests"] == server.requests and "informative" in summary
        sent = server.requests
        code = main([*args, "--llm-url", server.url])  # the folder is not empty now
        err = capsys.readouterr().err
        assert code == 2 and "exists and is not empty" in err and "Traceback" not in err
        code = main(
            [*args[:-2], "--vary", "borough=Mars", "--out", str(tmp_path / "x"), "--llm-url", server.url]
        )
        err = capsys.readouterr().err
        assert code == 2 and "'Mars' is not a label" in err
        assert server.requests == sent and not (tmp_path / "x").exists()


def _decisions(spread: bool) -> pd.DataFrame:
    """A hand-made run's decisions: 3 archetypes, 2 steps, P(isolate) differing by archetype and step or not."""
    rows = []
    for step in (0, 7):
        for k in range(3):
            p = 0.2 + 0.3 * k + (0.1 if step else 0.0) if spread else 0.94
            for action, q in (("isolate", p), ("go out", 1 - p)):
                rows.append(
                    {
                        "step": step,
                        "date": pd.Timestamp("2020-03-01") + pd.Timedelta(days=step),
                        "decision": "covid_isolation",
                        "archetype": k,
                        "age_group": ["0-4", "5-12", "13-17"][k],
                        "action": action,
                        "probability": q,
                        "mode": "logprobs",
                        "cached": False,
                    }
                )
    frame = pd.DataFrame(rows)
    frame["decision"] = pd.Categorical(frame["decision"])
    frame["action"] = pd.Categorical(frame["action"], categories=["isolate", "go out"])
    return frame


def test_decision_spread_and_report_section():
    varied = decision_spread(_decisions(spread=True))
    d = varied["decisions"]["covid_isolation"]
    assert d["archetypes"] == 3 and d["decision_steps"] == 2 and not d["near_constant"]
    assert d["actions"]["isolate"] == {
        "across_archetypes": pytest.approx(0.6),
        "across_steps": pytest.approx(0.1),
    }
    assert list(d["actions"]) == ["isolate", "go out"] and d["largest"] == pytest.approx(0.6)
    lines = "\n".join(spread_section(varied, "llm"))
    assert (
        "## How much the decisions vary" in lines
        and "| covid_isolation | isolate | 3 | 2 | 0.600 | 0.100 |" in lines
    )
    assert "Warning" not in lines

    flat = decision_spread(_decisions(spread=False))
    assert flat["decisions"]["covid_isolation"]["near_constant"]
    assert flat["decisions"]["covid_isolation"]["actions"]["go out"] == {
        "across_archetypes": pytest.approx(0.0),
        "across_steps": pytest.approx(0.0),
    }
    llm = "\n".join(spread_section(flat, "llm", {"covid_isolation": "covid_isolation"}))
    assert "The model's answers are near-constant" in llm and "model's reading of the situation" in llm
    assert "`lpm probe covid_isolation`" in llm
    heuristic = "\n".join(spread_section(flat, "heuristic"))
    assert "The decisions are near-constant" in heuristic and "model" not in heuristic
    one_step = decision_spread(_decisions(spread=True).query("step == 0"))
    assert one_step["decisions"]["covid_isolation"]["actions"]["isolate"]["across_steps"] is None
    assert decision_spread(_decisions(spread=True).iloc[:0]) == {"threshold": NEAR_CONSTANT, "decisions": {}}


def test_run_summary_and_report_carry_the_spread(tmp_path):
    from lpm.run import RunConfig, run

    out = run(RunConfig.build(scenario="covid", agents=5_000, weeks=2), tmp_path / "r", progress=False)
    spread = json.loads((out.folder / "summary.json").read_text())["decision_spread"]
    assert spread["decisions"]["isolation"]["archetypes"] == 100
    assert spread["decisions"]["isolation"]["decision_steps"] == 2
    report = (out.folder / "report.md").read_text()
    assert "## How much the decisions vary" in report and "| isolation | isolate | 100 | 2 |" in report


@pytest.mark.integration
def test_probe_against_the_real_model(vllm_server, tmp_path, capsys):
    out = tmp_path / "probe"
    code = main(
        ["probe", "covid_isolation", "--llm-url", vllm_server.url, "--cache", "off", "--out", str(out)]
        + ["--vary", "week=8", "--vary", "cases=100,30000", "--vary", "cases_change=0"]
        + ["--vary", "age_group=25-34,75+", "--vary", "borough=Manhattan"]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    table = pd.read_csv(out / "probe.csv")
    assert table.groupby("variable", sort=False).size().to_dict() == {
        "week": 2,
        "cases": 4,
        "cases_change": 2,
        "age_group": 4,
        "sex": 4,
        "borough": 2,
    }
    sums = table.groupby(["variable", "value"])["probability"].sum()
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert set(table["mode"]) == {"logprobs"}
    summary = json.loads((out / "probe.json").read_text())
    assert summary["requests"] == 4 and "verdict" in summary  # base, cases=30000, age 75+, male
