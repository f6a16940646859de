"""A Python listener whose handler raises: the delivery must fail with Python's own message
and traceback in its log, and the host must carry on."""

from jobhost_listener import Listener, jobs, listener, log  # noqa: F401 (Listener is the export)


@listener.on("job:ready", filter={"job": "space:explode"})
def explode(event):
    jobs.ack(event.job_id, info="about to fail")
    log.info("raising now")
    rows = {"row": 7}
    raise ValueError(f"bad input in {rows}")


@listener.on("job:ready", filter={"job": "space:refused"})
def refused(event):
    # A host refusal the handler does not catch: its kind and message reach the log.
    jobs.complete("job_of_someone_else")
