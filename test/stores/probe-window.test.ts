import t from 'tap';
import { ProbeWindows } from '../../src/stores/probe-window.ts';

const a = { name: 'a' };
const b = { name: 'b' };
const name = (s: { name: string }) => s.name;

t.test('every owner is covered for windowMs after start', async (t) => {
  let now = 100;
  const w = new ProbeWindows<{ name: string }>(1000, () => now);
  t.ok(w.covers(a) && w.covers(b));
  t.same(w.openFor(name), ['*']);
  now = 1100;
  t.notOk(w.covers(a) || w.covers(b));
  t.notOk(w.anyOpen());
});

t.test('after start, only the owner that changed state is covered, for windowMs from its last change', async (t) => {
  let now = 0;
  const w = new ProbeWindows<{ name: string }>(1000, () => now);
  now = 5000;
  w.noteChange(a, 5000);
  t.ok(w.covers(a));
  t.notOk(w.covers(b), 'a change of a cannot put b\'s blobs below b');
  t.same(w.openFor(name), ['a']);
  t.ok(w.anyOpen());
  now = 5999;
  w.noteChange(a, 5999);
  now = 6500;
  t.ok(w.covers(a), 'the last change counts');
  now = 6999;
  t.notOk(w.covers(a));
  t.notOk(w.anyOpen());
});

t.test('windowMs 0: never', async (t) => {
  const w = new ProbeWindows<{ name: string }>(0, () => 0);
  w.noteChange(a, 0);
  t.notOk(w.covers(a));
  t.notOk(w.anyOpen());
});
