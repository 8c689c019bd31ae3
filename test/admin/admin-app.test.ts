import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildAdminApp, type AdminAppOptions, type AdminState } from '../../src/admin/admin-app.ts';
import { createMetricsRegistry } from '../../src/admin/metrics.ts';
import { shardControl } from '../../src/admin/shard-control.ts';
import { MetricsStore } from '../../src/stores/metrics-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';

const TOKEN = 'correct horse battery staple';

/** A ShardingStore over three MemoryStores named a, b, c; closed with the test. */
async function sharding(t: Test, names = ['a', 'b', 'c']): Promise<ShardingStore> {
  const dir = mkdtempSync(join(tmpdir(), 'admin-app-test-'));
  const store = await ShardingStore.open({
    shards: names.map((name) => ({ name, weight: 1, store: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }) })),
    handoff: { dir },
    healthCheckIntervalMs: 60_000, // nothing in these tests waits for a check
  });
  t.teardown(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return store;
}

async function setup(t: Test, opts: Partial<AdminAppOptions> = {}) {
  const cas = await sharding(t);
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  let ready = false;
  const app = await buildAdminApp({
    describe: () => ({ cas: cas.describe(), ac: ac.describe() }),
    isReady: () => ready,
    notReadyReason: () => 'stores are still opening',
    drain: shardControl({ cas: [cas], ac: [] }),
    token: TOKEN,
    version: '9.9.9-test',
    ...opts,
  });
  t.teardown(() => app.close());
  const shard = (name: string) => (cas.describe().shards as { name: string; state: string; manual: boolean }[]).find((s) => s.name === name)!;
  return { app, cas, shard, setReady: (v: boolean) => void (ready = v) };
}

const post = (url: string, token?: string) => ({
  method: 'POST' as const,
  url,
  headers: token === undefined ? {} : { authorization: `Bearer ${token}` },
});

t.test('GET /api/state: both trees as described, processes, readiness, version', async (t) => {
  const { app } = await setup(t, {
    processes: () => [{ name: 'shard-a', pid: 42, running: true, restarts: 1, since: 1000, lastExit: 'signal SIGKILL' }],
  });
  const res = await app.inject({ method: 'GET', url: '/api/state' });
  t.equal(res.statusCode, 200);
  t.match(res.headers['content-type'], /^application\/json/);
  const state = res.json() as AdminState;
  t.equal(state.version, '9.9.9-test');
  t.equal(state.ready, false);
  t.equal(state.tokenConfigured, true);
  t.type(state.now, 'number');
  t.equal(state.trees.cas.kind, 'sharding');
  t.same((state.trees.cas.shards as { name: string }[]).map((s) => s.name), ['a', 'b', 'c']);
  t.match(state.trees.cas.shards, [
    { name: 'a', state: 'closed', manual: false, weight: 1, inFlight: 0, bytesIn: 0, bytesOut: 0 },
    { name: 'b', state: 'closed' },
    { name: 'c', state: 'closed' },
  ]);
  t.same(state.trees.cas.children?.map((c) => [c.kind, c.name]), [['memory', 'a'], ['memory', 'b'], ['memory', 'c']]);
  t.equal(state.trees.ac.kind, 'memory');
  t.same(state.processes, [{ name: 'shard-a', pid: 42, running: true, restarts: 1, since: 1000, lastExit: 'signal SIGKILL' }]);
  t.same(state.actions, []);
});

t.test('processes default to an empty list', async (t) => {
  const { app } = await setup(t);
  t.same((await app.inject({ url: '/api/state' })).json().processes, []);
});

t.test('drain and undrain need the bearer token', async (t) => {
  const { app, shard } = await setup(t);

  const missing = await app.inject(post('/api/shards/cas/b/drain'));
  t.equal(missing.statusCode, 401);
  t.match(missing.headers['www-authenticate'], /^Bearer/);
  t.match(missing.json(), { error: /missing bearer token/ });

  const wrong = await app.inject(post('/api/shards/cas/b/drain', 'not the token'));
  t.equal(wrong.statusCode, 401);
  t.same(wrong.json(), { error: 'wrong bearer token' });

  const prefix = await app.inject(post('/api/shards/cas/b/drain', TOKEN.slice(0, 5)));
  t.equal(prefix.statusCode, 401, 'a prefix of the token is not the token');

  const basic = await app.inject({ method: 'POST', url: '/api/shards/cas/b/drain', headers: { authorization: `Basic ${TOKEN}` } });
  t.equal(basic.statusCode, 401);
  t.match(basic.json(), { error: /malformed Authorization header/ });

  t.equal(shard('b').state, 'closed', 'refused requests changed nothing');

  const ok = await app.inject(post('/api/shards/cas/b/drain', TOKEN));
  t.equal(ok.statusCode, 200);
  t.same(ok.json(), { ok: true, tree: 'cas', shard: 'b', action: 'drain', stores: 1 });
  t.match(shard('b'), { state: 'drained', manual: true });

  const state = (await app.inject({ url: '/api/state' })).json() as AdminState;
  t.match(state.trees.cas.shards, [{ name: 'a', state: 'closed' }, { name: 'b', state: 'drained', manual: true }, { name: 'c' }]);
  t.match(state.actions, [{ tree: 'cas', shard: 'b', action: 'drain', stores: 1 }]);

  const undrain = await app.inject(post('/api/shards/cas/b/undrain', TOKEN));
  t.equal(undrain.statusCode, 200);
  t.same(undrain.json(), { ok: true, tree: 'cas', shard: 'b', action: 'undrain', stores: 1 });
  // Undrained shards go half-open and close once their health checks pass.
  t.match(shard('b'), { manual: false });
  t.not(shard('b').state, 'drained');
  t.match((await app.inject({ url: '/api/state' })).json().actions, [{ action: 'undrain' }, { action: 'drain' }]);
});

t.test('without a configured token, mutations are refused with 403', async (t) => {
  for (const token of [undefined, '']) {
    const { app, shard } = await setup(t, { token });
    const res = await app.inject(post('/api/shards/cas/a/drain', 'anything'));
    t.equal(res.statusCode, 403);
    t.match(res.json(), { error: /^admin token not configured/ });
    t.equal(shard('a').state, 'closed');
    t.equal((await app.inject({ url: '/api/state' })).json().tokenConfigured, false);
  }
});

t.test('unknown shards and trees are 404 with a JSON error', async (t) => {
  const { app } = await setup(t);
  const shard = await app.inject(post('/api/shards/cas/zz/drain', TOKEN));
  t.equal(shard.statusCode, 404);
  t.same(shard.json(), { error: 'no shard named "zz" in the cas tree' });
  const acShard = await app.inject(post('/api/shards/ac/a/undrain', TOKEN));
  t.equal(acShard.statusCode, 404, 'shard a is in the CAS tree only');
  const tree = await app.inject(post('/api/shards/xyz/a/drain', TOKEN));
  t.equal(tree.statusCode, 404);
  t.match(tree.json(), { error: /unknown tree "xyz"/ });
  const route = await app.inject({ url: '/api/nope' });
  t.equal(route.statusCode, 404);
  t.match(route.json(), { error: /no such endpoint/ });
});

t.test('an unknown shard is 404 when no drain callback is given', async (t) => {
  const { app } = await setup(t, { drain: undefined });
  t.equal((await app.inject(post('/api/shards/cas/a/drain', TOKEN))).statusCode, 404);
});

t.test('shardControl drains a shard name in every sharding store of the tree', async (t) => {
  const outer = await sharding(t, ['a', 'b', 'c']);
  const nested = await sharding(t, ['b', 'd']);
  // The nested one as the factory may hold it: wrapped in a MetricsStore.
  const wrapped = new MetricsStore(nested, { registry: createMetricsRegistry({ defaultMetrics: false }) });
  const drain = shardControl({ cas: [outer, wrapped], ac: [] });
  t.equal(await drain('cas', 'b', true), 2);
  const states = (s: ShardingStore) => (s.describe().shards as { name: string; state: string }[]).map((x) => `${x.name}:${x.state}`);
  t.same(states(outer), ['a:closed', 'b:drained', 'c:closed']);
  t.same(states(nested), ['b:drained', 'd:closed']);
  t.equal(await drain('cas', 'd', true), 1);
  t.equal(await drain('cas', 'q', true), 0);
  t.equal(await drain('ac', 'b', true), 0);
  t.equal(await drain('cas', 'b', false), 2);
  t.notOk(states(outer).includes('b:drained'));
});

t.test('/healthz is 200; /readyz is 503 with a reason until ready', async (t) => {
  const { app, setReady } = await setup(t);
  const health = await app.inject({ url: '/healthz' });
  t.equal(health.statusCode, 200);
  t.same(health.json(), { ok: true });

  const notReady = await app.inject({ url: '/readyz' });
  t.equal(notReady.statusCode, 503);
  t.same(notReady.json(), { ready: false, reason: 'stores are still opening' });

  setReady(true);
  const ready = await app.inject({ url: '/readyz' });
  t.equal(ready.statusCode, 200);
  t.same(ready.json(), { ready: true });
});

t.test('GET / serves the page and its two files, with a strict CSP', async (t) => {
  const { app } = await setup(t);
  const page = await app.inject({ url: '/' });
  t.equal(page.statusCode, 200);
  t.match(page.headers['content-type'], /^text\/html/);
  t.match(page.headers['content-security-policy'], /default-src 'none'.*script-src 'self'.*connect-src 'self'/);
  t.equal(page.headers['x-content-type-options'], 'nosniff');
  t.match(page.body, /<script src="\/app\.js" defer><\/script>/);
  t.notMatch(page.body, /https?:\/\//, 'the page references nothing outside this origin');

  const js = await app.inject({ url: '/app.js' });
  t.equal(js.statusCode, 200);
  t.match(js.headers['content-type'], /^text\/javascript/);
  t.match(js.body, /new EventSource\('\/api\/events'\)/);
  t.notMatch(js.body, /https?:\/\//);

  const css = await app.inject({ url: '/style.css' });
  t.equal(css.statusCode, 200);
  t.match(css.headers['content-type'], /^text\/css/);
  t.notMatch(css.body, /url\(|@import/);
});

/** Reads server-sent events from a fetch body, one parsed `data` per event. */
async function* events(body: ReadableStream<Uint8Array>): AsyncGenerator<{ event: string; data: string }> {
  const decoder = new TextDecoder();
  let buffer = '';
  for await (const chunk of body) {
    buffer += decoder.decode(chunk, { stream: true });
    for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = 'message';
      const data: string[] = [];
      for (const line of frame.split('\n')) {
        if (line.startsWith('event: ')) event = line.slice(7);
        else if (line.startsWith('data: ')) data.push(line.slice(6));
      }
      if (data.length > 0) yield { event, data: data.join('\n') };
    }
  }
}

t.test('/api/events pushes the state at once, again on a drain, and ends on close', async (t) => {
  // A long tick: the second event can only come from the drain.
  const { app } = await setup(t, { eventIntervalMs: 60_000 });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const base = `http://127.0.0.1:${port}`;

  const res = await fetch(`${base}/api/events`);
  t.equal(res.status, 200);
  t.match(res.headers.get('content-type'), /^text\/event-stream/);
  const it = events(res.body!);
  const first = await it.next();
  t.equal(first.value?.event, 'state');
  const state = JSON.parse(first.value!.data) as AdminState;
  t.match(state.trees.cas.shards, [{ name: 'a', state: 'closed' }, { name: 'b' }, { name: 'c' }]);

  const started = Date.now();
  const drained = await fetch(`${base}/api/shards/cas/c/drain`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}` } });
  t.equal(drained.status, 200);
  const second = await it.next();
  t.ok(Date.now() - started < 2000, 'pushed without waiting for the tick');
  t.match(JSON.parse(second.value!.data).trees.cas.shards, [{ name: 'a' }, { name: 'b' }, { name: 'c', state: 'drained', manual: true }]);

  // close() must not hang on the open stream, and the stream must end.
  await app.close();
  const end = await it.next();
  t.equal(end.done, true, 'the event stream ended');
});

t.test('onChange pushes the state at once', async (t) => {
  let notify: () => void = () => {};
  let unsubscribed = false;
  const { app } = await setup(t, {
    eventIntervalMs: 60_000,
    onChange: (listener) => {
      notify = listener;
      return () => void (unsubscribed = true);
    },
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const res = await fetch(`http://127.0.0.1:${port}/api/events`);
  const it = events(res.body!);
  await it.next();
  notify();
  const second = await Promise.race([it.next(), new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 2000))]);
  t.not(second, 'timeout', 'an onChange notification pushed an event');
  await app.close();
  t.ok(unsubscribed, 'close() unsubscribed from onChange');
});
