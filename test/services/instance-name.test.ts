import { Code, ConnectError } from '@connectrpc/connect';
import t from 'tap';
import { RESERVED_INSTANCE_SEGMENTS, validateInstanceName } from '../../src/services/instance-name.ts';

function problem(name: string): string | undefined {
  try {
    validateInstanceName(name);
    return undefined;
  } catch (err) {
    t.ok(err instanceof ConnectError && err.code === Code.InvalidArgument, `${name}: INVALID_ARGUMENT`);
    return (err as ConnectError).rawMessage;
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
