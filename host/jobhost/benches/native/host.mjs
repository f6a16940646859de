// Runs a JavaScript listener plugin natively (Node.js) against a small in-memory host: the
// baseline of `--bench runtime -- native`, which compares a plugin built into a component and
// run by jobhost with the same code run outside WebAssembly.
//
//   node host.mjs SDK_FILE APP_FILE RECORDS_JSONL
//
// The plugin's `app.js` and the SDK (`plugin-sdk/js/jobhost-listener.js`) run unchanged; what
// this file replaces is what componentize-js binds their imports to (`jobhost:plugin/*`): a
// module hook resolves those to the in-memory host below instead of jobhost. The host keeps
// jobs, parts and records in maps and delivers events one at a time, in order — no store, no
// durability — so the time is the listener's own code plus the cheapest host a listener
// could have. It runs the seeds' job (`sheet:submitLargeSheet`) over the records and prints
// one JSON line: seconds from the job's creation to its end, its status, its outcome and the
// records' counts (the benchmark checks them).

import { readFileSync } from "node:fs";
import { register } from "node:module";
import { pathToFileURL } from "node:url";

const [sdkFile, appFile, recordsFile] = process.argv.slice(2);

// ---- the in-memory host ----------------------------------------------------------------

const ENDED = ["complete", "failed", "canceled"];
const OPEN = ["ready", "executing"];

class Refused {
  // componentize-js throws a WIT `result`'s error as an object with the error in `payload`.
  constructor(kind, message, jobStatus) {
    this.payload = { kind, message, jobStatus };
  }
}

const jobs = new Map();
const parts = new Map(); // parent id -> [part ids]
const events = [];
const records = []; // {id, values: Map, messages: [...]}
const fields = [];
let nextId = 0;

for (const line of readFileSync(recordsFile, "utf8").split("\n")) {
  if (line === "") continue;
  const values = new Map(Object.entries(JSON.parse(line)));
  for (const f of values.keys()) if (!fields.includes(f)) fields.push(f);
  records.push({ id: BigInt(records.length + 1), values, messages: [] });
}
const byId = new Map(records.map((r) => [r.id, r]));

function emit(topic, job, payload = {}) {
  const context = { jobId: job.id, sheetId: "sheet", job: `${job.kind}:${job.operation}`, isPart: job.isPart };
  events.push({ topic, jobId: job.id, context, payload });
}

function create(kind, operation, input, parentId, partIndex, partData) {
  nextId += 1;
  const now = BigInt(Date.now());
  const job = {
    id: `job_${nextId}`,
    kind,
    operation,
    source: undefined,
    status: "ready",
    info: undefined,
    progress: 0,
    input,
    outcome: undefined,
    parentId,
    isPart: parentId !== undefined,
    partIndex,
    partData,
    attempt: 1,
    createdAt: now,
    updatedAt: now,
  };
  jobs.set(job.id, job);
  emit("job:ready", job);
  return job;
}

function find(id) {
  const job = jobs.get(id);
  if (job === undefined) throw new Refused("not-found", `job ${id} not found`);
  return job;
}

function open(id, verb) {
  const job = find(id);
  if (!OPEN.includes(job.status)) throw new Refused("conflict", `cannot ${verb} job ${id}: it is ${job.status}`, job.status);
  return job;
}

function end(id, status, outcome, info) {
  const job = open(id, status);
  Object.assign(job, { status, outcome, updatedAt: BigInt(Date.now()) });
  if (info !== undefined) job.info = info;
  if (job.parentId !== undefined) {
    const siblings = parts.get(job.parentId).map((p) => jobs.get(p));
    if (siblings.every((p) => ENDED.includes(p.status))) {
      const count = (s) => siblings.filter((p) => p.status === s).length;
      const summary = { total: siblings.length, completed: count("complete"), failed: count("failed"), canceled: count("canceled") };
      emit("job:parts-completed", jobs.get(job.parentId), { parts: summary });
    }
  }
  return job;
}

const isError = (m) => m.kind === "error";
const cell = (v) => {
  if (v === null || v === undefined) return { tag: "null" };
  if (typeof v === "boolean") return { tag: "boolean", val: v };
  if (typeof v === "number") return Number.isInteger(v) ? { tag: "integer", val: BigInt(v) } : { tag: "float", val: v };
  return { tag: "text", val: v };
};
const plain = (c) => (c.tag === "null" ? null : c.tag === "integer" ? Number(c.val) : c.val);

const wit = {
  jobs: {
    get: find,
    ack(id, info, progress) {
      const job = open(id, "ack");
      Object.assign(job, { status: "executing", updatedAt: BigInt(Date.now()) });
      if (info !== undefined) job.info = info;
      if (progress !== undefined) job.progress = progress;
      return job;
    },
    complete: (id, outcome, info) => end(id, "complete", outcome, info),
    fail: (id, outcome, info) => end(id, "failed", outcome, info),
    split(id, how) {
      const job = find(id);
      if (job.status !== "executing" || job.isPart) throw new Refused("conflict", `cannot split job ${id}`, job.status);
      if (parts.has(id)) throw new Refused("conflict", `job ${id} is already split`, job.status);
      const data = how.tag === "count" ? Array.from({ length: how.val }, (_, i) => JSON.stringify({ part: i, total: how.val })) : how.val;
      parts.set(id, data.map((d, i) => create(job.kind, job.operation, job.input, id, i, d).id));
      return data.length;
    },
  },
  records: {
    counts() {
      const error = records.filter((r) => r.messages.some(isError)).length;
      return { total: BigInt(records.length), valid: BigInt(records.length - error), error: BigInt(error) };
    },
    page(_sheet, size, number) {
      const rows = records.slice((number - 1) * size, number * size).map((r) => ({
        id: r.id,
        values: fields.map((f) => cell(r.values.get(f))),
        messages: [...r.messages],
        valid: !r.messages.some(isError),
      }));
      return { fields: [...fields], rows };
    },
    update(_sheet, updates) {
      for (const u of updates) if (!byId.has(u.id)) throw new Refused("not-found", `record ${u.id} not found`);
      for (const u of updates) {
        const record = byId.get(u.id);
        for (const { field, value } of u.values) {
          if (!fields.includes(field)) fields.push(field);
          record.values.set(field, plain(value));
        }
        if (u.messages !== undefined) record.messages = [...u.messages];
      }
      return BigInt(updates.length);
    },
  },
  sheets: {
    get: (id) => ({ id, name: id }),
  },
  config: {
    get: () => undefined,
    secret: (name) => {
      throw new Refused("denied", `secret ${name} is not granted`);
    },
  },
  log: { log: () => {} },
  completion: {
    // componentize-js runs the event loop for a deferred handler; here `await` does.
    defer: () => {},
    settle: (error) => {
      if (error !== undefined) throw new Error(`the handler failed: ${error}`);
    },
  },
};

globalThis.__jobhostNativeHost = wit;

// ---- module wiring -----------------------------------------------------------------------

// `jobhost:plugin/<interface>@…` resolves to a module re-exporting that interface of `wit`;
// the SDK and the app (`.js` files without a package.json) load as ES modules.
const hooks = `
const names = ${JSON.stringify(Object.fromEntries(Object.entries(wit).map(([k, v]) => [k, Object.keys(v)])))};
const esm = new Set(${JSON.stringify([pathToFileURL(sdkFile).href, pathToFileURL(appFile).href])});
export async function resolve(specifier, context, next) {
  const wit = /^jobhost:plugin\\/([a-z-]+)@/.exec(specifier);
  if (wit) return { url: "jobhost-native:" + wit[1], shortCircuit: true };
  if (specifier === "jobhost-listener") return { url: ${JSON.stringify(pathToFileURL(sdkFile).href)}, shortCircuit: true };
  return next(specifier, context);
}
export async function load(url, context, next) {
  if (url.startsWith("jobhost-native:")) {
    const iface = url.slice("jobhost-native:".length);
    const source = names[iface].map((n) => "export const " + n + " = globalThis.__jobhostNativeHost[" + JSON.stringify(iface) + "]." + n + ";").join("\\n");
    return { format: "module", source, shortCircuit: true };
  }
  if (esm.has(url)) return { ...(await next(url, context)), format: "module", shortCircuit: true };
  return next(url, context);
}`;
register(`data:text/javascript,${encodeURIComponent(hooks)}`);

const { exported, listener } = await import("jobhost-listener");
const app = await import(pathToFileURL(appFile).href);
app.default(listener);

// ---- the run -----------------------------------------------------------------------------

const routes = exported.subscriptions().map((s) => ({ topic: s.topic, filter: s.filter === undefined ? {} : JSON.parse(s.filter) }));
// A route's topic (exact, `prefix:*` or `**`) and exact values of the event's context keys: what
// the seeds' listeners use, not jobhost's whole filter language (globs, nested keys).
const matches = (route, e) =>
  (route.topic === e.topic || route.topic === "**" || (route.topic.endsWith(":*") && e.topic.startsWith(route.topic.slice(0, -1)))) &&
  Object.entries(route.filter).every(([k, v]) => e.context[k] === v);

const start = process.hrtime.bigint();
const parent = create("sheet", "submitLargeSheet");
let delivered = 0;
while (events.length > 0) {
  const e = events.shift();
  const route = routes.findIndex((r) => matches(r, e));
  if (route < 0) continue;
  const event = {
    id: `evt_${delivered}`,
    topic: e.topic,
    environmentId: "env",
    jobId: e.jobId,
    sheetId: "sheet",
    context: JSON.stringify(e.context),
    payload: JSON.stringify(e.payload),
    createdAt: BigInt(Date.now()),
    attempt: 1,
  };
  await exported.handle(route, event); // a failed handler ends the run: this host does not retry
  delivered += 1;
}
const seconds = Number(process.hrtime.bigint() - start) / 1e9;
const job = jobs.get(parent.id);
const counts = wit.records.counts();
console.log(
  JSON.stringify({
    seconds,
    events: delivered,
    status: job.status,
    outcome: job.outcome === undefined ? null : JSON.parse(job.outcome),
    records: { total: Number(counts.total), error: Number(counts.error) },
  }),
);
