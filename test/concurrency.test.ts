import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { Code, ConnectError } from '@connectrpc/connect';
import { abortable, mapLimit, mapLimitCancelling } from '../src/concurrency.ts';

t.test('mapLimit keeps at most `limit` calls in flight and returns results in item order', async (t) => {
  let inFlight = 0;
  let most = 0;
  const results = await mapLimit([30, 5, 20, 1, 10, 0], 2, async (ms, i) => {
    inFlight++;
    most = Math.max(most, inFlight);
    await sleep(ms);
    inFlight--;
    return `${i}:${ms}`;
  });
  t.same(results, ['0:30', '1:5', '2:20', '3:1', '4:10', '5:0']);
  t.equal(most, 2);
  t.same(await mapLimit([], 4, async () => 1), []);
  t.same(await mapLimit([1, 2], 0, async (n) => n * 2), [2, 4], 'a limit below 1 counts as 1');
});

t.test('mapLimit rejects with the first error and starts nothing after it', async (t) => {
  const started: number[] = [];
  const err = await mapLimit([0, 1, 2, 3, 4, 5], 2, async (n) => {
    started.push(n);
    await sleep(n === 1 ? 1 : 20);
    if (n === 1) throw new Error('item 1 failed');
    return n;
  }).catch((e: unknown) => e);
  t.equal((err as Error).message, 'item 1 failed');
  t.same(started, [0, 1], 'rejected while item 0 still runs');
  await sleep(50);
  t.same(started, [0, 1], 'nothing started after the failure');
});

t.test('abortable passes the outcome through, or rejects with the reason once aborted', async (t) => {
  const ctl = new AbortController();
  t.equal(await abortable(Promise.resolve(7), ctl.signal), 7);
  await t.rejects(abortable(Promise.reject(new Error('own failure')), ctl.signal), { message: 'own failure' });

  const never = new Promise<number>(() => {});
  const pending = abortable(never, ctl.signal);
  ctl.abort(new Error('stopped'));
  await t.rejects(pending, { message: 'stopped' });
  // Already aborted: rejects at once, and a late failure of the work is not unhandled.
  await t.rejects(abortable(sleep(5).then(() => Promise.reject(new Error('late'))), ctl.signal), { message: 'stopped' });
  await sleep(10);
});

t.test('mapLimitCancelling: the first failure cancels the calls still running', async (t) => {
  const cancelled: number[] = [];
  const err = await mapLimitCancelling([0, 1, 2], 3, undefined, (i, signal) => {
    if (i === 0) return Promise.reject(new Error('first fails'));
    return new Promise((_, reject) => {
      signal.addEventListener('abort', () => {
        cancelled.push(i);
        reject(new Error(`cancelled ${i}`));
      });
    });
  }).catch((e: unknown) => e);
  t.equal((err as Error).message, 'first fails');
  t.same(cancelled.sort(), [1, 2], 'both siblings saw the abort');
});

t.test('mapLimitCancelling: the caller aborting rejects with CANCELED', async (t) => {
  const ctl = new AbortController();
  const p = mapLimitCancelling([0], 1, ctl.signal, (_, signal) =>
    new Promise((_, reject) => signal.addEventListener('abort', () => reject(new Error('aborted below')))),
  );
  ctl.abort();
  const err = await p.catch((e: unknown) => e);
  t.ok(err instanceof ConnectError && err.code === Code.Canceled, `got ${String(err)}`);
});
