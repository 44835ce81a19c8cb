"""The federated digits demo runs end to end through the service, learns, and knows when it is unsure."""

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest


def load_demo() -> ModuleType:
    """examples/federated_digits.py as a module (examples/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "federated_digits.py"
    spec = importlib.util.spec_from_file_location("federated_digits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("method", "rounds", "aggregated", "uncertainty"), [
    ("fedavg", 3, [1, 2, 3], "MC_DROPOUT"),
    ("feddc", 4, [2, 4], "MC_DROPOUT"),
    ("swag", 2, [1, 2], "SWAG"),
])
async def test_demo_learns_well_above_chance(method: str, rounds: int, aggregated: list[int],
                                             uncertainty: str, capsys: pytest.CaptureFixture[str]) -> None:
    outcome = await load_demo().run_demo(method, rounds, seed=0)
    # Where a person watches it: the dashboard page of its training, and how to sign in.
    assert re.search(r"watch it live: http://127\.0\.0\.1:\d+/trainings/[0-9a-f-]{36} \(sign in as actor / ",
                     capsys.readouterr().out)
    results = outcome.rounds
    assert [round_ for round_, _ in results] == aggregated
    accuracies = [accuracy for _, accuracy in results]
    assert accuracies[-1] > 0.6, accuracies  # ten classes: chance is 0.1
    # The service's own evaluation (ONNX graph, dropout off) scores each aggregation as the demo's numpy does.
    assert sorted(outcome.server) == aggregated
    for round_, accuracy in results:
        assert outcome.server[round_][0] == pytest.approx(accuracy, abs=2 / 449), (round_, outcome.server)
    report = outcome.uncertainty
    assert report.method == uncertainty
    assert report.digits == 449
    assert report.accuracy > 0.6, report
    # Predictive entropy must flag wrong predictions clearly better than chance (0.5).
    assert report.auroc > 0.6, report
    assert report.entropy_wrong > report.entropy_right, report


def test_uncertainty_report_scores_an_answer() -> None:
    demo = load_demo()
    answer = {"inference": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]],
              "uncertainty": {"predictive_entropy": [0.1, 0.2, 0.6, 0.7]}}
    report = demo.uncertainty_report("MC_DROPOUT", answer, demo.np.array([0, 1, 1, 0]))
    assert (report.digits, report.accuracy, report.wrong) == (4, 0.5, 2)
    assert report.auroc == 1.0  # both wrong rows are the most uncertain
    assert report.entropy_right == pytest.approx(0.15) and report.entropy_wrong == pytest.approx(0.65)
