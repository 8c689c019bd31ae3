import type { FileHandle } from 'node:fs/promises';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';

export interface DurableLogOptions<T = unknown> {
  /**
   * Most live entries. append() of a key not already present throws
   * DurableLogFullError beyond this, so a stuck consumer cannot fill the
   * disk. Default 1,000,000.
   */
  readonly maxEntries?: number | undefined;
  /**
   * The file is rewritten (compacted) once it holds at least this many
   * records and more than half of them are dead (overwritten or deleted).
   * Default 1024.
   */
  readonly compactMinRecords?: number | undefined;
  /** fdatasync every commit. Only tests and benchmarks turn this off. Default true. */
  readonly fsync?: boolean | undefined;
  /** How records are stored. Default: JSON lines {"k","s","v"} and {"k","s","d":1}. */
  readonly format?: DurableLogFormat<T> | undefined;
}

/** One live entry. `seq` identifies this version of the key (see delete()). */
export interface LogEntry<T> {
  readonly key: string;
  readonly value: T;
  readonly seq: number;
}

export interface DurableLogStats {
  /** Live entries. */
  readonly size: number;
  readonly maxEntries: number;
  /** Records in the file, live or dead; compaction brings it back to `size`. */
  readonly records: number;
  /** Write + fsync rounds; fewer than appends + deletes when commits were grouped. */
  readonly commits: number;
  readonly compactions: number;
  /** Bytes of a torn tail cut off when the file was opened. */
  readonly tornTailBytes: number;
}

/** A record read back from the file: a put of `value`, or a delete. */
export type LogRecord<T> =
  | { readonly key: string; readonly seq?: number | undefined; readonly value: T }
  | { readonly key: string; readonly seq?: number | undefined; readonly deleted: true };

/**
 * How records are written, one line each (without the newline), and read
 * back. A format may leave sequence numbers out of the file (decode() gives
 * no `seq`): on open, puts are then numbered in file order and a delete
 * removes whatever version is live. That replays to the same state, since
 * records reach the file in call order and a delete is only written for the
 * version live at the time.
 */
export interface DurableLogFormat<T> {
  put(entry: LogEntry<T>): string;
  /** `entry` is the version being removed. */
  delete(entry: LogEntry<T>): string;
  /** The record a line holds, or why it is invalid (a throw counts as invalid too). */
  decode(line: string): LogRecord<T> | string;
}

/** The default format: {"k":key,"s":seq,"v":value} and {"k":key,"s":seq,"d":1}. */
const JSON_RECORDS: DurableLogFormat<unknown> = {
  put: (e) => JSON.stringify({ k: e.key, s: e.seq, v: e.value }),
  delete: (e) => JSON.stringify({ k: e.key, s: e.seq, d: 1 }),
  decode(line) {
    let r: unknown;
    try {
      r = JSON.parse(line);
    } catch {
      return 'not JSON';
    }
    if (typeof r !== 'object' || r === null) return 'not an object';
    const { k, s } = r as { k?: unknown; s?: unknown };
    if (typeof k !== 'string' || typeof s !== 'number' || !Number.isSafeInteger(s)) return 'missing key or sequence';
    if ('d' in r) return { key: k, seq: s, deleted: true };
    if (!('v' in r)) return 'missing value';
    return { key: k, seq: s, value: (r as { v: unknown }).v };
  },
};

/** append() of a new key while the log already holds `maxEntries` entries. */
export class DurableLogFullError extends Error {
  readonly code = 'ELOGFULL';
  constructor(path: string, maxEntries: number) {
    super(`durable log ${path} is full (${maxEntries} entries)`);
    this.name = 'DurableLogFullError';
  }
}

/** The file holds a bad record followed by good ones: not a torn write, so not ours to repair. */
export class DurableLogCorruptError extends Error {
  readonly code = 'ELOGCORRUPT';
  constructor(path: string, line: number, detail: string) {
    super(`durable log ${path}: line ${line} is corrupt (${detail}) and is followed by valid records`);
    this.name = 'DurableLogCorruptError';
  }
}

interface Pending {
  readonly line: string;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

const NEWLINE = 0x0a;

/**
 * A small durable map of string keys to JSON values, kept as an append-only
 * file of JSON lines and mirrored in memory. Built for work lists that must
 * survive a restart: "replay blob D to the primary", "hand blob D to shard S".
 *
 * - append() resolves only once its record is written and fdatasync'd.
 *   Concurrent appends and deletes are grouped into one write + fsync (group
 *   commit): while one commit is on disk, the next batch accumulates, so a
 *   burst of N appends costs about two fsyncs rather than N.
 * - The in-memory view changes at call time, in call order, so entries()
 *   and size always reflect every call made so far, durable or not yet.
 * - open() replays the file. A crash can tear only the tail (the last write
 *   may be partial, or zero-filled on some file systems): bad records at the
 *   end are dropped and cut off. A bad record followed by good ones is real
 *   corruption and open() throws DurableLogCorruptError rather than guess.
 * - Each version of a key has a sequence number; delete(key, seq) removes the
 *   entry only if it is still that version, so a consumer that finished
 *   version 3 cannot remove version 4 appended meanwhile.
 * - Bounded: at most `maxEntries` live entries, and once more than half the
 *   records in the file are dead it is rewritten to a temp file, fsync'd and
 *   renamed over the old one (and the directory fsync'd), so the file stays
 *   within about twice the live data.
 * - A failed write or fsync poisons the log: that commit and every later one
 *   reject, since after a failed fsync the kernel may already have dropped
 *   the dirty pages and nothing written since can be trusted. Reopen it.
 *
 * One process per file: there is no lock, the owner must ensure that.
 */
export class DurableLog<T> {
  readonly path: string;
  readonly maxEntries: number;
  readonly #compactMinRecords: number;
  readonly #fsync: boolean;
  readonly #format: DurableLogFormat<T>;
  readonly #entries = new Map<string, LogEntry<T>>();
  #fh: FileHandle | undefined;
  #nextSeq = 1;
  #records = 0;
  #commits = 0;
  #compactions = 0;
  #tornTailBytes = 0;
  #batch: Pending[] = [];
  #flushing: Promise<void> | undefined;
  #failed: Error | undefined;
  #closed = false;
  #closePromise: Promise<void> | undefined;

  private constructor(path: string, opts: DurableLogOptions<T>) {
    this.path = path;
    this.maxEntries = opts.maxEntries ?? 1_000_000;
    if (!(Number.isSafeInteger(this.maxEntries) && this.maxEntries > 0)) {
      throw new RangeError(`durable log ${path}: maxEntries ${this.maxEntries} must be a positive integer`);
    }
    this.#compactMinRecords = Math.max(1, opts.compactMinRecords ?? 1024);
    this.#fsync = opts.fsync ?? true;
    this.#format = opts.format ?? (JSON_RECORDS as DurableLogFormat<T>);
  }

  /** Opens (creating if needed) the log at `path` and loads its entries. */
  static async open<T>(path: string, opts: DurableLogOptions<T> = {}): Promise<DurableLog<T>> {
    const log = new DurableLog<T>(path, opts);
    await log.#load();
    return log;
  }

  /** Number of live entries. */
  get size(): number {
    return this.#entries.size;
  }

  has(key: string): boolean {
    return this.#entries.has(key);
  }

  get(key: string): LogEntry<T> | undefined {
    return this.#entries.get(key);
  }

  /** Live entries, oldest first (a key rewritten by append() moves to the end). */
  entries(): IterableIterator<LogEntry<T>> {
    return this.#entries.values();
  }

  /**
   * Records `value` under `key` (replacing any earlier version) and resolves
   * with the new version's sequence number once the record is durable.
   * Throws DurableLogFullError for a new key when the log is full.
   */
  async append(key: string, value: T): Promise<number> {
    this.#checkUsable();
    if (!this.#entries.has(key) && this.#entries.size >= this.maxEntries) {
      throw new DurableLogFullError(this.path, this.maxEntries);
    }
    const entry: LogEntry<T> = { key, value, seq: this.#nextSeq++ };
    const line = `${this.#format.put(entry)}\n`;
    // Delete first so that re-inserting moves the key to the end (age order).
    this.#entries.delete(key);
    this.#entries.set(key, entry);
    await this.#commit(line);
    return entry.seq;
  }

  /**
   * Removes `key` if present (and, when `seq` is given, only if it is still
   * that version). Returns false at once if nothing was removed; otherwise
   * resolves true once the removal is durable. Losing a removal to a crash
   * only means the entry comes back, so callers need not wait.
   */
  async delete(key: string, seq?: number): Promise<boolean> {
    this.#checkUsable();
    const entry = this.#entries.get(key);
    if (entry === undefined || (seq !== undefined && entry.seq !== seq)) return false;
    this.#entries.delete(key);
    await this.#commit(`${this.#format.delete(entry)}\n`);
    return true;
  }

  stats(): DurableLogStats {
    return {
      size: this.#entries.size,
      maxEntries: this.maxEntries,
      records: this.#records + this.#batch.length,
      commits: this.#commits,
      compactions: this.#compactions,
      tornTailBytes: this.#tornTailBytes,
    };
  }

  /** Waits for pending commits, then closes the file. Idempotent. */
  close(): Promise<void> {
    this.#closePromise ??= this.#close();
    return this.#closePromise;
  }

  async #close(): Promise<void> {
    this.#closed = true;
    // #flushing is replaced while a loop runs; wait until none is left.
    while (this.#flushing !== undefined) await this.#flushing;
    const fh = this.#fh;
    this.#fh = undefined;
    await fh?.close();
  }

  #checkUsable(): void {
    if (this.#closed) throw new Error(`durable log ${this.path} is closed`);
    if (this.#failed !== undefined) throw this.#failed;
  }

  #commit(line: string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.#batch.push({ line, resolve, reject });
      this.#flushing ??= this.#flushLoop();
    });
  }

  // One loop at a time owns the file: it writes everything queued so far as
  // one batch, fsyncs, resolves that batch, and repeats while more arrived.
  async #flushLoop(): Promise<void> {
    try {
      while (this.#batch.length > 0) {
        const batch = this.#batch;
        this.#batch = [];
        try {
          await writeAll(this.#fh!, Buffer.from(batch.map((p) => p.line).join(''), 'utf8'));
          if (this.#fsync) await this.#fh!.datasync();
          this.#commits++;
          this.#records += batch.length;
        } catch (err) {
          this.#failed = new Error(`durable log ${this.path}: write failed, log is unusable until reopened: ${String(err)}`, { cause: err });
          for (const p of [...batch, ...this.#batch]) p.reject(this.#failed);
          this.#batch = [];
          return;
        }
        for (const p of batch) p.resolve();
        if (this.#records >= this.#compactMinRecords && this.#records > 2 * this.#entries.size) {
          await this.#compact();
        }
      }
    } finally {
      this.#flushing = undefined;
    }
  }

  // Runs inside the flush loop, so no write interleaves. Records queued
  // meanwhile are written to the new file afterwards; the snapshot already
  // holds their effect, and replaying them again on load is harmless (a put
  // of the same version, a delete of an absent key).
  async #compact(): Promise<void> {
    const tmp = `${this.path}.compact`;
    const lines: string[] = [];
    for (const e of this.#entries.values()) lines.push(`${this.#format.put(e)}\n`);
    try {
      const out = await open(tmp, 'w');
      try {
        await writeAll(out, Buffer.from(lines.join(''), 'utf8'));
        await out.datasync();
      } finally {
        await out.close();
      }
      await rename(tmp, this.path);
    } catch {
      // The old file is intact and still open; try again after a later commit.
      await rm(tmp, { force: true }).catch(() => {});
      return;
    }
    try {
      await fsyncDir(dirname(this.path));
      const old = this.#fh;
      this.#fh = await open(this.path, 'a');
      await old?.close();
      this.#records = lines.length;
      this.#compactions++;
    } catch (err) {
      this.#failed = new Error(`durable log ${this.path}: reopening after compaction failed: ${String(err)}`, { cause: err });
    }
  }

  async #load(): Promise<void> {
    await mkdir(dirname(this.path), { recursive: true });
    // A crash during compaction leaves the temp file; the old file is complete.
    await rm(`${this.path}.compact`, { force: true });
    let data: Buffer;
    try {
      data = await readFile(this.path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      data = Buffer.alloc(0);
    }
    let start = 0;
    let line = 0;
    let goodEnd = 0;
    let firstBad: { line: number; detail: string } | undefined;
    while (start < data.length) {
      const nl = data.indexOf(NEWLINE, start);
      const end = nl === -1 ? data.length : nl;
      line++;
      const text = data.subarray(start, end).toString('utf8');
      const parsed = nl === -1 ? 'torn (no newline)' : this.#apply(text);
      if (parsed === undefined) {
        if (firstBad !== undefined) throw new DurableLogCorruptError(this.path, firstBad.line, firstBad.detail);
        goodEnd = end + 1;
        this.#records++;
      } else if (text.trim() === '' && nl !== -1 && firstBad === undefined) {
        goodEnd = end + 1; // a blank line is harmless
      } else {
        firstBad ??= { line, detail: parsed };
      }
      start = end + 1;
    }
    this.#tornTailBytes = data.length - goodEnd;
    const fh = await open(this.path, 'a');
    try {
      if (this.#tornTailBytes > 0) {
        await fh.truncate(goodEnd);
        await fh.datasync();
      }
      await fsyncDir(dirname(this.path));
    } catch (err) {
      await fh.close();
      throw err;
    }
    this.#fh = fh;
  }

  /** Applies one stored line to the map; returns why it is invalid, or undefined. */
  #apply(text: string): string | undefined {
    let r: LogRecord<T> | string;
    try {
      r = this.#format.decode(text);
    } catch (err) {
      return err instanceof Error ? err.message : String(err);
    }
    if (typeof r === 'string') return r;
    const { key, seq } = r;
    if (seq !== undefined && !Number.isSafeInteger(seq)) return 'bad sequence number';
    if (seq !== undefined) this.#nextSeq = Math.max(this.#nextSeq, seq + 1);
    if ('deleted' in r) {
      if (seq === undefined || this.#entries.get(key)?.seq === seq) this.#entries.delete(key);
      return undefined;
    }
    this.#entries.delete(key);
    this.#entries.set(key, { key, value: r.value, seq: seq ?? this.#nextSeq++ });
    return undefined;
  }
}

async function writeAll(fh: FileHandle, buf: Buffer): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off);
    off += bytesWritten;
  }
}

/** Makes a rename or a file creation in `dir` durable. */
async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
