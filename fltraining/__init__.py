"""fltraining: the training-management core of a federated learning server."""

__version__ = "0.1.0"
