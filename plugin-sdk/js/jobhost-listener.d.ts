// Type declarations for `jobhost-listener`, the JavaScript listener SDK of jobhost.

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

export type Handler = (event: Event) => void | Promise<void>;

/** Where handlers are registered. */
export interface Listener {
  /** Handle events whose topic matches `topic` (`job:ready`, `job:*`, `**`). */
  on(topic: string, handler: Handler): Listener;
  /** Handlers registered inside `configure` see only events matching `filter`. */
  filter(filter: { [key: string]: Json }, configure: (listener: Listener) => void): Listener;
}

export declare const listener: Listener;

export declare const api: {
  jobs: {
    get(id: string): Job;
    ack(id: string, ack?: { info?: string; progress?: number; estimatedCompletionAt?: number }): Job;
    complete(id: string, end?: { outcome?: Json; info?: string }): Job;
    fail(id: string, end?: { outcome?: Json; info?: string }): Job;
    cancel(id: string, end?: { info?: string }): Job;
    /** A count, or one `partData` object per part. Returns how many parts were made. */
    split(id: string, split: { parts: number | Json[]; runInParallel?: boolean }): number;
    create(job: { type: string; operation: string; source?: string; input?: Json; manual?: boolean }): Job;
    listParts(id: string): Job[];
  };
  records: {
    counts(sheetId: string): RecordCounts;
    page(sheetId: string, page?: { pageSize?: number; pageNumber?: number }): Record[];
    update(sheetId: string, updates: RecordUpdate[]): number;
    insert(sheetId: string, records: { [field: string]: CellValue }[]): number;
  };
  sheets: {
    get(id: string): { id: string; name: string };
  };
  config: {
    get(key: string): string | null;
    secret(name: string): string;
  };
};

export declare const log: {
  debug(message: unknown): void;
  info(message: unknown): void;
  warn(message: unknown): void;
  error(message: unknown): void;
};
