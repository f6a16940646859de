// The `{{name}}` listener: checks a sheet in parts.
//
// - The parent job (`sheet:{{name}}`) is split into one part per PART_SIZE records.
// - Each part reads its page, checks every record with `check`, writes an error message on
//   the records that break the rule, and completes.
// - When every part has ended the host emits `job:parts-completed`; the parent completes with
//   the counts, or fails when a part failed.
//
// Delivery is at least once: `tolerateRepeat` skips work a repeated event finds done.

import { api, HostError, tolerateRepeat } from "jobhost-listener";

const JOB = "sheet:{{name}}";
const PART_SIZE = 10; // records per part (the sample's 24 records make 3 parts; raise it for real sheets)
const REQUIRED = "@"; // the rule: every email contains this

/** The messages for one record: none when it is valid. */
function check(record) {
  const email = String(record.get("email") ?? "");
  if (email.includes(REQUIRED)) return [];
  return [{ field: "email", type: "error", message: `email must contain ${REQUIRED}` }];
}


export default function (listener) {
  listener.filter({ job: JOB, isPart: false }, (l) => {
    l.on("job:ready", split).on("job:parts-completed", finish);
  });
  listener.filter({ job: JOB, isPart: true }, (l) => l.on("job:ready", checkPart));
}

async function split(event) {
  const { total } = await api.records.counts(event.sheetId);
  if (tolerateRepeat(() => api.jobs.ack(event.jobId, { info: "splitting", progress: 10 })) === null) return;
  if (total === 0) {
    tolerateRepeat(() => api.jobs.complete(event.jobId, { outcome: { message: "the sheet has no records" } }));
    return;
  }
  try {
    await api.jobs.split(event.jobId, { parts: Math.ceil(total / PART_SIZE) });
  } catch (e) {
    if (!(e instanceof HostError && e.message.includes("already split"))) throw e;
  }
}

async function checkPart(event) {
  const job = tolerateRepeat(() => api.jobs.ack(event.jobId, { info: "checking", progress: 10 }));
  if (job === null) return;
  const records = await event.data({ pageSize: PART_SIZE, pageNumber: job.partData.part + 1 });
  const updates = [];
  for (const record of records) {
    const messages = check(record);
    if (messages.length > 0) updates.push({ id: record.id, messages });
  }
  if (updates.length > 0) await api.records.update(event.sheetId, updates);
  tolerateRepeat(() => api.jobs.complete(event.jobId, { outcome: { checked: records.length, invalid: updates.length } }));
}

async function finish(event) {
  const parts = event.payload.parts;
  const counts = await api.records.counts(event.sheetId);
  const outcome = {
    message: `${counts.total} records, ${counts.error} invalid`,
    parts,
    records: { total: counts.total, valid: counts.valid, error: counts.error },
  };
  const end = parts.failed + parts.canceled === 0 ? api.jobs.complete : api.jobs.fail;
  tolerateRepeat(() => end(event.jobId, { outcome }));
}
