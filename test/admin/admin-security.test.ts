// The admin surface's browser-facing defences: the Host check (DNS
// rebinding), cross-origin writes, form posts, and the security headers.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { buildAdminApp, type AdminAppOptions } from '../../src/admin/admin-app.ts';
import {
  API_CSP,
  PAGE_CSP,
  bodyProblem,
  crossOriginProblem,
  defaultAllowedHosts,
  formatHost,
  hostAllowed,
  parseAllowedHosts,
  parseHost,
} from '../../src/admin/admin-guard.ts';
import { shardControl } from '../../src/admin/shard-control.ts';
import { ConfigError } from '../../src/config.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';

const TOKEN = 'a-long-enough-admin-token-for-tests';
const auth = { authorization: `Bearer ${TOKEN}` };

async function setup(t: Test, opts: Partial<AdminAppOptions> = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'admin-security-test-'));
  const cas = await ShardingStore.open({
    shards: ['a', 'b'].map((name) => ({ name, weight: 1, store: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }) })),
    handoff: { dir },
    healthCheckIntervalMs: 60_000,
  });
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const app = await buildAdminApp({
    describe: () => ({ cas: cas.describe(), ac: ac.describe() }),
    isReady: () => true,
    drain: shardControl({ cas: [cas], ac: [] }),
    token: TOKEN,
    version: '0.0.0-test',
    ...opts,
  });
  t.teardown(async () => {
    await app.close();
    await cas.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const stateOf = (name: string) => (cas.describe().shards as { name: string; state: string }[]).find((s) => s.name === name)!.state;
  return { app, stateOf };
}

/** A raw HTTP/1.1 request with any Host header (fetch will not send one of ours). */
function raw(
  port: number,
  opts: { method?: string; path: string; headers?: Record<string, string>; body?: string },
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method: opts.method ?? 'GET', path: opts.path, headers: opts.headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => {
        chunks.push(c);
        // An event stream never ends: its first chunk is enough.
        if (String(res.headers['content-type']).startsWith('text/event-stream')) res.destroy();
      });
      const done = () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString() });
      res.on('end', done);
      res.on('close', done);
    });
    req.on('error', reject);
    req.end(opts.body);
  });
}

t.test('parseHost and hostAllowed: names, ports, IPv6, case', async (t) => {
  t.same(parseHost('Admin.Example.COM:8990'), { name: 'admin.example.com', port: 8990 });
  t.same(parseHost('localhost'), { name: 'localhost', port: undefined });
  t.same(parseHost('[0:0:0:0:0:0:0:1]:8990'), { name: '[::1]', port: 8990 }, 'IPv6 in its canonical form');
  t.same(parseHost('::1'), { name: '[::1]', port: undefined }, 'a bare IPv6 address (config entries)');
  for (const bad of ['', 'a:b', 'host:99999', '[not-v6]:1', 'a..b', 'evil.example/x', 'a b', 'x:80:80']) {
    t.equal(parseHost(bad), undefined, `${JSON.stringify(bad)} is not a host`);
  }

  const allowed = parseAllowedHosts(['admin.example.com', '127.0.0.1:8990', '[::1]:8990']);
  t.ok(hostAllowed('ADMIN.example.com', allowed), 'case-insensitive');
  t.ok(hostAllowed('admin.example.com:1234', allowed), 'an entry without a port allows any port');
  t.ok(hostAllowed('127.0.0.1:8990', allowed));
  t.ok(hostAllowed('[::1]:8990', allowed));
  t.notOk(hostAllowed('127.0.0.1:8991', allowed), 'another port');
  t.notOk(hostAllowed('127.0.0.1', allowed), 'no port means 80');
  t.notOk(hostAllowed('evil.example:8990', allowed), 'a rebinding name');
  t.notOk(hostAllowed('admin.example.com.evil.example', allowed), 'a suffix trick');
  t.notOk(hostAllowed(undefined, allowed), 'no Host at all');
  t.notOk(hostAllowed('', allowed));

  t.throws(() => parseAllowedHosts(['ok.example', 'a:b'], 'config.admin.allowedHosts'), {
    name: 'ConfigError',
    message: /^config\.admin\.allowedHosts\[1\]: expected "name", "name:port"/,
  });
  t.ok((() => {
    try {
      parseAllowedHosts(['x:99999']);
    } catch (err) {
      return err instanceof ConfigError;
    }
    return false;
  })(), 'an out-of-range port is a ConfigError');
});

t.test('defaultAllowedHosts: the listen address, loopback names, interface addresses', async (t) => {
  const names = (host: string, port?: number) => defaultAllowedHosts(host, port).map(formatHost).sort();
  t.same(names('127.0.0.1', 8990), ['127.0.0.1:8990', 'localhost:8990', '[::1]:8990'].sort());
  t.same(names('localhost', 8990), ['127.0.0.1:8990', 'localhost:8990', '[::1]:8990'].sort());
  t.same(names('::1', 8990), ['127.0.0.1:8990', 'localhost:8990', '[::1]:8990'].sort());
  t.same(names('10.1.2.3', 8990), ['10.1.2.3:8990'], 'a non-loopback address: only itself');
  t.same(names('admin.internal', 8990), ['admin.internal:8990']);
  t.same(names('127.0.0.1'), ['127.0.0.1', 'localhost', '[::1]'].sort(), 'no port known: any port');
  const wildcard = names('0.0.0.0', 8990);
  t.ok(wildcard.includes('localhost:8990') && wildcard.includes('127.0.0.1:8990'), 'a wildcard listen answers loopback');
  t.notOk(wildcard.includes('0.0.0.0:8990'), 'but not the wildcard itself');
  t.notOk(wildcard.some((h) => /evil/.test(h)));
});

t.test('crossOriginProblem and bodyProblem', async (t) => {
  const host = '127.0.0.1:8990';
  t.equal(crossOriginProblem({}, host), undefined, 'curl: no Origin, no Sec-Fetch-Site');
  t.equal(crossOriginProblem({ origin: 'http://127.0.0.1:8990', 'sec-fetch-site': 'same-origin' }, host), undefined);
  t.equal(crossOriginProblem({ origin: 'https://admin.example.com' }, 'admin.example.com'), undefined, 'behind a TLS proxy');
  t.equal(crossOriginProblem({ 'sec-fetch-site': 'none' }, host), undefined, 'typed by the user');
  t.match(crossOriginProblem({ origin: 'http://evil.example' }, host), /Origin "http:\/\/evil\.example" is not this admin server/);
  t.match(crossOriginProblem({ origin: 'http://127.0.0.1:8980' }, host), /is not this admin server/, 'the REAPI port is another origin');
  t.match(crossOriginProblem({ origin: 'null' }, host), /is not this admin server/);
  t.match(crossOriginProblem({ origin: 'file:///x' }, host), /is not this admin server/);
  t.match(crossOriginProblem({ 'sec-fetch-site': 'cross-site' }, host), /Sec-Fetch-Site: cross-site/);
  t.match(crossOriginProblem({ 'sec-fetch-site': 'same-site', origin: 'http://127.0.0.1:8990' }, host), /same-site/);

  t.equal(bodyProblem({}), undefined, 'no body');
  t.equal(bodyProblem({ 'content-length': '0', 'content-type': 'text/plain' }), undefined, 'an empty body');
  t.equal(bodyProblem({ 'content-length': '2', 'content-type': 'application/json; charset=utf-8' }), undefined);
  for (const type of ['application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'text/plain']) {
    t.match(bodyProblem({ 'content-length': '3', 'content-type': type }), /must be application\/json/, type);
  }
  t.match(bodyProblem({ 'transfer-encoding': 'chunked' }), /no content-type/);
});

t.test('a Host not on the list gets 421 everywhere but the probes', async (t) => {
  const { app, stateOf } = await setup(t, { listen: { host: '127.0.0.1', port: 8990 } });
  for (const host of ['127.0.0.1:8990', 'localhost:8990', '[::1]:8990', 'LOCALHOST:8990']) {
    t.equal((await app.inject({ url: '/api/state', headers: { host } })).statusCode, 200, `${host} is answered`);
  }
  // A DNS-rebinding page: same port, the attacker's name.
  for (const url of ['/', '/app.js', '/style.css', '/api/state', '/api/events', '/metrics', '/nope']) {
    const res = await app.inject({ url, headers: { host: 'evil.example:8990' } });
    t.equal(res.statusCode, 421, `${url}: 421`);
    t.match(res.headers['content-type'], /^text\/plain/);
    t.match(res.body, /^421 Misdirected Request: this admin server does not answer to Host "evil\.example:8990"/);
    t.notMatch(res.body, /shard|"trees"/, 'nothing about the stores');
  }
  for (const host of ['127.0.0.1:8991', 'localhost', '127.0.0.1.nip.io:8990', 'evil.example']) {
    t.equal((await app.inject({ url: '/api/state', headers: { host } })).statusCode, 421, `${host} is refused`);
  }
  const drain = await app.inject({ method: 'POST', url: '/api/shards/cas/a/drain', headers: { host: 'evil.example:8990', ...auth } });
  t.equal(drain.statusCode, 421, 'a drain with the right token but a foreign Host is refused');
  t.equal(stateOf('a'), 'closed');

  // Kubernetes probes send the pod IP; load balancers their own names.
  t.equal((await app.inject({ url: '/healthz', headers: { host: '10.0.0.7:8990' } })).statusCode, 200, '/healthz answers any Host');
  t.equal((await app.inject({ url: '/readyz?verbose', headers: { host: 'evil.example:8990' } })).statusCode, 200, '/readyz too');
  t.equal((await app.inject({ method: 'HEAD', url: '/healthz', headers: { host: 'lb.internal' } })).statusCode, 200);
});

t.test('configured allowedHosts replace the defaults', async (t) => {
  const { app } = await setup(t, { listen: { host: '0.0.0.0', port: 8990 }, allowedHosts: ['admin.example.com', 'prometheus-target:8990'] });
  t.equal((await app.inject({ url: '/metrics', headers: { host: 'Admin.Example.com' } })).statusCode, 200);
  t.equal((await app.inject({ url: '/metrics', headers: { host: 'prometheus-target:8990' } })).statusCode, 200);
  t.equal((await app.inject({ url: '/metrics', headers: { host: 'prometheus-target:9000' } })).statusCode, 421);
  t.equal((await app.inject({ url: '/metrics', headers: { host: 'localhost:8990' } })).statusCode, 421);
  await t.rejects(buildAdminApp({ describe: () => ({}) as never, isReady: () => true, allowedHosts: ['bad:host'] }), /allowedHosts\[0\]/);
});

t.test('DNS rebinding against a listening admin: the foreign Host is refused on the wire', async (t) => {
  const { app, stateOf } = await setup(t);
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };

  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`]) {
    const ok = await raw(port, { path: '/api/state', headers: { host } });
    t.equal(ok.status, 200, `Host ${host} is answered`);
    t.match(JSON.parse(ok.body), { version: '0.0.0-test' });
  }
  for (const path of ['/api/state', '/api/events', '/metrics', '/']) {
    const evil = await raw(port, { path, headers: { host: `evil.example:${port}` } });
    t.equal(evil.status, 421, `${path} with Host evil.example:${port} is refused`);
    t.notMatch(evil.body, /version|trees|reapi_/);
  }
  const other = await raw(port, { path: '/api/state', headers: { host: `127.0.0.1:${port + 1}` } });
  t.equal(other.status, 421, 'the bound port, not any port');
  const drain = await raw(port, { method: 'POST', path: '/api/shards/cas/b/drain', headers: { host: `evil.example:${port}`, origin: `http://evil.example:${port}`, ...auth } });
  t.equal(drain.status, 421, 'a rebinding page cannot drain even with a stolen token');
  t.equal(stateOf('b'), 'closed');
  const probe = await raw(port, { path: '/readyz', headers: { host: '10.0.0.7:9999' } });
  t.equal(probe.status, 200, 'probes are exempt');
});

t.test('cross-origin writes are refused even with the token; same-origin ones pass', async (t) => {
  const { app, stateOf } = await setup(t);
  const host = 'localhost:80'; // what inject() sends
  const post = (headers: Record<string, string>, body?: string) =>
    app.inject({ method: 'POST', url: '/api/shards/cas/a/drain', headers: { host, ...auth, ...headers }, ...(body === undefined ? {} : { body }) });

  const evil = await post({ origin: 'http://evil.example', 'sec-fetch-site': 'cross-site' });
  t.equal(evil.statusCode, 403);
  t.match(evil.json(), { error: /^cross-origin request refused/ });
  t.equal((await post({ origin: 'http://evil.example' })).statusCode, 403, 'Origin alone (an old browser)');
  t.equal((await post({ 'sec-fetch-site': 'cross-site' })).statusCode, 403, 'Sec-Fetch-Site alone');
  t.equal((await post({ origin: 'http://localhost:8980', 'sec-fetch-site': 'same-site' })).statusCode, 403, 'another port of the same host');
  t.equal((await post({ origin: 'null' })).statusCode, 403, 'a sandboxed frame');
  t.equal(stateOf('a'), 'closed', 'nothing was drained');

  // HTML forms can only send these three types; none of them is accepted.
  for (const type of ['application/x-www-form-urlencoded', 'multipart/form-data; boundary=xyz', 'text/plain']) {
    const form = await post({ 'content-type': type }, 'a=b');
    t.equal(form.statusCode, 415, `${type}: 415`);
    t.match(form.json(), { error: /must be application\/json/ });
  }
  t.equal(stateOf('a'), 'closed');

  const same = await post({ origin: 'http://localhost', 'sec-fetch-site': 'same-origin' });
  t.equal(same.statusCode, 200, 'the page itself (same origin) may drain');
  t.equal(stateOf('a'), 'drained');
  const json = await app.inject({
    method: 'POST',
    url: '/api/shards/cas/a/undrain',
    headers: { host, ...auth, 'content-type': 'application/json' },
    body: '{}',
  });
  t.equal(json.statusCode, 200, 'a JSON body is accepted');
  const curl = await app.inject({ method: 'POST', url: '/api/shards/cas/b/drain', headers: { host, ...auth } });
  t.equal(curl.statusCode, 200, 'curl (no Origin, no Sec-Fetch-Site) with the token');
  const big = await app.inject({
    method: 'POST',
    url: '/api/shards/cas/b/undrain',
    headers: { host, ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ pad: 'x'.repeat(64 * 1024) }),
  });
  t.equal(big.statusCode, 413, 'bodies are small');
});

t.test('every response carries the security headers', async (t) => {
  const { app } = await setup(t, { listen: { host: '127.0.0.1', port: 8990 } });
  const host = '127.0.0.1:8990';
  const common = {
    'x-content-type-options': 'nosniff',
    'x-frame-options': 'DENY',
    'referrer-policy': 'no-referrer',
    'cross-origin-opener-policy': 'same-origin',
    'cross-origin-resource-policy': 'same-origin',
    'cache-control': 'no-store',
  };
  const cases: [string, Record<string, string>, string?][] = [
    ['/', { host }, 'page'],
    ['/app.js', { host }, 'page'],
    ['/style.css', { host }, 'page'],
    ['/api/state', { host }],
    ['/metrics', { host }],
    ['/healthz', { host }],
    ['/readyz', { host }],
    ['/nope', { host }],
    ['/api/state', { host: 'evil.example' }],
  ];
  for (const [url, headers, kind] of cases) {
    const res = await app.inject({ url, headers });
    const what = `${url} (${res.statusCode})`;
    t.match(res.headers, common, `${what}: the common headers`);
    t.match(res.headers['permissions-policy'], /camera=\(\).*microphone=\(\)/, `${what}: permissions-policy`);
    t.equal(res.headers['content-security-policy'], kind === 'page' ? PAGE_CSP : API_CSP, `${what}: CSP`);
  }
  // Error replies from routes and the token check too.
  const refused = await app.inject({ method: 'POST', url: '/api/shards/cas/a/drain', headers: { host } });
  t.equal(refused.statusCode, 401);
  t.match(refused.headers, { ...common, 'content-security-policy': API_CSP });

  t.match(PAGE_CSP, /default-src 'none'/);
  t.match(PAGE_CSP, /script-src 'self';/);
  t.match(PAGE_CSP, /style-src 'self';/);
  t.match(PAGE_CSP, /frame-ancestors 'none'/);
  t.notMatch(PAGE_CSP, /unsafe-inline|unsafe-eval|\*/, 'no inline code, no eval, no wildcards');
  t.match(API_CSP, /^default-src 'none'/);

  // The page needs no inline code for that CSP.
  const html = (await app.inject({ url: '/', headers: { host } })).body;
  t.notMatch(html, /<script(?![^>]*\bsrc=)/, 'no inline <script>');
  t.notMatch(html, /<style|\sstyle=/, 'no inline style');
  t.notMatch(html, /\son[a-z]+=/, 'no inline event handlers');
  const js = readFileSync(new URL('../../src/admin/page/app.js', import.meta.url), 'utf8');
  t.notMatch(js, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function/, 'no DOM-XSS sinks (Trusted Types would refuse them)');
  t.notMatch(js, /\.style\.|setAttribute\('style'/, 'no inline styles from script');
});

t.test('the event stream carries the security headers too', async (t) => {
  const { app } = await setup(t);
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const res = await raw(port, { path: '/api/events', headers: { host: `127.0.0.1:${port}` } });
  t.equal(res.status, 200);
  t.match(res.headers, {
    'content-type': /^text\/event-stream/,
    'content-security-policy': API_CSP,
    'x-content-type-options': 'nosniff',
    'x-frame-options': 'DENY',
    'cross-origin-resource-policy': 'same-origin',
    'cache-control': 'no-store',
  });
  t.match(res.body, /event: state/);
});
