"""Training vocabulary and the bigram start of the Markov head (train/vocab.py, train/markov_init.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic_store import VOCAB, make_store

from dspark_offline.store import open_store
from dspark_offline.train.markov_init import bigram_factors, init_markov_bigram
from dspark_offline.train.vocab import training_vocabulary


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return open_store(str(make_store(tmp_path_factory.mktemp("vocab") / "s.zarr", num_samples=10)))


def _reference_scores(store, indices):
    score = np.zeros(VOCAB)
    for i in indices:
        s = store.sample(int(i))
        m = s.loss_mask.numpy()
        np.add.at(score, s.topk_ids.numpy()[m].ravel(), s.topk_probs.numpy()[m].ravel())
        np.add.at(score, s.input_ids.numpy()[m], 1.0)
    return score


def test_vocabulary_is_the_top_scoring_tokens_of_the_training_samples(store):
    indices = np.arange(0, 8)
    vocab = training_vocabulary(store, indices, 30, progress=False)
    assert vocab.shape == (30,) and torch.equal(vocab, vocab.sort().values)
    score = _reference_scores(store, indices)
    inside = np.zeros(VOCAB, dtype=bool)
    inside[vocab.numpy()] = True
    assert score[inside].min() >= score[~inside].max() - 1e-6  # nothing left out scores higher
    # held-out samples play no part: other indices give another choice
    assert not torch.equal(vocab, training_vocabulary(store, np.arange(8, 10), 30, progress=False))
    assert torch.equal(training_vocabulary(store, indices, 10**6, progress=False), torch.arange(VOCAB))


def test_bigram_factors_fit_the_log_table(store):
    vocab = torch.arange(VOCAB)
    w1, w2, explained = bigram_factors(store, np.arange(10), vocab, rank=VOCAB, progress=False)
    assert explained == pytest.approx(1.0, abs=1e-3)  # full rank: exact
    table = w1 @ w2.T  # [prev, next], row-centred log P(next | prev)
    # the most frequent supervised successor of a frequent token gets its row's highest score
    pairs = {}
    for i in range(10):
        s = store.sample(i)
        x, m = s.input_ids.numpy(), s.loss_mask.numpy()
        for t in range(len(x) - 1):
            if m[t] and m[t + 1]:
                pairs.setdefault(int(x[t]), []).append(int(x[t + 1]))
    prev = max(pairs, key=lambda k: len(pairs[k]))
    nxt = np.bincount(pairs[prev], minlength=VOCAB)
    assert int(table[prev].argmax()) in set(np.flatnonzero(nxt == nxt.max()).tolist())
    assert float(table[prev].mean()) == pytest.approx(0.0, abs=1e-4)
    _, _, low = bigram_factors(store, np.arange(10), vocab, rank=4, progress=False)
    assert 0 < low < explained


def test_init_markov_bigram_writes_only_the_vocabulary_rows(store, make_tiny_draft):
    model = make_tiny_draft(markov_rank=8)
    before = {k: v.clone() for k, v in model.markov_head.state_dict().items()}
    vocab = torch.arange(0, VOCAB, 3)
    explained = init_markov_bigram(model, store, np.arange(10), vocab, progress=False)
    assert 0 < explained <= 1
    w1 = model.markov_head.markov_w1.weight
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[vocab] = False
    assert torch.equal(w1[outside], before["markov_w1.weight"][outside])
    assert not torch.equal(w1[vocab], before["markov_w1.weight"][vocab])
    with pytest.raises(ValueError, match="markov_head"):
        init_markov_bigram(make_tiny_draft(markov_head=False), store, np.arange(10), vocab, progress=False)
