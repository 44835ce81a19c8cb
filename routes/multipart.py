"""Reading multipart (and url-encoded) forms: files streamed into GridFS, small text fields in memory."""

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from fltraining.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from fltraining.storage.blobs import StoredFile
from routes.keys import settings_key
from routes.parsing import BodyDeadline, media_type

FIELD_BYTES = 64 * 1024
MULTIPART_OVERHEAD = 1024 * 1024
MAX_LIST_ITEMS = 100

type StoreFile[F] = Callable[[AsyncIterator[bytes]], Awaitable[F]]


@dataclass
class Form[F = StoredFile]:
    """What a form carried: stored files by field, single text fields, repeated list fields."""

    files: dict[str, F] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FormSpec:
    """The fields a form may carry; anything else is refused (400)."""

    files: frozenset[str] = frozenset()
    texts: frozenset[str] = frozenset()
    lists: frozenset[str] = frozenset()  # repeated fields; `name[]` is read as `name`
    ignored: frozenset[str] = frozenset()  # sent by DLR clients, of no use here


async def _read[T](deadline: BodyDeadline, pending: Awaitable[T]) -> T:
    """Await one read of the multipart body; a malformed body is the client's error (400)."""
    try:
        return await deadline.read(pending)
    except HttpProcessingError as error:
        raise InvalidInput(f"Malformed multipart body: {error.message}") from error
    except (ValueError, RuntimeError) as error:  # how aiohttp's multipart parser reports bad framing
        raise InvalidInput(f"Malformed multipart body: {error}") from error


async def _part_chunks(part: BodyPartReader, deadline: BodyDeadline) -> AsyncIterator[bytes]:
    while chunk := await _read(deadline, part.read_chunk(256 * 1024)):
        yield chunk


async def _part_text(part: BodyPartReader, deadline: BodyDeadline) -> str:
    data = bytearray()
    while chunk := await _read(deadline, part.read_chunk(8192)):
        data += chunk
        if len(data) > FIELD_BYTES:
            raise InvalidInput(f"Field '{part.name}' is longer than {FIELD_BYTES} bytes.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(f"Field '{part.name}' is not UTF-8 text.") from error


def _add_text(form: Form, spec: FormSpec, name: str, value: str) -> None:
    listed = name.removesuffix("[]")
    if listed in spec.lists:
        items = form.lists.setdefault(listed, [])
        if len(items) >= MAX_LIST_ITEMS:
            raise InvalidInput(f"Field '{listed}' may be sent at most {MAX_LIST_ITEMS} times.")
        items.append(value)
    elif name in spec.texts:
        if name in form.texts:
            raise InvalidInput(f"Field '{name}' may be sent once.")
        form.texts[name] = value
    elif name not in spec.ignored:
        raise InvalidInput(f"Unknown field '{name[:64]}'.")


async def discard[F](form: Form[F], delete: Callable[[F], Awaitable[None]]) -> None:
    """Remove the files a refused form stored."""
    for stored in form.files.values():
        await delete(stored)


async def read_form[F](
    request: web.Request, spec: FormSpec, store: StoreFile[F], delete: Callable[[F], Awaitable[None]],
    max_file_bytes: int,
) -> Form[F]:
    """Read a multipart form (files streamed through `store`) or, without files, an url-encoded one."""
    settings = request.app[settings_key]
    if media_type(request) == "application/x-www-form-urlencoded" and not spec.files:
        form: Form[F] = Form()
        posted = await request.post()
        for name, value in posted.items():
            if not isinstance(value, str):
                raise InvalidInput(f"Field '{name[:64]}' must be text.")
            _add_text(form, spec, name, value)
        return form
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("Send this form as multipart/form-data.")
    if request.content_length is not None and request.content_length > len(spec.files) * max_file_bytes + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"A file may hold at most {max_file_bytes} bytes.")
    form: Form[F] = Form()
    deadline = BodyDeadline(settings.body_timeout_seconds, settings.upload_timeout_seconds)
    try:
        try:
            reader = await request.multipart()
        except (ValueError, AssertionError) as error:
            raise InvalidInput(f"Malformed multipart body: {error}") from error
        while (part := await _read(deadline, reader.next())) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise InvalidInput("Nested or unnamed multipart parts are not accepted.")
            if part.name in spec.files:
                if part.name in form.files:
                    raise InvalidInput(f"Send one {part.name} only.")
                form.files[part.name] = await store(_part_chunks(part, deadline))
            elif part.name in spec.ignored:
                await _read(deadline, part.release())
            else:
                _add_text(form, spec, part.name, await _part_text(part, deadline))
    except BaseException:
        await discard(form, delete)
        raise
    return form
