import t, { type Test } from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import { pino } from 'pino';
import type { Registry } from 'prom-client';
import { ActionCache, ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ByteStream } from '../../gen/google/bytestream/bytestream_pb.ts';
import { buildAdminApp } from '../../src/admin/admin-app.ts';
import { createMetricsRegistry, metricsInterceptor } from '../../src/admin/metrics.ts';
import { shardControl } from '../../src/admin/shard-control.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { registerServices } from '../../src/services/index.ts';
import { readResourceName, writeResourceName } from '../../src/services/resource-name.ts';
import { FallbackStore } from '../../src/stores/fallback-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { MetricsStore, grpcCodeName } from '../../src/stores/metrics-store.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';
import { collect, once } from '../../src/streams.ts';

const TOKEN = 'metrics-test-token';
const enc = new TextEncoder();

// ---- a small checker for the Prometheus text exposition format -------------

interface Sample {
  readonly name: string;
  readonly labels: Record<string, string>;
  readonly value: number;
}

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*';
const LABEL = `[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\\\n]|\\\\[\\\\"n])*"`;
// Prometheus parses values with Go's ParseFloat, which takes NaN in any
// case; prom-client writes "Nan".
const VALUE = '(?:[-+]?(?:\\d+(?:\\.\\d*)?|\\.\\d+)(?:[eE][-+]?\\d+)?|[-+]?Inf|[Nn][Aa][Nn])';
const SAMPLE_LINE = new RegExp(`^(${NAME})(?:\\{((?:${LABEL})(?:,${LABEL})*,?)?\\})? (${VALUE})(?: -?\\d+)?$`);
const HELP_LINE = new RegExp(`^# HELP (${NAME}) (.*)$`);
const TYPE_LINE = new RegExp(`^# TYPE (${NAME}) (counter|gauge|histogram|summary|untyped)$`);

/**
 * Parses exposition text, failing the test on any line that is not a
 * HELP, TYPE, sample or blank line, on a sample whose family has no HELP
 * and TYPE before it, and on a family declared twice.
 */
function parseExposition(t: Test, text: string): { samples: Sample[]; types: Map<string, string> } {
  const help = new Set<string>();
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  const bad: string[] = [];
  for (const line of text.split('\n')) {
    if (line === '') continue;
    let m: RegExpExecArray | null;
    if ((m = HELP_LINE.exec(line)) !== null) {
      if (help.has(m[1]!)) bad.push(`HELP twice: ${line}`);
      help.add(m[1]!);
    } else if ((m = TYPE_LINE.exec(line)) !== null) {
      if (types.has(m[1]!)) bad.push(`TYPE twice: ${line}`);
      types.set(m[1]!, m[2]!);
    } else if (line.startsWith('#')) {
      bad.push(`unknown comment: ${line}`);
    } else if ((m = SAMPLE_LINE.exec(line)) !== null) {
      const name = m[1]!;
      const labels: Record<string, string> = {};
      for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
      const family = [name, name.replace(/_(bucket|sum|count)$/, '')].find((f) => types.has(f));
      if (family === undefined || !help.has(family)) bad.push(`sample without HELP and TYPE: ${line}`);
      else if (family !== name && !['histogram', 'summary'].includes(types.get(family)!)) bad.push(`suffix on a ${types.get(family)}: ${line}`);
      samples.push({ name, labels, value: /^nan$/i.test(m[3]!) ? NaN : Number(m[3]!.replace(/^\+?Inf$/, 'Infinity').replace(/^-Inf$/, '-Infinity')) });
    } else {
      bad.push(`not exposition format: ${line}`);
    }
  }
  for (const name of types.keys()) if (!help.has(name)) bad.push(`TYPE without HELP: ${name}`);
  t.same(bad, [], 'every line is valid exposition format');
  return { samples, types };
}

/** The value of the one sample with this name and (at least) these labels; undefined if none. */
function value(samples: readonly Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (found.length > 1) throw new Error(`${found.length} samples match ${name} ${JSON.stringify(labels)}`);
  return found[0]?.value;
}

async function scrape(t: Test, registry: Registry) {
  return parseExposition(t, await registry.metrics());
}

async function shardingStore(t: Test): Promise<ShardingStore> {
  const dir = mkdtempSync(join(tmpdir(), 'admin-metrics-test-'));
  const store = await ShardingStore.open({
    shards: ['a', 'b', 'c'].map((name) => ({ name, weight: 1, store: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }) })),
    handoff: { dir },
    healthCheckIntervalMs: 60_000,
  });
  t.teardown(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return store;
}

t.test('grpcCodeName spells codes as gRPC does', async (t) => {
  t.equal(grpcCodeName(undefined), 'OK');
  t.equal(grpcCodeName(new ConnectError('x', Code.NotFound)), 'NOT_FOUND');
  t.equal(grpcCodeName(new ConnectError('x', Code.DeadlineExceeded)), 'DEADLINE_EXCEEDED');
  t.equal(grpcCodeName(new ConnectError('x', Code.Canceled)), 'CANCELLED');
  t.equal(grpcCodeName(new Error('boom')), 'UNKNOWN');
});

t.test('GET /metrics: valid exposition text with the tree, process and default families', async (t) => {
  const registry = createMetricsRegistry();
  const cas = await shardingStore(t);
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const app = await buildAdminApp({
    describe: () => ({ cas: cas.describe(), ac: ac.describe() }),
    processes: () => [{ name: 'shard-a', pid: 1, running: true, restarts: 2, since: 0, lastExit: undefined }],
    isReady: () => true,
    drain: shardControl({ cas: [cas], ac: [] }),
    token: TOKEN,
    registry,
    version: '1.2.3',
  });
  t.teardown(() => app.close());
  metricsInterceptor(registry); // the RPC families, as main.ts registers them

  const res = await app.inject({ url: '/metrics' });
  t.equal(res.statusCode, 200);
  t.match(res.headers['content-type'], /^text\/plain; version=0\.0\.4/);
  const { samples, types } = parseExposition(t, res.body);

  for (const [name, type] of [
    ['process_cpu_seconds_total', 'counter'],
    ['nodejs_eventloop_lag_seconds', 'gauge'],
    ['reapi_edge_build_info', 'gauge'],
    ['reapi_edge_ready', 'gauge'],
    ['reapi_edge_shard_breaker_state', 'gauge'],
    ['reapi_edge_breaker_transitions_total', 'counter'],
    ['reapi_edge_shard_health_check_up', 'gauge'],
    ['reapi_edge_shard_health_check_duration_seconds', 'gauge'],
    ['reapi_edge_shard_hints_pending', 'gauge'],
    ['reapi_edge_sharding_hints_pending', 'gauge'],
    ['reapi_edge_replication_queue_depth', 'gauge'],
    ['reapi_edge_replication_lag_seconds', 'gauge'],
    ['reapi_edge_journal_backlog', 'gauge'],
    ['reapi_edge_store_usage_bytes', 'gauge'],
    ['reapi_edge_store_blobs', 'gauge'],
    ['reapi_edge_store_evictions_total', 'counter'],
    ['reapi_edge_child_up', 'gauge'],
    ['reapi_edge_rpc_requests_total', 'counter'],
    ['reapi_edge_rpc_duration_seconds', 'histogram'],
    ['reapi_edge_rpc_received_bytes_total', 'counter'],
    ['reapi_edge_rpc_sent_bytes_total', 'counter'],
  ] as const) {
    t.equal(types.get(name), type, `${name} is a ${type}`);
  }
  for (const [name, type] of types) {
    if (!name.startsWith('reapi_edge_')) continue;
    if (type === 'counter') t.match(name, /_total$/, `counter ${name} ends in _total`);
    else t.notMatch(name, /_total$/, `${type} ${name} does not end in _total`);
  }

  t.equal(value(samples, 'reapi_edge_build_info', { version: '1.2.3' }), 1);
  t.equal(value(samples, 'reapi_edge_ready'), 1);
  t.equal(value(samples, 'reapi_edge_child_up', { child: 'shard-a' }), 1);
  t.equal(value(samples, 'reapi_edge_child_restarts_total', { child: 'shard-a' }), 2);
  for (const shard of ['a', 'b', 'c']) {
    const labels = { tree: 'cas', store: 'sharding', shard };
    t.equal(value(samples, 'reapi_edge_shard_breaker_state', { ...labels, state: 'closed' }), 1, `${shard} closed`);
    t.equal(value(samples, 'reapi_edge_shard_breaker_state', { ...labels, state: 'open' }), 0);
    t.equal(value(samples, 'reapi_edge_shard_breaker_state', { ...labels, state: 'drained' }), 0);
    t.equal(value(samples, 'reapi_edge_shard_hints_pending', labels), 0);
    t.equal(value(samples, 'reapi_edge_store_usage_bytes', { tree: 'cas', store: `sharding/${shard}`, kind: 'memory' }), 0);
  }
  t.equal(value(samples, 'reapi_edge_store_max_size_bytes', { tree: 'ac', store: 'memory', kind: 'memory' }), 1 << 20);

  // A drain shows in the state gauge and counts one manual transition.
  t.equal((await app.inject({ method: 'POST', url: '/api/shards/cas/b/drain', headers: { authorization: `Bearer ${TOKEN}` } })).statusCode, 200);
  const after = parseExposition(t, (await app.inject({ url: '/metrics' })).body).samples;
  const b = { tree: 'cas', store: 'sharding', shard: 'b' };
  t.equal(value(after, 'reapi_edge_shard_breaker_state', { ...b, state: 'drained' }), 1);
  t.equal(value(after, 'reapi_edge_shard_breaker_state', { ...b, state: 'closed' }), 0);
  t.equal(value(after, 'reapi_edge_shard_breaker_manual', b), 1);
  t.equal(value(after, 'reapi_edge_breaker_transitions_total', { ...b, from: 'closed', to: 'drained', manual: 'true' }), 1);
  t.equal(value(after, 'reapi_edge_shard_breaker_state', { tree: 'cas', store: 'sharding', shard: 'a', state: 'closed' }), 1);
});

t.test('fallback pairs: serving side, breaker, replication, journal and leaf usage', async (t) => {
  const registry = createMetricsRegistry({ defaultMetrics: false });
  const journalDir = mkdtempSync(join(tmpdir(), 'admin-metrics-fallback-'));
  const cas = await FallbackStore.open({
    primary: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }),
    secondary: new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }),
    journalDir,
  });
  t.teardown(async () => {
    await cas.close();
    rmSync(journalDir, { recursive: true, force: true });
  });
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const app = await buildAdminApp({ describe: () => ({ cas: cas.describe(), ac: ac.describe() }), isReady: () => false, registry });
  t.teardown(() => app.close());

  const data = enc.encode('replicate me');
  await cas.put(digestOf(data), once(data));
  const deadline = Date.now() + 5000;
  while ((cas.describe().replication as { done: number }).done < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));

  const { samples } = parseExposition(t, (await app.inject({ url: '/metrics' })).body);
  const f = { tree: 'cas', store: 'fallback' };
  t.equal(value(samples, 'reapi_edge_ready'), 0);
  t.equal(value(samples, 'reapi_edge_fallback_serving', { ...f, side: 'primary' }), 1);
  t.equal(value(samples, 'reapi_edge_fallback_serving', { ...f, side: 'secondary' }), 0);
  t.equal(value(samples, 'reapi_edge_fallback_breaker_state', { ...f, state: 'closed' }), 1);
  t.equal(value(samples, 'reapi_edge_replication_copied_total', f), 1, 'the write was replicated');
  t.equal(value(samples, 'reapi_edge_replication_queue_depth', f), 0);
  t.equal(value(samples, 'reapi_edge_journal_backlog', f), 0);
  t.type(value(samples, 'reapi_edge_journal_max_entries', f), 'number');
  for (const side of ['primary', 'secondary']) {
    t.equal(value(samples, 'reapi_edge_store_usage_bytes', { tree: 'cas', store: `fallback/${side}`, kind: 'memory' }), data.byteLength, `${side} holds the blob`);
    t.equal(value(samples, 'reapi_edge_store_blobs', { tree: 'cas', store: `fallback/${side}`, kind: 'memory' }), 1);
  }
});

t.test('two apps on two registries do not collide', async (t) => {
  const m = new MemoryStore({ maxSizeBytes: 1, contentAddressed: true });
  for (let i = 0; i < 2; i++) {
    const app = await buildAdminApp({ describe: () => ({ cas: m.describe(), ac: m.describe() }), isReady: () => true });
    t.teardown(() => app.close());
    t.equal((await app.inject({ url: '/metrics' })).statusCode, 200);
  }
});

t.test('MetricsStore counts operations, codes and bytes as they flow; describe() is the child\'s', async (t) => {
  const registry = createMetricsRegistry({ defaultMetrics: false });
  const inner = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const store = new MetricsStore(inner, { registry, tree: 'cas', name: 'leaf' });
  const labels = { tree: 'cas', kind: 'memory', name: 'leaf' };
  const ops = (operation: string, code: string, samples: readonly Sample[]) =>
    value(samples, 'reapi_edge_store_operations_total', { ...labels, operation, code }) ?? 0;

  t.same(store.describe(), inner.describe());

  const data = enc.encode('hello, metrics');
  const d = digestOf(data);
  const absent = digestOf(enc.encode('not stored'));
  await store.put(d, once(data));
  await t.rejects(store.put(digestOf(enc.encode('other')), once(data)), { code: Code.InvalidArgument });
  t.same(await store.findMissing([d, absent]), [absent]);
  t.equal(new TextDecoder().decode(await collect(await store.get(d))), 'hello, metrics');
  await t.rejects(store.get(absent), { code: Code.NotFound });
  for await (const chunk of await store.get(d)) {
    t.ok(chunk.byteLength > 0);
    break; // the consumer stops early: CANCELLED
  }

  const { samples } = await scrape(t, registry);
  t.equal(ops('put', 'OK', samples), 1);
  t.equal(ops('put', 'INVALID_ARGUMENT', samples), 1);
  t.equal(ops('find_missing', 'OK', samples), 1);
  t.equal(ops('get', 'OK', samples), 1);
  t.equal(ops('get', 'NOT_FOUND', samples), 1);
  t.equal(ops('get', 'CANCELLED', samples), 1);
  t.equal(value(samples, 'reapi_edge_store_written_bytes_total', labels), 2 * data.byteLength, 'both uploads flowed');
  t.equal(value(samples, 'reapi_edge_store_read_bytes_total', labels), 2 * data.byteLength);
  t.equal(value(samples, 'reapi_edge_store_find_missing_digests_total', { ...labels, result: 'present' }), 1);
  t.equal(value(samples, 'reapi_edge_store_find_missing_digests_total', { ...labels, result: 'missing' }), 1);
  t.equal(value(samples, 'reapi_edge_store_operation_duration_seconds_count', { ...labels, operation: 'put', code: 'OK' }), 1);
  t.equal(value(samples, 'reapi_edge_store_operation_duration_seconds_bucket', { ...labels, operation: 'put', code: 'OK', le: '+Inf' }), 1);

  // A second store on the same registry shares the families.
  const other = new MetricsStore(new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true }), { registry, tree: 'cas', name: 'other' });
  await other.findMissing([d]);
  const again = (await scrape(t, registry)).samples;
  t.equal(value(again, 'reapi_edge_store_operations_total', { tree: 'cas', kind: 'memory', name: 'other', operation: 'find_missing', code: 'OK' }), 1);
  t.equal(ops('find_missing', 'OK', again), 1);
});

t.test('the Connect interceptor counts RPCs by method and code, and blob bytes', async (t) => {
  const registry = createMetricsRegistry({ defaultMetrics: false });
  const cas = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: true });
  const ac = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const transport = createRouterTransport(
    (router) =>
      registerServices(router, { cas, ac, logger: pino({ level: 'silent' }), maxBatchTotalSizeBytes: 4 << 20, isReady: () => true }),
    { router: { interceptors: [metricsInterceptor(registry)] } },
  );
  const casClient = createClient(ContentAddressableStorage, transport);
  const bytestream = createClient(ByteStream, transport);
  const acClient = createClient(ActionCache, transport);

  const data = enc.encode('x'.repeat(5000));
  const d = digestOf(data);
  const CAS = 'build.bazel.remote.execution.v2.ContentAddressableStorage';
  const BS = 'google.bytestream.ByteStream';

  t.same((await casClient.findMissingBlobs({ blobDigests: [toProtoDigest(d)] })).missingBlobDigests.length, 1);
  const written = await bytestream.write(
    (async function* () {
      yield { resourceName: writeResourceName('', '3f1a0b9e-0000-4000-8000-000000000001', d), writeOffset: 0n, data: data.subarray(0, 3000) };
      yield { writeOffset: 3000n, data: data.subarray(3000), finishWrite: true };
    })(),
  );
  t.equal(written.committedSize, BigInt(data.byteLength));
  let read = 0;
  for await (const res of bytestream.read({ resourceName: readResourceName('', d) })) read += res.data.byteLength;
  t.equal(read, data.byteLength);
  await casClient.findMissingBlobs({ blobDigests: [toProtoDigest(d)] });
  await t.rejects(acClient.getActionResult({ actionDigest: toProtoDigest(d) }), { code: Code.NotFound });
  const batch = await casClient.batchReadBlobs({ digests: [toProtoDigest(d)] });
  t.equal(batch.responses[0]?.data.byteLength, data.byteLength);

  const { samples } = await scrape(t, registry);
  const rpcs = (service: string, method: string, code: string) => value(samples, 'reapi_edge_rpc_requests_total', { service, method, code });
  t.equal(rpcs(CAS, 'FindMissingBlobs', 'OK'), 2);
  t.equal(rpcs(BS, 'Write', 'OK'), 1);
  t.equal(rpcs(BS, 'Read', 'OK'), 1);
  t.equal(rpcs(CAS, 'BatchReadBlobs', 'OK'), 1);
  t.equal(rpcs('build.bazel.remote.execution.v2.ActionCache', 'GetActionResult', 'NOT_FOUND'), 1);
  t.equal(value(samples, 'reapi_edge_rpc_received_bytes_total', { service: BS, method: 'Write' }), data.byteLength);
  t.equal(value(samples, 'reapi_edge_rpc_sent_bytes_total', { service: BS, method: 'Read' }), data.byteLength);
  t.equal(value(samples, 'reapi_edge_rpc_sent_bytes_total', { service: CAS, method: 'BatchReadBlobs' }), data.byteLength);
  t.equal(value(samples, 'reapi_edge_rpc_duration_seconds_count', { service: CAS, method: 'FindMissingBlobs', code: 'OK' }), 2);
  t.equal(value(samples, 'reapi_edge_rpc_in_flight', { service: BS, method: 'Read' }), 0, 'nothing left in flight');
});
