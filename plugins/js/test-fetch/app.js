// A JavaScript listener that calls out with `fetch` (wasi:http underneath): the job's input
// lists the requests (`{url, method?, body?, headers?}`); the outcome says what each answered,
// or why it got no answer. The twin of `plugins/python/test-fetch`.

import { api } from "jobhost-listener";

export default function (listener) {
  listener.filter({ job: "space:fetch" }, (l) =>
    l.on("job:ready", async (event) => {
      const job = await api.jobs.get(event.jobId);
      const results = [];
      for (const r of job.input.requests) {
        try {
          const res = await fetch(r.url, { method: r.method ?? "GET", body: r.body, headers: r.headers });
          results.push({ status: res.status, body: await res.text(), header: res.headers.get("x-test") });
        } catch (e) {
          results.push({ error: String(e) });
        }
      }
      await api.jobs.complete(event.jobId, { outcome: { results } });
    }),
  );
}
