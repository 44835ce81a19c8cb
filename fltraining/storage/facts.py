"""A per-process memo of facts that never change once written.

Which training a model or a local update belongs to, a global model's tensor signature, and the
file a global model has in a given round are fixed when they are stored, so every process may
remember them instead of reading them on every upload and download. Permissions and states are never kept here: each use still asks the store,
and a remembered link is checked by the same query (a training deleted since answers nothing, and
the caller forgets the link and looks again).
"""

from collections import OrderedDict
from uuid import UUID

from fltraining.storage.blobs import StoredFile
from fltraining.weights.signature import Signature

MAX_ENTRIES = 100_000


class _Bounded[K, V]:
    """A dict that forgets its oldest entries past a size."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        if len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)


class ImmutableFacts:
    """What a model id names (its training and global model) and each global model's signature."""

    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self._targets: _Bounded[UUID, tuple[UUID, UUID]] = _Bounded(limit)
        self._signatures: _Bounded[UUID, Signature] = _Bounded(limit)
        self._round_files: _Bounded[UUID, tuple[int, StoredFile]] = _Bounded(limit)

    def target(self, model_id: UUID) -> tuple[UUID, UUID] | None:
        """(training id, global model id) a global model or a local update id was found to name."""
        return self._targets.get(model_id)

    def remember_target(self, model_id: UUID, training_id: UUID, global_model_id: UUID) -> None:
        """Remember what a model id names (a training's `model` never changes)."""
        self._targets.put(model_id, (training_id, global_model_id))

    def forget_target(self, model_id: UUID) -> None:
        """Drop a link found stale (its training was deleted; the model may have a new one)."""
        self._targets.pop(model_id)

    def signature(self, model_id: UUID) -> Signature | None:
        """A global model's tensor signature, if known."""
        return self._signatures.get(model_id)

    def remember_signature(self, model_id: UUID, signature: Signature) -> None:
        """Remember a model's signature (set when its file was first described, never changed after)."""
        self._signatures.put(model_id, signature)

    def round_file(self, model_id: UUID) -> tuple[int, StoredFile] | None:
        """(round, file) a global model was last seen to have: valid while its training is in that round."""
        return self._round_files.get(model_id)

    def remember_round_file(self, model_id: UUID, round_: int, stored: StoredFile) -> None:
        """Remember a global model's file in a round (a round's weights are written once, with the round)."""
        self._round_files.put(model_id, (round_, stored))
