"""The federated digits demo runs end to end through the service and learns."""

import importlib.util
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


@pytest.mark.parametrize(("method", "rounds", "aggregated"), [
    ("fedavg", 3, [1, 2, 3]),
    ("feddc", 4, [2, 4]),
    ("swag", 2, [1, 2]),
])
async def test_demo_learns_well_above_chance(method: str, rounds: int, aggregated: list[int]) -> None:
    results = await load_demo().run(method, rounds, seed=0)
    assert [round_ for round_, _ in results] == aggregated
    accuracies = [accuracy for _, accuracy in results]
    assert accuracies[-1] > 0.6, accuracies  # ten classes: chance is 0.1
