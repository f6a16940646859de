"""jobhost listeners in Python, built into a WebAssembly component with componentize-py.

A plugin module registers handlers on ``listener`` and re-exports ``Listener``, the class the
host calls (componentize-py looks for it in the module it builds)::

    from jobhost_listener import Listener, listener, jobs, records

    @listener.on("job:ready", filter={"job": "sheet:submitLargeSheet", "isPart": True})
    def part_ready(event):
        jobs.ack(event.job_id, progress=10)
        for record in event.data(page_size=1000, page_number=1):
            ...
        jobs.complete(event.job_id, outcome={"message": "done"})

``http`` calls out to the hosts the manifest grants (``[grants] allowed_outbound_hosts``)::

    answer = http.post(config.get("verify_url"), json={"emails": emails})
    flagged = answer.json()["flagged"] if answer.status == 200 else []

A host call that the host refuses raises ``HostError`` (``kind``: ``not-found``, ``conflict``,
``invalid``, ``denied``, ``limit``, ``internal``). An exception a handler lets escape fails the
delivery (it is retried) with the exception and its traceback in the delivery's log.
"""

import json
import traceback
from typing import Any, Callable, Optional, Union

from componentize_py_types import Err

from wit_world import exports
from wit_world.imports import config as _config
from wit_world.imports import jobs as _jobs
from wit_world.imports import log as _log
from wit_world.imports import records as _records
from wit_world.imports import jobhost_plugin_types as _t
from wit_world.imports import outgoing_handler as _outgoing
from wit_world.imports import streams as _streams
from wit_world.imports import wasi_http_types as _h

_json_dumps = json.dumps  # `http.request` takes a `json` keyword

__all__ = [
    "Listener",
    "listener",
    "Event",
    "Record",
    "HostError",
    "tolerate_repeat",
    "jobs",
    "records",
    "log",
    "config",
    "http",
    "HttpError",
    "Response",
]

_KINDS = {
    _t.ErrorKind.NOT_FOUND: "not-found",
    _t.ErrorKind.CONFLICT: "conflict",
    _t.ErrorKind.INVALID: "invalid",
    _t.ErrorKind.DENIED: "denied",
    _t.ErrorKind.LIMIT: "limit",
    _t.ErrorKind.INTERNAL: "internal",
}


class HostError(Exception):
    """The host refused a call: ``kind`` says why in one word, the message in full."""

    def __init__(self, error):
        super().__init__(error.message)
        self.kind = _KINDS.get(error.kind, "internal")
        self.message = error.message
        # The job's status when the refusal was about it (e.g. completing a completed job).
        self.job_status: Optional[str] = error.job_status.name.lower() if error.job_status is not None else None


def tolerate_repeat(call: Callable, *args: Any, **kwargs: Any) -> Any:
    """Runs ``call(*args, **kwargs)`` (a ``jobs`` call) and returns its result, or ``None``
    when the host refused it because the job already ended. Delivery is at least once: a
    repeated event finds its work done, and this tells "done before" from a real error::

        if tolerate_repeat(jobs.ack, event.job_id, progress=10) is None:
            return  # handled before
    """
    try:
        return call(*args, **kwargs)
    except HostError as e:
        if e.kind == "conflict" and e.job_status in ("complete", "failed", "canceled"):
            return None
        raise


def _call(f, *args):
    try:
        return f(*args)
    except Err as e:
        raise HostError(e.value) from None


def _text(value):
    return None if value is None else json.dumps(value)


def _parse(text):
    return None if text is None else json.loads(text)


# ---- values ----


def _from_cell(v):
    return None if isinstance(v, _t.Value_Null) else v.value


def _to_cell(v):
    if v is None:
        return _t.Value_Null()
    if isinstance(v, bool):
        return _t.Value_Boolean(v)
    if isinstance(v, int):
        return _t.Value_Integer(v)
    if isinstance(v, float):
        return _t.Value_Float(v)
    if isinstance(v, str):
        return _t.Value_Text(v)
    return _t.Value_Text(json.dumps(v))


_MESSAGE_KINDS = {"error": _t.MessageKind.ERROR, "warn": _t.MessageKind.WARN, "info": _t.MessageKind.INFO}


def _message(m):
    kind = _MESSAGE_KINDS.get(m.get("type", "error"))
    if kind is None:
        raise ValueError(f"a message type is error, warn or info, not {m.get('type')!r}")
    return _t.Message(field=m.get("field"), kind=kind, text=m["message"])


class Record:
    """One record of a page: ``record["email"]`` (``None`` when absent), ``record.id``, the
    record's current ``messages`` (dicts like those ``records.update`` takes) and ``valid``."""

    __slots__ = ("id", "_fields", "_values", "messages", "valid")

    def __init__(self, fields, row):
        self.id = row.id
        self._fields = fields
        self._values = row.values
        self.messages = [
            {"field": m.field, "type": m.kind.name.lower(), "message": m.text} for m in row.messages
        ]
        self.valid = row.valid

    def __getitem__(self, field: str) -> Any:
        """The value of ``field``: ``None``, ``bool``, ``int``, ``float`` or ``str``; ``None``
        when the record has no such field."""
        i = self._fields.get(field)
        return None if i is None else _from_cell(self._values[i])

    def get(self, field: str, default: Any = None) -> Any:
        """The value of ``field``, or ``default`` when it is absent or null."""
        value = self[field]
        return default if value is None else value

    @property
    def values(self) -> dict:
        """Every field's value, as a dict."""
        return {f: _from_cell(self._values[i]) for f, i in self._fields.items()}


# ---- the API ----


class jobs:
    """Jobs of the event's environment (the job family of the event unless granted more)."""

    @staticmethod
    def get(job_id: str) -> dict:
        """The job ``job_id`` as a dict shaped like the HTTP API's (``status``, ``input``,
        ``outcome``, ``partData``, ``parentId``, …). Raises ``HostError`` (``not-found``)."""
        return _job(_call(_jobs.get, job_id))

    @staticmethod
    def ack(
        job_id: str, info: Optional[str] = None, progress: Optional[int] = None, estimated_completion_at: Optional[int] = None
    ) -> dict:
        """Acknowledges a ``ready`` or ``executing`` job; it becomes ``executing`` (repeatable).
        ``progress`` is 0–100, ``estimated_completion_at`` milliseconds since the epoch.
        Raises ``HostError`` ``conflict`` (with ``job_status``) when the job already ended."""
        return _job(_call(_jobs.ack, job_id, info, progress, estimated_completion_at))

    @staticmethod
    def complete(job_id: str, outcome: Any = None, info: Optional[str] = None) -> dict:
        """Completes a ``ready`` or ``executing`` job with ``outcome`` (any JSON value).
        Raises ``HostError`` ``conflict`` when it already ended."""
        return _job(_call(_jobs.complete, job_id, _text(outcome), info))

    @staticmethod
    def fail(job_id: str, outcome: Any = None, info: Optional[str] = None) -> dict:
        """Fails a ``ready`` or ``executing`` job with ``outcome``. Raises ``HostError``
        ``conflict`` when it already ended."""
        return _job(_call(_jobs.fail, job_id, _text(outcome), info))

    @staticmethod
    def cancel(job_id: str, info: Optional[str] = None) -> dict:
        """Cancels an open job and its open parts."""
        return _job(_call(_jobs.cancel, job_id, info))

    @staticmethod
    def split(job_id: str, parts: Union[int, list], run_in_parallel: bool = True) -> int:
        """Splits an ``executing`` top-level job into parts; returns how many.

        ``parts`` is a count (part *i* gets ``partData`` ``{"part": i, "total": N}``) or a
        list with one ``partData`` object per part. When every part has ended the host emits
        ``job:parts-completed`` on the parent with ``payload["parts"]`` = ``{"total",
        "completed", "failed", "canceled"}``. Raises ``HostError`` ``conflict`` when the job
        was split before (the message says "already split")."""
        if isinstance(parts, int):
            how = _jobs.SplitParts_Count(parts)
        else:
            how = _jobs.SplitParts_Data([json.dumps(p) for p in parts])
        return _call(_jobs.split, job_id, how, run_in_parallel)

    @staticmethod
    def create(kind: str, operation: str, source: Optional[str] = None, input: Any = None, manual: bool = False) -> dict:
        """Creates a job: ``ready`` at once, or ``created`` when ``manual``."""
        return _job(_call(_jobs.create, _jobs.NewJob(kind, operation, source, _text(input), manual)))

    @staticmethod
    def list_parts(job_id: str) -> list:
        """The parts of a split job, in part order."""
        return [_job(j) for j in _call(_jobs.list_parts, job_id)]


def _job(j):
    """A job as a dict shaped like the HTTP API's (camelCase keys, JSON fields decoded)."""
    return {
        "id": j.id,
        "type": j.kind,
        "operation": j.operation,
        "source": j.source,
        "status": j.status.name.lower(),
        "info": j.info,
        "progress": j.progress,
        "input": _parse(j.input),
        "outcome": _parse(j.outcome),
        "parentId": j.parent_id,
        "isPart": j.is_part,
        "partIndex": j.part_index,
        "partData": _parse(j.part_data),
        "attempt": j.attempt,
        "createdAt": j.created_at,
        "updatedAt": j.updated_at,
    }


class records:
    """Records of the event's environment."""

    @staticmethod
    def counts(sheet_id: str) -> dict:
        """``{"total", "valid", "error"}``: ``error`` counts records with an error message."""
        c = _call(_records.counts, sheet_id)
        return {"total": c.total, "valid": c.valid, "error": c.error}

    @staticmethod
    def page(sheet_id: str, page_size: int = 1000, page_number: int = 1) -> "list[Record]":
        """Page ``page_number`` (from 1) of ``page_size`` (1–10,000) records, in the sheet's
        stable order; past the end, an empty list."""
        page = _call(_records.page, sheet_id, page_size, page_number)
        fields = {f: i for i, f in enumerate(page.fields)}
        return [Record(fields, row) for row in page.rows]

    @staticmethod
    def update(sheet_id: str, updates: list) -> int:
        """``updates``: dicts ``{"id", "values": {field: value}, "messages": [...]}``; a given
        ``messages`` list replaces the record's messages (``[]`` clears them). A message is
        ``{"field": "email", "type": "error" | "warn" | "info", "message": "…"}``. All or
        none; returns how many records changed."""
        wit = []
        for u in updates:
            values = [_t.FieldValue(k, _to_cell(v)) for k, v in u.get("values", {}).items()]
            messages = u.get("messages")
            wit.append(
                _t.RecordUpdate(u["id"], values, None if messages is None else [_message(m) for m in messages])
            )
        return _call(_records.update, sheet_id, wit)

    @staticmethod
    def insert(sheet_id: str, new_records: list) -> int:
        """Appends ``new_records`` (dicts of field → value); returns how many."""
        wit = [_t.NewRecord([_t.FieldValue(k, _to_cell(v)) for k, v in r.items()], []) for r in new_records]
        return _call(_records.insert, sheet_id, wit)


class log:
    """Lines in the delivery's log."""

    @staticmethod
    def info(message: Any) -> None:
        """An info line."""
        _log.log(_log.Level.INFO, str(message))

    @staticmethod
    def warn(message: Any) -> None:
        """A warning line."""
        _log.log(_log.Level.WARN, str(message))

    @staticmethod
    def error(message: Any) -> None:
        """An error line (it does not fail the delivery; raise for that)."""
        _log.log(_log.Level.ERROR, str(message))


class config:
    """What the plugin's manifest grants."""

    @staticmethod
    def get(key: str) -> Optional[str]:
        """A value of the manifest's ``[config]``, or ``None``."""
        return _config.get(key)

    @staticmethod
    def secret(name: str) -> str:
        """A secret of the environment that the manifest grants; ``HostError`` ``denied``
        when it does not."""
        return _call(_config.secret, name)


# ---- outbound HTTP ----


class HttpError(Exception):
    """A request that did not get a response: refused by the host (not granted, a denied
    address, a limit — the delivery's log says which), or failed on the way (timeout, a body
    cut at its limit, a refused connection)."""


class Response:
    """A response, its body read in full: ``status``, ``headers`` (a list of ``(name,
    value)``), ``body`` (bytes)."""

    def __init__(self, status: int, headers: list, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> Optional[str]:
        """The first value of a header (names compare without case), or ``None``."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def text(self) -> str:
        """The body as text (invalid UTF-8 replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


_METHODS = {
    "GET": _h.Method_Get,
    "HEAD": _h.Method_Head,
    "POST": _h.Method_Post,
    "PUT": _h.Method_Put,
    "DELETE": _h.Method_Delete,
    "OPTIONS": _h.Method_Options,
    "PATCH": _h.Method_Patch,
}


def _code(value) -> str:
    """An ``error-code`` by its name as the Rust SDK spells it (``HttpRequestDenied``), with
    its detail when it has one."""
    name = type(value).__name__.split("_", 1)[-1]
    detail = getattr(value, "value", None)
    return name if detail is None else f"{name}({detail!r})"


def _failed(what: str, url: str, detail: str) -> HttpError:
    return HttpError(f"HTTP {what} of {url} failed: {detail} (the delivery's log says why a request was refused)")


def _split_url(url: str):
    scheme, sep, rest = url.partition("://")
    cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=len(rest))
    authority, path = rest[:cut], rest[cut:] or "/"
    if not sep or scheme.lower() not in ("http", "https") or not authority:
        raise HttpError(f"`{url}` is not an http:// or https:// URL")
    return (_h.Scheme_Https() if scheme.lower() == "https" else _h.Scheme_Http()), authority, path


def _stream_failure(value) -> str:
    """Why a body stream failed: the HTTP error code when the host gave one, else the first
    line of the host's text."""
    if isinstance(value, _streams.StreamError_Closed):
        return "the stream closed"
    if isinstance(value, _streams.StreamError_LastOperationFailed):
        code = _h.http_error_code(value.value)
        return _code(code) if code is not None else value.value.to_debug_string().split("\n")[0][:300]
    return _code(value)


def _await(pending, url: str):
    """The response's head, once it arrives (the host bounds the wait)."""
    while (got := pending.get()) is None:
        with pending.subscribe() as ready:
            ready.block()
    if isinstance(got, Err):  # taken before: only a second `get` sees this
        raise _failed("request", url, "the response was already taken")
    if isinstance(got.value, Err):
        raise _failed("request", url, _code(got.value.value))
    return got.value.value


def _read_all(response, url: str) -> bytes:
    chunks = []
    # Children before parents: the host refuses to drop a body whose stream is still open.
    with response.consume() as body, body.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(64 << 10))
            except Err as e:
                if isinstance(e.value, _streams.StreamError_Closed):
                    break
                raise _failed("response body", url, _stream_failure(e.value)) from None
    return b"".join(chunks)


class http:
    """Outbound HTTP over ``wasi:http``, to the hosts the manifest grants.

    ``http.get(url)``, ``http.post(url, json=...)`` and the others send one request and read
    the whole response; a request that gets no response raises ``HttpError``. Redirects are
    returned as they are (a 3xx ``Response``): following one is a new request, checked the
    same way. Secrets go in headers the plugin sets from ``config.secret``.
    """

    @staticmethod
    def request(
        method: str,
        url: str,
        *,
        headers: Optional[dict] = None,
        body: Union[bytes, str, None] = None,
        json: Any = None,
        timeout_ms: Optional[int] = None,
    ) -> Response:
        """Sends ``method url`` with ``headers``, and ``body`` (bytes or text) or ``json``;
        ``timeout_ms`` bounds connecting and the wait for the response's head (the manifest's
        limits still apply when they are shorter)."""
        scheme, authority, path = _split_url(url)
        fields = [(k, str(v).encode()) for k, v in (headers or {}).items()]
        if json is not None:
            body = _json_dumps(json)
            if not any(k.lower() == "content-type" for k, _ in fields):
                fields.append(("content-type", b"application/json"))
        data = body.encode() if isinstance(body, str) else (body or b"")
        if data and not any(k.lower() == "content-length" for k, _ in fields):
            fields.append(("content-length", str(len(data)).encode()))
        try:
            head = _h.Fields.from_list(fields)
        except Err as e:
            raise _failed("header", url, _code(e.value)) from None
        request = _h.OutgoingRequest(head)
        make = _METHODS.get(method.upper())
        for what, setter, value in (
            ("method", request.set_method, make() if make else _h.Method_Other(method)),
            ("scheme", request.set_scheme, scheme),
            ("authority", request.set_authority, authority),
            ("path", request.set_path_with_query, path),
        ):
            try:
                setter(value)
            except Err:
                raise _failed("request", url, f"invalid {what}") from None
        out_body = request.body()
        options = None
        if timeout_ms is not None:
            options = _h.RequestOptions()
            options.set_connect_timeout(timeout_ms * 1_000_000)
            options.set_first_byte_timeout(timeout_ms * 1_000_000)
        try:
            pending = _outgoing.handle(request, options)
        except Err as e:
            out_body.__exit__(None, None, None)
            raise _failed("request", url, _code(e.value)) from None
        with pending:
            # The body goes after the request: the host streams it to the server.
            try:
                with out_body.write() as stream:
                    for i in range(0, len(data), 4096):
                        stream.blocking_write_and_flush(data[i : i + 4096])
                _h.OutgoingBody.finish(out_body, None)
            except Err as e:
                raise _failed("request body", url, _stream_failure(e.value)) from None
            with _await(pending, url) as response:
                status = response.status()
                with response.headers() as h:
                    got = [(k, v.decode("utf-8", "replace")) for k, v in h.entries()]
                return Response(status, got, _read_all(response, url))

    @staticmethod
    def get(url: str, **kwargs: Any) -> Response:
        """A ``GET`` of ``url`` (keywords as for ``request``)."""
        return http.request("GET", url, **kwargs)

    @staticmethod
    def post(url: str, **kwargs: Any) -> Response:
        """A ``POST`` to ``url``."""
        return http.request("POST", url, **kwargs)

    @staticmethod
    def put(url: str, **kwargs: Any) -> Response:
        """A ``PUT`` to ``url``."""
        return http.request("PUT", url, **kwargs)

    @staticmethod
    def delete(url: str, **kwargs: Any) -> Response:
        """A ``DELETE`` of ``url``."""
        return http.request("DELETE", url, **kwargs)


# ---- events and the listener ----


class Event:
    """An event: ``topic``, ``context`` and ``payload`` (dicts), ``job_id``, ``sheet_id``."""

    def __init__(self, e):
        self.id = e.id
        self.topic = e.topic
        self.environment_id = e.environment_id
        self.job_id = e.job_id
        self.sheet_id = e.sheet_id
        self.context = json.loads(e.context)
        self.payload = json.loads(e.payload)
        self.created_at = e.created_at
        self.attempt = e.attempt

    def data(self, page_size: int = 1000, page_number: int = 1) -> "list[Record]":
        """A page of the records of the event's sheet."""
        if self.sheet_id is None:
            raise ValueError(f"event {self.topic} has no sheet")
        return records.page(self.sheet_id, page_size, page_number)


class _Routes:
    """What ``@listener.on`` registers: (topic, filter, handler), in order."""

    def __init__(self):
        self.routes = []

    def on(self, topic: str, filter: Optional[dict] = None) -> Callable:
        """Registers the decorated function for events whose topic matches ``topic``
        (``job:ready``, ``job:*``, ``**``) and, when given, ``filter`` (``{"job":
        "sheet:check", "isPart": True}``: keys match the event's context and payload). The
        function receives an ``Event``; returning handles the event, raising fails the
        delivery (it is retried)."""

        def register(handler):
            self.routes.append((topic, filter, handler))
            return handler

        return register


listener = _Routes()


class Listener(exports.Listener):
    """The component's export: routes for the host, and the call of one handler per event."""

    def subscriptions(self):
        return [_t.Subscription(topic, _text(flt)) for topic, flt, _ in listener.routes]

    def handle(self, route, event):
        _, _, handler = listener.routes[route]
        try:
            handler(Event(event))
        except HostError as e:
            raise Err(f"{e.kind}: {e.message}") from None
        except Exception as e:
            raise Err(f"{type(e).__name__}: {e}\n{traceback.format_exc()}") from None
