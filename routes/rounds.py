"""Round endpoints: local updates, metrics, SWAG statistics, a training's models and its events."""

import asyncio
import json
from typing import Any
from uuid import UUID

from aiohttp import web

from fltraining.clock import utcnow
from fltraining.engine.arrivals import Progress, arrivals_of, progress_of
from fltraining.engine.events import list_events
from fltraining.engine.uploads import metrics_of, training_models, visible_file
from fltraining.errors import Conflict, InvalidInput, NotFound
from fltraining.schemas.common import Message, iso_z
from fltraining.schemas.rounds import (
    Arrival,
    EventPublic,
    EventsQuery,
    MetricPublic,
    MetricsAccepted,
    MetricsBody,
    RoundProgress,
    SwagForm,
    TrainingModelEntry,
    UpdateForm,
)
from fltraining.states import Phase, TrainingState
from fltraining.storage.blobs import BlobMissing
from routes.auth import current_user
from routes.keys import contributions_key, engine_key, models_key, shutting_down_key, trainings_key
from routes.multipart import Form, FormSpec, read_form
from routes.parsing import path_uuid, read_body, read_query, validate
from routes.responses import json_model, json_models, send_blob
from routes.table import Endpoint

UPDATE_FORM = FormSpec(
    files=frozenset({"model_file"}),
    texts=frozenset({"round", "sample_size"}),
    lists=frozenset({"metric_names", "metric_values"}),
    ignored=frozenset({"owner"}),  # the DLR client names itself; the credentials decide
)
SWAG_FORM = FormSpec(
    files=frozenset({"first_moment_file", "second_moment_file"}),
    texts=frozenset({"round", "sample_size"}),
    ignored=frozenset({"owner"}),
)
METRICS_FORM = FormSpec(lists=frozenset({"metric_names", "metric_values"}), ignored=frozenset({"owner"}))
# Other processes' commits are seen at this interval; this process's own wake a stream at once.
EVENT_POLL_SECONDS = 1.5
PROGRESS_SECONDS = 1.0
LATE_EVENT_WINDOW_MS = 10_000
EVENT_PAGE = 1000
ENDED = frozenset({TrainingState.COMPLETED, TrainingState.ERROR})
EVENT_HEARTBEAT_SECONDS = 15.0


async def _form(request: web.Request, spec: FormSpec) -> Form:
    models = request.app[models_key]
    return await read_form(request, spec, models.store_file, models.discard_file, models.max_bytes)


async def _release(request: web.Request, form: Form) -> None:
    """Drop a refused form's files, unless a stored contribution already names them."""
    for stored in form.files.values():
        await request.app[models_key].drop_unshared_file(stored.file_id)


def _required(form: Form, *texts: str, files: tuple[str, ...] = ()) -> None:
    for name in texts:
        if name not in form.texts:
            raise InvalidInput(f"Missing required field: {name}")
    for name in files:
        if name not in form.files:
            raise InvalidInput(f"No uploaded file '{name}' found.")


async def upload_update(request: web.Request) -> web.Response:
    """POST /api/models/{id}/: a round participant's local model."""
    model_id = path_uuid(request, "model_id")
    form = await _form(request, UPDATE_FORM)
    try:
        _required(form, "round", "sample_size", files=("model_file",))
        data = validate(UpdateForm, {**form.texts, **form.lists})
        await request.app[contributions_key].accept_update(
            current_user(request), model_id, data.round, data.sample_size, form.files["model_file"],
            (data.metric_names, data.metric_values),
        )
    except BaseException:
        await _release(request, form)
        raise
    return web.json_response({"detail": "Model Update Accepted"}, status=201)


async def upload_swag(request: web.Request) -> web.Response:
    """POST /api/models/{id}/swag/: a round participant's SWAG moments (state S)."""
    model_id = path_uuid(request, "model_id")
    form = await _form(request, SWAG_FORM)
    try:
        _required(form, "round", "sample_size", files=("first_moment_file", "second_moment_file"))
        data = validate(SwagForm, dict(form.texts))
        await request.app[contributions_key].accept_swag(
            current_user(request), model_id, data.round, data.sample_size,
            form.files["first_moment_file"], form.files["second_moment_file"],
        )
    except BaseException:
        await _release(request, form)
        raise
    return web.json_response({"detail": "SWAG Statistic Accepted"}, status=201)


async def post_metrics(request: web.Request) -> web.Response:
    """POST /api/models/{id}/metrics/: JSON, url-encoded or multipart names and values."""
    model_id = path_uuid(request, "model_id")
    if request.content_type in {"multipart/form-data", "application/x-www-form-urlencoded"}:
        form = await _form(request, METRICS_FORM)
        names = form.lists.get("metric_names", [])
        values = form.lists.get("metric_values", [])
        if not names or not values:
            raise InvalidInput("Metric names or values are missing")
        if len(names) != len(values):
            raise InvalidInput("Metric names and values must have the same length")
        body = validate(MetricsBody, {"metric_names": names, "metric_values": values})
    else:
        body = await read_body(request, MetricsBody)
    accepted = await request.app[contributions_key].accept_metrics(
        current_user(request), model_id, body.metric_names, body.metric_values
    )
    return json_model(MetricsAccepted(model_id=accepted), status=201)


async def get_metrics(request: web.Request) -> web.Response:
    """GET /api/models/{id}/metrics/ (a global model the caller reaches, or a local update)."""
    model_id = path_uuid(request, "model_id")
    await visible_file(request.app[models_key], current_user(request), model_id)
    return json_models([MetricPublic.of(raw) for raw in await metrics_of(model_id)])


async def swag_first(request: web.Request) -> web.StreamResponse:
    """GET /api/models/{id}/swag/first/: the aggregated first moment."""
    return await _swag_moment(request, "first")


async def swag_second(request: web.Request) -> web.StreamResponse:
    """GET /api/models/{id}/swag/second/: the aggregated second moment."""
    return await _swag_moment(request, "second")


async def _swag_moment(request: web.Request, which: str) -> web.StreamResponse:
    models = request.app[models_key]
    model = await models.get_accessible(current_user(request), path_uuid(request, "model_id"))
    file_id = model.swag_first_file_id if which == "first" else model.swag_second_file_id
    if file_id is None:
        raise NotFound("No aggregated SWAG moments yet.")
    try:
        return await send_blob(request, models.files, file_id, f"model-{model.id}-swag-{which}")
    except BlobMissing:  # replaced by the next SWAG aggregation while we looked
        raise Conflict("The SWAG moments changed while they were being read; try again.") from None


async def list_training_models(request: web.Request) -> web.Response:
    """GET /api/trainings/{id}/models/ and /models/latest/."""
    training = await request.app[trainings_key].get_visible(current_user(request), path_uuid(request, "training_id"))
    entries = await training_models(training, latest=request.path.rstrip("/").endswith("/latest"))
    return json_models([TrainingModelEntry.model_validate(entry) for entry in entries])


def _sse(event: dict[str, Any]) -> bytes:
    public = EventPublic.model_validate(event)
    return f"id: {public.id}\nevent: {public.type}\ndata: {public.model_dump_json()}\n\n".encode()


async def _event_stream(request: web.Request, training_id: UUID, after: str | None) -> web.StreamResponse:
    """Server-Sent Events: the backlog, then new events as they are stored, until the training ends."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        await _follow_events(request, response, training_id, after)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the reader went away: nothing left to send
    return response


def _progress_frame(training_id: UUID, progress: Progress) -> bytes:
    """A `round_progress` frame: computed, not stored, so it carries no id (Last-Event-ID stays)."""
    data = {"training": str(training_id), "type": "round_progress", "round": progress.round, "at": iso_z(utcnow()),
            "user": None, "data": {"phase": progress.phase, "arrived": progress.arrived, "expected": progress.expected}}
    return f"event: round_progress\ndata: {json.dumps(data)}\n\n".encode()


async def _follow_events(
    request: web.Request, response: web.StreamResponse, training_id: UUID, after: str | None
) -> None:
    start = after
    sent: set[str] = set()
    quiet = 0.0
    reported: tuple[int, str | None, int, int] | None = None
    reported_at = -PROGRESS_SECONDS
    ending = False
    loop = asyncio.get_running_loop()
    with request.app[engine_key].bell.listen(training_id) as woken:
        while True:
            woken.clear()
            # Ids sort by the time of their step; an event written late (by a reconciler after a crash,
            # or by a process whose clock lags) can sort before one already sent, so every poll looks
            # back a window and sends what it has not sent yet.
            newest = max(sent, default=start)
            floor = None if newest is None else f"{max(0, int(newest[:13]) - LATE_EVENT_WINDOW_MS):013d}"
            if start is not None and (floor is None or floor < start):
                floor = start
            events = []
            cursor = floor
            while True:
                page = await list_events(training_id, cursor, EVENT_PAGE)
                events += [event for event in page if event["id"] not in sent]
                if len(page) < EVENT_PAGE:
                    break
                cursor = page[-1]["id"]
            for event in events:
                await response.write(_sse(event))
                sent.add(event["id"])
            if floor is not None:
                sent = {event_id for event_id in sent if event_id > floor}
            if events:
                quiet = 0.0
                continue
            progress = await progress_of(training_id)
            if progress is None:
                return  # deleted while followed
            if progress.state in ENDED and progress.settled:
                if ending:
                    return
                # The last events may have been stored between the read above and this one: read once more.
                ending = True
                continue
            wait = EVENT_POLL_SECONDS
            shown = (progress.round, progress.phase, progress.arrived, progress.expected)
            if progress.phase is not None and shown != reported:
                # At most one progress frame a second: a change within the second is reported when it ends.
                due = reported_at + PROGRESS_SECONDS - loop.time()
                if due <= 0:
                    await response.write(_progress_frame(training_id, progress))
                    reported, reported_at, quiet = shown, loop.time(), 0.0
                else:
                    wait = due
            if quiet >= EVENT_HEARTBEAT_SECONDS:
                await response.write(b": keep-alive\n\n")
                quiet = 0.0
            # Woken at once by this process's own commits; other processes' are seen at the next poll.
            # A shutting-down service ends its streams (clients reconnect with Last-Event-ID).
            shutting_down = request.app[shutting_down_key]
            started = loop.time()
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(woken.wait()), asyncio.ensure_future(shutting_down.wait())],
                timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if shutting_down.is_set():
                return
            quiet += loop.time() - started


async def get_events(request: web.Request) -> web.StreamResponse:
    """GET /api/trainings/{id}/events/: JSON page, or a live SSE stream with Accept: text/event-stream."""
    training = await request.app[trainings_key].get_visible(current_user(request), path_uuid(request, "training_id"))
    query = read_query(request, EventsQuery)
    if "text/event-stream" in request.headers.get("Accept", ""):
        after = query.after or request.headers.get("Last-Event-ID")
        if after is not None:
            validate(EventsQuery, {"after": after})
        return await _event_stream(request, training.id, after)
    events = await list_events(training.id, query.after, query.limit)
    return json_models([EventPublic.model_validate(event) for event in events])


async def get_progress(request: web.Request) -> web.Response:
    """GET /api/trainings/{id}/progress/: the current round's participants, arrivals (with times) and who is
    still expected."""
    training = await request.app[trainings_key].get_visible(current_user(request), path_uuid(request, "training_id"))
    arrived = await arrivals_of(training)
    came = {arrival["user"] for arrival in arrived}
    waiting = training.phase is not None and training.phase != Phase.AGGREGATING
    participants = list(training.round_participants) if training.phase is not None else []
    return json_model(RoundProgress(
        training=training.id, state=training.state, round=training.round, phase=training.phase,
        round_deadline=training.round_deadline, participants=participants,
        expected_count=len(participants) if waiting else 0, arrived_count=len(arrived),
        arrived=[Arrival.model_validate(arrival) for arrival in arrived],
        expected=[user for user in participants if user not in came] if waiting else [],
    ))


_MODEL = "/api/models/{model_id}"
_TRAINING = "/api/trainings/{training_id}"
ENDPOINTS = [
    Endpoint("POST", _MODEL, upload_update, "Upload a local model update", "rounds", multipart=UpdateForm,
             responses={201: Message}, errors=(400, 403, 404, 408, 409, 413, 415, 507),
             description="Multipart `model_file`, `round`, `sample_size`, optional repeated `metric_names` and "
                         "`metric_values`. The id may be the global model or the local model handed out in a "
                         "daisy-chain round. An identical retry answers 201 again."),
    Endpoint("POST", _MODEL + "/metrics", post_metrics, "Upload metrics of a model", "rounds", body=MetricsBody,
             responses={201: MetricsAccepted}, errors=(400, 403, 404, 409, 413, 415),
             description="JSON, url-encoded or multipart `metric_names` and `metric_values`."),
    Endpoint("GET", _MODEL + "/metrics", get_metrics, "Metrics of a model", "rounds",
             responses={200: [MetricPublic]}, errors=(403, 404)),
    Endpoint("POST", _MODEL + "/swag", upload_swag, "Upload SWAG statistics (state S)", "rounds", multipart=SwagForm,
             files=("first_moment_file", "second_moment_file"),
             responses={201: Message}, errors=(400, 403, 404, 408, 409, 413, 415, 507)),
    Endpoint("GET", _MODEL + "/swag/first", swag_first, "Aggregated SWAG first moment", "rounds",
             responses={200: "application/octet-stream"}, errors=(403, 404), headers={200: ("Content-Disposition",)}),
    Endpoint("GET", _MODEL + "/swag/second", swag_second, "Aggregated SWAG second moment", "rounds",
             responses={200: "application/octet-stream"}, errors=(403, 404), headers={200: ("Content-Disposition",)}),
    Endpoint("GET", _TRAINING + "/models/latest", list_training_models, "Global model and newest updates", "rounds",
             responses={200: [TrainingModelEntry]}, errors=(403, 404), operation_id="list_latest_training_models"),
    Endpoint("GET", _TRAINING + "/models", list_training_models, "Global model and stored updates", "rounds",
             responses={200: [TrainingModelEntry]}, errors=(403, 404)),
    Endpoint("GET", _TRAINING + "/progress", get_progress, "The current round: arrivals and who is expected",
             "rounds", responses={200: RoundProgress}, errors=(403, 404),
             description="Who takes part in the current round, whose contribution to the current phase "
                         "(updates, SWAG statistics or test metrics) has arrived — when, with what sample size "
                         "and bytes — and who is still expected. While a round is aggregated nobody is "
                         "expected; before the start and after the end the lists are empty."),
    Endpoint("GET", _TRAINING + "/events", get_events, "A training's events (JSON, or SSE with Accept)", "rounds",
             query=EventsQuery, responses={200: [EventPublic]}, errors=(400, 403, 404),
             description="With `Accept: text/event-stream` the answer is a live Server-Sent Events stream "
                         "(`id` = event id, `Last-Event-ID` resumes) that ends when the training has ended."),
]
