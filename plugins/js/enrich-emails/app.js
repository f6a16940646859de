// The enrich-emails example in JavaScript: the same behaviour as plugins/enrich-emails (Rust),
// with the standard `fetch` for the call out.
//
// Parent ({job: sheet:enrichEmails, isPart: false}): on job:ready split into one part per
// 1,000 records; on job:parts-completed complete the parent with how many addresses its parts
// checked and flagged (fail it when a part failed). Part: read its page, POST the page's
// addresses in one request to the service (`verify_url` in the manifest's [config], granted in
// allowed_outbound_hosts), and write a `warn` message on the email cell of each record the
// service flags, keeping its other messages. The service answers
// {"flagged": [{"email", "reason"}, …]}; plugins/enrich-emails/verify-service.py is a small
// one to try it with.

import { api, HostError, log, tolerateRepeat } from "jobhost-listener";

const JOB = "sheet:enrichEmails";
const BATCH = 1000;

export default function (listener) {
  listener.filter({ job: JOB, isPart: false }, (l) => {
    l.on("job:ready", parentReady).on("job:parts-completed", partsCompleted);
  });
  listener.filter({ job: JOB, isPart: true }, (l) => l.on("job:ready", partReady));
}

async function parentReady(event) {
  const { jobId, sheetId } = event;
  const counts = await api.records.counts(sheetId);
  if (tolerateRepeat(() => api.jobs.ack(jobId, { info: "Checking addresses", progress: 10 })) === null) return;
  if (counts.total === 0) {
    tolerateRepeat(() => api.jobs.complete(jobId, { outcome: { message: "The sheet has no records." } }));
    return;
  }
  try {
    await api.jobs.split(jobId, { parts: Math.ceil(counts.total / BATCH) });
  } catch (e) {
    if (!(e instanceof HostError && e.message.includes("already split"))) throw e;
  }
}

async function partsCompleted(event) {
  const parts = event.payload.parts;
  const failed = parts.failed + parts.canceled;
  // The parts' own outcomes say what each checked and flagged.
  let checked = 0;
  let flagged = 0;
  for (const part of api.jobs.listParts(event.jobId)) {
    checked += part.outcome?.checked ?? 0;
    flagged += part.outcome?.flagged ?? 0;
  }
  let message = `${checked} addresses checked, ${flagged} flagged`;
  if (failed > 0) message += `; ${failed} of ${parts.total} parts did not finish`;
  const outcome = { message, checked, flagged, parts };
  const end = failed > 0 ? api.jobs.fail : api.jobs.complete;
  tolerateRepeat(() => end(event.jobId, { outcome, info: message }));
}

async function partReady(event) {
  const { jobId, sheetId } = event;
  const job = tolerateRepeat(() => api.jobs.ack(jobId));
  if (job === null) return;
  const url = api.config.get("verify_url");
  if (url === null) throw new Error("set verify_url in the manifest's [config]");
  const page = await event.data({ pageSize: BATCH, pageNumber: job.partData.part + 1 });
  const emails = page.map((r) => r.get("email")).filter((e) => typeof e === "string");
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ emails }),
  });
  if (res.status !== 200) throw new Error(`the verification service answered ${res.status}: ${await res.text()}`);
  const flagged = new Map(((await res.json()).flagged ?? []).map((f) => [f.email, f.reason ?? "flagged"]));
  const updates = [];
  for (const record of page) {
    const reason = flagged.get(record.get("email"));
    if (reason === undefined) continue;
    const text = `the verification service flags this address: ${reason}`;
    if (record.messages.some((m) => m.message === text)) continue; // a repeated delivery: already written
    const messages = [...record.messages, { field: "email", type: "warn", message: text }];
    updates.push({ id: record.id, messages });
  }
  if (updates.length > 0) api.records.update(sheetId, updates);
  const flaggedHere = page.filter((r) => flagged.has(r.get("email"))).length;
  const message = `checked ${emails.length} addresses, ${flaggedHere} flagged`;
  log.info(message);
  tolerateRepeat(() =>
    api.jobs.complete(jobId, { outcome: { message, checked: emails.length, flagged: flaggedHere }, info: message }),
  );
}
