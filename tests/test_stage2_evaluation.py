"""The evaluation of any two adapters (evaluate_stage1_sft.py --reference-checkpoint): the three paired
comparisons, their gate and labels, the three-way summary and plot. No model: paired outcomes are
made up here; test_stage2_chain.py runs the script end to end."""

from __future__ import annotations

from utils import evaluation as ev


def _pairs(cells: dict[str, tuple[int, int, int, int]]) -> list[dict]:
    """{type: (both, first only, second only, neither)} -> paired outcomes."""
    rows = []
    for name, (both, first, second, neither) in cells.items():
        outcomes = [(True, True)] * both + [(True, False)] * first + [(False, True)] * second + [(False, False)] * neither
        rows += [{"id": f"{name}-{i}", "type": name, "scored": True, "base_success": a, "sft_success": b} for i, (a, b) in enumerate(outcomes)]
    return rows


def _comparisons() -> dict:
    made = {"adapter_vs_base": _pairs({"factual": (5, 1, 30, 4), "instruction_following": (2, 0, 20, 18)}),
            "adapter_vs_reference": _pairs({"factual": (20, 2, 15, 3), "instruction_following": (5, 1, 17, 17)}),
            "reference_vs_base": _pairs({"factual": (5, 1, 17, 17), "instruction_following": (2, 0, 4, 34)})}
    labels = {"adapter_vs_base": ("base", "adapter"), "adapter_vs_reference": ("reference", "adapter"),
              "reference_vs_base": ("base", "reference")}
    assert set(made) == set(ev.COMPARISONS)
    return {key: {"statistics": ev.paired_statistics(pairs, alpha=0.01), "labels": list(labels[key])} for key, pairs in made.items()}


def test_gate_names_the_compared_models():
    comparisons = _comparisons()
    clean = {"found": False, "n_contaminated": 0, "overlaps": []}
    ahead = ev.gate_decision(comparisons["adapter_vs_reference"]["statistics"], clean, 0.01, False, labels=("reference", "adapter"))
    assert ahead["passed"] and ahead["compared"] == {"first": "reference", "second": "adapter"}
    assert "adapter-only successes > reference-only successes" in ahead["rule"]
    behind = ev.paired_statistics(_pairs({"factual": (5, 20, 2, 13)}), alpha=0.01)
    reasons = ev.gate_decision(behind, clean, 0.01, False, labels=("reference", "adapter"))["reasons"]
    assert reasons[0] == "adapter is not ahead (reference-only b=20, adapter-only c=2)"
    # The default labels keep Stage 1's wording.
    assert ev.gate_decision(behind, clean, 0.01, False)["reasons"][0] == "SFT is not ahead (base-only b=20, SFT-only c=2)"


def test_three_way_summary_and_plot(tmp_path):
    comparisons = _comparisons()
    statistics = comparisons["adapter_vs_base"]["statistics"]
    gate = ev.gate_decision(comparisons["adapter_vs_reference"]["statistics"], None, 0.01, False, labels=("reference", "adapter"))
    text = ev.format_summary(statistics, gate, None, ["header"], comparisons=comparisons)
    assert text.index("three-way") < text.index("adapter vs base:") < text.index("adapter vs reference:") < text.index("reference vs base:")
    row = next(line for line in text.splitlines() if line.startswith("instruction_following") and "%" in line and "[" not in line)
    # base 2/40, reference 6/40 (from reference vs base), adapter 22/40; then the three p-values.
    assert row.split()[1:4] == ["5.0%", "15.0%", "55.0%"]
    assert "per family" not in text and "b = successes of the first model only" in text
    plain = ev.format_summary(statistics, gate, None, ["header"])
    assert "three-way" not in plain and "b = base-only successes, c = SFT-only successes" in plain
    png = ev.plot_success_rates(statistics, tmp_path / "rates.png", reference_statistics=comparisons["reference_vs_base"]["statistics"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_flag_is_optional_and_parsed():
    import evaluate_stage1_sft as script

    assert script.parse_args([]).reference_checkpoint is None
    assert str(script.parse_args(["--reference-checkpoint", "checkpoints/stage1_sft/final_adapter"]).reference_checkpoint).endswith("final_adapter")
