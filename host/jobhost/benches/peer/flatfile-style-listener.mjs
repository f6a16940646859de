// The seeds' listener as Flatfile users run it today: a Node.js process outside the host that
// follows the event stream and does every step over the REST API — ack, counts, split, page,
// write back, complete — with the rules of plugins/submit-large-sheet. It is the peer of the
// `serve` benchmark (host/jobhost/benches/serve.rs), not part of the product.
//
//   node flatfile-style-listener.mjs http://127.0.0.1:PORT/v1 TOKEN [IN_FLIGHT]
//
// Events are handled concurrently, at most IN_FLIGHT (default 64, `jobhost serve`'s default)
// at once. Any failed call ends the process with exit code 1 and the reason on stderr.

const [base, token, inFlightArg] = process.argv.slice(2);
const IN_FLIGHT = Number(inFlightArg ?? 64);
const JOB = "sheet:submitLargeSheet";
const BATCH = 1000;
const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" };

async function call(method, path, body) {
  const res = await fetch(`${base}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return JSON.parse(text).data;
}

// ---- the rules -------------------------------------------------------------------------

const REQUIRED = ["firstName", "lastName", "email"];
const isBlank = (v) => v === null || v === undefined || (typeof v === "string" && v.trim() === "");

function emailOk(email) {
  const parts = email.split("@");
  if (parts.length !== 2) return false;
  const [local, domain] = parts;
  return local !== "" && domain.includes(".") && domain[0] !== "." && !domain.endsWith(".") && !/\s/.test(email);
}

function ageOk(age) {
  const n = typeof age === "string" && /^\s*[+-]?\d+\s*$/.test(age) ? Number(age.trim()) : age;
  return typeof n === "number" && Number.isInteger(n) && n >= 0 && n <= 150;
}

function errorsOf(values) {
  const value = (f) => values[f]?.value ?? null;
  const out = REQUIRED.filter((f) => isBlank(value(f))).map((f) => [f, `${f} is required`]);
  const email = value("email");
  if (typeof email === "string" && !isBlank(email) && !emailOk(email)) {
    out.push(["email", `\`${email}\` is not an email address (local@domain.tld)`]);
  }
  const age = value("age");
  if (!isBlank(age) && !ageOk(age)) {
    out.push(["age", `age must be an integer from 0 to 150, not ${typeof age === "string" ? `"${age}"` : String(age)}`]);
  }
  return out.map(([field, message]) => ({ type: "error", field, message }));
}

function unchanged(record, wanted) {
  const current = Object.entries(record.values).flatMap(([, cell]) => cell.messages ?? []).concat(record.messages ?? []);
  const keys = (ms) => ms.map((m) => `${m.field ?? ""}\n${m.message}`).sort().join("\n\n");
  return keys(current) === keys(wanted);
}

// ---- the handlers ----------------------------------------------------------------------

async function parentReady(event) {
  const id = event.context.jobId;
  const job = await call("GET", `/jobs/${id}`);
  if (["complete", "failed", "canceled"].includes(job.status)) return;
  const counts = await call("GET", `/sheets/${event.context.sheetId}/counts`);
  await call("POST", `/jobs/${id}/ack`, { info: "Splitting Job", progress: 10 });
  if (counts.total === 0) {
    await call("POST", `/jobs/${id}/complete`, { outcome: { message: "The sheet has no records; nothing to do." } });
    return;
  }
  const parts = Math.ceil(counts.total / BATCH);
  await call("POST", `/jobs/${id}/split`, { parts });
  await call("POST", `/jobs/${id}/ack`, { info: `Job split into ${parts} parts.`, progress: 20 });
}

async function partReady(event) {
  const id = event.context.jobId;
  const sheet = event.context.sheetId;
  const job = await call("POST", `/jobs/${id}/ack`, {});
  const part = job.partData.part;
  const parent = await call("GET", `/jobs/${job.parentId}`);
  if ((parent.input?.failParts ?? []).includes(part)) {
    await call("POST", `/jobs/${id}/fail`, { outcome: { message: `part ${part} failed on purpose` } });
    return;
  }
  const page = await call("GET", `/sheets/${sheet}/records?pageSize=${BATCH}&pageNumber=${part + 1}`);
  const updates = [];
  let invalid = 0;
  for (const record of page.records) {
    const errors = errorsOf(record.values);
    if (errors.length > 0) invalid += 1;
    if (!unchanged(record, errors)) updates.push({ id: record.id, messages: errors });
  }
  if (updates.length > 0) await call("PATCH", `/sheets/${sheet}/records`, updates);
  const message = `validated ${page.records.length} records, ${invalid} invalid`;
  await call("POST", `/jobs/${id}/complete`, { outcome: { message, invalid }, info: message });
}

async function partsCompleted(event) {
  const id = event.context.jobId;
  const parts = event.payload.parts;
  const c = await call("GET", `/sheets/${event.context.sheetId}/counts`);
  const summary =
    `${parts.completed} of ${parts.total} parts completed, ${parts.failed} failed, ${parts.canceled} canceled; ` +
    `${c.total} records: ${c.valid} valid, ${c.error} invalid.`;
  const body = { outcome: { message: summary, parts, records: c }, info: summary };
  await call("POST", `/jobs/${id}/${parts.failed > 0 || parts.canceled > 0 ? "fail" : "complete"}`, body);
}

function route(event) {
  if (event.payload?.job !== JOB) return null;
  if (event.topic === "job:ready") return event.payload.isPart ? partReady : parentReady;
  if (event.topic === "job:parts-completed" && !event.payload.isPart) return partsCompleted;
  return null;
}

// ---- following the stream --------------------------------------------------------------

let running = 0;
const waiting = [];
function handle(handler, event) {
  if (running >= IN_FLIGHT) {
    waiting.push([handler, event]);
    return;
  }
  running += 1;
  handler(event)
    .catch((e) => {
      console.error(`${event.topic} ${event.context.jobId}: ${e.message}`);
      process.exit(1);
    })
    .finally(() => {
      running -= 1;
      const next = waiting.shift();
      if (next) handle(...next);
    });
}

const res = await fetch(`${base}/events/stream?since=0&topic=job:*`, { headers });
if (!res.ok) {
  console.error(`the event stream was refused: ${res.status} ${await res.text()}`);
  process.exit(1);
}
console.log("following the event stream");
const decoder = new TextDecoder();
let buffer = "";
for await (const chunk of res.body) {
  buffer += decoder.decode(chunk, { stream: true });
  let end;
  while ((end = buffer.indexOf("\n")) >= 0) {
    const line = buffer.slice(0, end);
    buffer = buffer.slice(end + 1);
    if (!line.startsWith("data:")) continue;
    const event = JSON.parse(line.slice(5));
    const handler = route(event);
    if (handler) handle(handler, event);
  }
}
console.error("the event stream ended");
process.exit(1);
