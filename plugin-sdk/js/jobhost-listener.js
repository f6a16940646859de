// jobhost listeners in JavaScript, in the shape of @flatfile/listener, built into a WebAssembly
// component with componentize-js (`jobhost plugin build DIR`).
//
// A plugin is `app.js`, whose default export receives the listener:
//
//   import { api } from "jobhost-listener";
//
//   export default function (listener) {
//     listener.filter({ job: "sheet:submitLargeSheet", isPart: true }, (l) => {
//       l.on("job:ready", async (event) => {
//         const { jobId } = event.context;
//         await api.jobs.ack(jobId, { info: "validating", progress: 10 });
//         const records = await event.data({ pageSize: 1000, pageNumber: 1 });
//         await api.jobs.complete(jobId, { outcome: { message: `${records.length} records` } });
//       });
//     });
//   }
//
// Host calls are synchronous underneath; `await` on them is allowed (and costs a microtask).
// `fetch` reaches the hosts the plugin's manifest grants (`allowed_outbound_hosts`).
// A refused call throws `HostError` (`kind`: not-found, conflict, invalid, denied, limit,
// internal). An exception a handler lets escape, or a rejected promise, fails the delivery
// (it is retried) with the error's message and stack in the delivery's log.

import * as hostJobs from "jobhost:plugin/jobs@0.1.0";
import * as hostRecords from "jobhost:plugin/records@0.1.0";
import * as hostSheets from "jobhost:plugin/sheets@0.1.0";
import * as hostConfig from "jobhost:plugin/config@0.1.0";
import { log as hostLog } from "jobhost:plugin/log@0.1.0";
import { defer, settle } from "jobhost:plugin/completion@0.1.0";

/** A call the host refused. */
export class HostError extends Error {
  constructor(error) {
    super(error.message);
    this.name = "HostError";
    this.kind = error.kind;
    /** The job's status when the refusal was about it (completing a completed job). */
    this.jobStatus = error.jobStatus;
  }
}

/**
 * Runs `f` (a job call) and returns its result, or `null` when the host refused it because
 * the job already ended: delivery is at least once, and a repeated event finds its work done.
 */
export function tolerateRepeat(f) {
  try {
    return f();
  } catch (e) {
    if (e instanceof HostError && e.kind === "conflict" && ["complete", "failed", "canceled"].includes(e.jobStatus)) {
      return null;
    }
    throw e;
  }
}

function call(f, ...args) {
  try {
    return f(...args);
  } catch (e) {
    if (e && e.payload && typeof e.payload.kind === "string") throw new HostError(e.payload);
    throw e;
  }
}

const text = (v) => (v === undefined || v === null ? undefined : JSON.stringify(v));
const parse = (t) => (t === undefined || t === null ? null : JSON.parse(t));
const num = (v) => (typeof v === "bigint" ? Number(v) : v);

function fromCell(v) {
  switch (v.tag) {
    case "null":
      return null;
    case "integer":
      return Number(v.val);
    default:
      return v.val;
  }
}

function toCell(v) {
  if (v === null || v === undefined) return { tag: "null" };
  if (typeof v === "boolean") return { tag: "boolean", val: v };
  if (typeof v === "bigint") return { tag: "integer", val: v };
  if (typeof v === "number") return Number.isInteger(v) ? { tag: "integer", val: BigInt(v) } : { tag: "float", val: v };
  if (typeof v === "string") return { tag: "text", val: v };
  return { tag: "text", val: JSON.stringify(v) };
}

const KINDS = ["error", "warn", "info"];

function toMessage(m) {
  const kind = m.type ?? "error";
  if (!KINDS.includes(kind)) throw new TypeError(`a message type is error, warn or info, not ${kind}`);
  return { field: m.field ?? undefined, kind, text: String(m.message) };
}

function job(j) {
  return {
    id: j.id,
    type: j.kind,
    operation: j.operation,
    source: j.source ?? null,
    status: j.status,
    info: j.info ?? null,
    progress: j.progress,
    input: parse(j.input),
    outcome: parse(j.outcome),
    parentId: j.parentId ?? null,
    isPart: j.isPart,
    partIndex: j.partIndex ?? null,
    partData: parse(j.partData),
    attempt: j.attempt,
    createdAt: num(j.createdAt),
    updatedAt: num(j.updatedAt),
  };
}

/** One record of a page: `record.get("email")`, `record.values`, `record.messages`. */
export class Record {
  constructor(fields, row) {
    this.id = row.id;
    this._fields = fields;
    this._values = row.values;
    this.messages = row.messages.map((m) => ({ field: m.field ?? null, type: m.kind, message: m.text }));
    this.valid = row.valid;
  }
  get(field) {
    const i = this._fields.get(field);
    return i === undefined ? null : fromCell(this._values[i]);
  }
  get values() {
    const out = {};
    for (const [f, i] of this._fields) out[f] = fromCell(this._values[i]);
    return out;
  }
}

/** The host API, shaped after @flatfile/api. Every call is scoped to the event's environment. */
export const api = {
  jobs: {
    get: (id) => job(call(hostJobs.get, id)),
    ack: (id, { info, progress, estimatedCompletionAt } = {}) =>
      job(call(hostJobs.ack, id, info, progress, estimatedCompletionAt === undefined ? undefined : BigInt(estimatedCompletionAt))),
    complete: (id, { outcome, info } = {}) => job(call(hostJobs.complete, id, text(outcome), info)),
    fail: (id, { outcome, info } = {}) => job(call(hostJobs.fail, id, text(outcome), info)),
    cancel: (id, { info } = {}) => job(call(hostJobs.cancel, id, info)),
    /** `parts`: a count, or one `partData` object per part. */
    split: (id, { parts, runInParallel = true }) =>
      call(
        hostJobs.split,
        id,
        typeof parts === "number" ? { tag: "count", val: parts } : { tag: "data", val: parts.map((p) => JSON.stringify(p)) },
        runInParallel,
      ),
    create: ({ type, operation, source, input, manual = false }) =>
      job(call(hostJobs.create, { kind: type, operation, source, input: text(input), manual })),
    listParts: (id) => call(hostJobs.listParts, id).map(job),
  },
  records: {
    counts: (sheetId) => {
      const c = call(hostRecords.counts, sheetId);
      return { total: num(c.total), valid: num(c.valid), error: num(c.error) };
    },
    page: (sheetId, { pageSize = 1000, pageNumber = 1 } = {}) => {
      const page = call(hostRecords.page, sheetId, pageSize, pageNumber);
      const fields = new Map(page.fields.map((f, i) => [f, i]));
      return page.rows.map((row) => new Record(fields, row));
    },
    /** `updates`: `{id, values: {field: value}, messages: [...]}`; given messages replace all. */
    update: (sheetId, updates) =>
      num(
        call(
          hostRecords.update,
          sheetId,
          updates.map((u) => ({
            id: BigInt(u.id),
            values: Object.entries(u.values ?? {}).map(([field, value]) => ({ field, value: toCell(value) })),
            messages: u.messages === undefined ? undefined : u.messages.map(toMessage),
          })),
        ),
      ),
    /** `records`: objects of field → value. */
    insert: (sheetId, records) =>
      num(
        call(
          hostRecords.insert,
          sheetId,
          records.map((r) => ({
            values: Object.entries(r).map(([field, value]) => ({ field, value: toCell(value) })),
            messages: [],
          })),
        ),
      ),
  },
  sheets: {
    get: (id) => call(hostSheets.get, id),
  },
  config: {
    get: (key) => hostConfig.get(key) ?? null,
    secret: (name) => call(hostConfig.secret, name),
  },
};

/** Lines in the delivery's log. */
export const log = {
  debug: (m) => hostLog("debug", String(m)),
  info: (m) => hostLog("info", String(m)),
  warn: (m) => hostLog("warn", String(m)),
  error: (m) => hostLog("error", String(m)),
};

/** An event as a handler receives it. */
export class Event {
  constructor(e) {
    this.id = e.id;
    this.topic = e.topic;
    this.environmentId = e.environmentId;
    this.context = JSON.parse(e.context);
    this.payload = JSON.parse(e.payload);
    this.createdAt = num(e.createdAt);
    this.attempt = e.attempt;
    /** The ids a handler needs every time (also in `context`). */
    this.jobId = e.jobId ?? null;
    this.sheetId = e.sheetId ?? null;
  }
  /** A page of the records of the event's sheet. */
  async data({ pageSize = 1000, pageNumber = 1 } = {}) {
    if (!this.context.sheetId) throw new TypeError(`event ${this.topic} has no sheet`);
    return api.records.page(this.context.sheetId, { pageSize, pageNumber });
  }
}

const routes = [];

/** Where handlers are registered: `on(topic, handler)`, `filter(filter, configure)`. */
class Listener {
  constructor(filter) {
    this._filter = filter;
  }
  on(topic, handler) {
    routes.push({ topic, filter: this._filter, handler });
    return this;
  }
  filter(filter, configure) {
    const scoped = new Listener({ ...(this._filter ?? {}), ...filter });
    configure(scoped);
    return this;
  }
}

/** The root listener handed to the app's default export. */
export const listener = new Listener(null);

function describe(e) {
  if (e instanceof HostError) return `${e.kind}: ${e.message}`;
  if (e instanceof Error) return `${e.name}: ${e.message}\n${e.stack ?? ""}`.trimEnd();
  return String(e);
}

/** The component's export (the WIT `listener` interface). */
export const exported = {
  subscriptions() {
    return routes.map((r) => ({ topic: r.topic, filter: r.filter === null ? undefined : JSON.stringify(r.filter) }));
  },
  handle(route, event) {
    const { handler } = routes[route];
    let out;
    try {
      out = handler(new Event(event));
    } catch (e) {
      throw describe(e);
    }
    if (out && typeof out.then === "function") {
      // Returned, so componentize-js runs the event loop (microtasks and I/O such as `fetch`)
      // until it settles; the outcome goes through `settle`, so a promise the loop cannot
      // settle is reported as such rather than taken for success.
      defer();
      return out.then(
        () => settle(undefined),
        (e) => settle(describe(e)),
      );
    }
  },
};
