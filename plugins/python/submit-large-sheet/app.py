"""The seeds' two listeners in Python: the same behaviour as plugins/submit-large-sheet (Rust).

Parent (`{job: sheet:submitLargeSheet, isPart: false}`): on job:ready read the counts, ack,
split into ceil(total / 1000) parts; on job:parts-completed complete (or fail, when a part
failed or was canceled) with the counts. Part (`isPart: true`): ack, validate page part + 1
of 1000 records, write error messages back on invalid cells, complete.
"""

from jobhost_listener import HostError, Listener, jobs, listener, log, records, tolerate_repeat  # noqa: F401 (Listener is the export)

JOB = "sheet:submitLargeSheet"
BATCH = 1000


@listener.on("job:ready", filter={"job": JOB, "isPart": False})
def parent_ready(event):
    job = jobs.get(event.job_id)
    if job["status"] in ("complete", "failed", "canceled"):
        return
    counts = records.counts(event.sheet_id)
    if tolerate_repeat(jobs.ack, event.job_id, info="Splitting Job", progress=10) is None:
        return
    if counts["total"] == 0:
        tolerate_repeat(jobs.complete, event.job_id, outcome={"message": "The sheet has no records; nothing to do."})
        return
    parts = -(-counts["total"] // BATCH)
    try:
        jobs.split(event.job_id, parts)
    except HostError as e:
        if "already split" not in e.message:
            raise
    log.info(f"split {event.job_id} into {parts} parts")
    tolerate_repeat(jobs.ack, event.job_id, info=f"Job split into {parts} parts.", progress=20)


@listener.on("job:parts-completed", filter={"job": JOB, "isPart": False})
def parent_parts_completed(event):
    parts = event.payload["parts"]
    counts = records.counts(event.sheet_id)
    summary = (
        f"{parts['completed']} of {parts['total']} parts completed, {parts['failed']} failed, "
        f"{parts['canceled']} canceled; {counts['total']} records: {counts['valid']} valid, "
        f"{counts['error']} invalid."
    )
    outcome = {"message": summary, "parts": parts, "records": counts}
    end = jobs.fail if parts["failed"] or parts["canceled"] else jobs.complete
    tolerate_repeat(end, event.job_id, outcome=outcome, info=summary)


@listener.on("job:ready", filter={"job": JOB, "isPart": True})
def part_ready(event):
    job = tolerate_repeat(jobs.ack, event.job_id)
    if job is None:
        return
    part = job["partData"]["part"]
    parent = jobs.get(job["parentId"])
    if part in ((parent["input"] or {}).get("failParts") or []):
        tolerate_repeat(jobs.fail, event.job_id, outcome={"message": f"part {part} failed on purpose"})
        return
    page = event.data(page_size=BATCH, page_number=part + 1)
    updates, invalid = [], 0
    for record in page:
        errors = validate(record)
        invalid += bool(errors)
        if not same_messages(record.messages, errors):
            updates.append({"id": record.id, "messages": errors})
    if updates:
        records.update(event.sheet_id, updates)
    message = f"validated {len(page)} records, {invalid} invalid"
    tolerate_repeat(jobs.complete, event.job_id, outcome={"message": message, "invalid": invalid}, info=message)


def same_messages(current, wanted):
    key = lambda m: (m.get("field") or "", m["message"])  # noqa: E731
    return sorted(map(key, current)) == sorted(map(key, wanted))


def error(field, message):
    return {"field": field, "type": "error", "message": message}


def blank(value):
    return value is None or (isinstance(value, str) and not value.strip())


def validate(record):
    errors = []
    for field in ("firstName", "lastName", "email"):
        if blank(record[field]):
            errors.append(error(field, f"{field} is required"))
    email = record["email"]
    if isinstance(email, str) and email.strip() and not valid_email(email):
        errors.append(error("email", f"`{email}` is not an email address (local@domain.tld)"))
    age = record["age"]
    if not blank(age) and not valid_age(age):
        errors.append(error("age", f"age must be an integer from 0 to 150, not {show(age)}"))
    return errors


def valid_age(age):
    if isinstance(age, bool):
        return False
    if isinstance(age, int):
        return 0 <= age <= 150
    if isinstance(age, str):
        text = age.strip()
        digits = text[1:] if text[:1] in "+-" else text
        return digits.isascii() and digits.isdigit() and 0 <= int(text) <= 150
    return False


def show(value):
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def valid_email(email):
    local, at, domain = email.partition("@")
    return (
        bool(at)
        and bool(local)
        and "@" not in domain
        and "." in domain
        and not domain.startswith(".")
        and not domain.endswith(".")
        and not any(c.isspace() for c in email)
    )
