from __future__ import annotations

import pytest
import torch

from gyre.kernels.random import gumbel_noise
from gyre.kernels.sampling import logprobs_of, logprobs_of_ref, sample, sample_and_logprobs, sample_ref


def _random_params(batch, vocab, gen):
    def pick(options):
        return [options[i] for i in torch.randint(0, len(options), (batch,), generator=gen).tolist()]

    temperature = torch.tensor(pick([0.0, 0.3, 0.7, 1.0, 1.0, 1.5]), dtype=torch.float32)
    top_k = torch.tensor(pick([-1, 0, 1, 2, 5, 17, vocab - 1, vocab, vocab + 3]), dtype=torch.int32)
    top_p = torch.tensor(pick([1.0, 1.0, 0.95, 0.8, 0.5, 0.1, 0.0]), dtype=torch.float32)
    top_p = torch.where(torch.rand(batch, generator=gen) < 0.2, torch.rand(batch, generator=gen), top_p)
    min_p = torch.tensor(pick([0.0, 0.0, 0.01, 0.1, 0.5]), dtype=torch.float32)
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen)
    steps = torch.randint(0, 2**40, (batch,), generator=gen)
    return temperature, top_k, top_p, min_p, seeds, steps


def _random_logits(batch, vocab, gen):
    logits = torch.randn(batch, vocab, generator=gen) * torch.rand(batch, 1, generator=gen) * 8
    quantized = torch.rand(batch, generator=gen) < 0.3  # rows with many exact ties
    logits[quantized] = (logits[quantized] * 2).round() / 2
    masked = torch.rand(batch, vocab, generator=gen) < 0.2  # grammar-style -inf masks on some rows
    masked &= torch.rand(batch, 1, generator=gen) < 0.3
    masked[:, 0] = False
    return logits.masked_fill(masked, float("-inf"))


@pytest.mark.parametrize("vocab", [7, 300, 2500])
def test_sample_matches_reference(case, vocab):
    gen = torch.Generator().manual_seed(vocab)
    batch = 96
    logits = _random_logits(batch, vocab, gen)
    params = _random_params(batch, vocab, gen)
    ref = sample_ref(logits, *params)
    logits, params = logits.to(case.device), [p.to(case.device) for p in params]
    out = torch.full((batch,), -7, dtype=torch.int64, device=case.device)
    got = sample(logits, *params, out=out)
    assert got is out
    mismatched = torch.nonzero(got.cpu() != ref)[:, 0].tolist()
    assert mismatched == [], f"rows {mismatched}: {got.cpu()[mismatched]} != {ref[mismatched]}"


def test_sample_greedy_and_filters_edge_cases(case):
    vocab = 50
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, [3, 9]] = 10.0  # greedy tie -> lowest index
    temperature = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    top_k = torch.tensor([-1, 1, -1, -1, 3, -1], dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    seeds, steps = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    params = [temperature, top_k, top_p, min_p, seeds, steps]
    got = sample(logits.to(case.device), *[p.to(case.device) for p in params]).cpu()
    assert got[0] == 3  # greedy
    assert torch.equal(got[1:4], logits.argmax(-1)[1:4])  # top-1, top_p=0, min_p=1: the max
    assert got[4] in logits[4].topk(3).indices
    assert torch.equal(got, sample_ref(logits, *params))


def test_sample_noise_is_bit_exact(case):
    """With equal logits the sample is argmax of the noise alone."""
    batch, vocab = 64, 1500
    gen = torch.Generator().manual_seed(1)
    seeds = torch.randint(-(2**63), 2**63 - 1, (batch,), generator=gen)
    steps = torch.randint(0, 2**33, (batch,), generator=gen)
    logits = torch.zeros(batch, vocab)
    temperature, top_p, min_p = torch.ones(batch), torch.ones(batch), torch.zeros(batch)
    top_k = torch.full((batch,), -1, dtype=torch.int32)
    params = [temperature, top_k, top_p, min_p, seeds, steps]
    got = sample(logits.to(case.device), *[p.to(case.device) for p in params]).cpu()
    assert torch.equal(got, gumbel_noise(seeds, steps, vocab).argmax(-1))


@pytest.mark.parametrize(
    "top_k,top_p,min_p",
    [(-1, 1.0, 0.0), (4, 1.0, 0.0), (-1, 0.7, 0.0), (-1, 1.0, 0.3), (5, 0.8, 0.05)],
)
def test_sample_empirical_distribution(case, top_k, top_p, min_p):
    """Frequencies over many steps match softmax(z) renormalised over the keep set.

    On the CPU the interpreter is too slow for many samples: the reference is sampled instead, and the
    kernel is checked token for token against it on the first rows.
    """
    vocab, num = 12, 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, float("-inf")])
    temperature = 0.8
    z = logits / temperature
    probs = torch.softmax(z, -1)
    keep = torch.ones(vocab, dtype=torch.bool)
    if top_k > 0:
        keep &= z >= z.topk(top_k).values[-1]
    if top_p < 1.0:
        sorted_probs = probs.sort(descending=True).values
        keep &= probs >= sorted_probs[torch.nonzero(sorted_probs.cumsum(0) >= top_p)[0, 0]]
    keep &= probs >= min_p * probs.max()
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()

    params = [
        torch.full((num,), temperature),
        torch.full((num,), top_k, dtype=torch.int32),
        torch.full((num,), top_p),
        torch.full((num,), min_p),
        torch.full((num,), 1234, dtype=torch.int64),
        torch.arange(num, dtype=torch.int64),
    ]
    logits = logits.expand(num, vocab).contiguous()
    if case.device == "cpu":
        got = sample_ref(logits, *params)
        n = 32
        assert torch.equal(sample(logits[:n], *[p[:n] for p in params]), got[:n])
    else:
        got = sample(logits.to(case.device), *[p.to(case.device) for p in params]).cpu()
    freq = torch.bincount(got, minlength=vocab).float() / num
    assert (freq[~keep] == 0).all()
    sigma = (expected * (1 - expected) / num).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-4).all(), (freq, expected)


@pytest.mark.parametrize("vocab", [5, 1000, 3000])
def test_logprobs_of(case, vocab):
    gen = torch.Generator().manual_seed(vocab)
    batch = 8
    logits = torch.randn(batch, vocab, generator=gen) * 5
    logits[1, : vocab // 2] = float("-inf")
    tokens = torch.randint(0, vocab, (batch,), generator=gen)
    tokens[1] = vocab - 1
    temperature = torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0, 0.7, 0.0, 1.3])
    ref = logprobs_of_ref(logits, tokens, temperature)
    out = torch.full((batch,), float("nan"), device=case.device)
    got = logprobs_of(logits.to(case.device), tokens.to(case.device), temperature.to(case.device), out=out)
    assert got is out
    torch.testing.assert_close(got.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab", [7, 2500, 9000])  # 9000: three chunks of the vocabulary
@pytest.mark.parametrize("filtered", [False, True])
def test_sample_and_logprobs_split_over_the_vocabulary(case, vocab, filtered):
    """The split kernels: tokens equal sample_ref's (the row kernel's when filters are on), logprobs
    logprobs_of_ref's of those tokens."""
    gen = torch.Generator().manual_seed(vocab + filtered)
    batch = 24
    logits = _random_logits(batch, vocab, gen)
    params = list(_random_params(batch, vocab, gen))
    if not filtered:  # no row filters: the split kernels sample
        params[1] = torch.zeros(batch, dtype=torch.int32)
        params[2] = torch.ones(batch)
        params[3] = torch.zeros(batch)
    ref = sample_ref(logits, *params)
    ref_logprobs = logprobs_of_ref(logits, ref, params[0])
    tokens, logprobs = sample_and_logprobs(logits.to(case.device), *[p.to(case.device) for p in params],
                                           filtered=filtered)
    mismatched = torch.nonzero(tokens.cpu() != ref)[:, 0].tolist()
    assert mismatched == [], f"rows {mismatched}: {tokens.cpu()[mismatched]} != {ref[mismatched]}"
    case.close(logprobs.cpu(), ref_logprobs)
