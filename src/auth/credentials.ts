import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { Code } from '@connectrpc/connect';
import type { AuthConfig, IdentityConfig } from '../config.ts';
import type { PeerInfo } from '../server/peer.ts';
import { Grants } from './grants.ts';
import { DEFAULT_SCRYPT, parseScryptHash, verifyPassword } from './password.ts';
import type { ScryptHash } from './password.ts';
import { TokenBucket } from './rate-limit.ts';
import { TtlLru } from './ttl-lru.ts';

/** A configured identity, ready to use. */
export interface Identity {
  readonly name: string;
  readonly grants: Grants;
  /** Absent: no rate limit. */
  readonly rateLimit: TokenBucket | undefined;
}

/** Who is calling, as far as the credentials tell. */
export type Caller =
  | { readonly kind: 'identity'; readonly identity: Identity; readonly via: 'bearer' | 'basic' | 'certificate' }
  /** No credentials at all; `note` says why a client certificate did not count, if one was sent. */
  | { readonly kind: 'anonymous'; readonly note?: string | undefined }
  /** Credentials were sent and are not valid (or could not be checked now): never anonymous. */
  | { readonly kind: 'rejected'; readonly code: Code; readonly message: string };

export interface AuthenticatorOptions {
  /** Basic credentials that verified, by header: at most this many (default 1024) ... */
  readonly basicCacheMaxEntries?: number | undefined;
  /** ... for this long (default 5 min). */
  readonly basicCacheTtlMs?: number | undefined;
  /** Basic credentials that did not verify: kept apart, so failures cannot evict successes. Default 1024. */
  readonly basicFailureCacheMaxEntries?: number | undefined;
  /** Default 60 s. */
  readonly basicFailureCacheTtlMs?: number | undefined;
  /** scrypt runs at once (each holds 16 MiB and a libuv thread the disk store also needs). Default 2. */
  readonly maxConcurrentPasswordChecks?: number | undefined;
  /** Checks waiting for a slot; beyond that RESOURCE_EXHAUSTED. Default 64. */
  readonly maxQueuedPasswordChecks?: number | undefined;
  /** Clock for the caches and rate limits (ms); default performance.now. */
  readonly now?: (() => number) | undefined;
}

const BEARER_REJECTED: Caller = { kind: 'rejected', code: Code.Unauthenticated, message: 'invalid bearer token' };
const BASIC_REJECTED: Caller = { kind: 'rejected', code: Code.Unauthenticated, message: 'invalid username or password' };
const BASIC_MALFORMED: Caller = {
  kind: 'rejected',
  code: Code.Unauthenticated,
  message: 'malformed Basic credentials: expected base64 of "username:password"',
};
const ANONYMOUS: Caller = { kind: 'anonymous' };

/**
 * Turns a call's credentials into a Caller. In order:
 *
 * 1. An `Authorization` header, if there is one, decides: `Bearer <token>`
 *    (the token's SHA-256 compared with every identity's tokenSha256, all of
 *    them, in constant time) or `Basic <base64>` (username, then scrypt). A
 *    wrong or malformed header is rejected, never taken as anonymous.
 * 2. Else a verified client certificate whose CN names an identity.
 * 3. Else anonymous (the authorizer decides what anonymous may do).
 *
 * Basic checks cost one scrypt (~50 ms, 16 MiB) each, so their outcome is
 * cached by an HMAC of the whole header value (a client sends the same one
 * on every call): successes and failures in two bounded LRUs with a TTL,
 * concurrent checks of one header share one scrypt, and at most
 * maxConcurrentPasswordChecks run at once. An unknown username costs the
 * same scrypt as a known one (against a dummy hash), so timing does not
 * tell which usernames exist.
 */
export class Authenticator {
  readonly identities: ReadonlyMap<string, Identity>;
  /** scrypt runs so far (tests read it to see the cache work). */
  passwordChecks = 0;

  readonly #tokens: { readonly digest: Buffer; readonly identity: Identity }[] = [];
  readonly #users = new Map<string, { readonly hash: ScryptHash; readonly identity: Identity }>();
  readonly #byCommonName = new Map<string, Identity>();
  readonly #dummy: ScryptHash;
  /** Keys the basic caches: an HMAC, so a memory dump does not hold fast hashes of passwords. */
  readonly #cacheKey = randomBytes(32);
  readonly #verified: TtlLru<string, Caller>;
  readonly #failed: TtlLru<string, Caller>;
  readonly #pending = new Map<string, Promise<Caller>>();
  readonly #slots: Slots;

  constructor(config: AuthConfig, opts: AuthenticatorOptions = {}) {
    const now = opts.now ?? (() => performance.now());
    const identities = new Map<string, Identity>();
    for (const c of config.identities) {
      const identity = toIdentity(c, now);
      identities.set(c.name, identity);
      if (c.tokenSha256 !== undefined) this.#tokens.push({ digest: Buffer.from(c.tokenSha256, 'hex'), identity });
      if (c.basic !== undefined) {
        let hash: ScryptHash;
        try {
          hash = parseScryptHash(c.basic.passwordHash);
        } catch (err) {
          throw new Error(`auth.identities.${c.name}.basic.passwordHash: ${(err as Error).message.replace(/^password hash: /, '')}`);
        }
        this.#users.set(c.basic.username, { hash, identity });
      }
      if (c.clientCertCommonName !== undefined) this.#byCommonName.set(c.clientCertCommonName, identity);
    }
    this.identities = identities;
    this.#dummy = {
      N: DEFAULT_SCRYPT.N,
      r: DEFAULT_SCRYPT.r,
      p: DEFAULT_SCRYPT.p,
      salt: randomBytes(DEFAULT_SCRYPT.saltBytes),
      hash: randomBytes(DEFAULT_SCRYPT.keyBytes),
    };
    this.#verified = new TtlLru({ maxEntries: opts.basicCacheMaxEntries ?? 1024, ttlMs: opts.basicCacheTtlMs ?? 300_000, now });
    this.#failed = new TtlLru({
      maxEntries: opts.basicFailureCacheMaxEntries ?? 1024,
      ttlMs: opts.basicFailureCacheTtlMs ?? 60_000,
      now,
    });
    this.#slots = new Slots(opts.maxConcurrentPasswordChecks ?? 2, opts.maxQueuedPasswordChecks ?? 64);
  }

  /** Which kinds of credential some identity accepts (for the "missing credentials" message). */
  get accepts(): { readonly bearer: boolean; readonly basic: boolean; readonly certificate: boolean } {
    return { bearer: this.#tokens.length > 0, basic: this.#users.size > 0, certificate: this.#byCommonName.size > 0 };
  }

  /**
   * The caller of one call. `authorization` is the header's value (null
   * when absent). Synchronous except for a basic check that misses the
   * cache.
   */
  authenticate(authorization: string | null, peer: PeerInfo): Caller | Promise<Caller> {
    if (authorization !== null) return this.#fromHeader(authorization);
    const cn = peer.certCommonName;
    if (cn === undefined) return ANONYMOUS;
    const identity = this.#byCommonName.get(cn);
    if (identity !== undefined) return { kind: 'identity', identity, via: 'certificate' };
    return { kind: 'anonymous', note: `the client certificate's CN ${JSON.stringify(clip(cn))} names no identity` };
  }

  #fromHeader(value: string): Caller | Promise<Caller> {
    const v = value.trim();
    const space = v.indexOf(' ');
    const scheme = space < 0 ? v : v.slice(0, space);
    const rest = space < 0 ? '' : v.slice(space + 1).trim();
    const lower = scheme.toLowerCase();
    if (lower === 'bearer') return rest === '' ? BEARER_REJECTED : this.#bearer(rest);
    if (lower === 'basic') return this.#basic(v, rest);
    const shown = /^[A-Za-z][A-Za-z0-9._~+-]{0,31}$/.test(scheme) ? ` "${scheme}"` : '';
    return {
      kind: 'rejected',
      code: Code.Unauthenticated,
      message: `unsupported Authorization scheme${shown}: send "Bearer <token>" or "Basic <base64 of user:password>"`,
    };
  }

  /** Compares with every token, with no early exit: the time does not depend on which (if any) matched. */
  #bearer(token: string): Caller {
    const digest = createHash('sha256').update(token).digest();
    let found: Identity | undefined;
    for (const t of this.#tokens) {
      if (timingSafeEqual(digest, t.digest)) found = t.identity;
    }
    return found === undefined ? BEARER_REJECTED : { kind: 'identity', identity: found, via: 'bearer' };
  }

  #basic(header: string, encoded: string): Caller | Promise<Caller> {
    const key = createHmac('sha256', this.#cacheKey).update(header).digest('base64');
    const cached = this.#verified.get(key) ?? this.#failed.get(key);
    if (cached !== undefined) return cached;
    const pending = this.#pending.get(key);
    if (pending !== undefined) return pending;

    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(encoded)) return this.#remember(key, BASIC_MALFORMED);
    const decoded = Buffer.from(encoded, 'base64');
    const colon = decoded.indexOf(0x3a);
    if (colon < 0) return this.#remember(key, BASIC_MALFORMED);
    const user = this.#users.get(decoded.subarray(0, colon).toString('utf8'));
    const password = decoded.subarray(colon + 1);
    if (!this.#slots.available) {
      return {
        kind: 'rejected',
        code: Code.ResourceExhausted,
        message: 'too many password checks in progress; retry shortly (bearer tokens cost nothing to check)',
      };
    }
    const check = this.#slots
      .run(async () => {
        this.passwordChecks++;
        // An unknown user pays the same scrypt, against a hash nothing matches.
        const ok = await verifyPassword(password, user?.hash ?? this.#dummy);
        const caller: Caller = ok && user !== undefined ? { kind: 'identity', identity: user.identity, via: 'basic' } : BASIC_REJECTED;
        return this.#remember(key, caller);
      })
      .finally(() => this.#pending.delete(key));
    this.#pending.set(key, check);
    return check;
  }

  #remember(key: string, caller: Caller): Caller {
    if (caller.kind === 'identity') this.#verified.set(key, caller);
    else this.#failed.set(key, caller);
    return caller;
  }
}

function toIdentity(c: IdentityConfig, now: () => number): Identity {
  return {
    name: c.name,
    grants: new Grants(c.grants),
    rateLimit: c.rateLimit === undefined ? undefined : new TokenBucket(c.rateLimit.requestsPerSecond, c.rateLimit.burst, now),
  };
}

/** At most `limit` tasks at once, at most `queue` more waiting. */
class Slots {
  readonly #limit: number;
  readonly #queue: number;
  #running = 0;
  readonly #waiting: (() => void)[] = [];

  constructor(limit: number, queue: number) {
    this.#limit = Math.max(1, limit);
    this.#queue = Math.max(0, queue);
  }

  get available(): boolean {
    return this.#running < this.#limit || this.#waiting.length < this.#queue;
  }

  async run<T>(task: () => Promise<T>): Promise<T> {
    if (this.#running >= this.#limit) await new Promise<void>((resolve) => this.#waiting.push(resolve));
    else this.#running++;
    try {
      return await task();
    } finally {
      const next = this.#waiting.shift();
      if (next !== undefined) next();
      else this.#running--;
    }
  }
}

function clip(s: string): string {
  return s.length > 100 ? `${s.slice(0, 97)}...` : s;
}
