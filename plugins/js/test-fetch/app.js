// A JavaScript listener that calls out with `fetch` (wasi:http underneath): each job's input
// names the URLs; the outcome says what each answered, or why it could not.

import { api } from "jobhost-listener";

export default function (listener) {
  listener.filter({ job: "space:fetch" }, (l) =>
    l.on("job:ready", async (event) => {
      const job = await api.jobs.get(event.jobId);
      const results = [];
      for (const url of job.input.urls) {
        try {
          const res = await fetch(url, { method: "GET" });
          results.push({ status: res.status, body: await res.text() });
        } catch (e) {
          results.push({ error: String(e) });
        }
      }
      await api.jobs.complete(event.jobId, { outcome: { results } });
    }),
  );
}
