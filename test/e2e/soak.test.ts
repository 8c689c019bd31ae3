// The chaos soak's CI form (issue 9; README, "Chaos soak"): 60 s of a
// Bazel-like load through the default cluster shape (edge -> fallback {
// primary: sharding over 3 shard processes, secondary process }) while a
// seeded fault injector SIGKILLs, SIGSTOPs, wipes and restarts shards, the
// secondary and the edge itself. Every invariant of the checker
// (test/helpers/soak.ts) is asserted, and the whole table is printed as TAP
// comments.
//
// Durability "sync": the fault mix includes a shard coming back EMPTY, and
// the async mode's replication window may lose an acknowledged blob then (by
// design, documented), so only the sync mode can promise zero loss.
//
// Seed 562 draws every fault kind within its first seven faults (shard-stop,
// shard-empty, secondary-stop, secondary-kill, shard-kill, edge-term,
// edge-kill, ...). `npm run soak -- --duration 60 --seed 562 --durability sync`
// reproduces the schedule (the timing against the load varies by machine).
import t from 'tap';
import { errorBound, FAULT_CODES, formatReport, runSoak, unexplainedCodes } from '../helpers/soak.ts';

const SEED = 562;
const DURATION_MS = 60_000;

t.test(`chaos soak: ${DURATION_MS / 1000} s, seed ${SEED}, durability sync`, async (t) => {
  const r = await runSoak({
    durationMs: DURATION_MS,
    seed: SEED,
    durability: 'sync',
    workers: 4,
    settleTimeoutMs: 45_000,
    log: (line) => t.comment(line),
  });
  for (const line of formatReport(r)) t.comment(line);

  const kinds = new Set(r.faults.map((f) => f.kind));
  t.ok(r.faults.length >= 5, `${r.faults.length} faults injected (${[...kinds].join(', ')})`);
  t.ok(kinds.has('shard-empty'), 'a shard came back empty at least once');
  t.ok(r.ackedBlobs >= 300 && r.ackedActions >= 100, `load ran: ${r.ackedBlobs} blobs (${r.ackedLargeBlobs} large), ${r.ackedActions} ActionResults acknowledged`);

  t.ok(r.settled, `the cluster settled after the faults (breakers closed, hints handed off, journals replayed)${r.settled ? ` in ${r.settleMs} ms` : `: ${r.unsettledReasons.join('; ')}`}`);
  t.same(r.lostBlobs, [], `0 of ${r.ackedBlobs} acknowledged blobs lost`);
  t.same(r.lostActions, [], `0 of ${r.ackedActions} acknowledged ActionResults lost`);
  t.same(r.unreadableAtEnd, [], 'every acknowledged write readable at the end (no read errors after retries)');
  t.same(r.findMissingLies, [], `no FindMissing lie in ${r.findMissingChecked} reads of blobs it reported present`);
  t.same(r.incompleteActionResults, [], `no ActionResult served with an unreadable output in ${r.actionHitsChecked} cache hits`);

  // Bound on client errors while the edge itself was up (plus anything but
  // UNAVAILABLE or a connection reset while it was being restarted): an RPC
  // in flight on a shard or the secondary at the moment it is SIGKILLed or
  // SIGSTOPped can fail before the breaker opens (the edge fails over new
  // requests; a miss that asks a dying secondary answers UNAVAILABLE until its
  // breaker opens). 4% of all RPCs, at least 10; and none while no fault is
  // in progress (or within 5 s of its recovery).
  t.ok(r.unexpectedErrors <= errorBound(r), `${r.unexpectedErrors} unexpected client errors <= ${errorBound(r)} (of ${r.totalRpcs} RPCs)`);
  t.same(r.unexpectedOutsideFaults, [], 'no client error while no fault was in progress (or within 5 s of its recovery)');
  t.same(unexplainedCodes(r), [], `every client error has a code a fault explains (${FAULT_CODES.join(', ')})`);
});
