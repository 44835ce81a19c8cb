"""Attack demo: one of five clients sends its update sign-flipped and ×10 every round.

The federated digits demo (examples/federated_digits.py), FedAvg, run seven times on the service: without
the attacker (the honest run), then with it under each aggregation rule — `mean`, `median`,
`trimmed_mean` (β = 0.2), `krum` (f = 1) and `multi_krum` (f = 1, m = 3) — and once more with central differential privacy (clip norm
C, noise multiplier z). Prints the held-out accuracy after each round: the mean collapses, the robust rules
stay close to the honest run (after the last round and over the last five); then the private run's accuracy and the ε it spent.

    python examples/attack_demo.py [--rounds 20] [--seed 0] [--alpha 100] [--clip-norm 2] [--noise-multiplier 0.1]
"""

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from federated_digits import run_demo

ATTACKER = 4
TAIL = 5  # rounds averaged for the comparison with the honest run
RULES: list[tuple[str, dict[str, Any]]] = [
    ("mean", {"rule": "mean"}),
    ("median", {"rule": "median"}),
    ("trimmed_mean", {"rule": "trimmed_mean", "trim_fraction": 0.2}),
    ("krum", {"rule": "krum", "byzantine": 1}),
    ("multi_krum", {"rule": "multi_krum", "byzantine": 1, "select": 3}),
]


async def accuracies(rounds: int, seed: int, options: dict[str, Any], attacker: int | None,
                     alpha: float) -> dict[int, float]:
    """Held-out accuracy after each aggregation of one FedAvg run."""
    outcome = await run_demo("fedavg", rounds, seed, options=options, attacker=attacker, alpha=alpha)
    return dict(outcome.rounds)


def tail_mean(column: dict[int, float]) -> float:
    """The mean accuracy of the last `TAIL` rounds."""
    rounds = sorted(column)[-TAIL:]
    return sum(column[round_] for round_ in rounds) / len(rounds)


def main() -> None:
    """Run the honest, the attacked and the private trainings and print their accuracy per round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip-norm", type=float, default=2.0)
    parser.add_argument("--noise-multiplier", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=100.0,
                        help="Dirichlet α of the clients' label shares: 100 is close to IID, 0.5 (make demo's) far from it")
    args = parser.parse_args()
    columns = {"honest (mean)": asyncio.run(accuracies(args.rounds, args.seed, {}, None, args.alpha))}
    for name, rule in RULES:
        columns[f"attacked, {name}"] = asyncio.run(
            accuracies(args.rounds, args.seed, {"aggregation": rule}, ATTACKER, args.alpha))
    print(f"\nheld-out accuracy after each round (label shares Dirichlet α = {args.alpha}); "
          f"client{ATTACKER} sends −10× its update from round 0 on")
    print("| round | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for round_ in sorted(columns["honest (mean)"]):
        print(f"| {round_} | " + " | ".join(f"{column.get(round_, float('nan')):.3f}" for column in columns.values()) + " |")
    # One round's accuracy moves by a point or two from round to round: compare the last five rounds' mean too.
    honest_column = columns["honest (mean)"]
    honest, honest_tail = honest_column[max(honest_column)], tail_mean(honest_column)
    for name, column in columns.items():
        if name.startswith("attacked"):
            last, tail = column[max(column)], tail_mean(column)
            print(f"{name}: {last:.3f} after the last round ({100 * (last - honest):+.1f} points against the honest "
                  f"run), {tail:.3f} over the last {TAIL} rounds ({100 * (tail - honest_tail):+.1f} points)")
    privacy = {"clip_norm": args.clip_norm, "noise_multiplier": args.noise_multiplier}
    outcome = asyncio.run(run_demo("fedavg", args.rounds, args.seed, options={"differential_privacy": privacy},
                                   alpha=args.alpha))
    print(f"\ncentral differential privacy, no attacker, C = {args.clip_norm}, z = {args.noise_multiplier}")
    print("| round | accuracy |\n|---:|---:|")
    for round_, accuracy in outcome.rounds:
        print(f"| {round_} | {accuracy:.3f} |")
    spent = (outcome.privacy or {}).get("epsilon")
    delta = (outcome.privacy or {}).get("delta")
    print(f"ε = {'∞ (no noise)' if spent is None else f'{spent:.3g}'} at δ = {delta} after {len(outcome.rounds)} rounds")


if __name__ == "__main__":
    main()
