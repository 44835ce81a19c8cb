"""Model weights without storage: file formats, tensor signatures, aggregation."""

# Each reader module registers its codec on import; Python runs this file before any module of the package.
from fltraining.weights import npz_files, onnx_files, safetensors_files, torch_files  # noqa: F401
from fltraining.weights.aggregate import (
    FedAvgAccumulator,
    MomentsAccumulator,
    derangement,
    fedavg,
    weighted_mean_moments,
)
from fltraining.weights.formats import UnsupportedModelFormat, detect_format, dump_tensors, load_tensors
from fltraining.weights.signature import Signature, TensorSpec, check_matches, signature_of

__all__ = [
    "FedAvgAccumulator",
    "MomentsAccumulator",
    "Signature",
    "TensorSpec",
    "UnsupportedModelFormat",
    "check_matches",
    "derangement",
    "detect_format",
    "dump_tensors",
    "fedavg",
    "load_tensors",
    "signature_of",
    "weighted_mean_moments",
]
