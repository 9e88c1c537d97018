import torch

from lpm.sampling import UniformStream, bernoulli_st, categorical_st, uniform


def test_uniform_is_layout_independent_and_deterministic():
    full = uniform(7, 3, 2, 10_000)
    assert full.dtype == torch.float32 and full.shape == (10_000,)
    assert torch.equal(full[1234:5678], uniform(7, 3, 2, 5678 - 1234, start=1234))
    assert torch.equal(full, UniformStream(10_000).draw(7, 3, 2))
    assert not torch.equal(full, uniform(7, 4, 2, 10_000))  # step changes the draw
    assert not torch.equal(full, uniform(7, 3, 1, 10_000))  # stream changes the draw
    assert not torch.equal(full, uniform(8, 3, 2, 10_000))  # seed changes the draw


def test_uniform_distribution():
    u = uniform(1, 0, 0, 200_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    assert float((hist - 0.1).abs().max()) < 0.005
    v = uniform(1, 1, 0, 200_000)
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.01


def test_bernoulli_st_forward_hard_backward_matches_finite_difference():
    n = 400_000
    u = uniform(2, 0, 0, n)
    p = torch.full((n,), 0.3, requires_grad=True)
    x = bernoulli_st(p, u)
    assert set(x.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x.detach(), (u < 0.3).float())
    x.mean().backward()
    grad = float(p.grad.sum())  # d mean / d p for a common shift of all p
    h = 0.02  # finite difference of the hard sample mean with common random numbers
    fd = (float((u < 0.3 + h).float().mean()) - float((u < 0.3 - h).float().mean())) / (2 * h)
    assert abs(grad - 1.0) < 1e-6
    assert abs(fd - grad) < 0.03


def test_categorical_st_samples_softmax_and_has_soft_gradient():
    n, a = 100_000, 3
    logits = torch.tensor([0.5, -0.3, 1.0])
    u = torch.stack([uniform(3, 0, s, n) for s in range(a)], dim=1)
    sample = categorical_st(logits.expand(n, a), u, tau=0.5)
    assert torch.equal(sample.detach().sum(1), torch.ones(n))
    freq = sample.detach().mean(0)
    assert torch.allclose(freq, torch.softmax(logits, 0), atol=0.01)
    # backward = gradient of the Gumbel-softmax relaxation: check against its finite difference
    small = 2000
    lg = logits.clone().requires_grad_(True)
    weights = torch.tensor([1.0, -2.0, 0.5])
    (categorical_st(lg.expand(small, a), u[:small], tau=0.5) * weights).sum().backward()

    def soft(lv):
        g = -torch.log(-torch.log(u[:small].clamp(1e-7, 1 - 1e-7)))
        return (torch.softmax((lv + g) / 0.5, dim=1) * weights).sum()

    h = 1e-3
    for i in range(a):
        e = torch.zeros(a)
        e[i] = h
        fd = (soft(logits.double() + e.double()) - soft(logits.double() - e.double())) / (2 * h)
        assert abs(float(lg.grad[i]) - float(fd)) < 1e-2 * max(1.0, abs(float(fd)))


def test_hard_sampler_fast_paths_match_their_definitions():
    """support, count, tally and transition of HardSampler against the plain formulas they replace (the
    counts over enough agents to be taken in lanes, with the index in runs of one bin, as a borough's
    agents lie in a population)."""
    from lpm.sampling import LANES_FROM, HardSampler, SoftSampler

    n, k, bins = 2 * LANES_FROM + 7, 8, 5
    gen = torch.Generator().manual_seed(0)
    states = torch.randint(0, k, (n,), generator=gen).to(torch.uint8)
    index = torch.randint(0, bins, (n,), generator=gen).sort().values.to(torch.uint8)
    flag = torch.rand(n, generator=gen) < 0.2
    hard = HardSampler(n, seed=3).at(5)
    for table in (torch.tensor([0, 0, 0, 1, 1, 0.5, 2, 0]), torch.tensor([1.0, 0, 3, 0, 0, 0, 0, 2])):
        who, values = hard.support(states, table)
        dense = table[states.long()]
        assert torch.equal(who, dense.nonzero().view(-1)) and torch.equal(values, dense[who])
        if table[0] == 0:  # codes 3 .. 6 non-zero, given by the caller: the same without reading the table
            given = hard.support(states, table, codes=(3, 6))
            assert torch.equal(given[0], who) and torch.equal(given[1], values)
        soft = SoftSampler(n)
        who, values = soft.support(soft.states(states, k), table)  # the dense default: every agent
        assert who is None and torch.equal(values, dense)
    want = torch.zeros(bins).index_add_(0, index.long(), flag.float())
    assert torch.equal(hard.count(index, bins, flag), want)
    assert torch.equal(hard.count(index.long(), bins, flag), want)
    tally = torch.zeros(k, bins).index_put_((states.long(), index.long()), torch.ones(n), accumulate=True)
    assert torch.equal(hard.tally(states, k, index, bins), tally)
    split = torch.zeros(k, bins, 2).index_put_(
        (states.long(), index.long(), flag.long()), torch.ones(n), accumulate=True
    )
    assert torch.equal(hard.tally(states, k, index, bins, flag), split)
    assert torch.equal(hard.tally(states, k, index.long(), bins, flag), split)  # an int32 key
    p_first, hazard = torch.rand(n, generator=gen), torch.linspace(0.9, 0.0, k)
    nxt, moves = hard.transition(states, p_first, hazard, 16)
    p = torch.where(states == 0, p_first, hazard[states.long()])
    assert torch.equal(moves.leave, hard.uniform(16) < p) and torch.equal(nxt, states + moves.leave)
    assert hard.work("x").shape == (n,) and hard.work("x") is hard.work("x")
    # the work buffer and the lanes of the counts (uint8 keys): 8 for count's 10 bins, 4 for tally's 40,
    # 2 for the split tally's 80
    assert hard.nbytes() == HardSampler(n).nbytes() + 4 * n + 3 * n


def test_chain_step_backward_is_the_expected_transitions_jacobian():
    """SoftSampler.transition's hand-written backward equals autograd through the expected next states
    ``states - flow + shift(flow)``, ``flow = states * [p_first, hazard[1:]]``, for the states, the
    leaving probability and the hazards; the forward is the hard next state."""
    from lpm.sampling import _ChainStep

    gen = torch.Generator().manual_seed(0)
    n, k = 400, 8
    codes = torch.randint(0, k, (n,), generator=gen)
    w = torch.randn(n, k, generator=gen).requires_grad_(True)
    p = torch.rand(n, generator=gen).requires_grad_(True)
    h = torch.cat([torch.zeros(1), 0.5 * torch.rand(k - 2, generator=gen), torch.zeros(1)]).requires_grad_(
        True
    )
    states = torch.nn.functional.one_hot(codes, k).float() + (w - w.detach())
    following = torch.randint(0, k, (n,), generator=gen)
    weights = torch.randn(n, k, generator=gen)
    out = _ChainStep.apply(states, p, h, following)
    mine = torch.autograd.grad((out * weights).sum(), [w, p, h])
    flow = torch.cat([states[:, :1] * p[:, None], states[:, 1:] * h[1:]], 1)
    expected = states - flow + torch.nn.functional.pad(flow[:, :-1], (1, 0))
    reference = torch.nn.functional.one_hot(following, k).float() + (expected - expected.detach())
    theirs = torch.autograd.grad((reference * weights).sum(), [w, p, h])
    assert torch.equal(out, reference.detach())
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_shared_gradient_and_follow():
    """``shared_gradient(v, *others)`` is ``v`` forward and passes the same gradient to each of ``others``
    (what ``v + sum(o - o.detach())`` does); ``follow`` moves another copy of the states along the same hard
    step as ``transition`` (the same one-hot rows) with its own expected-transition gradient."""
    from lpm.sampling import HouseholdSampler, shared_gradient

    gen = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(6, 3, generator=gen).requires_grad_(True) for _ in range(3))
    weights = torch.randn(6, 3, generator=gen)
    out = shared_gradient(a * 2, b * 3, c * 4)
    assert torch.equal(out, a * 2)
    mine = torch.autograd.grad((out * weights).sum(), [a, b, c])
    ref = a * 2 + (b * 3 - (b * 3).detach()) + (c * 4 - (c * 4).detach())
    theirs = torch.autograd.grad((ref * weights).sum(), [a, b, c])
    for x, y in zip(mine, theirs, strict=True):
        torch.testing.assert_close(x, y)

    n, k = 500, 5
    sampler = HouseholdSampler(n, seed=3).at(2)
    codes = torch.randint(0, k, (n,), generator=gen)
    w = torch.zeros(n, k, requires_grad=True)
    states = sampler.states(codes, k)
    copy = states + (w - w.detach())
    p = torch.rand(n, generator=gen)
    q = torch.rand(n, generator=gen).requires_grad_(True)
    hazard = torch.tensor([0.0, 0.3, 0.5, 0.2, 0.0])
    following, moves = sampler.transition(states, p, hazard, 16)
    followed, _ = sampler.follow(copy, q, hazard, moves, following)
    assert torch.equal(followed, following)
    g_w, g_q = torch.autograd.grad((followed * weights[:1, :1]).sum() + followed[:, 1].sum(), [w, q])
    assert float(g_q.abs().sum()) > 0 and float(g_w.abs().sum()) > 0
    assert torch.all(g_q[codes != 0] == 0)  # only agents in the first state leave by p_first


def test_prune_keeps_one_alternative_per_group_without_bias():
    """:func:`prune` is a reservoir step: each group keeps one alternative among its current one and its
    candidates, chosen in proportion to the proxies, weight divided by the chance of being kept; the
    weights stay zero-valued; the gradient of kept weight × kept difference averages to that of every
    alternative's weight × its difference (here over 200,000 copies of one group, against the exact sum:
    within 1 %, several times the Monte Carlo error)."""
    from lpm.sampling import prune, uniform

    h, m = 200_000, 3  # groups, agents per group
    theta = torch.tensor(1.0, requires_grad=True)
    zero = theta - theta.detach()
    old_w, old_rate, old_diff = 0.7, 2.0, 5.0  # the current alternative: weight' 0.7, proxy 2, difference 5
    new_w = torch.tensor([0.4, -0.3, 0.0])  # the candidates' weights' (the third is no candidate)
    new_rate = torch.tensor([1.0, 3.0, 0.0], dtype=torch.float64)
    new_diff = torch.tensor([2.0, 4.0, 9.0])
    group = torch.arange(h).repeat_interleave(m)
    weight = zero * old_w * torch.ones(h)
    kept, total, winner, replaced = prune(
        weight,
        torch.full((h,), old_rate, dtype=torch.float64),
        group,
        zero * new_w.repeat(h),
        new_rate.repeat(h),
        uniform(7, 0, 20, h * m),
        uniform(7, 0, 21, h),
    )
    assert torch.all(kept.detach() == 0) and torch.allclose(total, torch.full((h,), 6.0, dtype=torch.float64))
    won = winner.view(h, m)
    assert torch.equal(won.sum(1) == 1, replaced) and not bool(won[:, 2].any())  # never the non-candidate
    share = won.float().mean(0)
    assert abs(float(share[0]) - 1 / 6) < 0.005 and abs(float(share[1]) - 3 / 6) < 0.005
    diff = torch.where(replaced, (won.float() * new_diff).sum(1), torch.tensor(old_diff))
    (estimate,) = torch.autograd.grad((kept * diff).sum() / h, theta)
    exact = old_w * old_diff + float((new_w * new_diff).sum())
    assert abs(float(estimate) - exact) < 0.01 * abs(exact), (float(estimate), exact)


def test_prune_picks_each_groups_smallest_key_and_the_lowest_index_among_ties():
    """The race's winner in each group is the agent of the smallest ``-log(1 - u) / rate`` and, among equal
    keys, the lowest index (one packed integer reduction finds both); a group with no candidate, or no
    agent, keeps its alternative. Checked against a plain loop over the groups, with ties made on purpose
    (agents of one group given the same uniform and proxy)."""
    from lpm.sampling import prune

    torch.manual_seed(0)
    h, n = 50, 400
    group = torch.randint(0, h - 3, (n,))  # the last 3 groups hold no agent
    u = torch.rand(n)
    u[group % 4 == 0] = 0.5  # every agent of these groups draws alike ...
    rate = torch.rand(n, dtype=torch.float64) + 0.1
    rate[group % 4 == 0] = 2.0  # ... with one proxy: all tie
    rate[torch.rand(n) < 0.2] = 0.0  # no candidate
    rate[group == 5] = 0.0  # a group of no candidate
    zero = torch.zeros(h, requires_grad=True) * 0.0
    _, _, winner, replaced = prune(
        zero, torch.zeros(h, dtype=torch.float64), group, torch.zeros(n), rate, u, torch.rand(h)
    )
    key = torch.log1p(-u).neg() / rate.float()
    key[rate <= 0] = float("inf")
    expected = torch.zeros(n, dtype=torch.bool)
    for g in range(h):
        members = torch.nonzero((group == g) & (rate > 0)).view(-1)
        if len(members):
            expected[members[torch.argmin(key[members])]] = True  # argmin: the first of equal keys
    assert torch.equal(winner, expected)
    assert torch.equal(replaced, torch.zeros(h, dtype=torch.bool).index_fill(0, group[expected], True))
    assert not bool(replaced[5]) and not bool(replaced[-3:].any())
    assert int((group[expected] % 4 == 0).sum()) > 5  # ties were met


def test_a_count_by_a_sorted_index_sums_runs_with_the_scatters_values_and_gradient():
    """The differentiable count by a sorted index (agents lie borough by borough) sums each run instead of
    scattering agent by agent: the same counts and gradient as index_add; an unsorted index still scatters."""
    from lpm.sampling import SoftSampler

    index = torch.tensor([0, 0, 1, 1, 1, 3, 3], dtype=torch.uint8)  # bin 2 empty
    where = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0], requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    sampler = SoftSampler(len(index))
    counts = sampler.count(index, 4, where)
    assert sampler._runs(index, 4) == [(0, 2), (2, 5), (5, 5), (5, 7)]
    (grad,) = torch.autograd.grad((counts * weights).sum(), where)
    scattered = torch.zeros(4).index_add(0, index.long(), where)
    (expected,) = torch.autograd.grad((scattered * weights).sum(), where)
    assert torch.equal(counts, scattered.detach()) and torch.equal(grad, expected)
    shuffled = index.flip(0)
    assert sampler._runs(shuffled, 4) is None
    assert torch.equal(sampler.count(shuffled, 4, where), torch.zeros(4).index_add(0, shuffled.long(), where))


def test_soft_categorical_draws_one_hot_rows_with_the_gradient_of_their_rows():
    from lpm.sampling import SoftSampler

    n, k, a = 50_000, 7, 3
    table = torch.softmax(torch.randn(k, a, generator=torch.Generator().manual_seed(0)), 1)
    index = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    weights = torch.randn(n, a, generator=torch.Generator().manual_seed(2))
    sampler = SoftSampler(n, seed=3).at(0)
    leaf = table.clone().requires_grad_(True)
    drawn = sampler.categorical(leaf, index, 5)
    hard = sampler._inverse_cdf(sampler.uniform(5), table, index).long()
    assert torch.equal(drawn.detach(), torch.nn.functional.one_hot(hard, a).float())
    (drawn * weights).sum().backward()
    # the gradient of probs[index] (each table row gains its agents' gradients), summed in agent order
    rows = table.clone().requires_grad_(True)
    (rows.index_select(0, index.long()) * weights).sum().backward()
    assert torch.equal(leaf.grad, rows.grad)
    assert leaf.grad.abs().min() > 0  # every row holds agents: a gradient that skipped some would be 0
