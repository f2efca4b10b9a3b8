"""data.pack = "best_fit": whole documents, each placed once, less padding than sequential,
and a resumed stream yields exactly the windows an uninterrupted one does."""

import numpy as np
import pytest

from runtime.data.chat.pack import WholeDocumentStream
from runtime.data.packing import Document

SEQ_LEN = 64
N_DOCS = 200  # per epoch
RNG = np.random.default_rng(0)
# Length-skewed: many short conversations, a few long ones (as real chat data is).
LENGTHS = np.where(RNG.random(N_DOCS) < 0.8, RNG.integers(3, 16, N_DOCS),
                   RNG.integers(30, SEQ_LEN + 1, N_DOCS))


def items(cursor):
    epoch, shard, index = cursor
    while True:
        for i in range(index, N_DOCS):
            yield (epoch, shard, i), (epoch * N_DOCS + i, int(LENGTHS[i]))
        epoch, index = epoch + 1, 0


def encode(batch):
    # Token value = document id + 1, so windows tell which documents they hold.
    return [Document(np.full(n, doc_id + 1, dtype=np.int64)) for doc_id, n in batch]


def stream(pack):
    return WholeDocumentStream(items, encode, SEQ_LEN, pad_id=0, overflow="drop", batch_docs=7,
                               pack=pack, pack_buffer=16)


def placed_ids(tokens, serials):
    """[(document id, length)] per window row, in window order; padding (id 0) left out."""
    out = []
    for row_tokens, row_serials in zip(tokens, serials):
        for serial in np.unique(row_serials):
            ids = np.unique(row_tokens[row_serials == serial])
            assert len(ids) == 1, "a document's tokens are contiguous and its own"
            if ids[0]:
                out.append((int(ids[0]) - 1, int((row_serials == serial).sum())))
    return out


@pytest.mark.parametrize("pack", ["sequential", "best_fit"])
def test_every_document_placed_once_and_whole(pack):
    s = stream(pack)
    tokens, serials, _ = s.next_windows(60)
    placed = placed_ids(tokens, serials)
    ids = [i for i, _ in placed]
    assert len(ids) == len(set(ids)), "no document is placed twice"
    assert all(n == LENGTHS[i % N_DOCS] for i, n in placed), "documents are never split"
    # Every document up to the last placed, but for at most pack_buffer still waiting, is in.
    missing = set(range(max(ids) + 1)) - set(ids)
    assert len(missing) <= (0 if pack == "sequential" else 16)
    if pack == "sequential":
        assert ids == sorted(ids)


def test_best_fit_pads_less_than_sequential():
    shares = {}
    for pack in ("sequential", "best_fit"):
        s = stream(pack)
        s.next_windows(100)
        shares[pack] = s.counts["padding_tokens"] / s.counts["window_tokens"]
    assert shares["best_fit"] < 0.5 * shares["sequential"], shares


@pytest.mark.parametrize("pack", ["sequential", "best_fit"])
@pytest.mark.parametrize("after", [1, 7, 33])
def test_resume_is_exact(pack, after):
    whole = stream(pack)
    expected = whole.next_windows(after + 20)
    first = stream(pack)
    first.next_windows(after)
    resumed = stream(pack)
    resumed.load_state_dict(first.state_dict())
    got = resumed.next_windows(20)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(want[after:], have)
