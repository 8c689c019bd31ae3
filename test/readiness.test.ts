import t from 'tap';
import { canServe } from '../src/readiness.ts';
import type { StoreDescription } from '../src/stores/blob-store.ts';

const shard = (name: string, state: string) => ({ name, state });
const sharding = (...states: string[]) => ({
  kind: 'sharding',
  shards: states.map((s, i) => shard(`s${i}`, s)),
  children: states.map(() => ({ kind: 'remote' })),
});

t.test('a sharding store can serve while any shard is closed', async (t) => {
  t.equal(canServe(sharding('open', 'closed', 'drained')), true);
  t.equal(canServe(sharding('open', 'half-open', 'drained')), false, 'half-open shards take no client traffic');
});

t.test('a fallback pair can serve while either side can', async (t) => {
  const fallback = (primary: StoreDescription, secondary: StoreDescription) => ({ kind: 'fallback', children: [primary, secondary] });
  t.equal(canServe(fallback(sharding('open'), { kind: 'remote' })), true, 'the secondary serves');
  t.equal(canServe(fallback(sharding('open'), sharding('open'))), false);
});

t.test('decorators need their backend', async (t) => {
  t.equal(canServe({ kind: 'completenessChecking', children: [sharding('open')] }), false);
  t.equal(canServe({ kind: 'completenessChecking', children: [sharding('closed')] }), true);
  t.equal(canServe({ kind: 'disk' }), true, 'a leaf can always serve');
});
