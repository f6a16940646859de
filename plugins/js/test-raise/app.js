// A JavaScript listener whose handlers fail: the delivery must fail with JavaScript's own
// message (and stack) in its log, and the host must carry on.

import { api, log } from "jobhost-listener";

export default function (listener) {
  listener.filter({ job: "space:explode" }, (l) =>
    l.on("job:ready", async (event) => {
      await api.jobs.ack(event.jobId, { info: "about to fail" });
      log.info("throwing now");
      const row = { row: 7 };
      throw new TypeError(`bad input in ${JSON.stringify(row)}`);
    }),
  );
  // Synchronous, and a host refusal it does not catch.
  listener.filter({ job: "space:refused" }, (l) => l.on("job:ready", () => api.jobs.complete("job_of_someone_else")));
  // A promise that never settles within the delivery.
  listener.filter({ job: "space:hang" }, (l) => l.on("job:ready", () => new Promise(() => {})));
}
