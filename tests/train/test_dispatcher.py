"""The dispatcher's choices, the data order and positions, and mixed-batch collation."""

from __future__ import annotations

import torch

from mlora.data import TokenizedExample
from mlora.train.data import AdapterData, Position, collate_mixed, target_count
from mlora.train.dispatcher import Candidate, Dispatcher, padding_cost


def example(n: int, targets: int = 1) -> TokenizedExample:
    ids = list(range(10, 10 + n))
    return TokenizedExample("t", ids, [-100] * (n - targets) + ids[n - targets:])


# ---------------------------------------------------------------------------- dispatcher
def test_candidates_bound_how_many_are_loaded():
    d = Dispatcher(["a", "b", "c"])
    assert d.to_load(2) == ["a", "b"] and d.waiting == ["c"]
    assert d.to_load(2) == []
    d.retire("a")
    assert d.to_load(2) == ["c"] and d.active == ["b", "c"]


def test_none_strategy_is_round_robin():
    d = Dispatcher(["a", "b", "c"])
    d.to_load(3)
    cands = [Candidate(n, 2, 10) for n in "abc"]
    seen = []
    for _ in range(6):
        chosen = d.choose(cands, 2, "none")
        d.record(chosen)
        seen.append(chosen)
    assert seen[:3] == [["a", "b"], ["a", "c"], ["b", "c"]]  # rows stay in load order
    for name in "abc":  # nobody waits more than one step
        assert all(name in seen[i] or name in seen[i + 1] for i in range(5))
    assert [sum(name in s for s in seen) for name in "abc"] == [4, 4, 4]


def test_optim_strategy_groups_similar_lengths_without_starving_anyone():
    d = Dispatcher(["short", "long", "short2", "long2"])
    d.to_load(4)
    cands = [Candidate("short", 2, 10), Candidate("long", 2, 50), Candidate("short2", 2, 12), Candidate("long2", 2, 48)]
    first = d.choose(cands, 2, "optim")
    assert first == ["short", "short2"]  # anchored on the longest-waiting (load order), least padding
    d.record(first)
    second = d.choose(cands, 2, "optim")
    assert second == ["long", "long2"]
    d.record(second)
    assert padding_cost([cands[0], cands[2]]) == 2 * 2 and padding_cost([cands[0], cands[1]]) == 2 * 40
    # An odd-one-out still trains at least once every len(active) steps (it becomes the anchor).
    cands[3] = Candidate("long2", 2, 11)
    seen = []
    for _ in range(8):
        chosen = d.choose(cands, 2, "optim")
        d.record(chosen)
        seen.append(chosen)
    for name in ("short", "long", "short2", "long2"):
        assert all(any(name in s for s in seen[i:i + 4]) for i in range(5)), (name, seen)


def test_dispatcher_state_round_trips():
    d = Dispatcher(["a", "b", "c"])
    d.to_load(2)
    d.record(["a"])
    again = Dispatcher.from_state(d.state_dict())
    assert again == d


# ---------------------------------------------------------------------------- data order
def test_epoch_order_is_a_seeded_permutation():
    data = AdapterData([example(3 + i) for i in range(10)], batch_size=4, micro_batch_size=2, num_epochs=2,
                       group_by_length=False, seed=5)
    same = AdapterData(data.examples, batch_size=4, micro_batch_size=2, num_epochs=2, group_by_length=False, seed=5)
    assert sorted(data.order(0)) == list(range(10))
    assert data.order(0) == same.order(0) and data.order(1) == same.order(1)
    assert data.order(0) != data.order(1)


def test_group_by_length_sorts_within_mega_batches():
    data = AdapterData([example(3 + (7 * i) % 11) for i in range(12)], batch_size=2, micro_batch_size=1,
                       num_epochs=1, group_by_length=True, seed=1)
    lengths = [data.lengths[i] for i in data.order(0)]
    assert lengths == sorted(lengths, reverse=True)  # 12 examples fit in one mega-batch of 50 batches
    assert sorted(data.order(0)) == list(range(12))


def test_positions_walk_micro_batches_batches_and_epochs():
    data = AdapterData([example(4, targets=i + 1) for i in range(3)], batch_size=2, micro_batch_size=1, num_epochs=2,
                       group_by_length=False, seed=0)
    assert data.steps_per_epoch == 2 and data.total_steps == 4
    pos, walked = Position(), []
    while not data.finished(pos):
        walked.append((pos, len(data.micro_indices(pos)), data.batch_targets(pos)))
        pos, done = data.advance(pos)
        walked[-1] += (done,)
    assert [w[0] for w in walked] == [Position(0, 0, 0), Position(0, 0, 1), Position(0, 1, 0),
                                      Position(1, 0, 0), Position(1, 0, 1), Position(1, 1, 0)]
    assert [w[3] for w in walked] == [False, True, True, False, True, True]
    # A batch's denominator is the target tokens of all its examples (position 0 never predicted).
    order = data.order(0)
    assert walked[0][2] == sum(target_count(data.examples[i]) for i in order[:2])
    assert data.micro_batches_done(Position(1, 1, 0)) == 5


def test_target_count_skips_the_first_position():
    assert target_count(TokenizedExample("t", [1, 2, 3], [1, 2, 3])) == 2
    assert target_count(TokenizedExample("t", [1, 2, 3], [-100, -100, 3])) == 1


# ---------------------------------------------------------------------------- collation
def test_collate_lays_out_adapters_contiguously_with_their_own_padding_side():
    a = [example(3), example(5)]
    b = [example(2)]
    batch = collate_mixed([("a", a, "right"), ("b", b, "left")], pad_id=0)
    assert batch.input_ids.shape == (3, 5) and batch.names == ["a", "b"]
    assert [(s.name, s.start, s.end) for s in batch.layout.segments] == [("a", 0, 2), ("b", 2, 3)]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch.input_ids[2].tolist() == [0, 0, 0, 10, 11]
    assert batch.labels[0].tolist() == [-100, -100, 12, -100, -100]
    assert torch.equal(batch.labels[batch.attention_mask == 0], torch.full((5,), -100))
    assert batch.tokens == 10
