"""A Python listener that calls out with the SDK's ``http`` client (wasi:http underneath): the
job's input lists the requests (``{url, method?, body?, headers?}``); the outcome says what
each answered, or why it got no answer. The twin of ``plugins/js/test-fetch``."""

from jobhost_listener import HttpError, Listener, http, jobs, listener  # noqa: F401 (Listener is the export)


@listener.on("job:ready", filter={"job": "space:fetch"})
def fetch(event):
    results = []
    for r in jobs.get(event.job_id)["input"]["requests"]:
        try:
            answer = http.request(r.get("method", "GET"), r["url"], body=r.get("body"), headers=r.get("headers"))
            results.append({"status": answer.status, "body": answer.text(), "header": answer.header("x-test")})
        except HttpError as e:
            results.append({"error": str(e)})
    jobs.complete(event.job_id, outcome={"results": results})
