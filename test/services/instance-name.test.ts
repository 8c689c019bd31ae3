import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import { RESERVED_INSTANCE_SEGMENTS, validateInstanceName } from '../../src/services/instance-name.ts';

function problem(name: string): string | undefined {
  try {
    validateInstanceName(name);
    return undefined;
  } catch (err) {
    // Thrown, not asserted on the root test: a failure lands in the subtest that asked.
    if (!(err instanceof ConnectError && err.code === Code.InvalidArgument)) throw new Error(`${JSON.stringify(name)}: not INVALID_ARGUMENT: ${String(err)}`);
    return err.rawMessage;
  }
}

t.test('accepts the empty name and ordinary segment paths', async (t) => {
  for (const name of ['', 'main', 'team/main', 'a/b/c', 'blobs2', 'my.instance', '...', 'Blobs']) {
    t.equal(problem(name), undefined, JSON.stringify(name));
  }
});

t.test('rejects empty segments, dot segments and reserved words, saying which', async (t) => {
  t.equal(problem('/main'), 'instance_name "/main" starts with "/"');
  t.equal(problem('main/'), 'instance_name "main/" ends with "/"');
  t.equal(problem('/'), 'instance_name "/" starts with "/"');
  t.equal(problem('a//b'), 'instance_name "a//b" contains an empty segment ("//")');
  t.equal(problem('.'), 'instance_name "." contains the segment "."');
  t.equal(problem('a/../b'), 'instance_name "a/../b" contains the segment ".."');
  for (const word of RESERVED_INSTANCE_SEGMENTS) {
    t.equal(problem(`x/${word}`), `instance_name "x/${word}" contains the reserved segment "${word}"`);
  }
  t.same(
    [...RESERVED_INSTANCE_SEGMENTS].sort(),
    ['actionResults', 'actions', 'blobs', 'capabilities', 'compressed-blobs', 'operations', 'uploads'],
  );
});

t.test('long names are clipped in the message', async (t) => {
  const msg = problem(`${'a'.repeat(300)}//`) ?? '';
  t.ok(msg.length > 0 && msg.length < 200, msg);
});

t.test('rejects control characters and overlong names, naming the character and where it is', async (t) => {
  t.equal(problem('a\u0000b'), 'instance_name "a\\u0000b" contains the control character U+0000 at offset 1');
  t.equal(problem('main\n'), 'instance_name "main\\n" contains the control character U+000A at offset 4');
  t.equal(problem('x\u007f'), 'instance_name "x\\u007f" contains the control character U+007F at offset 1');
  t.equal(problem('a\u2028b'), 'instance_name "a\\u2028b" contains the control character U+2028 at offset 1');
  t.match(problem('a'.repeat(1025)), /is longer than 1024 characters$/);
  t.equal(problem('a'.repeat(1024)), undefined, '1024 characters are fine');
  t.equal(problem('équipe/主'), undefined, 'printable non-ASCII is fine');
});
