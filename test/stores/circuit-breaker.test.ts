import t from 'tap';
import { Code, ConnectError } from '@connectrpc/connect';
import { CircuitBreaker, type BreakerTransition, type CircuitBreakerOptions } from '../../src/stores/circuit-breaker.ts';

const unavailable = () => new ConnectError('connection refused', Code.Unavailable);

function setup(opts: CircuitBreakerOptions = {}) {
  let now = 1_000_000;
  const clock = {
    now: () => now,
    advance: (ms: number) => {
      now += ms;
    },
  };
  const breaker = new CircuitBreaker({
    consecutiveFailures: 3,
    failureRatio: 0.5,
    windowMs: 10_000,
    minRequests: 10,
    healthCheckFailures: 2,
    closeAfterProbes: 2,
    backoffInitialMs: 1000,
    backoffMaxMs: 8000,
    backoffResetMs: 60_000,
    ...opts,
    now: clock.now,
  });
  const transitions: BreakerTransition[] = [];
  breaker.on('transition', (tr) => transitions.push(tr));
  return { breaker, clock, transitions };
}

t.test('opens after N consecutive infrastructure failures', async (t) => {
  const { breaker, transitions } = setup();
  t.ok(breaker.recordFailure(unavailable()));
  t.ok(breaker.recordFailure(new ConnectError('boom', Code.Internal)));
  t.equal(breaker.state, 'closed');
  t.ok(breaker.recordFailure(new ConnectError('late', Code.DeadlineExceeded)));
  t.equal(breaker.state, 'open');
  t.notOk(breaker.allowsTraffic());
  t.equal(transitions.length, 1);
  t.match(transitions[0], { from: 'closed', to: 'open', manual: false, backoffMs: 1000 });
  t.match(transitions[0]!.reason, /^3 consecutive infrastructure failures, last: \[deadline_exceeded\] late$/);
  const snap = breaker.snapshot();
  t.equal(snap.manual, false);
  t.equal(snap.halfOpenAt, 1_000_000 + 1000);
});

t.test('NOT_FOUND and INVALID_ARGUMENT never count, and reset the streak', async (t) => {
  const { breaker } = setup();
  for (let i = 0; i < 20; i++) {
    t.notOk(breaker.recordFailure(new ConnectError('no such blob', Code.NotFound)));
    t.notOk(breaker.recordFailure(new ConnectError('bad digest', Code.InvalidArgument)));
  }
  breaker.recordFailure(unavailable());
  breaker.recordFailure(unavailable());
  breaker.recordFailure(new ConnectError('no such blob', Code.NotFound));
  breaker.recordFailure(unavailable());
  t.equal(breaker.state, 'closed');
  t.equal(breaker.snapshot().consecutiveFailures, 1);
});

t.test('network errors (ECONNRESET) count as infrastructure failures', async (t) => {
  const { breaker } = setup();
  const reset = Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' });
  t.ok(breaker.recordFailure(reset));
});

t.test('opens on the failure ratio over the window once it holds enough requests', async (t) => {
  const { breaker, transitions } = setup({ consecutiveFailures: 100 });
  // Alternate success/failure: never 3 in a row, but 50% failures.
  for (let i = 0; i < 4; i++) {
    breaker.recordSuccess();
    breaker.recordFailure(unavailable());
  }
  t.equal(breaker.state, 'closed', '8 requests is under minRequests');
  breaker.recordSuccess();
  breaker.recordFailure(unavailable());
  t.equal(breaker.state, 'open');
  t.match(transitions[0]!.reason, /^5 of 10 recent requests failed/);
});

t.test('the window forgets requests older than windowMs', async (t) => {
  const { breaker, clock } = setup({ consecutiveFailures: 100 });
  for (let i = 0; i < 9; i++) breaker.recordFailure(unavailable());
  t.equal(breaker.snapshot().recentFailures, 9);
  clock.advance(11_000);
  t.equal(breaker.snapshot().recentRequests, 0);
  breaker.recordFailure(unavailable());
  t.equal(breaker.state, 'closed', 'one failure in a fresh window does not open it');
});

t.test('failed health checks open it; a success in between resets the count', async (t) => {
  const { breaker, transitions } = setup();
  breaker.recordHealthCheck(false, 'timed out');
  breaker.recordHealthCheck(true);
  breaker.recordHealthCheck(false, 'timed out');
  t.equal(breaker.state, 'closed');
  breaker.recordHealthCheck(false, 'health check timed out after 50 ms');
  t.equal(breaker.state, 'open');
  t.equal(transitions[0]!.reason, '2 failed health checks, last: health check timed out after 50 ms');
});

t.test('open -> half-open after the backoff; M good probes close it', async (t) => {
  const { breaker, clock, transitions } = setup();
  for (let i = 0; i < 3; i++) breaker.recordFailure(unavailable());
  clock.advance(999);
  t.equal(breaker.state, 'open');
  breaker.recordHealthCheck(true);
  clock.advance(1);
  t.equal(breaker.state, 'half-open');
  t.notOk(breaker.allowsTraffic(), 'half-open takes no client traffic');
  breaker.recordSuccess(); // a late client answer is not a probe
  t.equal(breaker.state, 'half-open');
  breaker.recordHealthCheck(true);
  t.equal(breaker.state, 'half-open', 'one probe is not enough');
  breaker.recordHealthCheck(true);
  t.equal(breaker.state, 'closed');
  t.ok(breaker.allowsTraffic());
  t.same(
    transitions.map((x) => `${x.from}->${x.to}`),
    ['closed->open', 'open->half-open', 'half-open->closed'],
  );
  t.equal(transitions[1]!.reason, 'backoff of 1000 ms elapsed');
  t.equal(transitions[2]!.reason, '2 successful probes');
});

/**
 * Health checks as ShardingStore runs them: every `intervalMs` for
 * `durationMs`, passing exactly when `up(t)` holds (t: ms since the start).
 */
function probe(
  { breaker, clock }: ReturnType<typeof setup>,
  intervalMs: number,
  durationMs: number,
  up: (t: number) => boolean,
): void {
  for (let t = 0; t < durationMs; t += intervalMs) {
    clock.advance(intervalMs);
    breaker.recordHealthCheck(up(t + intervalMs), up(t + intervalMs) ? '' : 'refused');
  }
}

t.test('while the shard stays down, failed probes reopen it for the initial backoff only', async (t) => {
  const { breaker, clock, transitions } = setup();
  for (let i = 0; i < 3; i++) breaker.recordFailure(unavailable());
  const backoffs: number[] = [];
  for (let i = 0; i < 5; i++) {
    backoffs.push(breaker.snapshot().backoffMs);
    clock.advance(breaker.snapshot().backoffMs);
    t.equal(breaker.state, 'half-open');
    t.equal(breaker.snapshot().backoffMs, 1000, 'half-open: a failed probe would reopen it for the initial backoff');
    breaker.recordHealthCheck(false, 'refused');
    t.equal(breaker.state, 'open');
  }
  t.same(backoffs, [1000, 1000, 1000, 1000, 1000]);
  t.match(transitions.at(-1), { from: 'half-open', to: 'open', backoffMs: 1000, reason: 'probe failed in half-open: refused' });
});

t.test('a shard down for ten minutes takes traffic again within initial backoff + closeAfterProbes checks of its return', async (t) => {
  const interval = 250;
  for (const closeAfterProbes of [2, 3]) {
    for (const returnAt of [600_000, 600_125, 600_900]) {
      const b = setup({ closeAfterProbes, backoffMaxMs: 60_000 });
      const start = b.clock.now();
      let closedAt: number | undefined;
      b.breaker.on('transition', (tr) => {
        if (tr.to === 'closed') closedAt ??= tr.at - start;
      });
      probe(b, interval, 700_000, (now) => now >= returnAt);
      const opens = b.transitions.filter((x) => x.to === 'open');
      t.ok(opens.length > 500, `probed all along (${opens.length} reopens)`);
      t.ok(opens.every((x) => x.backoffMs === 1000), 'never waited longer than the initial backoff');
      const bound = 1000 + closeAfterProbes * interval;
      t.ok(
        closedAt !== undefined && closedAt - returnAt <= bound,
        `closeAfterProbes ${closeAfterProbes}, back at +${returnAt} ms: closed ${closedAt === undefined ? 'never' : `${closedAt - returnAt} ms`} later (bound ${bound} ms)`,
      );
    }
  }
});

t.test('flapping: each open soon after a close holds longer, capped, and stays grown until closed for backoffResetMs', async (t) => {
  const { breaker, clock } = setup();
  const reopenSoonAfterClosing = () => {
    clock.advance(breaker.snapshot().backoffMs);
    breaker.recordHealthCheck(true);
    breaker.recordHealthCheck(true);
    t.equal(breaker.state, 'closed');
    clock.advance(5000);
    for (let i = 0; i < 3; i++) breaker.recordFailure(unavailable());
    t.equal(breaker.state, 'open');
    return breaker.snapshot().backoffMs;
  };
  for (let i = 0; i < 3; i++) breaker.recordFailure(unavailable());
  const holds = [breaker.snapshot().backoffMs];
  for (let i = 0; i < 4; i++) holds.push(reopenSoonAfterClosing());
  t.same(holds, [1000, 2000, 4000, 8000, 8000], 'flapping shard is readmitted less and less often');

  // A failed probe in between does not shrink the next hold.
  clock.advance(8000);
  breaker.recordHealthCheck(false, 'refused');
  t.equal(breaker.snapshot().backoffMs, 1000, 'still down: probed again soon');
  t.equal(reopenSoonAfterClosing(), 8000, 'the flap level is kept across failed probes');

  // After a long quiet period closed, the backoff starts small again.
  clock.advance(8000);
  breaker.recordHealthCheck(true);
  breaker.recordHealthCheck(true);
  t.equal(breaker.snapshot().backoffMs, 8000, 'closed: the next open would still hold long');
  clock.advance(60_000);
  t.equal(breaker.snapshot().backoffMs, 1000);
  for (let i = 0; i < 3; i++) breaker.recordFailure(unavailable());
  t.equal(breaker.snapshot().backoffMs, 1000);
});

t.test('a flapping shard is readmitted fewer times than it flaps', async (t) => {
  // Down 500 ms, up 1500 ms, 20 times; checks every 100 ms. Without the
  // hysteresis it would be readmitted on every flap (open at +200 ms, half-open
  // at +1200 ms, closed at +1400 ms).
  const b = setup({ backoffMaxMs: 8000 });
  const period = 2000;
  const flaps = 20;
  probe(b, 100, flaps * period, (now) => now % period >= 500);
  const readmissions = b.transitions.filter((x) => x.to === 'closed').length;
  const holds = b.transitions.filter((x) => x.from === 'closed' && x.to === 'open').map((x) => x.backoffMs);
  t.ok(readmissions < flaps / 2, `${readmissions} readmissions for ${flaps} flaps`);
  t.same(holds.slice(0, 4), [1000, 2000, 4000, 8000], 'each flap holds it out longer');

  // The same shard without hysteresis (multiplier 1) is readmitted every time:
  // the test above can fail.
  const flat = setup({ backoffMultiplier: 1 });
  probe(flat, 100, flaps * period, (now) => now % period >= 500);
  t.equal(flat.transitions.filter((x) => x.to === 'closed').length, flaps);
});

t.test('a reopened-and-closed breaker does not trip on failures from before', async (t) => {
  const { breaker, clock } = setup();
  breaker.recordFailure(unavailable());
  breaker.recordFailure(unavailable());
  breaker.recordHealthCheck(false);
  breaker.recordHealthCheck(false);
  t.equal(breaker.state, 'open');
  clock.advance(1000);
  breaker.recordHealthCheck(true);
  breaker.recordHealthCheck(true);
  t.equal(breaker.state, 'closed');
  breaker.recordFailure(unavailable());
  t.equal(breaker.state, 'closed');
  t.equal(breaker.snapshot().consecutiveFailures, 1);
});

t.test('manual drain holds it open until undrained, then probes decide', async (t) => {
  const { breaker, clock, transitions } = setup();
  breaker.drain();
  t.equal(breaker.state, 'drained');
  t.equal(breaker.snapshot().manual, true);
  t.notOk(breaker.allowsTraffic());
  // Nothing automatic ends a drain.
  clock.advance(1_000_000);
  breaker.recordHealthCheck(true);
  breaker.recordHealthCheck(true);
  breaker.recordHealthCheck(true);
  breaker.recordSuccess();
  t.equal(breaker.state, 'drained');
  breaker.undrain();
  t.equal(breaker.state, 'half-open');
  t.equal(breaker.snapshot().manual, false);
  breaker.recordHealthCheck(true);
  breaker.recordHealthCheck(true);
  t.equal(breaker.state, 'closed');
  t.same(
    transitions.map((x) => [x.to, x.manual, x.reason]),
    [
      ['drained', true, 'drained by operator'],
      ['half-open', true, 'undrained by operator'],
      ['closed', false, '2 successful probes'],
    ],
  );
});

t.test('drain overrides an automatic open; undrain of a closed breaker is a no-op', async (t) => {
  const { breaker, transitions } = setup();
  breaker.undrain();
  t.equal(transitions.length, 0);
  for (let i = 0; i < 3; i++) breaker.recordFailure(unavailable());
  t.equal(breaker.state, 'open');
  breaker.drain('maintenance');
  t.equal(breaker.state, 'drained');
  t.equal(breaker.snapshot().reason, 'maintenance');
  breaker.drain();
  t.equal(transitions.length, 2, 'draining twice emits once');
});

t.test('rejects nonsense options', async (t) => {
  t.throws(() => new CircuitBreaker({ consecutiveFailures: 0 }), /consecutiveFailures 0 must be positive/);
  t.throws(() => new CircuitBreaker({ failureRatio: 1.5 }), /failureRatio 1.5 is not in/);
});
