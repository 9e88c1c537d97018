"""Elicitation methods (lpm.elicitation): the question asked, the answers allowed, and the mapping back to
the spec's actions, against the scripted fake server."""

from __future__ import annotations

import pytest
import torch
from fake_server import FakeServer

from lpm.archetype import ArchetypeSpec
from lpm.backend import OpenAIBackend
from lpm.decision import Decider
from lpm.elicitation import SCALE, Elicitation
from lpm.errors import InputError
from lpm.prompt import PromptTemplate

CONTEXT = {"week": 10, "cases": 2345, "cases_change": 12}


@pytest.fixture(scope="module")
def spec() -> ArchetypeSpec:
    return ArchetypeSpec.load("covid_isolation")


def decide(server, spec, rows, elicitation):
    backend = OpenAIBackend(server.url, server.model, backoff=0.01)
    decider = Decider(
        backend, progress=False, mode="logprobs", scoring="first-token", elicitation=elicitation
    )
    return decider.decide(spec, rows, CONTEXT)


def test_yes_no_asks_yes_or_no_and_reads_p_yes(spec, small_pop):
    rows = spec.group(small_pop).rows()[:3]
    with FakeServer() as server:
        out = decide(server, spec, rows, "yes-no")
        bodies = server.bodies
    assert out.actions == ["isolate", "go out"] and out.probs.shape == (3, 2)
    prompt = PromptTemplate.load(spec)
    question = 'Would you choose "isolate" rather than "go out"? Answer yes or no.'
    assert all(body["structured_outputs"]["choice"] == ["yes", "no"] for body in bodies)
    for i, row in enumerate(rows):  # requests run concurrently: find each row's by its text
        text = prompt.render(row, CONTEXT)[-1]["content"].rstrip() + "\n" + question
        sent = next(body["messages"] for body in bodies if body["messages"][-1]["content"] == text)
        p_yes = FakeServer.expected(sent, ["yes", "no"])[0]
        assert out.probs[i].tolist() == pytest.approx([p_yes, 1 - p_yes], abs=1e-6)


def test_scale_reads_the_expected_number_scored_whole(spec, small_pop):
    """The answers 1 and 10 share the first token "1": the scale is scored as whole answers, and P(A) is the
    expected number over ten."""
    rows = spec.group(small_pop).rows()[:1]
    with FakeServer() as server:
        out = decide(server, spec, rows, "scale")
        first = server.bodies[0]
    assert first["structured_outputs"]["choice"] == SCALE
    assert 'from 0 (certainly "go out") to 10 (certainly "isolate")' in first["messages"][-1]["content"]
    weights = FakeServer.sequence_expected(SCALE, first["messages"])
    expected = sum(k / 10 * w for k, w in enumerate(weights))
    assert out.probs[0].tolist() == pytest.approx([expected, 1 - expected], abs=1e-6)
    assert out.scoring == ["sequence"]


def test_choice_is_the_specs_own_question():
    e = Elicitation("choice", ("a", "b", "c"))
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert e.messages(messages) == messages and e.asked == ["a", "b", "c"]
    probs = torch.tensor([[0.2, 0.3, 0.5]])
    assert torch.equal(e.to_actions(probs), probs)


def test_two_action_methods_refuse_other_action_sets():
    with pytest.raises(InputError, match="has 3"):
        Elicitation("scale", ("a", "b", "c"))
    with pytest.raises(InputError, match="must be one of"):
        Elicitation("vibes", ("a", "b"))
    with pytest.raises(InputError, match="elicitation must be one of"):
        Decider(OpenAIBackend("http://127.0.0.1:9/v1", "m"), elicitation="vibes")
