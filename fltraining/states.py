"""Enum codes of the seed and the training state machine as a table."""

from enum import StrEnum


class TrainingState(StrEnum):
    """Training state codes, stored and sent as the seed's one-letter strings."""

    INITIAL = "I"
    ONGOING = "O"
    COMPLETED = "C"
    ERROR = "E"
    SWAG_ROUND = "S"


class AggregationMethod(StrEnum):
    """Aggregation method codes of the seed."""

    FED_AVG = "FedAvg"
    FED_DC = "FedDC"
    FED_PROX = "FedProx"


class UncertaintyMethod(StrEnum):
    """Uncertainty method codes of the seed."""

    NONE = "NONE"
    ENSEMBLE = "ENSEMBLE"
    MC_DROPOUT = "MC_DROPOUT"
    SWAG = "SWAG"


class Phase(StrEnum):
    """Where a running training is within its current round."""

    UPDATES = "updates"
    AGGREGATING = "aggregating"
    TESTING = "testing"
    SWAG = "swag"


class Transition(StrEnum):
    """Named moves of the state machine."""

    START = "start"
    CANCEL = "cancel"
    SWAG_ROUND = "swag_round"
    RESUME = "resume"
    COMPLETE = "complete"
    FAIL = "fail"


S = TrainingState

# transition -> (states it may start from, state it leads to)
TRANSITIONS: dict[Transition, tuple[frozenset[TrainingState], TrainingState]] = {
    Transition.START: (frozenset({S.INITIAL}), S.ONGOING),
    Transition.CANCEL: (frozenset({S.INITIAL, S.ONGOING, S.SWAG_ROUND}), S.ERROR),
    Transition.SWAG_ROUND: (frozenset({S.ONGOING}), S.SWAG_ROUND),
    Transition.RESUME: (frozenset({S.SWAG_ROUND}), S.ONGOING),
    Transition.COMPLETE: (frozenset({S.ONGOING, S.SWAG_ROUND}), S.COMPLETED),
    Transition.FAIL: (frozenset({S.INITIAL, S.ONGOING, S.SWAG_ROUND}), S.ERROR),
}

# States in which the participant list may still change.
PARTICIPANTS_EDITABLE: frozenset[TrainingState] = frozenset({S.INITIAL, S.ONGOING, S.SWAG_ROUND})

# States in which the round engine runs.
RUNNING: frozenset[TrainingState] = frozenset({S.ONGOING, S.SWAG_ROUND})

# States in which the training's settings may be patched.
PATCHABLE: frozenset[TrainingState] = frozenset({S.INITIAL})
