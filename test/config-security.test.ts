// The config sections of issue 11: tls, auth, instances, limits, the admin
// token's sources and the TLS and bearer options of remote stores. Every
// error names the field by its path.
import t from 'tap';
import { ConfigError, DEFAULT_INSTANCES, DEFAULT_LIMITS, parseConfig } from '../src/config.ts';
import type { NodeConfig } from '../src/config.ts';

const base = '/etc/reapi';
const SHA = 'a'.repeat(64);

function valid(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    listen: '127.0.0.1:8980',
    cas: { memory: { maxSizeBytes: 1024 } },
    ac: { memory: { maxSizeBytes: 1024 } },
    ...extra,
  };
}

function parse(extra: Record<string, unknown>): NodeConfig {
  return parseConfig(valid(extra), { baseDir: base });
}

function errorOf(extra: Record<string, unknown>): string {
  try {
    parse(extra);
  } catch (err) {
    if (err instanceof ConfigError) return err.message;
    throw err;
  }
  return '(no error)';
}

t.test('without the new sections: cleartext, no auth, isolated AC, default limits', async (t) => {
  const c = parse({});
  t.equal(c.tls, undefined);
  t.equal(c.auth, undefined);
  t.same(c.instances, DEFAULT_INSTANCES);
  t.same(c.limits, DEFAULT_LIMITS);
  t.equal(c.instances.isolateActionCache, true, 'the action cache is isolated by instance by default');
  t.equal(c.limits.maxMessageBytes, 4 * 1024 * 1024, 'the message limit of Bazel and gRPC');
});

t.test('tls: files resolve against the config directory; clientCert needs a CA', async (t) => {
  const c = parse({ tls: { certFile: 'tls/server.pem', keyFile: '/keys/server.key', clientCaFile: 'tls/ca.pem' } });
  t.same(c.tls, {
    certFile: '/etc/reapi/tls/server.pem',
    keyFile: '/keys/server.key',
    clientCaFile: '/etc/reapi/tls/ca.pem',
    clientCert: 'require',
  });
  t.equal(parse({ tls: { certFile: 'a', keyFile: 'b', clientCaFile: 'c', clientCert: 'optional' } }).tls?.clientCert, 'optional');
  t.equal(errorOf({ tls: { keyFile: 'b' } }), 'config.tls.certFile: required');
  t.match(errorOf({ tls: { certFile: 'a', keyFile: 'b', clientCert: 'optional' } }), /^config\.tls\.clientCert: needs clientCaFile/);
  t.match(errorOf({ tls: { certFile: 'a', keyFile: 'b', clientCaFile: 'c', clientCert: 'maybe' } }), /^config\.tls\.clientCert: expected one of require, optional/);
  t.match(errorOf({ tls: { certFile: 'a', keyFile: 'b', password: 'x' } }), /^config\.tls\.password: unknown field/);
});

t.test('auth: identities with hashed secrets and grants by instance prefix', async (t) => {
  const c = parse({
    tls: { certFile: 'a', keyFile: 'b', clientCaFile: 'c' },
    auth: {
      anonymous: 'read',
      identities: {
        ci: { tokenSha256: SHA, grants: { '': 'read-write' }, rateLimit: { requestsPerSecond: 100 } },
        alice: { basic: { username: 'alice', passwordHash: 'scrypt$16384$8$1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==' }, grants: { 'team-a': 'read', 'team-a/x': 'read-write' } },
        'runner-7': { clientCertCommonName: 'runner-7', grants: { '': 'read-write' } },
      },
    },
  });
  t.equal(c.auth?.anonymous, 'read');
  t.same(
    c.auth?.identities.map((i) => [i.name, i.grants.map((g) => `${g.instancePrefix}=${g.access}`)]),
    [
      ['ci', ['=read-write']],
      ['alice', ['team-a=read', 'team-a/x=read-write']],
      ['runner-7', ['=read-write']],
    ],
  );
  t.same(c.auth?.identities[0]?.rateLimit, { requestsPerSecond: 100, burst: 100 }, 'burst defaults to the rate');
  t.equal(parse({ auth: { identities: { ci: { tokenSha256: SHA, grants: {} } } } }).auth?.anonymous, 'none', 'anonymous access is off by default');
});

t.test('auth: plain secrets, missing credentials and duplicates are refused', async (t) => {
  const id = (o: Record<string, unknown>) => ({ auth: { identities: { ci: { grants: { '': 'read' }, ...o } } } });
  t.match(errorOf(id({ tokenSha256: 'my-secret-token' })), /^config\.auth\.identities\.ci\.tokenSha256: expected 64 lowercase hex digits .*never the token itself/);
  t.match(errorOf(id({ basic: { username: 'ci', passwordHash: 'hunter2' } })), /^config\.auth\.identities\.ci\.basic\.passwordHash: expected "scrypt\$N\$r\$p\$salt\$hash".*never a plain password/);
  t.match(errorOf(id({ basic: { username: 'ci', passwordHash: 'scrypt$1048576$8$1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==' } })), /passwordHash: N x r x 128 = \d+ bytes per check is over/);
  t.match(errorOf(id({ basic: { username: 'c:i', passwordHash: 'scrypt$16384$8$1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==' } })), /^config\.auth\.identities\.ci\.basic\.username: may not contain ':'/);
  t.match(errorOf(id({})), /^config\.auth\.identities\.ci: needs a credential/);
  t.match(errorOf(id({ clientCertCommonName: 'ci' })), /^config\.auth\.identities\.ci\.clientCertCommonName: needs tls\.clientCaFile/);
  t.match(errorOf(id({ tokenSha256: SHA, grants: { '': 'write' } })), /^config\.auth\.identities\.ci\.grants\."": expected one of read, read-write/);
  t.match(errorOf(id({ tokenSha256: SHA, grants: { 'a//b': 'read' } })), /^config\.auth\.identities\.ci\.grants\."a\/\/b": instance name contains an empty segment/);
  t.match(errorOf(id({ tokenSha256: SHA, token: 'x' })), /^config\.auth\.identities\.ci\.token: unknown field/);
  t.match(
    errorOf({ auth: { identities: { a: { tokenSha256: SHA, grants: {} }, b: { tokenSha256: SHA, grants: {} } } } }),
    /^config\.auth\.identities\.b\.tokenSha256: the same token is already given to config\.auth\.identities\.a\.tokenSha256/,
  );
  t.match(errorOf({ auth: { identities: { 'bad name': { tokenSha256: SHA, grants: {} } } } }), /^config\.auth\.identities\.bad name: identity names may contain only/);
  t.match(errorOf({ auth: { anonymous: 'write', identities: {} } }), /^config\.auth\.anonymous: expected one of none, read/);
});

t.test('instances: aliases map instance names to one namespace; names are checked', async (t) => {
  const c = parse({ instances: { aliases: { 'ci-linux': 'linux', 'dev-linux': 'linux' } } });
  t.same([...c.instances.aliases], [['ci-linux', 'linux'], ['dev-linux', 'linux']]);
  t.equal(parse({ instances: { isolateActionCache: false } }).instances.isolateActionCache, false);
  t.match(errorOf({ instances: { aliases: { 'a\u0000': 'x' } } }), /^config\.instances\.aliases\."a\\u0000": instance name contains the control character U\+0000/);
  t.match(errorOf({ instances: { aliases: { a: 'blobs' } } }), /^config\.instances\.aliases\."a": instance name contains the reserved segment "blobs"/);
  t.match(errorOf({ instances: { isolateActionCache: 'yes' } }), /^config\.instances\.isolateActionCache: expected true or false/);
});

t.test('limits: defaults filled in, each checked against its range, and the batch limit must fit a message', async (t) => {
  const c = parse({ limits: { maxConcurrentStreams: 64 } });
  t.equal(c.limits.maxConcurrentStreams, 64);
  t.equal(c.limits.maxMessageBytes, DEFAULT_LIMITS.maxMessageBytes, 'the rest keep their defaults');
  t.match(errorOf({ limits: { maxConcurrentStreams: 0 } }), /^config\.limits\.maxConcurrentStreams: expected a positive integer, got 0/);
  t.match(errorOf({ limits: { maxZstdWindowLog: 40 } }), /^config\.limits\.maxZstdWindowLog: must be between 10 and 31, got 40/);
  t.match(errorOf({ limits: { headersTimeoutMs: 50 } }), /^config\.limits\.headersTimeoutMs: must be between 100 and 600000, got 50/);
  t.match(errorOf({ limits: { maxMessages: 1 } }), /^config\.limits\.maxMessages: unknown field/);
  t.match(
    errorOf({ limits: { maxMessageBytes: 1024 * 1024, maxConnectionBufferBytes: 1024 * 1024 } }),
    /^config\.maxBatchTotalSizeBytes: 4128768 does not fit in limits\.maxMessageBytes \(1048576\)/,
  );
  t.match(
    errorOf({ limits: { maxMessageBytes: 8 * 1024 * 1024, maxConnectionBufferBytes: 4 * 1024 * 1024 } }),
    /^config\.limits\.maxConnectionBufferBytes: must be at least maxMessageBytes/,
  );
  t.equal(parse({ maxBatchTotalSizeBytes: 1 << 20, limits: { maxMessageBytes: 2 << 20 } }).maxBatchTotalSizeBytes, 1 << 20);
});

t.test('admin: the token from exactly one source; allowed hosts', async (t) => {
  const c = parse({ admin: { listen: '127.0.0.1:8990', tokenFile: 'secrets/admin-token', allowedHosts: ['Admin.Example:8990'] } });
  t.equal(c.admin?.tokenFile, '/etc/reapi/secrets/admin-token');
  t.same(c.admin?.allowedHosts, ['admin.example:8990'], 'hosts compare lowercase');
  t.equal(parse({ admin: { listen: '127.0.0.1:8990', tokenEnv: 'REAPI_ADMIN_TOKEN' } }).admin?.tokenEnv, 'REAPI_ADMIN_TOKEN');
  t.match(errorOf({ admin: { listen: '127.0.0.1:8990', token: 'x', tokenEnv: 'X' } }), /^config\.admin: give one of token, tokenFile or tokenEnv, not token and tokenEnv/);
  t.match(errorOf({ admin: { listen: '127.0.0.1:8990', tokenEnv: 'not a name' } }), /^config\.admin\.tokenEnv: not an environment variable name/);
  t.match(errorOf({ admin: { listen: '127.0.0.1:8990', allowedHosts: [] } }), /^config\.admin\.allowedHosts: expected a non-empty array/);
  t.match(errorOf({ admin: { listen: '127.0.0.1:8990', allowedHosts: ['a b'] } }), /^config\.admin\.allowedHosts\[0\]: not a host or host:port/);
});

t.test('remote stores: TLS files and a bearer token from a file or the environment, never inline', async (t) => {
  const remote = (o: Record<string, unknown>) => ({ cas: { remote: { url: 'https://shard:8981', ...o } } });
  const c = parse(remote({ tls: { caFile: 'ca.pem', certFile: 'edge.pem', keyFile: 'edge.key', serverName: 'shard.internal' }, bearerTokenFile: 'shard-token' }));
  t.same(c.cas, {
    kind: 'remote',
    url: 'https://shard:8981',
    instanceName: '',
    timeoutMs: undefined,
    healthTimeoutMs: undefined,
    tls: { caFile: '/etc/reapi/ca.pem', certFile: '/etc/reapi/edge.pem', keyFile: '/etc/reapi/edge.key', serverName: 'shard.internal' },
    bearerTokenFile: '/etc/reapi/shard-token',
    bearerTokenEnv: undefined,
  });
  t.match(errorOf({ cas: { remote: { url: 'http://shard:8981', tls: { caFile: 'ca.pem' } } } }), /^config\.cas\.remote\.tls: only valid with an https:\/\/ url/);
  t.match(errorOf(remote({ tls: { certFile: 'edge.pem' } })), /^config\.cas\.remote\.tls: certFile and keyFile go together/);
  t.match(errorOf(remote({ bearerTokenFile: 'a', bearerTokenEnv: 'B' })), /^config\.cas\.remote: give bearerTokenFile or bearerTokenEnv, not both/);
  t.match(errorOf(remote({ bearerToken: 'plain' })), /^config\.cas\.remote\.bearerToken: unknown field/);
});
