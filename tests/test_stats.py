import math

import pytest

from utils.exit_codes import BadInputError
from utils.stats import EXACT_DISCORDANT_THRESHOLD, benjamini_hochberg, cohens_h, mcnemar_from_table, mcnemar_table, mcnemar_test, wilson_ci

PINNED_TABLE = [[101, 121], [59, 33]]


def _paired(both, base_only, sft_only, neither):
    base = [True] * both + [True] * base_only + [False] * sft_only + [False] * neither
    sft = [True] * both + [False] * base_only + [True] * sft_only + [False] * neither
    return base, sft


def test_mcnemar_pinned_exact():
    result = mcnemar_from_table(PINNED_TABLE, exact=True)
    assert result["p_value"] == pytest.approx(4.434e-06, rel=1e-3)
    assert result["method"] == "exact_binomial"
    assert (result["b"], result["c"]) == (121, 59)


def test_mcnemar_pinned_corrected_chi2():
    result = mcnemar_from_table(PINNED_TABLE, exact=False)
    assert result["statistic"] == pytest.approx(20.67222, rel=1e-6)
    assert result["p_value"] == pytest.approx(5.450095e-06, rel=1e-6)
    assert result["method"] == "chi2_continuity_corrected"


def test_mcnemar_test_builds_table_and_picks_chi2_for_many_discordant():
    base, sft = _paired(*[x for row in PINNED_TABLE for x in row])
    result = mcnemar_test(base, sft)
    assert result["table"] == PINNED_TABLE
    assert result["method"] == "chi2_continuity_corrected"
    assert result["p_value"] == pytest.approx(5.450095e-06, rel=1e-6)
    assert result["favours"] == "base"


@pytest.mark.parametrize("b,c,method", [(3, 5, "exact_binomial"), (12, 12, "exact_binomial"),
                                        (10, 14, "exact_binomial"), (10, 15, "chi2_continuity_corrected"),
                                        (0, 30, "chi2_continuity_corrected")])
def test_method_selection_by_discordant_count(b, c, method):
    assert (b + c < EXACT_DISCORDANT_THRESHOLD) == (method == "exact_binomial")
    assert mcnemar_test(*_paired(40, b, c, 20))["method"] == method


@pytest.mark.parametrize("b,c,favours", [(2, 9, "sft"), (9, 2, "base"), (4, 4, "tie"), (0, 0, "tie")])
def test_favours_direction(b, c, favours):
    result = mcnemar_test(*_paired(10, b, c, 10))
    assert result["favours"] == favours
    assert (result["b"], result["c"]) == (b, c)


def test_no_discordant_pairs_is_p_one():
    for exact in (True, False):
        assert mcnemar_from_table([[10, 0], [0, 5]], exact=exact)["p_value"] == 1.0


def test_mcnemar_rejects_unpaired_and_bad_tables():
    with pytest.raises(BadInputError):
        mcnemar_table([True, False], [True])
    with pytest.raises(BadInputError):
        mcnemar_from_table([[1, 2, 3], [4, 5, 6]], exact=True)
    with pytest.raises(BadInputError):
        mcnemar_from_table([[1, -2], [3, 4]], exact=True)


def test_wilson_pinned():
    low, high = wilson_ci(19, 38)
    assert low == pytest.approx(0.348499283643951, rel=1e-12)
    assert high == pytest.approx(0.651500716356049, rel=1e-12)


def test_wilson_edges():
    low, high = wilson_ci(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 1
    low, high = wilson_ci(10, 10)
    assert 0 < low < 1 and high == pytest.approx(1.0)
    with pytest.raises(BadInputError):
        wilson_ci(0, 0)
    with pytest.raises(BadInputError):
        wilson_ci(11, 10)


def test_cohens_h_pinned_and_sign():
    assert cohens_h(0.5, 0.4) == pytest.approx(0.2013579207903309, rel=1e-12)
    assert cohens_h(0.4, 0.5) == pytest.approx(-0.2013579207903309, rel=1e-12)
    assert cohens_h(0.3, 0.3) == 0.0
    with pytest.raises(BadInputError):
        cohens_h(1.2, 0.5)


def test_benjamini_hochberg_known_example():
    # sorted p (0.005, 0.01, 0.03, 0.04) * m/rank = (0.02, 0.02, 0.04, 0.04) after the step-up minimum
    result = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert result["adjusted"] == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert result["reject"] == [True, True, True, True]
    result = benjamini_hochberg([0.01, 0.02, 0.03, 0.5], alpha=0.05)
    assert result["adjusted"] == pytest.approx([0.04, 0.04, 0.04, 0.5])
    assert result["reject"] == [True, True, True, False]
    assert all(isinstance(x, bool) for x in result["reject"])


def test_benjamini_hochberg_empty():
    assert benjamini_hochberg([]) == {"adjusted": [], "reject": [], "alpha": 0.05}


def test_results_are_plain_python_numbers():
    result = mcnemar_from_table(PINNED_TABLE, exact=True)
    assert type(result["p_value"]) is float and type(result["statistic"]) is float
    assert not math.isnan(result["p_value"])
