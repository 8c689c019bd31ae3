import t from 'tap';
import { ExistenceCache } from '../../src/stores/existence-cache.ts';

const a = { name: 'a' };
const b = { name: 'b' };

t.test('a confirmation is believed until its TTL, counted from the confirmation, not renewed by hits', async (t) => {
  let now = 0;
  const c = new ExistenceCache<object>({ ttlMs: 1000, now: () => now });
  c.confirm('x', a, c.epoch(a));
  now = 999;
  t.equal(c.holder('x'), a);
  c.hit();
  now = 1000;
  t.equal(c.holder('x'), undefined);
  t.equal(c.size, 0, 'dropped when found expired');
  t.equal(c.holder('never'), undefined, 'misses are never remembered');
});

t.test('invalidate voids every confirmation of that holder, and answers from calls that started before it', async (t) => {
  const c = new ExistenceCache<object>({ ttlMs: 1000, now: () => 0 });
  c.confirm('x', a, c.epoch(a));
  c.confirm('y', b, c.epoch(b));
  const started = c.epoch(a); // a call to a starts...
  c.invalidate(a); // ...a's breaker changes state...
  c.confirm('z', a, started); // ...and its late answer arrives
  t.equal(c.holder('x'), undefined);
  t.equal(c.holder('z'), undefined, 'a late answer is not believed');
  t.equal(c.holder('y'), b, 'other holders keep theirs');
  c.confirm('z', a, c.epoch(a));
  t.equal(c.holder('z'), a, 'answers from after the transition are');
  t.match(c.describe(), { entries: 2, invalidations: 1 });
});

t.test('forget drops a confirmation only if that holder made it', async (t) => {
  const c = new ExistenceCache<object>({ ttlMs: 1000, now: () => 0 });
  c.confirm('x', a, 0);
  c.forget('x', b);
  t.equal(c.holder('x'), a);
  c.forget('x', a);
  t.equal(c.holder('x'), undefined);
});

t.test('bounded: the oldest confirmations go first; a re-confirmation makes one young again', async (t) => {
  const c = new ExistenceCache<object>({ maxEntries: 16, ttlMs: 1000, now: () => 0 });
  for (let i = 0; i < 16; i++) c.confirm(`k${i}`, a, 0);
  c.confirm('k0', a, 0);
  c.confirm('k16', a, 0);
  t.ok(c.size <= 16);
  t.equal(c.holder('k1'), undefined, 'the oldest went');
  t.equal(c.holder('k0'), a, 're-confirmed, kept');
  t.equal(c.holder('k16'), a);
});

t.test('maxEntries 0 or ttlMs 0 turn it off', async (t) => {
  for (const opts of [{ maxEntries: 0 }, { ttlMs: 0 }]) {
    const c = new ExistenceCache<object>({ ...opts, now: () => 0 });
    t.notOk(c.enabled);
    c.confirm('x', a, 0);
    t.equal(c.holder('x'), undefined);
    t.equal(c.size, 0);
  }
});
