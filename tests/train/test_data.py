"""Training batches: deterministic per step, exact shapes, answer weights exactly on the answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kvflow.train.corpus import load_token_stream
from kvflow.train.data import TaskMix, TrainingBatches
from kvflow.train.synthetic import RetrievalTasks, parse_answer


@pytest.fixture(scope="module")
def batches(smoke_run):
    out, _ = smoke_run
    tokenizer = AutoTokenizer.from_pretrained(out / "work" / "tokenizer")
    stream = load_token_stream(tokenizer, [], out / "work" / "train_tokens.npy")
    return TrainingBatches(RetrievalTasks(tokenizer, stream), stream, TaskMix(answer_weight=7.0), seed=3)


def test_same_step_same_batch_other_step_other_batch(batches):
    a_ids, a_w = batches.batch(5, 4, 256)
    b_ids, b_w = batches.batch(5, 4, 256)
    c_ids, _ = batches.batch(6, 4, 256)
    assert torch.equal(a_ids, b_ids) and torch.equal(a_w, b_w)
    assert not torch.equal(a_ids, c_ids)
    assert a_ids.shape == (4, 257) and a_w.shape == (4, 256)


def test_every_row_starts_with_bos_and_answers_carry_the_weight(batches):
    tokenizer = batches.tasks.tokenizer
    seen_answers = 0
    for step in range(6):
        ids, weights = batches.batch(step, 8, 256)
        assert (ids[:, 0] == tokenizer.bos_token_id).all()
        assert set(weights.unique().tolist()) <= {1.0, 7.0}
        for row in range(ids.shape[0]):
            heavy = (weights[row] == 7.0).nonzero().flatten()
            if len(heavy) == 0:
                continue
            seen_answers += 1
            # every weighted target is a digit, a space, '.' or a newline of an answer that the
            # context states earlier
            answer_text = tokenizer.decode(ids[row, heavy[0] + 1: heavy[0] + 1 + len(heavy)].tolist())
            digits = parse_answer(answer_text)
            assert digits, answer_text
            context = tokenizer.decode(ids[row, : heavy[0] + 1].tolist())
            assert digits in context
    assert seen_answers > 5


def test_mix_must_be_valid():
    with pytest.raises(ValueError):
        TaskMix(plain=0, passkey=0, multikey=0).probabilities()
    assert np.allclose(TaskMix(plain=2, passkey=1, multikey=1).probabilities(), [0.5, 0.25, 0.25])
