// Type declarations for `jobhost-listener`, the JavaScript listener SDK of jobhost: the
// reference for plugin authors (editors show these comments). A plugin's `app.js` default-
// exports a function that receives the root {@link Listener}:
//
//   import { api, log } from "jobhost-listener";
//   export default function (listener) {
//     listener.filter({ job: "sheet:check" }, (l) => l.on("job:ready", async (event) => { ... }));
//   }

/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export type JobStatus = "created" | "scheduled" | "waiting" | "ready" | "executing" | "complete" | "failed" | "canceled";

/** A job, shaped like the HTTP API's. */
export interface Job {
  id: string;
  type: string;
  operation: string;
  source: string | null;
  status: JobStatus;
  info: string | null;
  progress: number;
  input: Json;
  outcome: Json;
  parentId: string | null;
  isPart: boolean;
  partIndex: number | null;
  partData: Json;
  attempt: number;
  createdAt: number;
  updatedAt: number;
}

export type MessageType = "error" | "warn" | "info";

/** A message on a record; `field` names the cell it is about (none: the whole record). */
export interface Message {
  field?: string | null;
  type?: MessageType;
  message: string;
}

export type CellValue = null | boolean | number | string;

/** One record of a page. */
export declare class Record {
  readonly id: bigint;
  readonly messages: Message[];
  readonly valid: boolean;
  /** The value of `field` (`null` when absent). */
  get(field: string): CellValue;
  /** Every field's value. */
  readonly values: { [field: string]: CellValue };
}

export interface RecordCounts {
  total: number;
  valid: number;
  error: number;
}

export interface RecordUpdate {
  id: bigint | number;
  /** Fields to set; `null` clears a field. */
  values?: { [field: string]: CellValue };
  /** When given, replaces all of the record's messages (`[]` clears them). */
  messages?: Message[];
}

/** A call the host refused. */
export declare class HostError extends Error {
  readonly kind: "not-found" | "conflict" | "invalid" | "denied" | "limit" | "internal";
  /** The job's status, when the refusal was about it. */
  readonly jobStatus?: JobStatus;
}

/**
 * Runs `f` (a job call) and returns its result, or `null` when the host refused it because
 * the job already ended. Delivery is at least once: a repeated event finds its work done, and
 * this tells "done before" from a real error.
 * @example
 * if (tolerateRepeat(() => api.jobs.ack(event.jobId, { progress: 10 })) === null) return;
 */
export declare function tolerateRepeat<T>(f: () => T): T | null;

/** An event as a handler receives it. */
export declare class Event {
  readonly id: string;
  readonly topic: string;
  readonly environmentId: string;
  readonly jobId: string | null;
  readonly sheetId: string | null;
  readonly context: { [key: string]: Json };
  readonly payload: { [key: string]: Json };
  readonly createdAt: number;
  readonly attempt: number;
  /** A page of the records of the event's sheet. */
  data(page?: { pageSize?: number; pageNumber?: number }): Promise<Record[]>;
}

/**
 * A handler. Returning (or resolving) ends the delivery as handled; throwing (or rejecting)
 * fails it with the error's message and stack, and it is retried with backoff.
 */
export type Handler = (event: Event) => void | Promise<void>;

/** Where handlers are registered. */
export interface Listener {
  /** Handle events whose topic matches `topic` (`job:ready`, `job:*`, `**`). */
  on(topic: string, handler: Handler): Listener;
  /** Handlers registered inside `configure` see only events matching `filter`. */
  filter(filter: { [key: string]: Json }, configure: (listener: Listener) => void): Listener;
}

/** The root listener (also handed to the app's default export). */
export declare const listener: Listener;

/**
 * The host API, shaped after `@flatfile/api`. Every call acts inside the event's environment
 * (an id from another environment is `not-found`) and may move only the jobs of the event's
 * job family unless the plugin's manifest grants `any_job`. Calls are synchronous; `await` on
 * them is harmless. A refused call throws {@link HostError}.
 *
 * @example
 * const job = api.jobs.ack(event.jobId, { info: "checking", progress: 10 });
 * const records = await event.data({ pageSize: 1000, pageNumber: job.partData.part + 1 });
 */
export declare const api: {
  jobs: {
    /** The job `id`. @throws {HostError} `not-found` */
    get(id: string): Job;
    /**
     * Acknowledges a `ready` or `executing` job: it becomes `executing` (repeatable).
     * @param ack.info a line shown with the job
     * @param ack.progress 0–100
     * @param ack.estimatedCompletionAt milliseconds since the epoch
     * @throws {HostError} `conflict` (with `jobStatus`) when the job already ended
     */
    ack(id: string, ack?: { info?: string; progress?: number; estimatedCompletionAt?: number }): Job;
    /** Completes a `ready` or `executing` job with an outcome. @throws {HostError} `conflict` when it already ended */
    complete(id: string, end?: { outcome?: Json; info?: string }): Job;
    /** Fails a `ready` or `executing` job with an outcome. @throws {HostError} `conflict` when it already ended */
    fail(id: string, end?: { outcome?: Json; info?: string }): Job;
    /** Cancels an open job and its open parts. */
    cancel(id: string, end?: { info?: string }): Job;
    /**
     * Splits an `executing` top-level job into parts: `parts` is a count (part *i* gets
     * `partData: {part: i, total: N}`) or one `partData` object per part. Parts run in
     * parallel unless `runInParallel: false`. When every part has ended the host emits
     * `job:parts-completed` on the parent with `payload.parts` `{total, completed, failed,
     * canceled}`. Returns how many parts were made.
     * @throws {HostError} `conflict` when the job was split before (the message says "already split")
     */
    split(id: string, split: { parts: number | Json[]; runInParallel?: boolean }): number;
    /** Creates a job (`ready` at once, or `created` with `manual: true`). */
    create(job: { type: string; operation: string; source?: string; input?: Json; manual?: boolean }): Job;
    /** The parts of a split job, in part order. */
    listParts(id: string): Job[];
  };
  records: {
    /** Record counts of a sheet: `error` counts records with an error message. */
    counts(sheetId: string): RecordCounts;
    /** Page `pageNumber` (from 1) of `pageSize` (1–10,000) records, in the sheet's stable order. */
    page(sheetId: string, page?: { pageSize?: number; pageNumber?: number }): Record[];
    /**
     * Updates records: given `values` are set, given `messages` replace all of a record's
     * messages. All or none. Returns how many records changed.
     */
    update(sheetId: string, updates: RecordUpdate[]): number;
    /** Appends records (objects of field → value); returns how many. */
    insert(sheetId: string, records: { [field: string]: CellValue }[]): number;
  };
  sheets: {
    /** The sheet `id`. */
    get(id: string): { id: string; name: string };
  };
  config: {
    /** A value of the manifest's `[config]`, or `null`. */
    get(key: string): string | null;
    /** A secret of the environment that the manifest grants. @throws {HostError} `denied` when not granted */
    secret(name: string): string;
  };
};

/** Lines in the delivery's log (kept in its execution record). */
export declare const log: {
  debug(message: unknown): void;
  info(message: unknown): void;
  warn(message: unknown): void;
  error(message: unknown): void;
};
