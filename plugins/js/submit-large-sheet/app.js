// The seeds' two listeners in JavaScript: the same behaviour as plugins/submit-large-sheet
// (Rust) and plugins/python/submit-large-sheet.
//
// Parent ({job: sheet:submitLargeSheet, isPart: false}): on job:ready read the counts, ack,
// split into ceil(total / 1000) parts; on job:parts-completed complete (or fail, when a part
// failed or was canceled) with the counts. Part (isPart: true): ack, validate page part + 1 of
// 1000 records, write error messages back on invalid cells, complete.

import { api, HostError, log, tolerateRepeat } from "jobhost-listener";

const JOB = "sheet:submitLargeSheet";
const BATCH = 1000;
const ENDED = ["complete", "failed", "canceled"];

export default function (listener) {
  listener.filter({ job: JOB, isPart: false }, (l) => {
    l.on("job:ready", parentReady).on("job:parts-completed", partsCompleted);
  });
  listener.filter({ job: JOB, isPart: true }, (l) => l.on("job:ready", partReady));
}

async function parentReady(event) {
  const { jobId, sheetId } = event;
  const job = await api.jobs.get(jobId);
  if (ENDED.includes(job.status)) return;
  const counts = await api.records.counts(sheetId);
  if (tolerateRepeat(() => api.jobs.ack(jobId, { info: "Splitting Job", progress: 10 })) === null) return;
  if (counts.total === 0) {
    tolerateRepeat(() => api.jobs.complete(jobId, { outcome: { message: "The sheet has no records; nothing to do." } }));
    return;
  }
  const parts = Math.ceil(counts.total / BATCH);
  try {
    await api.jobs.split(jobId, { parts });
  } catch (e) {
    if (!(e instanceof HostError && e.message.includes("already split"))) throw e;
  }
  log.info(`split ${jobId} into ${parts} parts`);
  tolerateRepeat(() => api.jobs.ack(jobId, { info: `Job split into ${parts} parts.`, progress: 20 }));
}

async function partsCompleted(event) {
  const { jobId, sheetId } = event;
  const parts = event.payload.parts;
  const counts = await api.records.counts(sheetId);
  const summary =
    `${parts.completed} of ${parts.total} parts completed, ${parts.failed} failed, ${parts.canceled} canceled; ` +
    `${counts.total} records: ${counts.valid} valid, ${counts.error} invalid.`;
  const outcome = { message: summary, parts, records: counts };
  const end = parts.failed > 0 || parts.canceled > 0 ? api.jobs.fail : api.jobs.complete;
  tolerateRepeat(() => end(jobId, { outcome, info: summary }));
}

async function partReady(event) {
  const { jobId, sheetId } = event;
  const job = tolerateRepeat(() => api.jobs.ack(jobId));
  if (job === null) return;
  const part = job.partData.part;
  const parent = await api.jobs.get(job.parentId);
  if ((parent.input?.failParts ?? []).includes(part)) {
    tolerateRepeat(() => api.jobs.fail(jobId, { outcome: { message: `part ${part} failed on purpose` } }));
    return;
  }
  const records = await event.data({ pageSize: BATCH, pageNumber: part + 1 });
  const updates = [];
  let invalid = 0;
  for (const record of records) {
    const errors = validate(record);
    if (errors.length > 0) invalid += 1;
    if (!sameMessages(record.messages, errors)) updates.push({ id: record.id, messages: errors });
  }
  if (updates.length > 0) await api.records.update(sheetId, updates);
  const message = `validated ${records.length} records, ${invalid} invalid`;
  tolerateRepeat(() => api.jobs.complete(jobId, { outcome: { message, invalid }, info: message }));
}

function sameMessages(current, wanted) {
  const key = (m) => `${m.field ?? ""}\u0000${m.message}`;
  const a = current.map(key).sort();
  const b = wanted.map(key).sort();
  return a.length === b.length && a.every((k, i) => k === b[i]);
}

const error = (field, message) => ({ field, type: "error", message });
const blank = (v) => v === null || (typeof v === "string" && v.trim() === "");

function validate(record) {
  const errors = [];
  for (const field of ["firstName", "lastName", "email"]) {
    if (blank(record.get(field))) errors.push(error(field, `${field} is required`));
  }
  const email = record.get("email");
  if (typeof email === "string" && email.trim() !== "" && !validEmail(email)) {
    errors.push(error("email", `\`${email}\` is not an email address (local@domain.tld)`));
  }
  const age = record.get("age");
  if (!blank(age) && !validAge(age)) {
    errors.push(error("age", `age must be an integer from 0 to 150, not ${show(age)}`));
  }
  return errors;
}

function validAge(age) {
  if (typeof age === "number") return Number.isInteger(age) && age >= 0 && age <= 150;
  if (typeof age === "string") {
    const t = age.trim();
    if (!/^[+-]?[0-9]+$/.test(t)) return false;
    const n = Number(t);
    return n >= 0 && n <= 150;
  }
  return false;
}

function show(v) {
  if (typeof v === "string") return `"${v}"`;
  return String(v);
}

function validEmail(email) {
  const at = email.indexOf("@");
  if (at < 0) return false;
  const local = email.slice(0, at);
  const domain = email.slice(at + 1);
  return (
    local.length > 0 &&
    !domain.includes("@") &&
    domain.includes(".") &&
    !domain.startsWith(".") &&
    !domain.endsWith(".") &&
    !/\s/.test(email)
  );
}
