"""Rules for the free-form `options` object of a training."""

from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

FORBIDDEN_KEY_HINT = "keys may not start with '$' or contain '.' or NUL"
UNPAIRED_SURROGATE = "string holds an unpaired surrogate, which is not Unicode text"
# Keeps target_num_updates x period far inside a 64-bit integer (BSON cannot store more).
MAX_DAISY_CHAIN_PERIOD = 1_000_000
DEFAULT_FEDPROX_MU = 0.01
MAX_ROUND_TIMEOUT_SECONDS = 366 * 86_400
MAX_UNCERTAINTY_PASSES = 1000
MAX_BYZANTINE = 1_000_000


class UncertaintyOptions(BaseModel):
    """The typed `options.uncertainty` object."""

    model_config = ConfigDict(extra="allow")

    N: StrictInt = Field(default=10, ge=1, le=MAX_UNCERTAINTY_PASSES)
    softmax: StrictBool = False
    seed: StrictInt | None = Field(default=None, ge=0, le=2**31 - 1)


class EvaluationOptions(BaseModel):
    """The typed `options.evaluation` object: the held-out data set the global model is measured on."""

    model_config = ConfigDict(extra="forbid")

    # Text, not a UUID type: options are stored as the client sent them (JSON), and the database's
    # validator would otherwise demand a binary UUID.
    dataset: str = Field(pattern=r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")

    @property
    def dataset_id(self) -> UUID:
        """The data set's id."""
        return UUID(self.dataset)


class MeanRule(BaseModel):
    """`{"rule": "mean"}`: the sample-weighted mean (the default)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["mean"]


class MedianRule(BaseModel):
    """`{"rule": "median"}`: the coordinate-wise median of the updates, unweighted."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["median"]


class TrimmedMeanRule(BaseModel):
    """`{"rule": "trimmed_mean", "trim_fraction": β}`: per coordinate, the unweighted mean without the ⌊β·n⌋
    smallest and largest values (β defaults to Flower's FedTrimmedAvg's 0.2)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["trimmed_mean"]
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5, strict=True, allow_inf_nan=False)] = 0.2


class KrumRule(BaseModel):
    """`{"rule": "krum", "byzantine": f}`: the update with the lowest Krum score (needs n ≥ 2f + 3)."""

    model_config = ConfigDict(extra="forbid")

    rule: Literal["krum"]
    byzantine: StrictInt = Field(default=0, ge=0, le=MAX_BYZANTINE)

    def smallest_n(self) -> int:
        """The fewest updates the rule can combine."""
        return 2 * self.byzantine + 3


class MultiKrumRule(KrumRule):
    """`{"rule": "multi_krum", "byzantine": f, "select": m}`: the sample-weighted mean of the m updates with
    the lowest Krum scores (1 ≤ m ≤ n − f)."""

    rule: Literal["multi_krum"]  # type: ignore[assignment]
    select: StrictInt = Field(ge=1, le=MAX_BYZANTINE)

    def smallest_n(self) -> int:
        """The fewest updates the rule can combine."""
        return max(2 * self.byzantine + 3, self.select + self.byzantine)


type AggregationRule = Annotated[MeanRule | MedianRule | TrimmedMeanRule | KrumRule | MultiKrumRule,
                                 Field(discriminator="rule")]


# Flower 1.42's defaults for FedAdam, FedYogi and FedAdagrad: (eta, beta_1, beta_2, tau).
OPTIMIZER_DEFAULTS: dict[str, tuple[float, float, float, float]] = {
    "adam": (0.1, 0.9, 0.99, 1e-9),
    "yogi": (0.01, 0.9, 0.99, 1e-3),
    "adagrad": (0.1, 0.0, 0.0, 1e-9),
}
UnitInterval = Annotated[float, Field(ge=0, lt=1, strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, le=1e6, strict=True, allow_inf_nan=False)]


class ServerOptimizer(BaseModel):
    """`options.server_optimizer` (Reddi et al., 2021): how the combined update moves the global model."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["adam", "yogi", "adagrad"]
    lr: Positive | None = None
    beta1: UnitInterval | None = None
    beta2: UnitInterval | None = None
    tau: Positive | None = None

    def resolved(self) -> tuple[float, float, float, float]:
        """(η, β₁, β₂, τ): the values given, else Flower 1.42's defaults for this optimizer."""
        defaults = OPTIMIZER_DEFAULTS[self.name]
        given = (self.lr, self.beta1, self.beta2, self.tau)
        lr, beta1, beta2, tau = (default if value is None else value for value, default in zip(given, defaults,
                                                                                                 strict=True))
        return lr, beta1, beta2, tau


class DifferentialPrivacy(BaseModel):
    """`options.differential_privacy`: server-side fixed clipping with Gaussian noise (DP-FedAvg)."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: Positive
    noise_multiplier: Annotated[float, Field(ge=0, le=1e6, strict=True, allow_inf_nan=False)]
    delta: Annotated[float, Field(gt=0, lt=1, strict=True, allow_inf_nan=False)] = 1e-5
    target_epsilon: Positive | None = None
    # Reproducible noise, for tests only: refused unless FLTRAINING_DP_ALLOW_SEED is set.
    seed: StrictInt | None = Field(default=None, ge=0, le=2**31 - 1)


class TrainingOptions(BaseModel):
    """Training options: known keys are typed, any other JSON key is kept as sent."""

    model_config = ConfigDict(extra="allow")

    daisy_chain_period: StrictInt | None = Field(default=None, ge=0, le=MAX_DAISY_CHAIN_PERIOD)
    uncertainty: UncertaintyOptions | None = None
    skip_model_tests: StrictBool | None = None
    fedprox_mu: Annotated[float, Field(ge=0, le=1e6, strict=True, allow_inf_nan=False)] | None = None
    round_timeout_seconds: StrictInt | None = Field(default=None, ge=1, le=MAX_ROUND_TIMEOUT_SECONDS)
    min_updates: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    keep_local_models: StrictBool | None = None
    evaluation: EvaluationOptions | None = None
    aggregation: AggregationRule | None = None
    server_optimizer: ServerOptimizer | None = None
    differential_privacy: DifferentialPrivacy | None = None

    def as_stored(self) -> dict[str, Any]:
        """Return the object exactly as the client sent it (unset known keys stay absent)."""
        return self.model_dump(mode="json", exclude_unset=True)


def is_forbidden_key(key: str) -> bool:
    """Whether a key would be read by MongoDB as an operator or a path."""
    return key.startswith("$") or "." in key or "\x00" in key


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def is_unicode_text(text: str) -> bool:
    """Whether a string is Unicode text BSON can hold (JSON escapes can carry lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_value_problems(
    value: Any, max_depth: int, path: tuple[str | int, ...] = ()
) -> list[dict[str, Any]]:
    """List forbidden keys, over-deep nesting, and integers or strings BSON cannot hold in a JSON value."""
    problems: list[dict[str, Any]] = []
    depth = len(path) + 1
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return [{"loc": list(path), "msg": "integer does not fit in 64 bits", "type": "int_range"}]
    if isinstance(value, str) and not is_unicode_text(value):
        return [{"loc": list(path), "msg": UNPAIRED_SURROGATE, "type": "string_unicode"}]
    if isinstance(value, dict):
        if depth > max_depth:
            return [{"loc": list(path), "msg": f"nesting deeper than {max_depth} levels", "type": "too_deep"}]
        for key, item in value.items():
            if is_forbidden_key(key):
                problems.append({"loc": [*path, key], "msg": f"forbidden key: {FORBIDDEN_KEY_HINT}", "type": "forbidden_key"})
            if not is_unicode_text(key):
                problems.append({"loc": [*path, key], "msg": UNPAIRED_SURROGATE, "type": "string_unicode"})
            problems.extend(find_value_problems(item, max_depth, (*path, key)))
    elif isinstance(value, list):
        if depth > max_depth:
            return [{"loc": list(path), "msg": f"nesting deeper than {max_depth} levels", "type": "too_deep"}]
        for index, item in enumerate(value):
            problems.extend(find_value_problems(item, max_depth, (*path, index)))
    return problems


# The same rule as a MongoDB expression, for the `trainings` validator: a writer that bypasses the
# service (a bulk load, an analyst's insert) cannot store a target the rule would not give.
DAISY_CHAIN_RULE_EXPR: dict[str, Any] = {"$eq": [
    "$target_num_updates",
    {"$multiply": ["$base_target_num_updates", {"$max": [1, {"$ifNull": ["$options.daisy_chain_period", 1]}]}]},
]}


def daisy_chained_target(requested: int, period: int | None) -> int:
    """The seed's post_save rule: the target counts daisy-chain sub-rounds when period > 0."""
    if period is not None and period > 0:
        return requested * period
    return requested
