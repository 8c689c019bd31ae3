import { fromBinary } from '@bufbuild/protobuf';
import { Code, ConnectError } from '@connectrpc/connect';
import type { Logger } from 'pino';
import type {
  ActionResult,
  Digest as ProtoDigest,
  Directory,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ActionResultSchema, DirectorySchema, TreeSchema } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../digest.ts';
import { digestKey, digestString, fromProtoDigest, isEmptyDigest } from '../digest.ts';
import { isCode, withPrefix } from '../errors.ts';
import { mapLimit } from '../concurrency.ts';
import { readAtMost, resolveRange } from '../streams.ts';
import type { BlobStore, CallOptions, GetOptions, PutOptions, StoreDescription } from './blob-store.ts';

/** Largest ActionResult this store will buffer and check. Real ones are KiB. */
const MAX_ACTION_RESULT_BYTES = 16 * 1024 * 1024;
/** Default budget of Tree / Directory bytes read to check one ActionResult. */
const DEFAULT_MAX_TREE_BYTES = 64 * 1024 * 1024;
/** Trees or directories fetched at once while checking one result. */
const FETCH_PARALLELISM = 8;
/** ActionResults checked at once by findMissing. */
const FIND_MISSING_PARALLELISM = 8;

export interface CompletenessCheckingStoreOptions {
  /** The AC store holding serialized ActionResults. */
  readonly backend: BlobStore;
  /** The CAS tree the results' outputs must be readable from (not owned: close() leaves it open). */
  readonly cas: BlobStore;
  readonly logger?: Logger | undefined;
  /**
   * Most Tree and Directory bytes read from the CAS to check one result.
   * A result with larger output trees is hidden (NOT_FOUND), not served
   * unchecked. Default 64 MiB.
   */
  readonly maxTreeBytes?: number | undefined;
}

/** A CAS digest an ActionResult depends on, and the field that names it. */
interface Reference {
  readonly digest: Digest;
  readonly what: string;
}

/**
 * For the AC tree only: serves an ActionResult only if every CAS blob it
 * references is readable through `cas`: output files, stdout and stderr,
 * each output directory's Tree and every file listed in that Tree (or,
 * for results that carry only root_directory_digest, every Directory and
 * file under it). Otherwise the result is reported NOT_FOUND ("action result
 * X references missing blob Y"), so Bazel reruns the action instead of
 * failing a Builds-without-the-Bytes build on a download that cannot work.
 *
 * findMissing() answers honestly too: a digest is missing when its result is
 * absent or incomplete. CAS infrastructure errors propagate with their code
 * (never turned into NOT_FOUND: an unreachable shard is not a cache miss).
 *
 * Put it at the top of the AC tree, above any routing, with `cas` being the
 * same tree the CAS service uses, so the check sees what clients will see.
 * The catch: each hit costs a read of the result, of its Trees, and a
 * FindMissing over all its outputs; results with huge output trees are
 * hidden once they exceed `maxTreeBytes`.
 *
 * Config: `{"completenessChecking": {"backend": {"disk": {...}}}}`
 */
export class CompletenessCheckingStore implements BlobStore {
  readonly #backend: BlobStore;
  readonly #cas: BlobStore;
  readonly #logger: Logger | undefined;
  readonly #maxTreeBytes: number;
  #hidden = 0;

  constructor(opts: CompletenessCheckingStoreOptions) {
    this.#backend = opts.backend;
    this.#cas = opts.cas;
    this.#logger = opts.logger;
    this.#maxTreeBytes = opts.maxTreeBytes ?? DEFAULT_MAX_TREE_BYTES;
  }

  async findMissing(digests: readonly Digest[], opts?: CallOptions): Promise<Digest[]> {
    const absent = await this.#backend.findMissing(digests, opts);
    const absentKeys = new Set(absent.map(digestKey));
    const present = digests.filter((d) => !absentKeys.has(digestKey(d)));
    const incomplete = await mapLimit(present, FIND_MISSING_PARALLELISM, async (d) => {
      try {
        await this.#readChecked(d, opts);
        return false;
      } catch (err) {
        if (isCode(err, Code.NotFound)) return true;
        throw err;
      }
    });
    return [...absent, ...present.filter((_, i) => incomplete[i])];
  }

  async get(digest: Digest, opts?: GetOptions): Promise<AsyncIterable<Uint8Array>> {
    const bytes = await this.#readChecked(digest, opts);
    const { start, end } = resolveRange(bytes.byteLength, opts?.offset, opts?.limit);
    const slice = bytes.subarray(start, end);
    return (async function* () {
      if (slice.byteLength > 0) yield slice;
    })();
  }

  async put(digest: Digest, chunks: AsyncIterable<Uint8Array>, opts?: PutOptions): Promise<void> {
    // Writes are not checked: clients upload outputs before the result, and
    // reads are where an incomplete result would do harm.
    await this.#backend.put(digest, chunks, opts);
  }

  describe(): StoreDescription {
    return { kind: 'completenessChecking', hiddenResults: this.#hidden, children: [this.#backend.describe()] };
  }

  async close(): Promise<void> {
    // The CAS tree belongs to whoever built it; only the backend is ours.
    await this.#backend.close();
  }

  /** Returns the result's bytes, or rejects NOT_FOUND if it is absent or incomplete. */
  async #readChecked(action: Digest, opts: CallOptions | undefined): Promise<Uint8Array> {
    // A miss in the backend is a plain miss; only a result that exists but
    // cannot be vouched for counts as hidden. The result is read in the
    // caller's namespace; the CAS reads that check it are shared.
    const signal = opts?.signal;
    const stream = await this.#backend.get(action, { signal, namespace: opts?.namespace });
    try {
      return await this.#check(action, stream, signal);
    } catch (err) {
      if (isCode(err, Code.NotFound)) {
        this.#hidden++;
        this.#logger?.debug({ action: digestString(action) }, (err as ConnectError).rawMessage);
      }
      throw err;
    }
  }

  async #check(action: Digest, stream: AsyncIterable<Uint8Array>, signal: AbortSignal | undefined): Promise<Uint8Array> {
    const bytes = await readAtMost(stream, MAX_ACTION_RESULT_BYTES);
    if (bytes === undefined) {
      throw this.#hide(action, `is larger than ${MAX_ACTION_RESULT_BYTES} bytes and cannot be checked`);
    }
    let result: ActionResult;
    try {
      result = fromBinary(ActionResultSchema, bytes);
    } catch (err) {
      throw this.#hide(action, `does not parse: ${err instanceof Error ? err.message : String(err)}`);
    }
    const refs = await this.#references(action, result, signal);
    let missing: Digest[];
    try {
      missing = await this.#cas.findMissing(
        refs.map((r) => r.digest),
        { signal },
      );
    } catch (err) {
      throw withPrefix(`checking action result ${digestString(action)}`, err);
    }
    if (missing.length > 0) {
      const missingKeys = new Set(missing.map(digestKey));
      const first = refs.find((r) => missingKeys.has(digestKey(r.digest))) ?? { digest: missing[0]!, what: 'unknown field' };
      const more = missing.length > 1 ? ` and ${missing.length - 1} more` : '';
      throw this.#hide(action, `references missing blob ${digestString(first.digest)} (${first.what})${more}`);
    }
    return bytes;
  }

  /** Collects every CAS digest the result depends on, reading Trees as needed. */
  async #references(action: Digest, result: ActionResult, signal: AbortSignal | undefined): Promise<Reference[]> {
    const refs = new Map<string, Reference>();
    const add = (pd: ProtoDigest | undefined, what: string): Digest => {
      let d: Digest;
      try {
        d = fromProtoDigest(pd, what);
      } catch (err) {
        throw this.#hide(action, `is invalid: ${err instanceof ConnectError ? err.rawMessage : String(err)}`);
      }
      if (!isEmptyDigest(d) && !refs.has(digestKey(d))) refs.set(digestKey(d), { digest: d, what });
      return d;
    };
    const addFiles = (dir: Directory, what: string): void => {
      dir.files.forEach((f) => add(f.digest, `${what} file "${f.name}"`));
    };

    result.outputFiles.forEach((f, i) => add(f.digest, `output_files[${i}] "${f.path}"`));
    if (result.stdoutDigest !== undefined) add(result.stdoutDigest, 'stdout_digest');
    if (result.stderrDigest !== undefined) add(result.stderrDigest, 'stderr_digest');

    // Trees are read (which also proves them readable); their sizes are known
    // up front, so an oversized result is refused before reading anything.
    const trees: Array<{ digest: Digest; what: string }> = [];
    const hierarchies: Array<{ digest: Digest; what: string }> = [];
    result.outputDirectories.forEach((o, i) => {
      const what = `output_directories[${i}] "${o.path}"`;
      if (o.treeDigest !== undefined) {
        trees.push({ digest: add(o.treeDigest, `${what} tree_digest`), what });
      }
      if (o.rootDirectoryDigest !== undefined) {
        const root = add(o.rootDirectoryDigest, `${what} root_directory_digest`);
        // With a Tree present the Tree is authoritative for the contents.
        if (o.treeDigest === undefined) hierarchies.push({ digest: root, what });
      }
      if (o.treeDigest === undefined && o.rootDirectoryDigest === undefined) {
        throw this.#hide(action, `is invalid: ${what} has neither tree_digest nor root_directory_digest`);
      }
    });
    const budget = { left: this.#maxTreeBytes };
    const spend = (d: Digest): void => {
      budget.left -= d.size;
      if (budget.left < 0) {
        throw this.#hide(action, `has output trees larger than ${this.#maxTreeBytes} bytes and cannot be checked`);
      }
    };
    trees.forEach((t) => spend(t.digest));

    await mapLimit(trees, FETCH_PARALLELISM, async (t) => {
      const bytes = await this.#readCas(action, t.digest, `tree ${digestString(t.digest)} (${t.what})`, signal);
      let tree;
      try {
        tree = fromBinary(TreeSchema, bytes);
      } catch {
        throw this.#hide(action, `has tree ${digestString(t.digest)} (${t.what}) that is not a valid Tree message`);
      }
      if (tree.root !== undefined) addFiles(tree.root, `${t.what} root`);
      tree.children.forEach((c, j) => addFiles(c, `${t.what} children[${j}]`));
    });

    // Directory-only outputs: walk the hierarchy breadth first.
    for (const h of hierarchies) {
      const seen = new Set<string>([digestKey(h.digest)]);
      let level: Array<{ digest: Digest; path: string }> = [{ digest: h.digest, path: '' }];
      while (level.length > 0) {
        level.forEach((e) => spend(e.digest));
        const dirs = await mapLimit(level, FETCH_PARALLELISM, async (e) => {
          const what = `directory ${digestString(e.digest)} at "${e.path}" (${h.what})`;
          const bytes = await this.#readCas(action, e.digest, what, signal);
          try {
            return fromBinary(DirectorySchema, bytes);
          } catch {
            throw this.#hide(action, `has ${what} that is not a valid Directory message`);
          }
        });
        const next: typeof level = [];
        dirs.forEach((dir, i) => {
          const { path } = level[i]!;
          const what = `${h.what} "${path}"`;
          addFiles(dir, what);
          dir.directories.forEach((node) => {
            const childPath = path === '' ? node.name : `${path}/${node.name}`;
            const child = add(node.digest, `${h.what} directory "${childPath}"`);
            if (seen.has(digestKey(child))) return;
            seen.add(digestKey(child));
            next.push({ digest: child, path: childPath });
          });
        });
        level = next;
      }
    }
    return [...refs.values()];
  }

  /** Reads a Tree or Directory blob from the CAS; a miss hides the result. */
  async #readCas(action: Digest, d: Digest, what: string, signal: AbortSignal | undefined): Promise<Uint8Array> {
    if (isEmptyDigest(d)) return new Uint8Array(0);
    try {
      const bytes = await readAtMost(await this.#cas.get(d, { signal }), d.size);
      if (bytes !== undefined) return bytes;
    } catch (err) {
      if (isCode(err, Code.NotFound)) throw this.#hide(action, `references missing ${what}`);
      throw withPrefix(`checking action result ${digestString(action)}`, err);
    }
    throw this.#hide(action, `references ${what} whose stored size exceeds its digest`);
  }

  #hide(action: Digest, reason: string): ConnectError {
    return new ConnectError(`action result ${digestString(action)} ${reason}`, Code.NotFound);
  }
}
