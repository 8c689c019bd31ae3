import { createHash, randomBytes } from 'node:crypto';
import type { Hash } from 'node:crypto';
import type { FileHandle } from 'node:fs/promises';
import { statSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, unlink, utimes, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Logger } from 'pino';
import { abortable, mapLimit } from '../concurrency.ts';
import { DEFAULT_LIMITS } from '../config.ts';
import type { Digest } from '../digest.ts';
import { digestString, EMPTY_SHA256, isEmptyDigest, SHA256_HEX_LENGTH } from '../digest.ts';
import { notFound, storageError, throwIfAborted, toConnectError } from '../errors.ts';
import { resolveRange, verifying } from '../streams.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription, UploadRef } from './blob-store.ts';

export interface DiskStoreOptions {
  /** The store's own directory; created if absent. One process per directory. */
  readonly path: string;
  /** Evict least recently used blobs beyond this many bytes (file contents, not blocks). */
  readonly maxSizeBytes: number;
  /**
   * True for the CAS: content is verified against its digest while it is
   * written. False for the AC, where the key is an action digest and the value
   * an ActionResult of any length, overwritten on every put.
   */
  readonly contentAddressed: boolean;
  readonly logger?: Logger | undefined;
  /**
   * fsync each blob before it becomes visible, so an acknowledged write
   * survives power loss. Default true; turn off only for scratch caches and
   * benchmarks (a process crash is safe either way).
   */
  readonly fsync?: boolean | undefined;
  /**
   * Use of a blob moves its mtime forward at most this often, so that recency
   * survives restarts without a syscall per FindMissing. Default 60000.
   */
  readonly touchIntervalMs?: number | undefined;
  /**
   * AC only (ignored for the CAS): values of at most 64 KiB are kept in
   * memory once read, up to this many bytes in all, least recently read
   * dropped first. Default 32 MiB; 0 turns the cache off.
   */
  readonly valueCacheBytes?: number | undefined;
  /**
   * CAS only: bounds on the prefixes of interrupted uploads kept for
   * resumption (see "Resumable uploads" below). Defaults: the
   * limits.maxPartialUploads, maxPartialUploadBytes and partialUploadTtlMs
   * defaults of config.ts.
   */
  readonly partialUploads?: PartialUploadLimits | undefined;
}

export interface PartialUploadLimits {
  /** Most prefixes kept at once; the oldest goes first. */
  readonly maxCount?: number | undefined;
  /** Most bytes kept in all; a prefix larger than this is not kept. */
  readonly maxBytes?: number | undefined;
  /** A prefix not resumed within this long is deleted. */
  readonly ttlMs?: number | undefined;
}

/** The kept prefix of an interrupted upload (see DiskStore). */
interface PartialUpload {
  readonly key: string;
  readonly digest: Digest;
  readonly tmpPath: string;
  /** Bytes in the temp file, all of them hashed into `hash`; counted in #reserved. */
  readonly bytes: number;
  /** SHA-256 state over exactly those bytes, so a resumption does not re-read them. */
  readonly hash: Hash;
  readonly timer: NodeJS.Timeout;
}

/** A resumable upload being written (see #activeUploads). */
interface ActiveUpload {
  readonly ctl: AbortController;
  readonly done: Promise<void>;
}

/** Longest uploadStatus() waits for a write of the same upload to settle (park its prefix). */
const UPLOAD_SETTLE_MS = 2000;

interface Entry {
  /** Bytes in the file: the digest size for the CAS, the value length for the AC. */
  size: number;
  /** Last use as persisted (or about to be) in the file's mtime. */
  mtimeMs: number;
}

const TMP_DIR = 'tmp';
/** AC only: `ns/<sha256 of the namespace>/` holds each namespace but the default one. */
const NS_DIR = 'ns';
/** In each namespace directory: the namespace itself (UTF-8), for operators. */
const NS_NAME_FILE = 'name';
const NS_DIR_NAME = /^[0-9a-f]{64}$/;
/** Namespace -> directory names remembered (the set is cleared when full). */
const NS_DIR_MEMO = 4096;
const READ_CHUNK_BYTES = 256 * 1024;
const SCAN_CONCURRENCY = 32;
const STAT_BATCH = 1000;
const TOUCH_CONCURRENCY = 4;
const DEFAULT_TOUCH_INTERVAL_MS = 60_000;
const FAN_OUT = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));
const FAN_OUT_SET = new Set(FAN_OUT);
const BLOB_NAME = /^([0-9a-f]{64})-(0|[1-9][0-9]{0,15})$/;
/** Largest AC value the value cache keeps (ActionResults are typically a few KiB). */
const VALUE_CACHE_MAX_ENTRY_BYTES = 64 * 1024;
const DEFAULT_VALUE_CACHE_BYTES = 32 * 1024 * 1024;

/** An AC value held in memory, valid while `entry` is the key's index entry. */
interface CachedValue {
  readonly entry: Entry;
  readonly bytes: Uint8Array;
}

/**
 * The storage node's own store: one file per blob under `path`, with an LRU
 * size cap. Use it as the leaf of a storage node's CAS tree and AC tree, each
 * at its own path (an action digest is also a valid CAS key, so the two must
 * never share a directory).
 *
 * Layout: `<path>/<first 2 hex of hash>/<hash>-<size>` for blobs and
 * `<path>/tmp/` for writes in progress. A write streams into a fresh temp file
 * (verified on the fly against the digest in a CAS), is fsync'd, and is
 * renamed into place only when complete and valid, so readers and restarts
 * never see a partial blob; concurrent writers of one digest each use their
 * own temp file and the last rename wins. tmp/ is emptied on open. With
 * `fsync` the directory that received the new name is fsync'd after the
 * rename too (one directory fsync shared by the renames that were waiting
 * for it), so an acknowledged blob's name also survives power loss.
 *
 * The size cap counts uploads in flight: a CAS write reserves its digest's
 * size when it starts (an AC write reserves as its bytes arrive), evicting
 * least recently used blobs to make room, and a write whose reservation
 * cannot fit even with every stored blob evicted (other uploads in flight
 * hold the rest) fails RESOURCE_EXHAUSTED, which clients retry. Blobs evicted
 * for an upload that is then abandoned stay evicted.
 *
 * Resumable uploads (CAS; PutOptions.upload, uploadStatus()): a put that
 * names an upload keeps its temp file when it fails because its source
 * failed or its caller cancelled (a ByteStream Write cancelled or broken):
 * the bytes received up to then are written out and parked under the
 * upload's key (upload id + digest), with the SHA-256 state over them kept
 * in memory, so a put at offset = the kept size appends to the same file
 * and carries on hashing without reading the prefix again (re-reading and
 * hashing a 32 MiB prefix measured 28-39 ms from the page cache, more from a
 * cold disk; the kept state is a few hundred bytes and costs nothing). A prefix is never a blob: it lives in tmp/ and is renamed into
 * place only once the whole blob is verified. A prefix the store itself
 * refused (too long, I/O error) is not kept, nor is one interrupted by
 * close(). Parked prefixes count against maxSizeBytes like uploads in
 * flight, are bounded in count and bytes (`partialUploads`; the oldest goes
 * first), expire after `partialUploads.ttlMs`, are dropped first when an
 * upload needs room, and do not survive a restart (tmp/ is emptied on
 * open). A put at offset 0 discards the upload's prefix; at any other
 * offset than the kept size it fails OUT_OF_RANGE (offset beyond the kept
 * prefix) or INVALID_ARGUMENT (behind it), and the prefix stays. A new put
 * of an upload that is still being written (the client gave up on the old
 * stream before the server noticed) cancels the old one first and then
 * sees what it kept; uploadStatus() likewise waits up to 2 s for such a
 * write to settle.
 *
 * AC namespaces (CallOptions.namespace): the default namespace "" is the
 * layout above, so entries written before namespaces existed are read as
 * "". Every other namespace has its own tree `<path>/ns/<sha256 of the
 * namespace's UTF-8, hex>/<first 2 hex of hash>/<hash>-<size>`, created on
 * first write, with a `name` file holding the namespace for operators. A
 * hash, not the name itself: instance names may be up to 1024 characters of
 * any script, which no file system takes as one name, and a hash never
 * folds two names into one on a case-insensitive file system. The index
 * (keys `ns/<hash>/<hash>-<size>`) spans all namespaces: one LRU and one
 * size cap for the store, rebuilt from both trees on open. The CAS ignores
 * namespaces.
 *
 * Recency lives in an in-memory index (a Map in LRU order). FindMissing and
 * reads refresh it, since Bazel treats FindMissing as a lease on the blob, and
 * push the file's mtime forward at most once per `touchIntervalMs` so the
 * order survives a restart: open() rebuilds the index from a directory scan
 * sorted by mtime. FindMissing consults only the index; a file removed behind
 * the store's back is noticed (and forgotten) by the next read.
 *
 * AC values (ActionResults, small) are also kept in memory once read (see
 * `valueCacheBytes`): a GetActionResult then costs no syscalls instead of
 * open + fstat + read + close through libuv's threadpool, which measured as
 * the largest single cost of a storage node's GetActionResult. A cached
 * value is tied to the index entry it was read under: an overwrite (a new
 * entry), an eviction or a forgotten file makes it unreachable at once, so
 * the cache never serves a value the index no longer holds. Unlike a read
 * from disk, a cached value is still served after its file is removed
 * behind the store's back, until the value leaves the cache.
 *
 * The catch: a stream returned by get() holds an open file descriptor until it
 * is consumed, broken out of, or returned; callers must do one of these.
 * Eviction unlinks files, which is safe for readers already streaming them.
 *
 * close() aborts writes in flight (they reject UNAVAILABLE and leave nothing
 * behind) rather than waiting for them, since an upload may stall
 * indefinitely; streams already returned by get() keep working.
 *
 * Config:
 * ```json
 * {"disk": {"path": "data/cas", "maxSizeBytes": 10737418240}}
 * ```
 */
export class DiskStore implements BlobStore {
  // Map iteration order is insertion order: re-inserting on use makes the
  // first entry the least recently used.
  readonly #index: BlobIndex;
  readonly #opts: DiskStoreOptions;
  readonly #root: string;
  readonly #tmpDir: string;
  readonly #fsync: boolean;
  readonly #touchIntervalMs: number;
  readonly #log: Logger | undefined;
  // Per-key queue serialising "rename into place + index update" against
  // "unlink after eviction", so an eviction never deletes a newer file.
  readonly #keyOps = new Map<string, Promise<void>>();
  readonly #writesInFlight = new Set<Promise<void>>();
  // AC: namespace -> its directory below the root (see #key).
  readonly #nsDirs = new Map<string, string>();
  readonly #touchQueue = new Set<string>();
  readonly #touchWorkers = new Set<Promise<void>>();
  // AC values read recently (LRU order, like #index); see CachedValue.
  readonly #valueCache = new Map<string, CachedValue>();
  readonly #valueCacheMax: number;
  #valueCacheBytes = 0;
  readonly #closing = new AbortController();
  #closePromise: Promise<void> | undefined;
  #tmpSeq = 0;
  #bytes = 0;
  // Resumable uploads: prefixes kept (oldest first) and uploads being written, by upload key.
  readonly #partials = new Map<string, PartialUpload>();
  readonly #activeUploads = new Map<string, ActiveUpload>();
  readonly #partialMaxCount: number;
  readonly #partialMaxBytes: number;
  readonly #partialTtlMs: number;
  #partialBytes = 0;
  #partialsResumed = 0;
  #partialsExpired = 0;
  /** Bytes reserved by writes in flight (their temp files), counted against the cap. */
  #reserved = 0;
  #evictions = 0;
  #writes = 0;
  #reads = 0;
  #openMs = 0;
  #tempFilesRemoved = 0;
  #junkRemoved = 0;
  /** Per directory: the fsync running and the one queued behind it (see #syncDir). */
  readonly #dirSyncs = new Map<string, { running: Promise<void> | undefined; next: Promise<void> | undefined }>();

  private constructor(opts: DiskStoreOptions) {
    this.#opts = opts;
    this.#root = opts.path;
    this.#tmpDir = join(opts.path, TMP_DIR);
    this.#fsync = opts.fsync ?? true;
    this.#touchIntervalMs = opts.touchIntervalMs ?? DEFAULT_TOUCH_INTERVAL_MS;
    this.#valueCacheMax = opts.contentAddressed ? 0 : (opts.valueCacheBytes ?? DEFAULT_VALUE_CACHE_BYTES);
    this.#index = new BlobIndex(opts.contentAddressed);
    this.#log = opts.logger;
    this.#partialMaxCount = opts.partialUploads?.maxCount ?? DEFAULT_LIMITS.maxPartialUploads;
    this.#partialMaxBytes = opts.partialUploads?.maxBytes ?? DEFAULT_LIMITS.maxPartialUploadBytes;
    this.#partialTtlMs = opts.partialUploads?.ttlMs ?? DEFAULT_LIMITS.partialUploadTtlMs;
  }

  /** Opens (or creates) the store at `opts.path` and rebuilds its index from disk. */
  static async open(opts: DiskStoreOptions): Promise<DiskStore> {
    if (typeof opts.path !== 'string' || opts.path === '') {
      throw new ConnectError('disk store: path must be a non-empty string', Code.InvalidArgument);
    }
    if (!Number.isSafeInteger(opts.maxSizeBytes) || opts.maxSizeBytes <= 0) {
      throw new ConnectError(
        `disk store ${opts.path}: maxSizeBytes must be a positive integer, got ${opts.maxSizeBytes}`,
        Code.InvalidArgument,
      );
    }
    const store = new DiskStore(opts);
    await store.#load();
    return store;
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    const missing: Digest[] = [];
    const now = Date.now();
    const index = this.#index;
    if (!this.#opts.contentAddressed) {
      for (const d of digests) {
        const key = this.#key(d, opts?.namespace);
        const entry = index.get(key);
        if (entry === undefined) missing.push(d);
        else this.#touch(key, entry, now);
      }
      return missing;
    }
    // CAS: find the entry through its hash (see BlobIndex), which builds and
    // hashes no new string per digest.
    for (const d of digests) {
      if (isEmptyDigest(d)) continue;
      const stored = index.storedFor(d.hash);
      if (stored === undefined) {
        missing.push(d);
      } else if (stored.entry.size === d.size) {
        this.#touch(stored.key, stored.entry, now);
      } else {
        // The hash is stored under another size: ask for this exact key.
        const key = digestString(d);
        const entry = index.get(key);
        if (entry === undefined) missing.push(d);
        else this.#touch(key, entry, now);
      }
    }
    return missing;
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    const key = this.#key(digest, opts?.namespace);
    const entry = this.#index.get(key);
    if (entry === undefined) {
      if (!(this.#opts.contentAddressed && isEmptyDigest(digest))) throw notFound(digest);
      resolveRange(0, opts?.offset, opts?.limit);
      this.#reads++;
      return empty();
    }
    this.#touch(key, entry, Date.now());
    if (entry.size <= VALUE_CACHE_MAX_ENTRY_BYTES && this.#valueCacheMax > 0) return this.#getSmallValue(key, entry, digest, opts);

    // Open the descriptor before resolving: NOT_FOUND must come before the
    // first byte, and an open descriptor keeps reading correctly even if
    // eviction unlinks the file meanwhile.
    let fh: FileHandle;
    try {
      fh = await open(this.#blobPath(key), 'r');
    } catch (err) {
      if (errno(err) === 'ENOENT') {
        this.#log?.warn({ path: this.#root, blob: key }, 'disk store: blob file vanished; forgetting it');
        this.#forget(key, entry);
        throw notFound(digest);
      }
      throw this.#ioError(`opening blob ${key}`, err);
    }
    try {
      const { size } = await fh.stat();
      if (this.#opts.contentAddressed && size !== digest.size) {
        // Truncated or tampered with outside the store: never serve it.
        this.#log?.error(
          { path: this.#root, blob: key, fileSize: size },
          'disk store: blob file has the wrong size; removing it',
        );
        this.#forget(key, entry);
        void this.#removeFile(key);
        throw notFound(digest);
      }
      const { start, end } = resolveRange(size, opts?.offset, opts?.limit);
      this.#reads++;
      if (start === end) {
        await fh.close();
        return empty();
      }
      const rs = fh.createReadStream({ start, end: end - 1, highWaterMark: READ_CHUNK_BYTES });
      return this.#readStream(rs, key, opts?.signal);
    } catch (err) {
      await fh.close().catch(noop);
      if (err instanceof ConnectError) throw err;
      throw this.#ioError(`reading blob ${key}`, err);
    }
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    const upload = opts?.upload;
    if (upload !== undefined && !this.#opts.contentAddressed && upload.offset !== 0) {
      throw new ConnectError(`entry ${digestString(digest)}: this store keeps no partial uploads; write from offset 0`, Code.OutOfRange);
    }
    if (this.#opts.contentAddressed) {
      if (digest.size > this.#opts.maxSizeBytes) throw this.#tooLarge(digest, digest.size);
      if (isEmptyDigest(digest)) {
        if (upload !== undefined && upload.offset !== 0) throw this.#wrongOffset(digest, upload, 0);
        // Always present; nothing to store, but the stream must still be empty.
        for await (const _ of verifying(digest, chunks)) throwIfAborted(opts?.signal);
        return;
      }
    }
    if (!this.#opts.contentAddressed || upload === undefined) {
      const signal = opts?.signal ? AbortSignal.any([opts.signal, this.#closing.signal]) : this.#closing.signal;
      await this.#tracked(this.#write(digest, chunks, signal, opts?.signal, opts?.namespace, undefined));
      return;
    }
    // A resumable upload: one write per upload key at a time, the newest wins.
    const key = uploadKey(upload.id, digest);
    for (let active = this.#activeUploads.get(key); active !== undefined; active = this.#activeUploads.get(key)) {
      active.ctl.abort(new ConnectError(`write of blob ${digestString(digest)} was superseded by a newer Write of upload ${upload.id}`, Code.Aborted));
      await active.done.catch(noop);
      throwIfAborted(opts?.signal);
      this.#checkOpen();
    }
    const ctl = new AbortController();
    const signal = AbortSignal.any([ctl.signal, this.#closing.signal, ...(opts?.signal ? [opts.signal] : [])]);
    const done = this.#write(digest, chunks, signal, opts?.signal, undefined, { ...upload, key });
    const active = { ctl, done };
    this.#activeUploads.set(key, active);
    try {
      await this.#tracked(done);
    } finally {
      if (this.#activeUploads.get(key) === active) this.#activeUploads.delete(key);
    }
  }

  /**
   * The bytes of upload `uploadId` of `digest` kept from an interrupted put
   * (see "Resumable uploads"); 0 if none. If a put of that upload is still
   * running, waits up to UPLOAD_SETTLE_MS for it to end first: a client that
   * cancelled a Write asks at once, often before the cancellation reached
   * the write.
   */
  async uploadStatus(digest: Digest, uploadId: string, opts?: CallOptions): Promise<number> {
    this.#checkOpen();
    throwIfAborted(opts?.signal);
    if (!this.#opts.contentAddressed || isEmptyDigest(digest)) return 0;
    const key = uploadKey(uploadId, digest);
    const active = this.#activeUploads.get(key);
    if (active !== undefined) {
      let timer: NodeJS.Timeout | undefined;
      const waited = new Promise<void>((resolve) => {
        timer = setTimeout(resolve, UPLOAD_SETTLE_MS);
      });
      try {
        const settled = Promise.race([active.done.catch(noop), waited]);
        await (opts?.signal === undefined ? settled : abortable(settled, opts.signal));
      } finally {
        clearTimeout(timer);
      }
    }
    return this.#partials.get(key)?.bytes ?? 0;
  }

  async #tracked(write: Promise<void>): Promise<void> {
    this.#writesInFlight.add(write);
    try {
      await write;
    } finally {
      this.#writesInFlight.delete(write);
    }
  }

  describe(): StoreDescription {
    return {
      kind: 'disk',
      path: this.#root,
      contentAddressed: this.#opts.contentAddressed,
      blobs: this.#index.size,
      bytes: this.#bytes,
      uploadBytesInFlight: this.#reserved,
      ...(this.#opts.contentAddressed
        ? {
            partialUploads: this.#partials.size,
            partialUploadBytes: this.#partialBytes,
            partialUploadsResumed: this.#partialsResumed,
            partialUploadsExpired: this.#partialsExpired,
          }
        : {}),
      maxSizeBytes: this.#opts.maxSizeBytes,
      evictions: this.#evictions,
      writes: this.#writes,
      reads: this.#reads,
      writesInFlight: this.#writesInFlight.size,
      ...(this.#valueCacheMax > 0 ? { cachedValues: this.#valueCache.size, cachedValueBytes: this.#valueCacheBytes } : {}),
      openMs: Math.round(this.#openMs),
      tempFilesRemovedAtOpen: this.#tempFilesRemoved,
      junkRemovedAtOpen: this.#junkRemoved,
      closed: this.#closePromise !== undefined,
    };
  }

  /**
   * Aborts writes in flight and waits until their temp files are gone, lets
   * pending evictions and mtime updates finish, then drops the index.
   * Idempotent. Streams already returned by get() keep working.
   */
  close(): Promise<void> {
    this.#closePromise ??= (async () => {
      this.#closing.abort(new ConnectError('the disk store is closing', Code.Unavailable));
      await Promise.allSettled([...this.#writesInFlight]);
      await Promise.all([...this.#partials.values()].map((p) => this.#discardPartial(p)));
      await Promise.allSettled([...this.#keyOps.values()]);
      while (this.#touchWorkers.size > 0) await Promise.allSettled([...this.#touchWorkers]);
      this.#index.clear();
      this.#bytes = 0;
      this.#log?.info({ path: this.#root }, 'disk store closed');
    })();
    return this.#closePromise;
  }

  // ---- writing ----

  async #write(
    digest: Digest,
    chunks: AsyncIterable<Uint8Array>,
    signal: AbortSignal,
    callerSignal: AbortSignal | undefined,
    namespace: string | undefined,
    upload: (UploadRef & { readonly key: string }) | undefined,
  ): Promise<void> {
    const key = this.#key(digest, namespace);
    const cas = this.#opts.contentAddressed;
    // Resuming: take over the kept prefix (its file, hash state and reserved bytes).
    let resumed: PartialUpload | undefined;
    if (upload !== undefined) {
      resumed = this.#takePartial(upload.key);
      if (upload.offset === 0) {
        if (resumed !== undefined) void this.#discardPartial(resumed, true);
        resumed = undefined;
      } else if (resumed === undefined || resumed.bytes !== upload.offset) {
        if (resumed !== undefined) this.#park(resumed);
        throw this.#wrongOffset(digest, upload, resumed?.bytes ?? 0);
      }
    }
    const tmpPath = resumed?.tmpPath ?? join(this.#tmpDir, `${digestString(digest)}.${++this.#tmpSeq}.${randomBytes(4).toString('hex')}`);
    let fh: FileHandle | undefined;
    let committed = false;
    // Bytes of this write counted in #reserved until it commits, fails or parks.
    const reservation = { bytes: resumed?.bytes ?? 0 };
    // CAS: the SHA-256 and length of everything in the temp file.
    const hash = cas ? (resumed?.hash ?? createHash('sha256')) : undefined;
    const prefix = resumed?.bytes ?? 0;
    // Set once the bytes in the temp file are exactly those hashed, after a
    // failure of the source or a cancellation: the prefix may be kept.
    let keepable = false;
    // CAS: bytes hashed so far (and, once `keepable`, in the temp file).
    let n = prefix;
    // The temp file is (again) a kept prefix: it must not be deleted.
    let parked = false;
    try {
      // The CAS knows the size up front: make room before the first byte.
      if (cas) {
        try {
          this.#reserve(reservation, digest, digest.size - prefix);
        } catch (err) {
          if (resumed !== undefined) {
            // Give the prefix back untouched: the client may retry.
            reservation.bytes = 0;
            parked = this.#park(resumed);
            resumed = undefined;
          }
          throw err;
        }
        if (resumed !== undefined) this.#partialsResumed++;
      }
      fh = await this.#io(
        `${resumed === undefined ? 'creating' : 'reopening'} temp file for blob ${key}`,
        open(tmpPath, resumed === undefined ? 'wx' : 'a', 0o644),
      );
      const source = cas ? chunks : this.#capped(digest, chunks, reservation);
      const it = source[Symbol.asyncIterator]();
      const file = fh;
      // Buffers no larger than the blob: small blobs are most of a CAS.
      const capacity = cas ? digest.size - prefix : 64 * 1024;
      const out = new WriteBehind(capacity, (buf) => this.#io(`writing blob ${key}`, writeFully(file, buf)));
      try {
        for (;;) {
          let r: IteratorResult<Uint8Array>;
          try {
            r = await abortable(it.next(), signal);
          } catch (err) {
            keepable = upload !== undefined && !this.#closing.signal.aborted;
            throw err;
          }
          if (r.done) break;
          const chunk = r.value;
          if (hash !== undefined) {
            n += chunk.byteLength;
            if (n > digest.size) {
              throw new ConnectError(`blob ${digestString(digest)}: received more than ${digest.size} bytes`, Code.InvalidArgument);
            }
            hash.update(chunk);
          }
          // At most two buffers per upload: one being written, one filling.
          await out.add(chunk);
        }
        await out.flush();
      } catch (err) {
        // Stop the source (it may be stuck waiting on a client); don't wait.
        it.return?.().catch(noop);
        if (keepable) {
          // Everything hashed goes to the file, or nothing is kept.
          try {
            await out.flush();
          } catch {
            keepable = false;
            await out.settle();
          }
        } else {
          await out.settle();
        }
        throw err;
      }
      if (hash !== undefined) {
        if (n !== digest.size) {
          throw new ConnectError(`blob ${digestString(digest)}: received ${n} bytes, digest says ${digest.size}`, Code.InvalidArgument);
        }
        const got = hash.digest('hex');
        if (got !== digest.hash) {
          throw new ConnectError(`blob ${digestString(digest)}: content hashes to ${got}, not to the digest's hash`, Code.InvalidArgument);
        }
      }
      const size = cas ? n : out.bytes;
      if (this.#fsync) await this.#io(`syncing blob ${key}`, fh.sync());
      await this.#io(`closing blob ${key}`, fh.close());
      fh = undefined;
      // Cancelled or closing: commit nothing. (A newer Write of the same
      // upload does not stop one that already has the whole verified blob.)
      if (callerSignal?.aborted || this.#closing.signal.aborted) throw signal.reason;
      await this.#withKey(key, async () => {
        await this.#renameIntoPlace(tmpPath, key, namespace);
        committed = true;
        const old = this.#index.get(key);
        if (old !== undefined) {
          this.#bytes -= old.size;
          this.#index.delete(key);
        }
        this.#index.set(key, { size, mtimeMs: Date.now() });
        this.#bytes += size;
        this.#reserved -= reservation.bytes;
        reservation.bytes = 0;
      });
      this.#writes++;
      this.#evict(key);
      // The name is in the index already (readers may use it); the caller's
      // acknowledgement waits until it is durable.
      if (this.#fsync) await this.#syncDir(dirname(this.#blobPath(key)), `syncing the directory of blob ${key}`);
    } catch (err) {
      if (fh !== undefined) {
        const closed = await fh.close().then(
          () => true,
          () => false,
        );
        if (keepable && closed && !committed && upload !== undefined && hash !== undefined && n > 0 && n <= reservation.bytes) {
          // The prefix keeps `n` bytes of this write's reservation; the rest is released below.
          reservation.bytes -= n;
          parked = this.#park({ key: upload.key, digest, tmpPath, bytes: n, hash }, true);
          if (!parked) reservation.bytes += n;
        }
      }
      this.#reserved -= reservation.bytes;
      reservation.bytes = 0;
      if (!committed && !parked) {
        await unlink(tmpPath).catch((e: unknown) => {
          if (errno(e) !== 'ENOENT') this.#log?.warn({ err: e, tmpPath }, 'disk store: could not remove temp file');
        });
      }
      throw this.#writeError(err, key, signal, callerSignal);
    }
  }

  // ---- resumable uploads ----

  /** Removes the kept prefix of `key` from the table and hands it (file, hash, reserved bytes) to the caller. */
  #takePartial(key: string): PartialUpload | undefined {
    const p = this.#partials.get(key);
    if (p === undefined) return undefined;
    clearTimeout(p.timer);
    this.#partials.delete(key);
    this.#partialBytes -= p.bytes;
    return p;
  }

  /**
   * Keeps `p` (whose bytes are counted in #reserved) for resumption, within
   * the bounds: older prefixes go first to make room; one larger than all
   * the room there is is not kept. Returns false, having released nothing,
   * when `p` is not kept and `fresh` (the caller then releases it);
   * otherwise a prefix not kept is discarded here.
   */
  #park(p: Omit<PartialUpload, 'timer'>, fresh = false): boolean {
    if (p.bytes > this.#partialMaxBytes || this.#partialMaxCount < 1 || this.#closePromise !== undefined) {
      if (!fresh) void this.#discardPartial(p, true);
      return false;
    }
    for (const old of this.#partials.values()) {
      if (this.#partials.size < this.#partialMaxCount && this.#partialBytes + p.bytes <= this.#partialMaxBytes) break;
      this.#takePartial(old.key);
      void this.#discardPartial(old, true);
    }
    const timer = setTimeout(() => {
      if (this.#partials.get(p.key)?.tmpPath !== p.tmpPath) return;
      this.#partialsExpired++;
      const kept = this.#takePartial(p.key)!;
      void this.#discardPartial(kept, true);
    }, this.#partialTtlMs);
    timer.unref();
    const kept: PartialUpload = { ...p, timer };
    this.#partials.set(p.key, kept);
    this.#partialBytes += p.bytes;
    return true;
  }

  /**
   * Deletes a prefix's temp file and releases its reserved bytes. `taken`:
   * already out of the table (see #takePartial).
   */
  async #discardPartial(p: Omit<PartialUpload, 'timer'>, taken = false): Promise<void> {
    if (!taken) {
      if (this.#partials.get(p.key)?.tmpPath !== p.tmpPath) return;
      this.#takePartial(p.key);
    }
    this.#reserved -= p.bytes;
    await unlink(p.tmpPath).catch((e: unknown) => {
      if (errno(e) !== 'ENOENT') this.#log?.warn({ err: e, tmpPath: p.tmpPath }, 'disk store: could not remove a partial upload');
    });
  }

  /** A put at `upload.offset` when the store keeps `kept` bytes of that upload. */
  #wrongOffset(digest: Digest, upload: UploadRef, kept: number): ConnectError {
    const where = `upload ${upload.id} of blob ${digestString(digest)}`;
    if (upload.offset > kept) {
      return new ConnectError(
        `write_offset ${upload.offset} is beyond the ${kept} bytes this server holds of ${where} ` +
          `(QueryWriteStatus reports them; resume there, or restart at 0)`,
        Code.OutOfRange,
      );
    }
    return new ConnectError(
      `write_offset ${upload.offset} is behind the ${kept} bytes this server holds of ${where}: ` +
        `resume at write_offset ${kept} (what QueryWriteStatus reports), or restart at 0`,
      Code.InvalidArgument,
    );
  }

  async #renameIntoPlace(tmpPath: string, key: string, namespace?: string | undefined): Promise<void> {
    const dest = this.#blobPath(key);
    try {
      await rename(tmpPath, dest);
    } catch (err) {
      if (errno(err) !== 'ENOENT') throw this.#ioError(`renaming blob ${key} into place`, err);
      // The fan-out directory was removed behind our back, or is the first of
      // a new namespace (created on first use): create it once.
      await this.#io(`creating directory for blob ${key}`, mkdir(dirname(dest), { recursive: true }));
      if (key.includes('/') && namespace !== undefined) await this.#nameNamespace(key, namespace);
      await this.#io(`renaming blob ${key} into place`, rename(tmpPath, dest));
      // Directories just created: their names must be durable too (the new
      // blob's own directory is synced by the caller).
      if (this.#fsync) {
        for (let d = dirname(dest); d !== this.#root && d !== dirname(d); ) {
          d = dirname(d);
          await this.#syncDir(d, 'syncing a directory of the store');
        }
      }
    }
  }

  /**
   * fsyncs `dir` with a sync that starts after the caller's rename: renames
   * that arrive while one runs share the next one, so a burst of N writes to
   * one directory costs about two directory fsyncs, not N.
   */
  #syncDir(dir: string, what: string): Promise<void> {
    let state = this.#dirSyncs.get(dir);
    if (state === undefined) {
      state = { running: undefined, next: undefined };
      this.#dirSyncs.set(dir, state);
    }
    if (state.next !== undefined) return state.next;
    const st = state;
    const start = (): Promise<void> => {
      const run = this.#io(what, fsyncDirectory(dir)).finally(() => {
        if (st.running === run) st.running = undefined;
      });
      st.running = run;
      return run;
    };
    if (st.running === undefined) return start();
    st.next = st.running.then(noop, noop).then(() => {
      st.next = undefined;
      return start();
    });
    return st.next;
  }

  /**
   * Counts `bytes` more of a write in flight against the cap, evicting least
   * recently used blobs to make room; RESOURCE_EXHAUSTED if even evicting
   * every stored blob leaves too little (other uploads hold the rest).
   */
  #reserve(reservation: { bytes: number }, digest: Digest, bytes: number): void {
    const max = this.#opts.maxSizeBytes;
    // Kept prefixes of interrupted uploads are the first to go.
    for (const p of this.#partials.values()) {
      if (this.#reserved + bytes <= max) break;
      this.#takePartial(p.key);
      void this.#discardPartial(p, true);
    }
    // Nothing is evicted for a write that could not fit anyway.
    if (this.#reserved + bytes > max) {
      throw new ConnectError(
        `the disk store is full: uploads in flight hold ${this.#reserved} of its ${max} bytes (maxSizeBytes), ` +
          `too many to also hold ${bytes} bytes of ${digestString(digest)}; retry later`,
        Code.ResourceExhausted,
      );
    }
    if (this.#bytes + this.#reserved + bytes > max) this.#evict(undefined, bytes);
    this.#reserved += bytes;
    reservation.bytes += bytes;
  }

  /** For the AC, where the length is not known in advance: enforce the cap, and reserve, while streaming. */
  async *#capped(digest: Digest, chunks: AsyncIterable<Uint8Array>, reservation: { bytes: number }): AsyncIterable<Uint8Array> {
    let n = 0;
    for await (const c of chunks) {
      n += c.byteLength;
      if (n > this.#opts.maxSizeBytes) throw this.#tooLarge(digest);
      this.#reserve(reservation, digest, c.byteLength);
      yield c;
    }
  }

  /** `valueLength` is known for the CAS (the digest size) and not for the AC. */
  #tooLarge(digest: Digest, valueLength?: number): ConnectError {
    const what =
      valueLength === undefined
        ? `entry ${digestString(digest)}: value is larger than`
        : `blob ${digestString(digest)} is ${valueLength} bytes, larger than`;
    return new ConnectError(`${what} the disk store's maxSizeBytes (${this.#opts.maxSizeBytes})`, Code.ResourceExhausted);
  }

  #writeError(err: unknown, key: string, signal: AbortSignal, callerSignal: AbortSignal | undefined): ConnectError {
    if (callerSignal?.aborted) {
      return new ConnectError(`write of blob ${key} was cancelled`, Code.Canceled, undefined, undefined, callerSignal.reason);
    }
    if (signal.aborted && !this.#closing.signal.aborted) return toConnectError(signal.reason);
    if (signal.aborted) {
      return new ConnectError(
        `the disk store is closing; write of blob ${key} aborted`,
        Code.Unavailable,
        undefined,
        undefined,
        signal.reason,
      );
    }
    return toConnectError(err);
  }

  // ---- reading ----

  #readStream(rs: Readable, key: string, signal: AbortSignal | undefined): AsyncIterable<Uint8Array> {
    const onAbort = () => rs.destroy(new ConnectError(`read of blob ${key} was cancelled`, Code.Canceled));
    signal?.addEventListener('abort', onAbort, { once: true });
    if (signal?.aborted) onAbort();
    rs.once('close', () => signal?.removeEventListener('abort', onAbort));
    const mapError = (err: unknown): never => {
      if (err instanceof ConnectError) throw err;
      throw this.#ioError(`reading blob ${key}`, err);
    };
    // A plain iterator over the Readable (not a generator wrapper), so that
    // return() before the first next() still destroys the stream and closes
    // the descriptor.
    return {
      [Symbol.asyncIterator]() {
        const it = rs[Symbol.asyncIterator]();
        return {
          next: () => it.next().catch(mapError),
          return: async () => {
            rs.destroy();
            await it.return?.();
            return { done: true as const, value: undefined };
          },
        };
      },
    };
  }

  // ---- AC value cache ----

  /** get() of an AC value small enough for the value cache. */
  async #getSmallValue(key: string, entry: Entry, digest: Digest, opts: GetOptions | undefined): Promise<AsyncIterable<Uint8Array>> {
    let bytes: Uint8Array | undefined;
    const cached = this.#valueCache.get(key);
    if (cached !== undefined) {
      if (cached.entry === entry) {
        bytes = cached.bytes;
        this.#valueCache.delete(key);
        this.#valueCache.set(key, cached);
      } else {
        this.#uncacheValue(key); // overwritten since it was read
      }
    }
    if (bytes === undefined) {
      try {
        bytes = await readFile(this.#blobPath(key));
      } catch (err) {
        if (errno(err) === 'ENOENT') {
          this.#log?.warn({ path: this.#root, blob: key }, 'disk store: blob file vanished; forgetting it');
          this.#forget(key, entry);
          throw notFound(digest);
        }
        throw this.#ioError(`reading blob ${key}`, err);
      }
      // A value read while an overwrite was landing may belong to another
      // entry: serve it (it was the file's content), but cache only what
      // matches the entry that is still current.
      if (this.#index.get(key) === entry && bytes.byteLength === entry.size) this.#cacheValue(key, entry, bytes);
    }
    const { start, end } = resolveRange(bytes.byteLength, opts?.offset, opts?.limit);
    this.#reads++;
    return start === end ? empty() : oneChunk(bytes.subarray(start, end));
  }

  #cacheValue(key: string, entry: Entry, bytes: Uint8Array): void {
    this.#uncacheValue(key);
    this.#valueCache.set(key, { entry, bytes });
    this.#valueCacheBytes += bytes.byteLength;
    for (const [k, v] of this.#valueCache) {
      if (this.#valueCacheBytes <= this.#valueCacheMax) break;
      this.#valueCache.delete(k);
      this.#valueCacheBytes -= v.bytes.byteLength;
    }
  }

  #uncacheValue(key: string): void {
    const v = this.#valueCache.get(key);
    if (v === undefined) return;
    this.#valueCache.delete(key);
    this.#valueCacheBytes -= v.bytes.byteLength;
  }

  // ---- index and recency ----

  #touch(key: string, entry: Entry, now: number): void {
    this.#index.moveToEnd(key, entry);
    if (now - entry.mtimeMs >= this.#touchIntervalMs) {
      entry.mtimeMs = now;
      this.#touchQueue.add(key);
      if (this.#touchWorkers.size < TOUCH_CONCURRENCY) {
        const w = this.#touchWorker().finally(() => this.#touchWorkers.delete(w));
        this.#touchWorkers.add(w);
      }
    }
  }

  async #touchWorker(): Promise<void> {
    for (const key of this.#touchQueue) {
      this.#touchQueue.delete(key);
      const entry = this.#index.get(key);
      if (entry === undefined) continue;
      const t = entry.mtimeMs / 1000;
      try {
        await utimes(this.#blobPath(key), t, t);
      } catch (err) {
        if (errno(err) !== 'ENOENT') this.#log?.warn({ err, blob: key }, 'disk store: could not update mtime');
      }
    }
  }

  /** Drops `key` from the index if it still maps to `entry` (a newer write may have replaced it). */
  #forget(key: string, entry: Entry): void {
    if (this.#index.get(key) !== entry) return;
    this.#index.delete(key);
    this.#bytes -= entry.size;
    this.#uncacheValue(key);
  }

  /** Evicts least recently used blobs (never `keep`) until stored, in-flight and `extra` bytes fit the cap. */
  #evict(keep: string | undefined, extra = 0): void {
    const limit = this.#opts.maxSizeBytes - this.#reserved - extra;
    for (const [key, entry] of this.#index) {
      if (this.#bytes <= limit) break;
      if (key === keep) continue;
      this.#index.delete(key);
      this.#bytes -= entry.size;
      this.#uncacheValue(key);
      this.#evictions++;
      void this.#removeFile(key);
    }
  }

  /** Unlinks the file of a key that has left the index, unless a newer write has put it back. */
  #removeFile(key: string): Promise<void> {
    return this.#withKey(key, async () => {
      if (this.#index.has(key)) return;
      try {
        await unlink(this.#blobPath(key));
      } catch (err) {
        if (errno(err) !== 'ENOENT') this.#log?.warn({ err, blob: key }, 'disk store: could not remove evicted blob');
      }
    });
  }

  #withKey(key: string, fn: () => Promise<void>): Promise<void> {
    const prev = this.#keyOps.get(key);
    const run = prev === undefined ? fn() : prev.then(fn);
    const tail = run.then(noop, noop);
    this.#keyOps.set(key, tail);
    void tail.then(() => {
      if (this.#keyOps.get(key) === tail) this.#keyOps.delete(key);
    });
    return run;
  }

  // ---- opening ----

  async #load(): Promise<void> {
    const t0 = performance.now();
    await this.#io('creating store directory', mkdir(this.#root, { recursive: true }));

    // Anything in tmp/ is a write that never completed (crash, kill -9).
    try {
      this.#tempFilesRemoved = (await readdir(this.#tmpDir)).length;
    } catch (err) {
      if (errno(err) !== 'ENOENT') throw this.#ioError('listing tmp/', err);
    }
    await this.#io('emptying tmp/', rm(this.#tmpDir, { recursive: true, force: true }));
    await this.#io('creating tmp/', mkdir(this.#tmpDir));

    const top = await this.#io('listing store directory', readdir(this.#root, { withFileTypes: true }));
    const present = new Set<string>();
    let namespaces = false;
    for (const e of top) {
      if (e.isDirectory() && FAN_OUT_SET.has(e.name)) present.add(e.name);
      else if (e.isDirectory() && e.name === NS_DIR && !this.#opts.contentAddressed) namespaces = true;
      else if (e.name !== TMP_DIR) {
        this.#log?.warn({ path: this.#root, entry: e.name }, 'disk store: ignoring unexpected entry in store directory');
      }
    }

    // Directory listings give names; names give hash and (for the CAS) size.
    // `prefix`: the namespace directory of the key ("ns/<hash>/"), if not the default one.
    const candidates: { dir: string; name: string; size: number; prefix?: string }[] = [];
    const junk: string[] = [];
    await mapLimit(FAN_OUT, SCAN_CONCURRENCY, async (dir) => {
      const dirPath = join(this.#root, dir);
      if (!present.has(dir)) {
        await this.#io(`creating ${dir}/`, mkdir(dirPath, { recursive: true }));
        return;
      }
      const entries = await this.#io(`listing ${dir}/`, readdir(dirPath, { withFileTypes: true }));
      for (const e of entries) {
        const m = BLOB_NAME.exec(e.name);
        const size = m ? Number(m[2]) : NaN;
        const valid =
          m !== null &&
          e.name.startsWith(dir) &&
          Number.isSafeInteger(size) &&
          !(this.#opts.contentAddressed && size === 0 && m[1] !== EMPTY_SHA256);
        if (!e.isFile()) {
          this.#log?.warn({ path: dirPath, entry: e.name }, 'disk store: ignoring non-file entry');
        } else if (!valid) {
          junk.push(join(dirPath, e.name));
        } else {
          candidates.push({ dir, name: e.name, size });
        }
      }
    });
    if (namespaces) await this.#scanNamespaces(candidates, junk);

    // One stat per file, for the mtime (recency). The size is checked against
    // the name in a CAS; in the AC the file size is the value's length.
    // Synchronous stats in batches, yielding between them: 2-3x faster than
    // promise stats through libuv's 4 threads (100k files: ~0.3 s vs ~0.8 s),
    // while blocking the event loop only a few milliseconds at a time.
    const found: { key: string; size: number; mtimeMs: number }[] = [];
    for (let i = 0; i < candidates.length; i += STAT_BATCH) {
      if (i > 0) await new Promise((resolve) => setImmediate(resolve));
      for (const c of candidates.slice(i, i + STAT_BATCH)) {
        const p = join(this.#root, c.dir, c.name);
        let st;
        try {
          st = statSync(p, { throwIfNoEntry: false });
        } catch (err) {
          throw this.#ioError(`stat of ${c.dir}/${c.name}`, err);
        }
        if (st === undefined) continue;
        if (this.#opts.contentAddressed && st.size !== c.size) junk.push(p);
        else found.push({ key: c.prefix === undefined ? c.name : c.prefix + c.name, size: st.size, mtimeMs: st.mtimeMs });
      }
    }

    for (const p of junk) {
      this.#log?.warn({ path: p }, 'disk store: removing invalid blob file');
      await unlink(p).catch(noop);
    }
    this.#junkRemoved = junk.length;

    found.sort((a, b) => a.mtimeMs - b.mtimeMs);
    for (const f of found) {
      this.#index.set(f.key, { size: f.size, mtimeMs: f.mtimeMs });
      this.#bytes += f.size;
    }
    // The cap may have shrunk since the last run.
    this.#evict(undefined);
    await Promise.allSettled([...this.#keyOps.values()]);

    this.#openMs = performance.now() - t0;
    this.#log?.info(
      {
        path: this.#root,
        blobs: this.#index.size,
        bytes: this.#bytes,
        ms: Math.round(this.#openMs),
        tempFilesRemoved: this.#tempFilesRemoved,
        junkRemoved: this.#junkRemoved,
        evicted: this.#evictions,
      },
      'disk store opened',
    );
  }

  /**
   * AC only: lists the blob files of every namespace but the default one
   * (`ns/<hash>/<fan-out>/<hash>-<size>`) into `candidates`, invalid names
   * into `junk`. All namespaces share one index, so one LRU and one size cap.
   */
  async #scanNamespaces(candidates: { dir: string; name: string; size: number; prefix?: string }[], junk: string[]): Promise<void> {
    const nsRoot = join(this.#root, NS_DIR);
    const fans: { dir: string; fan: string; prefix: string }[] = [];
    for (const d of await this.#io('listing ns/', readdir(nsRoot, { withFileTypes: true }))) {
      if (!d.isDirectory() || !NS_DIR_NAME.test(d.name)) {
        this.#log?.warn({ path: nsRoot, entry: d.name }, 'disk store: ignoring unexpected entry in namespace directory');
        continue;
      }
      const nsPath = join(nsRoot, d.name);
      for (const e of await this.#io(`listing ns/${d.name}/`, readdir(nsPath, { withFileTypes: true }))) {
        if (e.isDirectory() && FAN_OUT_SET.has(e.name)) {
          fans.push({ dir: `${NS_DIR}/${d.name}/${e.name}`, fan: e.name, prefix: `${NS_DIR}/${d.name}/` });
        } else if (e.name !== NS_NAME_FILE) {
          this.#log?.warn({ path: nsPath, entry: e.name }, 'disk store: ignoring unexpected entry in namespace directory');
        }
      }
    }
    await mapLimit(fans, SCAN_CONCURRENCY, async ({ dir, fan, prefix }) => {
      const dirPath = join(this.#root, dir);
      for (const e of await this.#io(`listing ${dir}/`, readdir(dirPath, { withFileTypes: true }))) {
        const m = BLOB_NAME.exec(e.name);
        const size = m ? Number(m[2]) : NaN;
        if (!e.isFile()) {
          this.#log?.warn({ path: dirPath, entry: e.name }, 'disk store: ignoring non-file entry');
        } else if (m === null || !e.name.startsWith(fan) || !Number.isSafeInteger(size)) {
          junk.push(join(dirPath, e.name));
        } else {
          candidates.push({ dir, name: e.name, size, prefix });
        }
      }
    });
  }

  // ---- helpers ----

  /** `<hash>-<size>` lives in `<hash[0..2]>/`; `ns/<ns hash>/<hash>-<size>` in `ns/<ns hash>/<hash[0..2]>/`. */
  #blobPath(key: string): string {
    const slash = key.lastIndexOf('/');
    if (slash < 0) return join(this.#root, key.slice(0, 2), key);
    return join(this.#root, key.slice(0, slash), key.slice(slash + 1, slash + 3), key.slice(slash + 1));
  }

  /**
   * The index key (and path below the root, see #blobPath) of `digest`: its
   * file name in the CAS and in the AC's default namespace, else prefixed by
   * the namespace's directory.
   */
  #key(digest: Digest, namespace: string | undefined): string {
    const name = digestString(digest);
    if (namespace === undefined || namespace === '' || this.#opts.contentAddressed) return name;
    let dir = this.#nsDirs.get(namespace);
    if (dir === undefined) {
      if (this.#nsDirs.size >= NS_DIR_MEMO) this.#nsDirs.clear();
      dir = `${NS_DIR}/${createHash('sha256').update(namespace, 'utf8').digest('hex')}`;
      this.#nsDirs.set(namespace, dir);
    }
    return `${dir}/${name}`;
  }

  /** Writes the `name` file of a namespace directory just created; only informational, so failures are logged. */
  async #nameNamespace(key: string, namespace: string): Promise<void> {
    const file = join(this.#root, key.slice(0, key.indexOf('/', NS_DIR.length + 1)), NS_NAME_FILE);
    try {
      await writeFile(file, namespace, { flag: 'wx' });
    } catch (err) {
      if (errno(err) !== 'EEXIST') this.#log?.warn({ err, path: file }, 'disk store: could not record a namespace name');
    }
  }

  #checkOpen(): void {
    if (this.#closePromise !== undefined) {
      throw new ConnectError('the disk store is closed', Code.Unavailable);
    }
  }

  async #io<T>(what: string, p: Promise<T>): Promise<T> {
    try {
      return await p;
    } catch (err) {
      throw this.#ioError(what, err);
    }
  }

  /**
   * ENOSPC/EDQUOT become RESOURCE_EXHAUSTED; every other I/O failure
   * INTERNAL. The message says what failed ("storage error: writing blob
   * <digest>: no space left on device (ENOSPC)") but never the store's path:
   * it may reach a client. The path and the system's message go to the log
   * here, and stay in the error's cause.
   */
  #ioError(what: string, err: unknown): ConnectError {
    if (err instanceof ConnectError) return err;
    this.#log?.warn({ err, path: this.#root }, `disk store: ${what} failed`);
    return storageError(err, what);
  }
}

function noop(): void {}

function errno(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

async function* empty(): AsyncIterable<Uint8Array> {}

/**
 * The index: key ("<hash>-<size>", the file name) -> Entry, least recently
 * used first. For the CAS it also maps every hash to the key stored under it
 * and its entry, kept in step by set/delete/clear, so FindMissing (10,000
 * digests a call) finds an entry from the request's hash string, one lookup
 * per digest: that string's hash code is
 * computed once per request, and the stored key's once ever, where building
 * "<hash>-<size>" per digest cost a new string and its hashing for every
 * lookup (measured: the largest cost of a 10,000-digest FindMissing).
 * In the CAS a hash has one size (content is verified against both), so one
 * key per hash; if a second appears anyway (a file tampered with on disk),
 * the map names the last one set and findMissing() falls back to the exact
 * key for a size that does not match.
 */
interface StoredKey {
  readonly key: string;
  readonly entry: Entry;
}

class BlobIndex extends Map<string, Entry> {
  readonly #byHash: Map<string, StoredKey> | undefined;

  constructor(byHash: boolean) {
    super();
    this.#byHash = byHash ? new Map() : undefined;
  }

  /** CAS only: the key stored for `hash` and its entry, if any (undefined for the AC). */
  storedFor(hash: string): StoredKey | undefined {
    return this.#byHash?.get(hash);
  }

  override set(key: string, entry: Entry): this {
    super.set(key, entry);
    this.#byHash?.set(key.slice(0, SHA256_HEX_LENGTH), { key, entry });
    return this;
  }

  override delete(key: string): boolean {
    const had = super.delete(key);
    if (had && this.#byHash !== undefined) {
      const hash = key.slice(0, SHA256_HEX_LENGTH);
      if (this.#byHash.get(hash)?.key === key) this.#byHash.delete(hash);
    }
    return had;
  }

  override clear(): void {
    super.clear();
    this.#byHash?.clear();
  }

  /** Marks `key` most recently used; its entry, and so the hash map, are unchanged. */
  moveToEnd(key: string, entry: Entry): void {
    super.delete(key);
    super.set(key, entry);
  }
}

/** The key of a resumable upload: its id and the blob's digest. */
function uploadKey(id: string, digest: Digest): string {
  return `${id}/${digestString(digest)}`;
}

/** One chunk as an AsyncIterable, without a generator. */
function oneChunk(bytes: Uint8Array): AsyncIterable<Uint8Array> {
  return {
    [Symbol.asyncIterator]() {
      let done = false;
      return {
        next: () => {
          if (done) return Promise.resolve({ done: true as const, value: undefined });
          done = true;
          return Promise.resolve({ done: false as const, value: bytes });
        },
        return: () => {
          done = true;
          return Promise.resolve({ done: true as const, value: undefined });
        },
      };
    },
  };
}

/** Bytes gathered before one write to the temp file. */
const WRITE_BUFFER_BYTES = 1024 * 1024;

/**
 * Gathers an upload's chunks (16 KiB each from Bazel) into 1 MiB buffers and
 * writes each while the next one fills, so the disk sees a few large writes
 * and the network is never waiting on it. Chunks are copied, so a source may
 * reuse its buffers as soon as add() returns. Backpressure: add() waits when
 * a full buffer is ready and the previous write is still running.
 */
class WriteBehind {
  readonly #write: (buf: Uint8Array) => Promise<void>;
  readonly #capacity: number;
  #buf: Buffer | undefined;
  #fill = 0;
  #spare: Buffer | undefined;
  #inFlight: Promise<void> | undefined;
  bytes = 0;

  /** `sizeHint`: the expected total, so a small upload gets a small buffer. */
  constructor(sizeHint: number, write: (buf: Uint8Array) => Promise<void>) {
    this.#capacity = Math.max(1, Math.min(WRITE_BUFFER_BYTES, sizeHint));
    this.#write = write;
  }

  async add(chunk: Uint8Array): Promise<void> {
    let off = 0;
    while (off < chunk.byteLength) {
      this.#buf ??= this.#spare ?? Buffer.allocUnsafe(this.#capacity);
      this.#spare = undefined;
      const n = Math.min(this.#buf.length - this.#fill, chunk.byteLength - off);
      this.#buf.set(chunk.subarray(off, off + n), this.#fill);
      this.#fill += n;
      off += n;
      this.bytes += n;
      if (this.#fill === this.#buf.length) await this.#start();
    }
  }

  /** Writes what is gathered and waits for every write. */
  async flush(): Promise<void> {
    if (this.#fill > 0) await this.#start();
    await this.#inFlight;
    this.#inFlight = undefined;
  }

  /** Waits for a write still running, ignoring its outcome (after a failure elsewhere). */
  async settle(): Promise<void> {
    await this.#inFlight?.catch(noop);
  }

  async #start(): Promise<void> {
    await this.#inFlight;
    const buf = this.#buf!;
    const fill = this.#fill;
    this.#buf = undefined;
    this.#fill = 0;
    this.#inFlight = this.#write(buf.subarray(0, fill)).then(() => {
      this.#spare = buf;
    });
    // A failed write is reported by the next add()/flush(); keep it from
    // counting as unhandled meanwhile.
    this.#inFlight.catch(noop);
  }
}

async function writeFully(fh: FileHandle, chunk: Uint8Array): Promise<void> {
  let off = 0;
  while (off < chunk.byteLength) {
    const { bytesWritten } = await fh.write(chunk, off, chunk.byteLength - off, null);
    off += bytesWritten;
  }
}

/** fsyncs a directory, so the names created or removed in it are durable. */
async function fsyncDirectory(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
