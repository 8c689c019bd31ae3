// Instance names, property-based: instanceNameError (src/services/instance-name.ts)
// agrees with a reference model written here from the rules alone, on names
// built to hit every rule (segments, dots, reserved words, non-printable
// characters of every class, the length limit) and on arbitrary strings;
// validateInstanceName throws nothing but INVALID_ARGUMENT, with the name
// quoted without any raw control character.
import { Code, ConnectError } from '@connectrpc/connect';
import fc from 'fast-check';
import t from 'tap';
import { instanceNameError, validateInstanceName } from '../../src/services/instance-name.ts';
import { Tally, check, nastyChar } from './property.ts';

// ---- the reference model, from the rules ----

/** What is wrong with a name, by rule; undefined when it is well-formed. */
type Problem = 'length' | 'character' | 'empty-segment' | 'dot-segment' | 'reserved';

const RESERVED = ['blobs', 'uploads', 'actions', 'actionResults', 'operations', 'capabilities', 'compressed-blobs'];
const MAX_LENGTH = 1024;

/**
 * Printable: not a control character (C0, DEL, C1), not a line or paragraph
 * separator, not an invisible format character (bidi overrides, zero-width
 * characters, BOM, tags: they make two names that print alike differ), not
 * a lone surrogate (not Unicode at all: UTF-8 cannot carry it, so it would
 * reach a shard as U+FFFD and alias another name).
 */
function printable(codePoint: number, char: string): boolean {
  if (codePoint <= 0x1f || (codePoint >= 0x7f && codePoint <= 0x9f)) return false;
  if (codePoint === 0x2028 || codePoint === 0x2029) return false;
  if (codePoint >= 0xd800 && codePoint <= 0xdfff) return false;
  return !/^\p{Cf}$/u.test(char);
}

function model(name: string): Problem | undefined {
  if (name === '') return undefined;
  if (name.length > MAX_LENGTH) return 'length';
  for (const char of name) {
    if (!printable(char.codePointAt(0)!, char)) return 'character';
  }
  for (const segment of name.split('/')) {
    if (segment === '') return 'empty-segment';
    if (segment === '.' || segment === '..') return 'dot-segment';
    if (RESERVED.includes(segment)) return 'reserved';
  }
  return undefined;
}

/** The rule an instanceNameError message names. */
function problemOf(message: string): Problem | 'unrecognised' {
  if (/^is longer than \d+ characters$/.test(message)) return 'length';
  if (/^contains the (control character|invisible format character|lone surrogate) U\+[0-9A-F]{4,6} at offset \d+$/.test(message)) return 'character';
  if (/^(starts with "\/"|ends with "\/"|contains an empty segment)/.test(message)) return 'empty-segment';
  if (/^contains the segment "\.\.?"$/.test(message)) return 'dot-segment';
  if (/^contains the reserved segment "[^"]+"$/.test(message)) return 'reserved';
  return 'unrecognised';
}

// ---- generators ----

const word = fc.stringMatching(/^[A-Za-z0-9_.@+-]{1,10}$/);
const segment = fc.oneof(
  { weight: 6, arbitrary: word },
  { weight: 1, arbitrary: fc.constantFrom('', '.', '..', '...', ' ', 'Blobs', 'blobs2', 'uploads.', ...RESERVED) },
  { weight: 1, arbitrary: fc.tuple(word, nastyChar, word).map(([a, c, b]) => a + c + b) },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', minLength: 1, maxLength: 6 }) },
);
const structured = fc.array(segment, { minLength: 1, maxLength: 6 }).map((s) => s.join('/'));
/** Names around the length limit: valid characters, one bad one somewhere, or a "/" at the edges. */
const longName = fc
  .record({
    length: fc.integer({ min: MAX_LENGTH - 3, max: MAX_LENGTH + 3 }),
    bad: fc.option(fc.tuple(fc.nat(), nastyChar), { freq: 3 }),
  })
  .map(({ length, bad }) => {
    const chars = [...'x'.repeat(length)];
    if (bad !== null) chars[bad[0] % length] = bad[1];
    return chars.join('');
  });
const anyName = fc.oneof(
  { weight: 6, arbitrary: structured },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 20 }) },
  { weight: 1, arbitrary: longName },
);

// ---- properties ----

t.test('instanceNameError agrees with the reference model, rule by rule', async (t) => {
  const tally = new Tally();
  check(
    t,
    'instanceNameError matches the model',
    fc.property(anyName, (name) => {
      const want = model(name);
      const got = instanceNameError(name);
      tally.add(want ?? 'ok');
      if (want === undefined) return got === undefined;
      return got !== undefined && problemOf(got) === want;
    }),
    4000,
  );
  t.comment(`instance names: ${tally.summary()}`);
});

t.test('validateInstanceName throws only INVALID_ARGUMENT, quoting the name without raw control characters', async (t) => {
  const tally = new Tally();
  check(
    t,
    'INVALID_ARGUMENT with a clean message, or nothing',
    fc.property(anyName, (name) => {
      try {
        validateInstanceName(name);
        tally.add('ok');
        return model(name) === undefined;
      } catch (err) {
        if (!(err instanceof ConnectError) || err.code !== Code.InvalidArgument) throw err;
        tally.add('INVALID_ARGUMENT');
        // The message goes to logs and into a grpc-message header: no
        // control, separator or invisible character may appear in it raw.
        return !/[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}]/u.test(err.rawMessage) && err.rawMessage.length < 400;
      }
    }),
    2000,
  );
  t.comment(`validateInstanceName: ${tally.summary()}`);
});

// What the model found in the first version (only C0/C1/DEL/U+2028/U+2029
// were refused): lone surrogates and invisible format characters passed.
t.test('lone surrogates and invisible format characters are refused, named by code point', async (t) => {
  t.equal(instanceNameError('a\ud800b'), 'contains the lone surrogate U+D800 at offset 1');
  t.equal(instanceNameError('x/\udfff'), 'contains the lone surrogate U+DFFF at offset 2');
  t.equal(instanceNameError('main\u202egnp.exe'), 'contains the invisible format character U+202E at offset 4');
  t.equal(instanceNameError('\ufeffmain'), 'contains the invisible format character U+FEFF at offset 0');
  t.equal(instanceNameError('a\u200bb'), 'contains the invisible format character U+200B at offset 1');
  t.equal(instanceNameError('a\u{e0001}'), 'contains the invisible format character U+E0001 at offset 1');
  t.equal(instanceNameError('team/\u{1f600}'), undefined, 'a whole astral character (a surrogate pair) is fine');
  try {
    validateInstanceName('a\u202eb');
    t.fail('accepted');
  } catch (err) {
    t.equal((err as ConnectError).rawMessage, 'instance_name "a\\u202eb" contains the invisible format character U+202E at offset 1', 'quoted escaped');
  }
});
