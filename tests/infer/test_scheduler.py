"""The one step loop (infer/scheduler.py): requests arriving and leaving between steps, n completions sharing one
prefill, cancellation, log-probabilities and OpenAI's penalties, each checked against an independent reference
(transformers' generate, a plain loop over whole sequences, requests run alone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.infer import SamplingConfig, generate_ids
from lmforge.infer.scheduler import ContextLimit, Scheduler
from lmforge.model import Transformer, load_hf_model, preset
from lmforge.model.transformer import KVCache
from tests.model.test_hf_interop import _hf_tiny, _save

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 7, 1], [250, 12, 33, 44, 55, 66, 77, 88, 9, 10, 11, 12, 13], [1, 2]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny-llama", vocab_size=300, max_seq_len=40)).eval()


def _alone(model, prompt, cfg):
    """The reference: the request alone, every step a forward over the whole sequence (no cache, no padding)."""
    return generate_ids(model, [prompt], cfg, use_cache=False)[0]


def _greedy_loop(model, prompt, steps, presence=0.0, frequency=0.0):
    """A plain greedy loop over whole sequences with OpenAI's penalties written out: logit[t] -= presence *
    [count[t] > 0] + frequency * count[t], counting the reply's tokens only."""
    seq, counts = list(prompt), torch.zeros(model.cfg.vocab_size)
    with torch.no_grad():
        for _ in range(steps):
            logits = model.logits(model(torch.tensor([seq])))[0, -1].float()
            logits = logits - presence * (counts > 0) - frequency * counts
            token = int(logits.argmax())
            counts[token] += 1
            seq.append(token)
    return seq[len(prompt):]


def _run(scheduler, plan):
    """Step `scheduler`, adding plan[step] (a list of (prompt, configs, kwargs)) before that step; the groups in order
    of addition."""
    groups, step = [], 0
    while scheduler.busy or any(s >= step for s in plan):
        for prompt, configs, kw in plan.get(step, []):
            groups.append(scheduler.add(prompt, configs, **kw))
        scheduler.step()
        step += 1
    return groups


def test_n_completions_share_one_prefill_and_equal_separate_requests(model):
    """A request with n = 4 seeded completions: the prompt is prefilled once (the model sees its tokens once) and
    each completion gives the tokens of a request of its own with that seed, also when only 2 rows are free (the
    other two wait with the prompt's keys and values) and when other requests run beside them."""
    prompt = PROMPTS[2]
    configs = [SamplingConfig(max_new_tokens=12, temperature=1.1, top_k=50, seed=s) for s in (3, 4, 5, 6)]
    want = [_alone(model, prompt, c) for c in configs]
    assert len({tuple(w) for w in want}) > 1  # the seeds matter: the test would see rows mixed up
    fed = []
    hook = model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape))
    try:
        for capacity in (4, 2):
            fed.clear()
            scheduler = Scheduler(model, capacity=capacity)
            group = scheduler.add(prompt, configs)
            scheduler.run()
            assert [group.tokens(k) for k in range(4)] == want
            prefills = [shape for shape in fed if shape[1] > 1]
            assert prefills == [torch.Size([1, len(prompt)])]  # one prefill of one row, for the four completions
            assert scheduler.stats["prefill_tokens"] == len(prompt)
    finally:
        hook.remove()
    # beside other requests, arriving while they decode
    scheduler = Scheduler(model, capacity=5)
    other = SamplingConfig(max_new_tokens=9, temperature=0)
    groups = _run(scheduler, {0: [(PROMPTS[0], other, {})], 3: [(prompt, configs, {}), (PROMPTS[1], other, {})]})
    assert [groups[1].tokens(k) for k in range(4)] == want
    assert groups[0].tokens() == _alone(model, PROMPTS[0], other)
    assert groups[2].tokens() == _alone(model, PROMPTS[1], other)
    # generate_ids' n: completion k samples with seed + k, prompt-major
    assert generate_ids(model, [prompt, PROMPTS[0]], configs[0], n=4) == want + [
        _alone(model, PROMPTS[0], SamplingConfig(max_new_tokens=12, temperature=1.1, top_k=50, seed=s))
        for s in (3, 4, 5, 6)]


def test_arrivals_and_departures_keep_every_request_its_own_tokens(model):
    """Requests of different lengths join a running batch (a longer prompt shifts the rows right), leave it at
    different steps (the last rows move into their slots), and the shared column reaches the end of a 40-slot cache
    (every row moves left): each request gets the tokens it gets alone."""
    compactions = []
    scheduler = Scheduler(model, capacity=3)
    compact = scheduler._compact
    scheduler._compact = lambda: (compactions.append(scheduler.col), compact())[1]
    cfgs = [SamplingConfig(max_new_tokens=n, temperature=0) for n in (20, 6, 25, 30)]
    sampled = SamplingConfig(max_new_tokens=15, temperature=0.9, seed=1)
    plan = {0: [(PROMPTS[1], cfgs[0], {})], 2: [(PROMPTS[3], cfgs[1], {})], 5: [(PROMPTS[2], cfgs[2], {})],
            9: [(PROMPTS[0], cfgs[3], {}), (PROMPTS[1], sampled, {})]}
    groups = _run(scheduler, plan)
    assert compactions, "the test should make the rows reach the end of the cache"
    want = [_alone(model, p, c) for p, c in [(PROMPTS[1], cfgs[0]), (PROMPTS[3], cfgs[1]), (PROMPTS[2], cfgs[2]),
                                             (PROMPTS[0], cfgs[3]), (PROMPTS[1], sampled)]]
    assert [g.tokens() for g in groups] == want
    assert [len(w) for w in want] == [20, 6, 25, 30, 15]


def test_a_sliding_window_model_equals_transformers_with_arrivals(tmp_path):
    """Mistral with an 8-token window: rows that join later and are left-padded in the shared cache attend to the
    same positions as transformers' generate of each prompt alone."""
    hf = _save(_hf_tiny("mistral"), tmp_path)
    ours = load_hf_model(tmp_path)
    cfg = SamplingConfig(max_new_tokens=14, temperature=0)
    groups = _run(Scheduler(ours, capacity=3), {0: [(PROMPTS[1], cfg, {})], 2: [(PROMPTS[2], cfg, {})],
                                                 4: [(PROMPTS[0], cfg, {})]})
    for group, prompt in zip(groups, [PROMPTS[1], PROMPTS[2], PROMPTS[0]]):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
        assert group.tokens() == out[0, len(prompt):].tolist()


def test_cancel_ends_a_request_and_the_others_go_on(model):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    scheduler = Scheduler(model, capacity=2)
    a, b = scheduler.add(PROMPTS[0], cfg), scheduler.add(PROMPTS[1], [cfg, cfg])
    waiting = scheduler.add(PROMPTS[3], cfg)
    events = scheduler.step() + scheduler.step() + scheduler.step()
    a.cancel()
    waiting.cancel()
    events += scheduler.run()
    last = {(id(e.group), e.index): e.finish_reason for e in events if e.finish_reason}
    assert last[(id(a), 0)] == "cancelled" and last[(id(waiting), 0)] == "cancelled"
    assert len(a.tokens()) == 4 and waiting.tokens() == []  # the admission samples one token, each step one more
    assert b.tokens(0) == b.tokens(1) == _alone(model, PROMPTS[1], cfg)


def test_logprobs_and_penalties_equal_a_plain_loop(model):
    """Chosen and top-k log-probabilities are the model's distribution (log_softmax of a whole-sequence forward,
    before penalties); presence / frequency penalties follow OpenAI's formula written out in a plain loop."""
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    scheduler = Scheduler(model, capacity=3)
    penalised = scheduler.add(PROMPTS[0], cfg, presence=0.7, frequency=0.9, logprobs=3)
    plain = scheduler.add(PROMPTS[2], cfg, logprobs=0)
    events = scheduler.run()
    assert penalised.tokens() == _greedy_loop(model, PROMPTS[0], 10, presence=0.7, frequency=0.9)
    assert penalised.tokens() != _greedy_loop(model, PROMPTS[0], 10)  # the penalties changed something
    assert plain.tokens() == _greedy_loop(model, PROMPTS[2], 10)
    for group, prompt in ((penalised, PROMPTS[0]), (plain, PROMPTS[2])):
        mine = [e for e in events if e.group is group]
        seq = prompt + group.tokens()
        with torch.no_grad():
            logp = F.log_softmax(model.logits(model(torch.tensor([seq[:-1]])))[0, len(prompt) - 1:].float(), -1)
        chosen = logp.gather(1, torch.tensor(group.tokens())[:, None])[:, 0]
        assert torch.allclose(torch.tensor([e.logprob for e in mine]), chosen, atol=1e-4)
        if group.logprobs:
            values, ids = logp.topk(3)
            assert [[i for i, _ in e.top_logprobs] for e in mine] == ids.tolist()
            assert torch.allclose(torch.tensor([[v for _, v in e.top_logprobs] for e in mine]), values, atol=1e-4)
        else:
            assert all(e.top_logprobs is None for e in mine)


def test_the_budget_is_clipped_to_the_context_and_a_prompt_too_long_is_refused(model):
    scheduler = Scheduler(model, capacity=2)
    group = scheduler.add(PROMPTS[2], SamplingConfig(max_new_tokens=100, temperature=0))
    assert group.clipped and group.budgets == [40 - len(PROMPTS[2])]
    events = scheduler.run()
    assert len(group.tokens()) == 40 - len(PROMPTS[2]) and events[-1].finish_reason == "length"
    with pytest.raises(ContextLimit, match="40-token context"):
        scheduler.add(list(range(1, 41)), SamplingConfig(max_new_tokens=1))


def _transformers_greedy(hf, prompt, steps):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """Mistral with an 8-token window (transformers' model, and lmforge's loaded from its directory)."""
    path = tmp_path_factory.mktemp("mistral")
    hf = _save(_hf_tiny("mistral"), path)
    return hf, load_hf_model(path)


def test_sliding_layers_keep_a_ring_of_their_window(mistral):
    """Every Mistral layer slides over 8 positions: the scheduler's cache keeps 8 slots per layer and row instead of
    the context's 256, and 40 tokens (5 windows) past 30-token prompts still equal transformers' generate; n seeded
    completions equal each one alone without a cache."""
    hf, ours = mistral
    scheduler = Scheduler(ours, capacity=2)
    assert [k.shape[2] for k in scheduler.cache.k] == [8, 8, 8]
    # keys and values x 3 layers x 2 rows x 2 kv heads x head_dim 8 x 8 slots x 4 bytes; without rings 256 slots
    assert scheduler.cache.nbytes == 2 * 3 * 2 * 2 * 8 * 8 * 4
    assert KVCache(ours.cfg, 2, 256).nbytes == 32 * scheduler.cache.nbytes
    prompts = [list(range(3, 33)), list(range(100, 120))]
    cfg = SamplingConfig(max_new_tokens=40, temperature=0)
    groups = _run(scheduler, {0: [(prompts[0], cfg, {})], 3: [(prompts[1], cfg, {})]})
    for group, prompt in zip(groups, prompts):
        assert group.tokens() == _transformers_greedy(hf, prompt, 40)
    # n = 3 seeded completions through 2 rows: the third waits with a copy of the prompt's rings, then joins
    seeded = [SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50, seed=s) for s in (1, 2, 3)]
    group = scheduler.add(prompts[0], seeded)
    scheduler.run()
    assert [group.tokens(k) for k in range(3)] == [_alone(ours, prompts[0], c) for c in seeded]


def test_the_prefix_cache_with_rings_reuses_only_what_a_ring_still_holds(mistral):
    """A conversation's next turn begins with the whole last prompt + reply: its keys and values are reused (the
    rings hold that prefix's last 8 positions). A prompt that shares only part of a cached entry longer than the
    window cannot reuse it (the ring has overwritten the positions that prefix ends at) and is prefilled whole; an
    entry no longer than the window can serve a part of itself. Every reply equals transformers' generate."""
    hf, ours = mistral
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    scheduler = Scheduler(ours, capacity=2, prefix_cache_tokens=1000, min_prefix=3)

    def reply(prompt, hits):
        before = scheduler.stats["prefix_hits"]
        group = scheduler.add(prompt, cfg)
        scheduler.run()
        assert scheduler.stats["prefix_hits"] - before == hits, prompt
        assert group.tokens() == _transformers_greedy(hf, prompt, 6), prompt
        return group.tokens()[:-1]  # the reply's last token is not in the cache yet

    first = list(range(3, 23))
    second = first + reply(first, 0) + [7, 8, 9]
    reply(second, 1)
    reply(first[:15] + [200, 201, 202], 0)  # a part of a 25-token entry: no reuse
    short = [40, 41, 42]
    reply(short + reply(short, 0)[:2] + [250, 251], 1)  # a part of an 8-token entry (3 + 5), within the window


def test_chunked_prefill_gives_the_same_tokens_and_running_rows_keep_decoding(model, mistral):
    """A 25-token prompt arriving with max_prefill_tokens=4 is prefilled in 7 chunks, one per step, while a running
    request gets one token at every step; every request's tokens equal its reference (alone without a cache;
    transformers' generate for Mistral, whose 8-token window the chunks cross), with n = 2 seeded completions and
    a prefix reused by a chunked prompt."""
    long_prompt = [(7 * i + 3) % 300 for i in range(25)]
    greedy, sampled = SamplingConfig(max_new_tokens=12, temperature=0), [
        SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=40, seed=s) for s in (1, 2)]
    fed = []
    hook = model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[1]))
    try:
        scheduler = Scheduler(model, capacity=3, max_prefill_tokens=4)
        running = scheduler.add(PROMPTS[0], greedy)
        scheduler.step()
        scheduler.step()
        arriving = scheduler.add(long_prompt, sampled)
        fed.clear()
        for _ in range(7):  # seven chunks of at most 4 tokens, the running row decoding beside each
            before = len(running.tokens())
            scheduler.step()
            assert len(running.tokens()) == before + 1
        assert sorted(t for t in fed if t > 1) == [4] * 6 and fed.count(1) >= 7
        scheduler.run()
    finally:
        hook.remove()
    assert running.tokens() == _alone(model, PROMPTS[0], greedy)
    assert [arriving.tokens(k) for k in range(2)] == [_alone(model, long_prompt, c) for c in sampled]
    hf, ours = mistral
    scheduler = Scheduler(ours, capacity=2, max_prefill_tokens=5, prefix_cache_tokens=1000, min_prefix=4)
    groups = _run(scheduler, {0: [(PROMPTS[2], greedy, {})], 1: [(long_prompt, greedy, {})]})
    later = long_prompt + groups[1].tokens()[:-1] + [1, 2, 3, 4, 5, 6, 7]  # reuses the long prompt + reply
    groups += _run(scheduler, {0: [(later, greedy, {})]})
    assert scheduler.stats["prefix_hits"] == 1
    for group, prompt in zip(groups, [PROMPTS[2], long_prompt, later]):
        assert group.tokens() == _transformers_greedy(hf, prompt, 12)


@pytest.mark.slow
def test_compiled_steps_with_rings_and_chunked_prefill_equal_transformers(mistral):
    """compile=True: the one-token step over a static cache whose sliding layers are rings (written by scatter, the
    mask from the positions), prompts prefilled in chunks of 5 then copied in; transformers' tokens."""
    hf, ours = mistral
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    prompts = [list(range(3, 33)), PROMPTS[0]]
    scheduler = Scheduler(ours, capacity=2, compile=True, max_prefill_tokens=5)
    assert scheduler.cache.static and [k.shape[2] for k in scheduler.cache.k] == [8, 8, 8]
    groups = _run(scheduler, {0: [(prompts[0], cfg, {})], 2: [(prompts[1], cfg, {})]})
    for group, prompt in zip(groups, prompts):
        assert group.tokens() == _transformers_greedy(hf, prompt, 20)
