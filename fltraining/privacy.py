"""Privacy accounting: ε of repeated Gaussian mechanisms, by Google's `dp-accounting` (RDP)."""

import math
from functools import cache

from dp_accounting import dp_event, rdp


@cache
def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after `rounds` self-composed Gaussian mechanisms with this noise multiplier (every participant in
    every round) at δ, as the RDP accountant gives it; infinite without noise, 0 before any round."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


def shown(value: float) -> float | None:
    """ε as JSON holds it: None for no privacy at all (no noise)."""
    return None if math.isinf(value) else value
