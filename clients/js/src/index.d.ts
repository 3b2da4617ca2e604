// Types of @sluice/client (src/index.js).

/** An event to publish: the envelope of docs/http.md. */
export interface SluiceEvent {
  /** The value: any JSON. */
  value: unknown;
  /** Chooses the partition; events with one key keep their order. */
  key?: string;
  /** Your id of the event; one is assigned (a UUID) when absent, fixed across retries. */
  id?: string;
  headers?: Record<string, string>;
  /** The event's own time: RFC 3339, milliseconds since the epoch, or a Date. */
  timestamp?: string | number | Date;
  /** The partition, chosen by you. */
  partition?: number;
}

/** Where an event is, once the gateway took it. */
export interface Position {
  partition: number;
  /** Absent where the stream acks before the offset is known. */
  offset?: number;
  status?: "received" | "spooled";
  /** A retry the gateway recognised (streams with dedup): the original's position. */
  duplicate?: true;
  /** WebSocket acks also carry the event's id. */
  id?: string | null;
}

/** An event that failed for good. */
export interface Failure {
  error: SluiceError;
}

export type Result = Position | Failure;

export class SluiceError extends Error {
  constructor(code: string, message: string, options?: { status?: number; retryAfterMs?: number | null });
  /** malformed, unauthenticated, forbidden, too_large, over_quota, unavailable, network, … */
  readonly code: string;
  /** The HTTP status; 0 for network errors and WebSocket nacks. */
  readonly status: number;
  readonly retryAfterMs: number | null;
  readonly retryable: boolean;
}

export function newEventId(): string;

export interface RetryOptions {
  /** Retries after the first attempt (default 5). */
  maxRetries?: number;
  /** First backoff when the gateway gave no Retry-After (default 100 ms, doubling). */
  baseDelayMs?: number;
  /** Longest wait between attempts (default 10 s). */
  maxDelayMs?: number;
}

export interface OfflineQueue {
  push(item: { stream: string; event: SluiceEvent }): Promise<unknown>;
  peek(n: number): Promise<Array<{ key: unknown; item: { stream: string; event: SluiceEvent } }>>;
  remove(keys: unknown[]): Promise<unknown>;
  size(): Promise<number>;
}

export interface ClientOptions extends RetryOptions {
  /** The gateway, e.g. `http://127.0.0.1:8080`. */
  url: string;
  /** Sent as `X-API-Key`. */
  apiKey?: string;
  /** An API key or JWT, sent as `Authorization: Bearer`. */
  token?: string;
  /** Per request (default 30 s). */
  timeoutMs?: number;
  fetch?: typeof fetch;
  queue?: OfflineQueue | null;
}

export class SluiceClient {
  constructor(options: ClientOptions);
  publish(
    stream: string,
    events: SluiceEvent[],
    options?: { idempotencyKey?: string; signal?: AbortSignal },
  ): Promise<Result[]>;
  batcher(stream: string, options?: { maxEvents?: number; lingerMs?: number }): Batcher;
  enqueue(stream: string, event: SluiceEvent): Promise<number>;
  flushQueue(): Promise<number>;
}

export class Batcher {
  send(event: SluiceEvent): Promise<Result>;
  flush(): Promise<void>;
}

export interface WebSocketOptions extends RetryOptions {
  /** `ws://`, `wss://` (or `http(s)://`) address of the gateway. */
  url: string;
  stream: string;
  /** An API key or JWT, sent as the subprotocol `bearer.<token>`. */
  token?: string;
  /** `cloudevents`: frames are CloudEvents (docs/websocket.md). */
  format?: "json" | "cloudevents";
  /** Reconnect after the socket drops (default true). */
  reconnect?: boolean;
  WebSocket?: typeof WebSocket;
}

export class SluiceWebSocket {
  constructor(options: WebSocketOptions);
  readonly state: "connecting" | "connected" | "closed";
  onstatechange: ((state: string, detail?: string) => void) | null;
  connect(): Promise<void>;
  send(event: SluiceEvent): Promise<Result>;
  send(events: SluiceEvent[]): Promise<Result[]>;
  close(): void;
}

export class MemoryQueue implements OfflineQueue {
  push(item: { stream: string; event: SluiceEvent }): Promise<unknown>;
  peek(n: number): Promise<Array<{ key: unknown; item: { stream: string; event: SluiceEvent } }>>;
  remove(keys: unknown[]): Promise<unknown>;
  size(): Promise<number>;
}

export class IndexedDbQueue implements OfflineQueue {
  constructor(name?: string, indexedDB?: IDBFactory);
  push(item: { stream: string; event: SluiceEvent }): Promise<unknown>;
  peek(n: number): Promise<Array<{ key: unknown; item: { stream: string; event: SluiceEvent } }>>;
  remove(keys: unknown[]): Promise<unknown>;
  size(): Promise<number>;
}
