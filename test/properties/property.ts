// Shared plumbing for the property-based tests in this directory (fast-check
// under tap): one fixed seed for every property, a run count that can be
// scaled, and a tally of outcomes per surface that each file prints as a tap
// comment, so the counts of bad inputs tried (and what they got) can be quoted.
//
//   PROPERTY_SEED=123 npx tap test/properties/x.test.ts   another fixed seed
//   PROPERTY_RUNS=10 npx tap test/properties/x.test.ts    10x the runs (a long soak)
//
// On a failure fast-check's report names the seed, the shrunk counterexample
// and the path to replay it (`{seed, path, endOnFailure: true}`).
import fc from 'fast-check';
import type { Test } from 'tap';

/** The seed every property runs with unless PROPERTY_SEED says otherwise. */
export const SEED = process.env.PROPERTY_SEED === undefined ? 0x11bad : Number(process.env.PROPERTY_SEED);

const SCALE = process.env.PROPERTY_RUNS === undefined ? 1 : Number(process.env.PROPERTY_RUNS);

/** `n` runs, scaled by PROPERTY_RUNS. */
export function runs(n: number): number {
  return Math.max(1, Math.round(n * SCALE));
}

/** Counts of cases and of each outcome, for one surface. */
export class Tally {
  readonly #counts = new Map<string, number>();
  cases = 0;

  /** Records one case's outcome (an error code name, "ok", ...). */
  add(outcome: string): void {
    this.cases++;
    this.#counts.set(outcome, (this.#counts.get(outcome) ?? 0) + 1);
  }

  count(outcome: string): number {
    return this.#counts.get(outcome) ?? 0;
  }

  /** "2000 cases, 1712 INVALID_ARGUMENT, 288 ok": most frequent outcome first. */
  summary(): string {
    const parts = [...this.#counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).map(([k, v]) => `${v} ${k}`);
    return [`${this.cases} cases`, ...parts].join(', ');
  }
}

function params<T>(numRuns: number): fc.Parameters<T> {
  return { seed: SEED, numRuns: runs(numRuns) };
}

/** Runs a synchronous property; one tap assertion, failing with fast-check's report (seed, counterexample). */
export function check<T>(t: Test, name: string, property: fc.IProperty<T>, numRuns: number): void {
  const details = fc.check(property, params<T>(numRuns));
  report(t, name, details);
}

/** check() for an async property. */
export async function checkAsync<T>(t: Test, name: string, property: fc.IAsyncProperty<T>, numRuns: number): Promise<void> {
  const details = await fc.check(property, params<T>(numRuns));
  report(t, name, details);
}

/**
 * One assertion for a finished run: on failure, fast-check's report (seed,
 * replay path, shrunk counterexample) and the error the property threw.
 * (The synchronous report: the asynchronous one awaits anything thenable
 * in the counterexample.)
 */
function report<T>(t: Test, name: string, details: fc.RunDetails<T>): void {
  if (!details.failed) {
    t.pass(`${name}: ${details.numRuns} runs, seed ${SEED}`);
    return;
  }
  const err = details.errorInstance;
  const why = err instanceof Error ? err.message : err === undefined ? '' : String(err);
  t.fail(`${name}: ${why}\n${fc.defaultReportMessage(details) ?? ''}`);
}

// ---- arbitraries shared by several files ----

/** One character from the classes that break parsers: controls, separators, format characters, lone surrogates, astral. */
export const nastyChar: fc.Arbitrary<string> = fc.oneof(
  fc.integer({ min: 0, max: 0x1f }).map((c) => String.fromCharCode(c)),
  fc.constantFrom('\u007f', '\u0085', '\u009f', '\u00a0', '\u00ad', '\u2028', '\u2029', '\u200b', '\u200d', '\u202e', '\u2066', '\ufeff', '\ufffd', '\uffff'),
  fc.integer({ min: 0xd800, max: 0xdfff }).map((c) => String.fromCharCode(c)),
  fc.constantFrom('\u{1f600}', '\u{e0001}', '\u{1d173}', '\u{10ffff}', 'é', 'ß', 'İ', '٣', '７'),
  fc.constantFrom('/', '.', '%', '\\', ' ', '"', "'", ':', '?', '#', '*', '\u0000'),
);

/** Short strings mixing ordinary ASCII with nastyChar. */
export function nastyString(maxLength = 12): fc.Arbitrary<string> {
  return fc.string({ unit: fc.oneof({ weight: 3, arbitrary: fc.string({ unit: 'grapheme-ascii', minLength: 1, maxLength: 1 }) }, { weight: 1, arbitrary: nastyChar }), maxLength });
}

/** A 64-character lowercase hex string (a well-formed SHA-256, of nothing in particular). */
export const hex64: fc.Arbitrary<string> = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b).toString('hex'));
