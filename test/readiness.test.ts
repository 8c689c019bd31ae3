import t from 'tap';
import { allShardsClosed, canServe } from '../src/readiness.ts';
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

t.test('allShardsClosed: a NOT_FOUND from a tree is about the blob only while every shard takes traffic', async (t) => {
  const tree = (a: string, b: string): StoreDescription => ({
    kind: 'fallback',
    children: [
      { kind: 'sharding', shards: [{ name: 'a', state: a }, { name: 'b', state: b }], children: [] },
      { kind: 'remote', name: 'secondary' },
    ],
  });
  t.equal(allShardsClosed(tree('closed', 'closed')), true);
  t.equal(allShardsClosed(tree('closed', 'open')), false, 'an open shard: its blobs are not asked for');
  t.equal(allShardsClosed(tree('half-open', 'closed')), false);
  t.equal(allShardsClosed(tree('drained', 'closed')), false);
  t.equal(allShardsClosed({ kind: 'remote', name: 'x' }), true, 'a tree without sharding');
});
