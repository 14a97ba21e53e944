"""Best-of-N selection and the critic signals' proof: cheap filters, the acceptance rule of each trusted
signal, ranking by the most discriminating one, and the probe AUCs on a tiny model that discriminates
and on one that does not."""

import json
from types import SimpleNamespace

import pytest

CONFIG = SimpleNamespace(confidence_threshold=1.0, relevance_min=0.0, num_candidates=3, min_signal_auc=0.75, seed=7)


def _candidate(index, *, relevance=0.5, pmi=5.0, margin=2.0, direct=2.0, reasons=(), scored=True):
    signals = {"ab_margin": margin, "ab_margin_direct": direct, "relevance": relevance, "relevance_total": pmi} if scored else {}
    return {"id": f"r00-00001-c{index}", "instruction_id": "r00-00001", "candidate_index": index, "signals": signals,
            "filter_reasons": list(reasons), "pair_critic": {} if scored else None, "relevance": {} if scored else None}


def _signals(trusted, aucs=None):
    from utils.response_selection import CriticSignals

    aucs = aucs or {name: (0.9 if name in trusted else 0.5) for name in ("ab_margin", "ab_margin_direct", "relevance", "relevance_total")}
    return CriticSignals.from_aucs(aucs, 0.75, "test")


def test_cheap_filters_in_order():
    from utils.response_selection import filter_reasons

    ok = {"response": "Fine.", "raw_response": " Fine.", "finish_reason": "stop"}
    assert filter_reasons(ok) == []
    assert filter_reasons({**ok, "response": "", "raw_response": ""}) == ["empty_response"]
    assert filter_reasons({**ok, "raw_response": "the cat sat " * 3, "finish_reason": "length"}) == ["runaway", "token_limit"]
    assert filter_reasons({**ok, "response": "Hi <start_of_turn> x"}) == ["chat_marker"]
    assert filter_reasons({**ok, "response": "Done ### END"}) == ["delimiter_leak"]
    assert filter_reasons(ok, [{"family": "lowercase", "passed": False, "reason": "x"}]) == ["constraint_failed"]


def test_trust_follows_the_aucs_and_the_best_one_ranks():
    from utils.response_selection import CriticSignals

    signals = CriticSignals.from_aucs({"ab_margin": 0.5, "ab_margin_direct": None, "relevance": 0.8, "relevance_total": 0.9}, 0.75, "t")
    assert signals.trusted == ("relevance", "relevance_total") and signals.rank_by == "relevance_total"
    tie = CriticSignals.from_aucs({"ab_margin": 0.8, "relevance": 0.8}, 0.75, "t")
    assert tie.rank_by == "ab_margin"  # equal AUCs: by name
    none = CriticSignals.from_aucs({"ab_margin": 0.74, "relevance": None}, 0.75, "t")
    assert none.trusted == () and none.rank_by is None
    assert none.failure() == "no critic signal discriminates on the probe set (needs AUC >= 0.75): ab_margin 0.740, relevance n/a"


def test_the_best_passing_candidate_wins_by_the_ranking_signal():
    from utils.response_selection import choose

    candidates = [_candidate(0, pmi=3.0), _candidate(1, pmi=9.0, reasons=["token_limit"]), _candidate(2, pmi=6.0),
                  _candidate(3, pmi=6.0)]
    winner, accepted, reasons, selection = choose(candidates, _signals(["relevance_total"]), CONFIG)
    assert winner["candidate_index"] == 2 and accepted and reasons == []  # c1 ranks higher but fails a filter; c2 beats c3 on the tie
    assert selection == {"candidates": 4, "passing": 3, "winner_index": 2, "ranked_by": "relevance_total",
                         "trusted_signals": ["relevance_total"], "reason": "best of 3 passing (of 4) by relevance_total"}


def test_only_trusted_signals_accept():
    from utils.response_selection import choose

    low_margin = [_candidate(0, margin=-3.0, direct=-3.0)]
    assert choose(low_margin, _signals(["relevance"]), CONFIG)[1] is True  # an untrusted critic rejects nothing
    winner, accepted, reasons, selection = choose(low_margin, _signals(["relevance", "ab_margin"]), CONFIG)
    assert not accepted and reasons == ["low_ab_margin"] and selection["reason"] == "no candidate passed: c0 low_ab_margin"
    irrelevant = [_candidate(0, relevance=0.0, pmi=0.0), _candidate(1, relevance=-0.2, pmi=-2.0)]
    winner, accepted, reasons, _ = choose(irrelevant, _signals(["relevance_total"]), CONFIG)
    assert not accepted and reasons == ["low_relevance_total"] and winner["candidate_index"] == 0  # relevance <= 0 rejects
    empty = [_candidate(0, reasons=["empty_response"], scored=False)]
    assert choose(empty, _signals(["relevance"]), CONFIG)[2] == ["empty_response"]


def test_the_pilot_verdict_is_read_back_or_refused():
    from utils.exit_codes import RefusedError
    from utils.response_selection import signals_from_pilot_manifest

    record = _signals(["relevance"]).as_record()
    signals = signals_from_pilot_manifest({"critic_signals": record}, "pilot.json")
    assert signals.trusted == ("relevance",) and signals.source == "pilot manifest pilot.json"
    for bad in (None, {**record, "trusted": ["ab_margin"]}, {**record, "aucs": {"mystery": 0.9}}, {**record, "trusted": []},
                {**record, "aucs": {"relevance": 0.5}, "trusted": []}):
        with pytest.raises(RefusedError, match="no usable critic signal verdict"):
            signals_from_pilot_manifest({"critic_signals": bad}, "pilot.json")


def test_a_swapped_critique_is_recorded_as_one(trained_model_dir):
    """The decision said label_swap false when the caller asked for the swapped reading (fixed)."""
    from utils.clean_model_loader import CleanModelLoader
    from utils.instruction_critic import InstructionCritic

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    critic = InstructionCritic(model, tokenizer, label_swap=False)
    [swapped] = critic.critique_pairs_batch([("Name two planets.", "Mars and Venus.")], label_swap=True)
    [plain] = critic.critique_pairs_batch([("Name two planets.", "Mars and Venus.")])
    assert swapped["label_swap"] is True and "swapped_margin" in swapped
    assert plain["label_swap"] is False and "swapped_margin" not in plain
    assert swapped["logp_a"] == pytest.approx(plain["logp_a"], abs=1e-5)


# -- the probe on real tiny models ----------------------------------------------------------------
_SUBJECTS = ["cats", "dogs", "rivers", "the moon", "bread", "music", "trees", "rain", "books", "the sun", "birds", "apples"]
_TASKS = ["Describe {s} in one sentence.", "Write a short line about {s}.", "Give a tip about {s}.", "Explain why {s} matter."]


def _probe_pairs():
    """Pairs in the trained tiny model's own answer style, naming the subject last."""
    return [{"id": f"h{i:02d}", "instruction": _TASKS[i % 4].format(s=s), "response": f"People often talk about {s}."}
            for i, s in enumerate(_SUBJECTS)]


def _probe(model_dir):
    from utils.clean_model_loader import CleanModelLoader
    from utils.critic_probe import build_probe_set, summarize_signals
    from utils.instruction_critic import InstructionCritic
    from utils.response_selection import SIGNALS, signal_values

    model, tokenizer, _ = CleanModelLoader(str(model_dir), run_sentinels=False).load()
    critic = InstructionCritic(model, tokenizer, batch_size=8)
    items = build_probe_set(_probe_pairs(), seed=7)
    asked = [(item.instruction, item.response) for item in items]
    values = [signal_values(d, r) for d, r in zip(critic.critique_pairs_batch(asked, label_swap=True),
                                                  critic.relevance_scores(asked), strict=True)]
    return summarize_signals(items, {name: [v[name] for v in values] for name in SIGNALS}, min_auc=0.65)


def test_the_probe_trusts_relevance_on_a_model_that_discriminates(trained_model_dir):
    """The trained tiny model names an instruction's subject in its answers, so the relevance signals tell
    its answers from another pair's (measured once, pinned here)."""
    summary = _probe(trained_model_dir)
    aucs = {name: s["auc"] for name, s in summary["signals"].items()}
    assert aucs == pytest.approx(PINNED_TRAINED_AUCS, abs=0.03)
    assert summary["signals"]["relevance"]["auc_by_kind"]["mismatched"] > 0.8
    assert summary["signals"]["relevance_total"]["auc_by_kind"]["mismatched"] > 0.8
    assert "relevance_total" in summary["discriminating"]
    assert summary["kinds"] == {"matched": 12, "mismatched": 12, "truncated": 12, "looping": 12}


def test_the_probe_trusts_nothing_on_a_random_model(tiny_model_dir):
    summary = _probe(tiny_model_dir)
    for name, signal in summary["signals"].items():
        assert abs(signal["auc"] - 0.5) < 0.15, (name, signal)
    assert summary["signals"]["relevance"]["auc_by_kind"]["mismatched"] == pytest.approx(0.5, abs=0.1)
    assert summary["discriminating"] == []


# Measured on the stored trained tiny model (tiny_models.TRAINED_FIXTURE) on 2026-11-28; the same to four places under
# PyTorch's avx2, avx512 and default kernels.
PINNED_TRAINED_AUCS = {"ab_margin": 0.6343, "ab_margin_direct": 0.5347, "relevance": 0.6227, "relevance_total": 0.7546}


def test_measure_signals_writes_the_probe_and_reads_it_back(trained_model_dir, tmp_path, monkeypatch):
    from utils.clean_model_loader import CleanModelLoader
    from utils.instruction_critic import InstructionCritic
    from utils.response_selection import PROBE_FILE, measure_signals, signal_values

    model, tokenizer, _ = CleanModelLoader(str(trained_model_dir), run_sentinels=False).load()
    critic = InstructionCritic(model, tokenizer, batch_size=8)
    scored = []
    for pair in _probe_pairs():
        [decision] = critic.critique_pairs_batch([(pair["instruction"], pair["response"])], label_swap=True)
        [relevance] = critic.relevance_scores([(pair["instruction"], pair["response"])])
        for index, reasons in ((0, ["runaway"]), (1, [])):  # the first candidate fails a probe filter: the second enters
            scored.append({"instruction_id": pair["id"], "candidate_index": index, "round": 0, "instruction": pair["instruction"],
                           "response": pair["response"], "filter_reasons": reasons, "signals": signal_values(decision, relevance)})
    config = SimpleNamespace(seed=7, min_signal_auc=0.65)
    signals = measure_signals(critic, tmp_path, scored, config)
    saved = json.loads((tmp_path / PROBE_FILE).read_text())
    assert saved["pairs"] == 12 and len(saved["items"]) == 48 and saved["trusted"] == list(signals.trusted)
    assert signals.aucs == pytest.approx(PINNED_TRAINED_AUCS, abs=0.03)  # matched items reuse their candidates' scores

    def no_scoring(*args, **kwargs):
        raise AssertionError("a resumed run reads the probe back")

    monkeypatch.setattr(critic, "relevance_scores", no_scoring)
    assert measure_signals(critic, tmp_path, scored, config) == signals
