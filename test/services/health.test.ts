import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import t from 'tap';
import { Health, HealthCheckResponse_ServingStatus } from '../../gen/grpc/health/v1/health_pb.ts';
import { createHealthService } from '../../src/services/health.ts';

const { SERVING, NOT_SERVING, SERVICE_UNKNOWN } = HealthCheckResponse_ServingStatus;
const CAS = 'build.bazel.remote.execution.v2.ContentAddressableStorage';

function setup() {
  const state = { ready: true };
  const draining = new AbortController();
  const service = createHealthService({
    isReady: () => state.ready,
    services: [CAS],
    draining: draining.signal,
    pollIntervalMs: 10,
  });
  const client = createClient(Health, createRouterTransport((router) => router.service(Health, service)));
  return { client, state, draining };
}

async function collect<T>(it: AsyncIterable<T>, n: number, onEach: (i: number) => void = () => {}): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) {
    out.push(x);
    onEach(out.length);
    if (out.length === n) break;
  }
  return out;
}

t.test('Check: "" and served services follow isReady; unknown names are NOT_FOUND', async (t) => {
  const { client, state } = setup();
  t.equal((await client.check({ service: '' })).status, SERVING);
  t.equal((await client.check({ service: CAS })).status, SERVING);
  state.ready = false;
  t.equal((await client.check({ service: '' })).status, NOT_SERVING);
  t.equal((await client.check({ service: CAS })).status, NOT_SERVING);
  const err = await client.check({ service: 'nope.Service' }).then(
    () => undefined,
    (e: unknown) => ConnectError.from(e),
  );
  t.equal(err?.code, Code.NotFound);
  t.equal(err?.rawMessage, 'unknown service "nope.Service"');
});

t.test('List reports every served service', async (t) => {
  const { client, state } = setup();
  state.ready = false;
  const res = await client.list({});
  t.same(Object.keys(res.statuses).sort(), ['', CAS]);
  t.equal(res.statuses[CAS]?.status, NOT_SERVING);
});

t.test('Watch sends the current status, then only changes', async (t) => {
  const { client, state } = setup();
  const statuses = await collect(client.watch({ service: CAS }), 3, (n) => {
    // Flip after the first message; flip back after the second.
    if (n === 1) setTimeout(() => (state.ready = false), 50);
    if (n === 2) setTimeout(() => (state.ready = true), 50);
  });
  t.same(
    statuses.map((s) => s.status),
    [SERVING, NOT_SERVING, SERVING],
  );
});

t.test('Watch of an unknown service says SERVICE_UNKNOWN and keeps the stream open', async (t) => {
  const { client } = setup();
  const ac = new AbortController();
  const seen: number[] = [];
  const watching = (async () => {
    for await (const s of client.watch({ service: 'nope.Service' }, { signal: ac.signal })) seen.push(s.status);
  })();
  await new Promise((r) => setTimeout(r, 100));
  ac.abort();
  await watching.catch(() => undefined);
  t.same(seen, [SERVICE_UNKNOWN]);
});

t.test('draining ends Watch streams after a final NOT_SERVING', async (t) => {
  const { client, draining } = setup();
  const seen: number[] = [];
  const watching = (async () => {
    for await (const s of client.watch({ service: '' })) seen.push(s.status);
  })();
  await new Promise((r) => setTimeout(r, 50));
  draining.abort();
  await watching;
  t.same(seen, [SERVING, NOT_SERVING]);
  t.equal((await client.check({ service: '' })).status, NOT_SERVING, 'Check says NOT_SERVING while draining');
});
