"""The two 95% intervals (over episodes, over seeds) and the one mean ± CI formatter."""

import math
import statistics

import pytest
import torch

from fewshot_cli.intervals import format_mean_ci, normal_ci95, student_t_ci95, t95


def test_t95_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy comes with the [dev] extra")
    for dof in range(1, 300):
        assert t95(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-4), dof


def test_over_episodes_the_interval_is_normal_over_seeds_student_t():
    values = [0.5, 0.7, 0.6, 0.9]
    standard_error = statistics.stdev(values) / math.sqrt(4)
    mean, half = normal_ci95(torch.tensor(values))
    assert (mean, half) == pytest.approx((0.675, 1.96 * standard_error))
    mean, half = student_t_ci95(values)
    assert (mean, half) == pytest.approx((0.675, 3.1824 * standard_error))  # t(0.975, 3 dof)


def test_one_value_has_no_half_width_and_none_no_mean():
    assert normal_ci95(torch.tensor([0.25]))[0] == 0.25
    assert math.isnan(normal_ci95(torch.tensor([0.25]))[1])
    assert student_t_ci95([0.25])[0] == 0.25 and math.isnan(student_t_ci95([0.25])[1])
    assert all(math.isnan(x) for x in student_t_ci95([]))


@pytest.mark.parametrize(("args", "options", "text"), [
    ((0.912, 0.0055, "accuracy"), {}, "91.20% ± 0.55%"),
    ((0.912, 0.0055, "accuracy"), {"unit": False}, "91.20 ± 0.55"),
    ((7.406, 0.123, "total_reward"), {}, "7.41 ± 0.12"),
    ((0.912, None, "accuracy"), {"alone": " ± n/a (one episode)"}, "91.20% ± n/a (one episode)"),
    ((0.912, math.nan, "accuracy"), {}, "91.20%"),
    ((None, None, "accuracy"), {}, "—"),
    ((math.nan, 0.1, "accuracy"), {}, "—"),
    ((48.7, 1.84, None), {"decimals": 1}, "48.7 ± 1.8"),
])
def test_one_formatter_prints_every_figure(args, options, text):
    assert format_mean_ci(*args, **options) == text
