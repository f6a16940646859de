"""The `{{name}}` listener: checks a sheet in parts.

- The parent job (`sheet:{{name}}`) is split into one part per PART_SIZE records.
- Each part reads its page, checks every record with `check`, writes an error message on the
  records that break the rule, and completes.
- When every part has ended the host emits `job:parts-completed`; the parent completes with
  the counts, or fails when a part failed.

Delivery is at least once: `tolerate_repeat` skips work a repeated event finds done.
"""

from jobhost_listener import HostError, Listener, jobs, listener, records, tolerate_repeat  # noqa: F401 (Listener is the export)

JOB = "sheet:{{name}}"
PART_SIZE = 10  # records per part (the sample's 24 records make 3 parts; raise it for real sheets)
REQUIRED = "@"  # the rule: every email contains this


def check(record):
    """The messages for one record: none when it is valid."""
    email = record["email"] or ""
    if REQUIRED in str(email):
        return []
    return [{"field": "email", "type": "error", "message": f"email must contain {REQUIRED}"}]


@listener.on("job:ready", filter={"job": JOB, "isPart": False})
def split(event):
    total = records.counts(event.sheet_id)["total"]
    if tolerate_repeat(jobs.ack, event.job_id, info="splitting", progress=10) is None:
        return
    if total == 0:
        tolerate_repeat(jobs.complete, event.job_id, outcome={"message": "the sheet has no records"})
        return
    try:
        jobs.split(event.job_id, -(-total // PART_SIZE))
    except HostError as e:
        if "already split" not in e.message:
            raise


@listener.on("job:ready", filter={"job": JOB, "isPart": True})
def check_part(event):
    job = tolerate_repeat(jobs.ack, event.job_id, info="checking", progress=10)
    if job is None:
        return
    page = event.data(page_size=PART_SIZE, page_number=job["partData"]["part"] + 1)
    updates = []
    for record in page:
        messages = check(record)
        if messages:
            updates.append({"id": record.id, "messages": messages})
    if updates:
        records.update(event.sheet_id, updates)
    tolerate_repeat(jobs.complete, event.job_id, outcome={"checked": len(page), "invalid": len(updates)})


@listener.on("job:parts-completed", filter={"job": JOB, "isPart": False})
def finish(event):
    parts = event.payload["parts"]
    counts = records.counts(event.sheet_id)
    outcome = {
        "message": f"{counts['total']} records, {counts['error']} invalid",
        "parts": parts,
        "records": {"total": counts["total"], "valid": counts["valid"], "error": counts["error"]},
    }
    end = jobs.complete if parts["failed"] + parts["canceled"] == 0 else jobs.fail
    tolerate_repeat(end, event.job_id, outcome=outcome)
