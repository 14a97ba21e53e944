"""The probe set that a critic signal must separate before it may accept or rank pairs."""

import pytest

from utils.critic_probe import PROBE_KINDS, build_probe_set, roc_auc, summarize_signal, summarize_signals

PAIRS = [
    {"id": "p1", "instruction": "Name two planets.", "response": "Mars and Venus are two planets of our solar system."},
    {"id": "p2", "instruction": "Describe rain.", "response": "Rain is water falling from clouds in drops."},
    {"id": "p3", "instruction": "Say hi.", "response": "Hi!"},
]


def test_probe_set_construction_is_pinned():
    items = build_probe_set(PAIRS, seed=7)
    assert [(i.id, i.kind) for i in items] == [
        ("p3:matched", "matched"), ("p3:mismatched", "mismatched"), ("p3:looping", "looping"),
        ("p2:matched", "matched"), ("p2:mismatched", "mismatched"), ("p2:truncated", "truncated"), ("p2:looping", "looping"),
        ("p1:matched", "matched"), ("p1:mismatched", "mismatched"), ("p1:truncated", "truncated"), ("p1:looping", "looping"),
    ]
    by_id = {i.id: i for i in items}
    assert by_id["p2:mismatched"].response == PAIRS[0]["response"]  # the next pair in the shuffled cycle
    assert by_id["p1:mismatched"].response == "Hi!" and by_id["p3:mismatched"].response == PAIRS[1]["response"]
    assert by_id["p2:mismatched"].instruction == "Describe rain."
    assert by_id["p1:truncated"].response == "Mars and Venus are two"
    assert by_id["p2:looping"].response == " ".join(["Rain is water falling from clouds in drops."] * 4)
    assert by_id["p1:looping"].response == " ".join(["Mars and Venus are two planets of our"] * 4)
    assert "p3:truncated" not in by_id  # one word cannot be cut in half
    assert all(i.source_id == i.id.split(":")[0] for i in items)


def test_no_pair_is_mismatched_with_its_own_answer():
    pairs = [{"id": f"q{i}", "instruction": f"task {i}", "response": f"answer number {i} here"} for i in range(30)]
    for item in build_probe_set(pairs, seed=3):
        if item.kind == "mismatched":
            assert item.response != f"answer number {item.source_id[1:]} here"
    same = [{"id": "a", "instruction": "x", "response": "same"}, {"id": "b", "instruction": "y", "response": "same"}]
    assert not [i for i in build_probe_set(same, seed=0) if i.kind == "mismatched"]


def test_roc_auc_matches_its_definition():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1], [2, 3]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5  # ties count half
    assert roc_auc([2, 0], [1]) == 0.5
    assert roc_auc([], [1]) is None


def test_summary_gates_on_the_pooled_auc():
    items = build_probe_set(PAIRS, seed=7)
    good = [1.0 if i.kind == "matched" else 0.0 for i in items]
    summary = summarize_signal(items, good, min_auc=0.75)
    assert summary["auc"] == 1.0 and summary["discriminates"]
    assert set(summary["auc_by_kind"]) == set(PROBE_KINDS)
    flat = summarize_signal(items, [0.0] * len(items), min_auc=0.75)
    assert flat["auc"] == 0.5 and not flat["discriminates"]
    both = summarize_signals(items, {"good": good, "flat": [0.0] * len(items)})
    assert both["discriminating"] == ["good"] and both["kinds"]["matched"] == 3
    with pytest.raises(ValueError):
        summarize_signal(items, good[:-1])
