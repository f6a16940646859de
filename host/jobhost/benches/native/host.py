"""Runs a Python listener plugin natively (CPython) against a small in-memory host: the
baseline of `--bench runtime -- native`, which compares a plugin built into a component and
run by jobhost with the same code run outside WebAssembly.

    python3 host.py SDK_DIR APP_DIR RECORDS_JSONL

The plugin's `app.py` and the SDK (`plugin-sdk/python/jobhost_listener`) run unchanged; what
this file replaces is what componentize-py generates for them (`wit_world`,
`componentize_py_types`): the host calls go to the in-memory host below instead of jobhost.
The host keeps jobs, parts and records in dicts and delivers events one at a time, in order,
on this thread — no store, no durability — so the time is the listener's own code plus the
cheapest host a listener could have. It runs the seeds' job (`sheet:submitLargeSheet`) over
the records and prints one JSON line: seconds from the job's creation to its end, its status,
its outcome and the records' counts (the benchmark checks them).
"""

import dataclasses
import enum
import json
import sys
import time
import types
from collections import deque


# ---- the types componentize-py generates (only what the SDK touches) ----


class Err(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value


class ErrorKind(enum.Enum):
    NOT_FOUND = 0
    CONFLICT = 1
    INVALID = 2
    DENIED = 3
    LIMIT = 4
    INTERNAL = 5


class JobStatus(enum.Enum):
    CREATED = 0
    SCHEDULED = 1
    WAITING = 2
    READY = 3
    EXECUTING = 4
    COMPLETE = 5
    FAILED = 6
    CANCELED = 7


class MessageKind(enum.Enum):
    ERROR = 0
    WARN = 1
    INFO = 2


class Level(enum.Enum):
    DEBUG = 0
    INFO = 1
    WARN = 2
    ERROR = 3


def _record(name, fields):
    """A WIT record: a class with these fields, positional or by keyword (as componentize-py
    generates them: dataclasses)."""
    return dataclasses.make_dataclass(name, fields, slots=True)


def _case(name, has_value=True):
    return _record(name, ("value",) if has_value else ())


HostErrorValue = _record("Error", ("kind", "message", "job_status"))
Job = _record(
    "Job",
    (
        "id", "kind", "operation", "source", "status", "info", "progress", "input", "outcome",
        "parent_id", "is_part", "part_index", "part_data", "attempt", "created_at", "updated_at",
    ),
)
Message = _record("Message", ("field", "kind", "text"))
Row = _record("Row", ("id", "values", "messages", "valid"))
Page = _record("Page", ("fields", "rows"))
RecordCounts = _record("RecordCounts", ("total", "valid", "error"))
FieldValue = _record("FieldValue", ("field", "value"))
RecordUpdate = _record("RecordUpdate", ("id", "values", "messages"))
NewRecord = _record("NewRecord", ("values", "messages"))
Subscription = _record("Subscription", ("topic", "filter"))
EventValue = _record(
    "Event", ("id", "topic", "environment_id", "job_id", "sheet_id", "context", "payload", "created_at", "attempt")
)
Value_Null = _case("Value_Null", has_value=False)
Value_Boolean = _case("Value_Boolean")
Value_Integer = _case("Value_Integer")
Value_Float = _case("Value_Float")
Value_Text = _case("Value_Text")
SplitParts_Count = _case("SplitParts_Count")
SplitParts_Data = _case("SplitParts_Data")


def _cell(v):
    if v is None:
        return Value_Null()
    if isinstance(v, bool):
        return Value_Boolean(v)
    if isinstance(v, int):
        return Value_Integer(v)
    if isinstance(v, float):
        return Value_Float(v)
    return Value_Text(v)


def _plain(cell):
    return None if isinstance(cell, Value_Null) else cell.value


# ---- the in-memory host ----

ENDED = (JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.CANCELED)
OPEN = (JobStatus.READY, JobStatus.EXECUTING)


class Host:
    def __init__(self, records):
        self.jobs = {}
        self.parts = {}  # parent id -> [part ids]
        self.events = deque()
        self.fields = []
        self.records = []  # [id, {field: value}, [Message]]
        seen = set()
        for i, values in enumerate(records, 1):
            for f in values:
                if f not in seen:
                    seen.add(f)
                    self.fields.append(f)
            self.records.append([i, values, []])
        self.by_id = {r[0]: r for r in self.records}
        self.next_id = 0

    def now(self):
        return int(time.time() * 1000)

    def create(self, kind, operation, input=None, parent=None, index=None, part_data=None):
        self.next_id += 1
        now = self.now()
        job = Job(
            f"job_{self.next_id}", kind, operation, None, JobStatus.READY, None, 0, input, None,
            parent, parent is not None, index, part_data, 1, now, now,
        )
        self.jobs[job.id] = job
        self.emit("job:ready", job)
        return job

    def emit(self, topic, job, payload=None):
        context = {"jobId": job.id, "sheetId": "sheet", "job": f"{job.kind}:{job.operation}", "isPart": job.is_part}
        self.events.append((topic, job.id, context, payload or {}))

    def job(self, job_id):
        job = self.jobs.get(job_id)
        if job is None:
            raise Err(HostErrorValue(ErrorKind.NOT_FOUND, f"job {job_id} not found", None))
        return job

    def open_job(self, job_id, verb):
        job = self.job(job_id)
        if job.status not in OPEN:
            raise Err(HostErrorValue(ErrorKind.CONFLICT, f"cannot {verb} job {job_id}: it is {job.status.name.lower()}", job.status))
        return job

    def ack(self, job_id, info, progress, _eta):
        job = self.open_job(job_id, "ack")
        job.status, job.updated_at = JobStatus.EXECUTING, self.now()
        if info is not None:
            job.info = info
        if progress is not None:
            job.progress = progress
        return job

    def end(self, job_id, status, outcome, info):
        job = self.open_job(job_id, status.name.lower())
        job.status, job.outcome, job.updated_at = status, outcome, self.now()
        if info is not None:
            job.info = info
        if job.parent_id is not None:
            parts = [self.jobs[p] for p in self.parts[job.parent_id]]
            if all(p.status in ENDED for p in parts):
                counts = {
                    "total": len(parts),
                    "completed": sum(p.status is JobStatus.COMPLETE for p in parts),
                    "failed": sum(p.status is JobStatus.FAILED for p in parts),
                    "canceled": sum(p.status is JobStatus.CANCELED for p in parts),
                }
                self.emit("job:parts-completed", self.jobs[job.parent_id], {"parts": counts})
        return job

    def split(self, job_id, how, _parallel):
        job = self.job(job_id)
        if job.status is not JobStatus.EXECUTING or job.is_part:
            raise Err(HostErrorValue(ErrorKind.CONFLICT, f"cannot split job {job_id}", job.status))
        if job_id in self.parts:
            raise Err(HostErrorValue(ErrorKind.CONFLICT, f"job {job_id} is already split", job.status))
        data = (
            [json.dumps({"part": i, "total": how.value}) for i in range(how.value)]
            if isinstance(how, SplitParts_Count)
            else list(how.value)
        )
        self.parts[job_id] = [
            self.create(job.kind, job.operation, job.input, job_id, i, d).id for i, d in enumerate(data)
        ]
        return len(data)

    def counts(self, _sheet):
        error = sum(any(m.kind is MessageKind.ERROR for m in r[2]) for r in self.records)
        return RecordCounts(len(self.records), len(self.records) - error, error)

    def page(self, _sheet, size, number):
        rows = []
        for id, values, messages in self.records[(number - 1) * size : number * size]:
            cells = [_cell(values.get(f)) for f in self.fields]
            valid = not any(m.kind is MessageKind.ERROR for m in messages)
            rows.append(Row(id, cells, list(messages), valid))
        return Page(list(self.fields), rows)

    def update(self, _sheet, updates):
        for u in updates:
            if u.id not in self.by_id:
                raise Err(HostErrorValue(ErrorKind.NOT_FOUND, f"record {u.id} not found", None))
        for u in updates:
            record = self.by_id[u.id]
            for fv in u.values:
                if fv.field not in self.fields:
                    self.fields.append(fv.field)
                record[1][fv.field] = _plain(fv.value)
            if u.messages is not None:
                record[2] = list(u.messages)
        return len(updates)


def install(host):
    """The modules the SDK imports, wired to `host`."""

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("componentize_py_types", Err=Err)
    t = module(
        "wit_world.imports.jobhost_plugin_types",
        ErrorKind=ErrorKind, MessageKind=MessageKind, Message=Message, FieldValue=FieldValue,
        RecordUpdate=RecordUpdate, NewRecord=NewRecord, Subscription=Subscription,
        Value_Null=Value_Null, Value_Boolean=Value_Boolean, Value_Integer=Value_Integer,
        Value_Float=Value_Float, Value_Text=Value_Text,
    )
    jobs = module(
        "wit_world.imports.jobs",
        get=host.job,
        ack=host.ack,
        complete=lambda job_id, outcome, info: host.end(job_id, JobStatus.COMPLETE, outcome, info),
        fail=lambda job_id, outcome, info: host.end(job_id, JobStatus.FAILED, outcome, info),
        split=host.split,
        SplitParts_Count=SplitParts_Count,
        SplitParts_Data=SplitParts_Data,
    )
    records = module("wit_world.imports.records", counts=host.counts, page=host.page, update=host.update)
    log = module("wit_world.imports.log", Level=Level, log=lambda level, message: None)
    config = module("wit_world.imports.config", get=lambda key: None)
    # Outbound HTTP is not part of the scenario: its names exist (the SDK reads some at
    # import), using one fails.
    def absent(interface):
        def lookup(name):
            if name.startswith("__"):
                raise AttributeError(name)

            def unavailable(*_args, **_kwargs):
                raise RuntimeError(f"{interface}.{name}: outbound HTTP is not available in this host")

            return unavailable

        return lookup

    unused = {
        n: module(f"wit_world.imports.{n}", __getattr__=absent(n))
        for n in ("outgoing_handler", "streams", "wasi_http_types")
    }
    imports = module(
        "wit_world.imports", jobs=jobs, records=records, log=log, config=config, jobhost_plugin_types=t, **unused
    )
    exports = module("wit_world.exports", Listener=object)
    module("wit_world", imports=imports, exports=exports)


def matches(topic, flt, event_topic, context):
    """A route's topic (exact, `prefix:*` or `**`) and exact values of the event's context keys:
    what the seeds' listeners use, not jobhost's whole filter language (globs, nested keys)."""
    if topic not in (event_topic, "**") and not (topic.endswith(":*") and event_topic.startswith(topic[:-1])):
        return False
    return all(context.get(k) == v for k, v in (flt or {}).items())


def main():
    sdk, app_dir, records_path = sys.argv[1:4]
    with open(records_path) as f:
        records = [json.loads(line) for line in f]
    host = Host(records)
    install(host)
    sys.path[:0] = [sdk, app_dir]
    import app  # noqa: F401 (registers its routes)
    from jobhost_listener import Listener

    exported = Listener()
    routes = [(s.topic, None if s.filter is None else json.loads(s.filter)) for s in exported.subscriptions()]

    start = time.perf_counter()
    parent = host.create("sheet", "submitLargeSheet")
    delivered = 0
    while host.events:
        topic, job_id, context, payload = host.events.popleft()
        for i, (pattern, flt) in enumerate(routes):
            if matches(pattern, flt, topic, context):
                event = EventValue(
                    f"evt_{delivered}", topic, "env", job_id, "sheet", json.dumps(context), json.dumps(payload),
                    host.now(), 1,
                )
                exported.handle(i, event)  # an Err fails the run: this host does not retry
                delivered += 1
                break
    took = time.perf_counter() - start
    job = host.jobs[parent.id]
    counts = host.counts("sheet")
    print(
        json.dumps(
            {
                "seconds": took,
                "events": delivered,
                "status": job.status.name.lower(),
                "outcome": json.loads(job.outcome) if job.outcome else None,
                "records": {"total": counts.total, "error": counts.error},
            }
        )
    )


if __name__ == "__main__":
    main()
