// Credentials, grants, password hashes and rate limits (src/auth/), without a
// server: what each kind of credential resolves to, what is rejected and
// with which code, that bearer tokens are compared against every identity,
// that basic checks are cached (successes and failures, bounded, with a
// TTL) and limited, and the segment-prefix semantics of grants.
import crypto, { createHash, scryptSync } from 'node:crypto';
import { syncBuiltinESMExports } from 'node:module';
import { Code } from '@connectrpc/connect';
import t from 'tap';
import type { AuthConfig, IdentityConfig } from '../../src/config.ts';
import { Authenticator } from '../../src/auth/credentials.ts';
import type { Caller } from '../../src/auth/credentials.ts';
import { Grants } from '../../src/auth/grants.ts';
import { hashPassword, parseScryptHash, scryptHashProblem, verifyPassword } from '../../src/auth/password.ts';
import { TokenBucket } from '../../src/auth/rate-limit.ts';
import { ANONYMOUS_PEER } from '../../src/server/peer.ts';
import type { PeerInfo } from '../../src/server/peer.ts';

const sha = (s: string) => createHash('sha256').update(s).digest('hex');
const basic = (user: string, password: string) => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
/** A cheap scrypt hash (N=1024) so cache tests do not spend seconds. */
const cheapHash = (password: string) => {
  const salt = Buffer.from('0123456789abcdef');
  const key = scryptSync(password, salt, 32, { N: 1024, r: 8, p: 1 });
  return `scrypt$1024$8$1$${salt.toString('base64')}$${key.toString('base64')}`;
};
const peerWithCert = (cn: string): PeerInfo => ({ address: '127.0.0.1', tls: true, certCommonName: cn });

const identities: IdentityConfig[] = [
  { name: 'ci', tokenSha256: sha('ci-token'), grants: [{ instancePrefix: '', access: 'read-write' }] },
  { name: 'dev', tokenSha256: sha('dev-token'), grants: [{ instancePrefix: '', access: 'read' }] },
  { name: 'alice', basic: { username: 'alice', passwordHash: cheapHash('correct horse') }, grants: [{ instancePrefix: 'a', access: 'read' }] },
  { name: 'runner', clientCertCommonName: 'runner-7', grants: [{ instancePrefix: '', access: 'read-write' }] },
];
const config: AuthConfig = { anonymous: 'none', identities };

function nameOf(c: Caller): string {
  if (c.kind === 'identity') return `${c.identity.name} via ${c.via}`;
  if (c.kind === 'anonymous') return 'anonymous';
  return `rejected ${Code[c.code]}: ${c.message}`;
}

t.test('grants: whole-segment prefixes, the longest match decides', async (t) => {
  const g = new Grants([
    { instancePrefix: 'a/b', access: 'read-write' },
    { instancePrefix: 'a/b/release', access: 'read' },
  ]);
  t.same(g.match('a/b'), { instancePrefix: 'a/b', access: 'read-write' }, '"a/b" matches itself');
  t.same(g.match('a/b/c'), { instancePrefix: 'a/b', access: 'read-write' }, '"a/b" matches "a/b/c"');
  t.equal(g.match('a/bc'), undefined, '"a/b" does not match "a/bc"');
  t.equal(g.match('a'), undefined, '"a/b" does not match its parent "a"');
  t.equal(g.match(''), undefined, 'nor the empty instance name');
  t.same(g.match('a/b/release/x'), { instancePrefix: 'a/b/release', access: 'read' }, 'the longer prefix wins');
  t.ok(g.allows('a/b/c', 'write'), 'read-write allows writes');
  t.notOk(g.allows('a/b/release/x', 'write'), 'a narrower read grant takes write access away');
  t.ok(g.allows('a/b/release/x', 'read'), 'and still allows reads');

  const all = new Grants([{ instancePrefix: '', access: 'read' }]);
  for (const name of ['', 'x', 'x/y/z']) t.same(all.match(name), { instancePrefix: '', access: 'read' }, `"" matches ${JSON.stringify(name)}`);
  t.notOk(all.allows('x', 'write'), 'a read grant never allows writes');
  t.equal(new Grants([]).match('x'), undefined, 'no grants, no access');
});

t.test('bearer tokens', async (t) => {
  const auth = new Authenticator(config);
  t.equal(nameOf(auth.authenticate('Bearer ci-token', ANONYMOUS_PEER) as Caller), 'ci via bearer');
  t.equal(nameOf(auth.authenticate('bearer   dev-token  ', ANONYMOUS_PEER) as Caller), 'dev via bearer', 'the scheme is case-insensitive, spaces trimmed');
  const wrong = auth.authenticate('Bearer ci-token-x', ANONYMOUS_PEER) as Caller;
  t.equal(nameOf(wrong), 'rejected Unauthenticated: invalid bearer token', 'a wrong token is UNAUTHENTICATED');
  t.equal(nameOf(auth.authenticate('Bearer', ANONYMOUS_PEER) as Caller), 'rejected Unauthenticated: invalid bearer token', 'an empty token too');
  const digest = auth.authenticate('Digest username="x", secret-ish', ANONYMOUS_PEER) as Caller;
  t.equal(digest.kind, 'rejected');
  t.match(nameOf(digest), /^rejected Unauthenticated: unsupported Authorization scheme "Digest"/, 'an unknown scheme is named');
  t.notMatch(nameOf(digest), /secret/, 'but nothing after it');
  t.equal(nameOf(auth.authenticate('', ANONYMOUS_PEER) as Caller).startsWith('rejected Unauthenticated'), true, 'an empty header is not anonymous');
  t.equal(nameOf(auth.authenticate(null, ANONYMOUS_PEER) as Caller), 'anonymous', 'no header: anonymous');
});

t.test('bearer tokens are compared with timingSafeEqual against every identity, with no early exit', async (t) => {
  const auth = new Authenticator(config);
  const original = crypto.timingSafeEqual;
  let calls = 0;
  crypto.timingSafeEqual = ((a: NodeJS.ArrayBufferView, b: NodeJS.ArrayBufferView) => {
    calls++;
    return original(a, b);
  }) as typeof crypto.timingSafeEqual;
  syncBuiltinESMExports();
  t.teardown(() => {
    crypto.timingSafeEqual = original;
    syncBuiltinESMExports();
  });
  const tokens = identities.filter((i) => i.tokenSha256 !== undefined).length;
  for (const [header, who] of [
    ['Bearer ci-token', 'ci via bearer'], // the first identity: no early exit after it
    ['Bearer dev-token', 'dev via bearer'],
    ['Bearer nobody', 'rejected Unauthenticated: invalid bearer token'],
  ] as const) {
    calls = 0;
    t.equal(nameOf(auth.authenticate(header, ANONYMOUS_PEER) as Caller), who);
    t.equal(calls, tokens, `${who}: ${tokens} constant-time comparisons, one per token identity`);
  }
});

t.test('client certificates, and the precedence of the header', async (t) => {
  const auth = new Authenticator(config);
  t.equal(nameOf(auth.authenticate(null, peerWithCert('runner-7')) as Caller), 'runner via certificate');
  const unknown = auth.authenticate(null, peerWithCert('stranger')) as Caller;
  t.same(unknown, { kind: 'anonymous', note: 'the client certificate\'s CN "stranger" names no identity' }, 'an unmapped CN is anonymous, with a note');
  t.equal(nameOf(auth.authenticate('Bearer dev-token', peerWithCert('runner-7')) as Caller), 'dev via bearer', 'a header wins over the certificate');
  t.equal(
    nameOf(auth.authenticate('Bearer wrong', peerWithCert('runner-7')) as Caller),
    'rejected Unauthenticated: invalid bearer token',
    'a wrong header is rejected even with a good certificate',
  );
});

t.test('password hashes', async (t) => {
  const h = await hashPassword(Buffer.from('s3cret'));
  t.match(h, /^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$/, 'the format config.ts checks');
  t.match(h, /^scrypt\$16384\$8\$1\$/, 'N=16384, r=8, p=1');
  const parsed = parseScryptHash(h);
  t.equal(parsed.salt.length, 16, 'a 16-byte salt');
  t.ok(await verifyPassword(Buffer.from('s3cret'), parsed), 'the right password verifies');
  t.notOk(await verifyPassword(Buffer.from('s3cret '), parsed), 'a wrong one does not');
  t.not(await hashPassword(Buffer.from('s3cret')), h, 'a fresh salt each time');
  t.equal(scryptHashProblem(h), undefined);
  t.match(scryptHashProblem('scrypt$1000$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=='), /not a power of two/);
  t.match(scryptHashProblem('scrypt$1048576$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA=='), /over the .*limit/);
  t.match(scryptHashProblem('scrypt$1024$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAA=='), /salt is 3 bytes/);
  t.match(scryptHashProblem('plain-password'), /expected "scrypt/);
  t.throws(() => new Authenticator({ anonymous: 'none', identities: [{ name: 'x', basic: { username: 'x', passwordHash: 'scrypt$3$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==' }, grants: [] }] }), {
    message: /^auth\.identities\.x\.basic\.passwordHash: N=3 is not a power of two/,
  });
});

t.test('basic credentials: right, wrong, unknown user, malformed', async (t) => {
  const auth = new Authenticator(config);
  t.equal(nameOf(await auth.authenticate(basic('alice', 'correct horse'), ANONYMOUS_PEER)), 'alice via basic');
  t.equal(nameOf(await auth.authenticate(basic('alice', 'wrong'), ANONYMOUS_PEER)), 'rejected Unauthenticated: invalid username or password');
  const before = auth.passwordChecks;
  t.equal(nameOf(await auth.authenticate(basic('mallory', 'x'), ANONYMOUS_PEER)), 'rejected Unauthenticated: invalid username or password', 'the same answer for an unknown user');
  t.equal(auth.passwordChecks, before + 1, 'which costs a scrypt too (usernames do not show in the timing)');
  const n = auth.passwordChecks;
  t.match(nameOf(await auth.authenticate('Basic !!!', ANONYMOUS_PEER)), /^rejected Unauthenticated: malformed Basic credentials/);
  t.match(nameOf(await auth.authenticate(`Basic ${Buffer.from('no-colon').toString('base64')}`, ANONYMOUS_PEER)), /malformed Basic/);
  t.equal(auth.passwordChecks, n, 'malformed credentials cost no scrypt');
});

t.test('basic checks are cached: successes and failures, bounded, with a TTL, shared while running', async (t) => {
  let now = 0;
  const auth = new Authenticator(config, { basicCacheMaxEntries: 2, basicCacheTtlMs: 1000, basicFailureCacheMaxEntries: 2, basicFailureCacheTtlMs: 1000, now: () => now });
  const good = basic('alice', 'correct horse');
  t.equal(nameOf(await auth.authenticate(good, ANONYMOUS_PEER)), 'alice via basic');
  t.equal(auth.passwordChecks, 1);
  for (let i = 0; i < 5; i++) {
    const again = auth.authenticate(good, ANONYMOUS_PEER);
    t.notOk(again instanceof Promise, 'a cached success answers synchronously');
  }
  t.equal(auth.passwordChecks, 1, 'the same header again: no scrypt');

  const bad = basic('alice', 'nope');
  await auth.authenticate(bad, ANONYMOUS_PEER);
  await auth.authenticate(bad, ANONYMOUS_PEER);
  t.equal(auth.passwordChecks, 2, 'failures are cached too');

  // Failures live in their own LRU: flooding it does not evict the success.
  for (let i = 0; i < 5; i++) await auth.authenticate(basic('alice', `guess-${i}`), ANONYMOUS_PEER);
  t.equal(auth.passwordChecks, 7);
  await auth.authenticate(bad, ANONYMOUS_PEER);
  t.equal(auth.passwordChecks, 8, 'the failure cache is bounded: the oldest failure was evicted');
  auth.authenticate(good, ANONYMOUS_PEER);
  t.equal(auth.passwordChecks, 8, 'and the success is still cached');

  now += 1001;
  await auth.authenticate(good, ANONYMOUS_PEER);
  t.equal(auth.passwordChecks, 9, 'after the TTL the password is checked again');

  const concurrent = basic('alice', 'correct horse '); // another header
  const results = await Promise.all(Array.from({ length: 20 }, () => auth.authenticate(concurrent, ANONYMOUS_PEER)));
  t.equal(auth.passwordChecks, 10, '20 concurrent calls with one header share one scrypt');
  t.ok(results.every((r) => r.kind === 'rejected'));
});

t.test('password checks in flight are limited', async (t) => {
  const auth = new Authenticator(config, { maxConcurrentPasswordChecks: 1, maxQueuedPasswordChecks: 1 });
  const calls = [1, 2, 3].map((i) => auth.authenticate(basic('alice', `p${i}`), ANONYMOUS_PEER));
  const third = await calls[2]!;
  t.equal(third.kind, 'rejected');
  t.equal(third.kind === 'rejected' && third.code, Code.ResourceExhausted, 'beyond running + queued: RESOURCE_EXHAUSTED');
  t.same((await Promise.all(calls.slice(0, 2))).map(nameOf), [
    'rejected Unauthenticated: invalid username or password',
    'rejected Unauthenticated: invalid username or password',
  ], 'the running and the queued one are answered');
});

t.test('token bucket', async (t) => {
  let now = 0;
  const b = new TokenBucket(2, 3, () => now);
  t.same([b.take(), b.take(), b.take(), b.take()], [true, true, true, false], 'a burst of 3, then none');
  now += 499;
  t.notOk(b.take(), 'not yet a whole token after 499 ms at 2/s');
  now += 1;
  t.ok(b.take(), 'one after 500 ms');
  now += 60_000;
  t.same([b.take(), b.take(), b.take(), b.take()], [true, true, true, false], 'refills to the burst, no further');
});
