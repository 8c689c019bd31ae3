import { create, equals, toBinary } from '@bufbuild/protobuf';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { Client } from '@connectrpc/connect';
import { Code, ConnectError, createClient, createRouterTransport } from '@connectrpc/connect';
import { pino } from 'pino';
import t from 'tap';
import type { ActionResult } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ActionCache, ActionResultSchema, DigestFunction_Value } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { digestOf, digestString, toProtoDigest } from '../../src/digest.ts';
import { createActionCacheService } from '../../src/services/action-cache.ts';
import type { BlobStore } from '../../src/stores/blob-store.ts';
import { CompletenessCheckingStore } from '../../src/stores/completeness-checking-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { once } from '../../src/streams.ts';
import { failure } from '../helpers/failure.ts';
import type { InstancesConfig } from '../../src/config.ts';

const enc = new TextEncoder();

function setup(opts: { completenessChecking?: boolean; instances?: InstancesConfig } = {}): {
  client: Client<typeof ActionCache>;
  cas: MemoryStore;
  acBackend: MemoryStore;
} {
  const cas = new MemoryStore({ maxSizeBytes: 1 << 30, contentAddressed: true });
  const acBackend = new MemoryStore({ maxSizeBytes: 1 << 20, contentAddressed: false });
  const ac: BlobStore = opts.completenessChecking ? new CompletenessCheckingStore({ backend: acBackend, cas }) : acBackend;
  const service = createActionCacheService({
    cas,
    ac,
    logger: pino({ level: 'silent' }),
    maxBatchTotalSizeBytes: 4 * 1024 * 1024,
    isReady: () => true,
    instances: opts.instances,
  });
  const transport = createRouterTransport((router) => {
    router.service(ActionCache, service);
  });
  return { client: createClient(ActionCache, transport), cas, acBackend };
}

async function putBlob(cas: BlobStore, data: Uint8Array): Promise<Digest> {
  const d = digestOf(data);
  await cas.put(d, once(data));
  return d;
}

/** A plain-object ActionResult init (not a Message), so it can be spread. */
type ResultInit = Exclude<MessageInitShape<typeof ActionResultSchema>, ActionResult>;

const action = digestOf(enc.encode('an Action message'));

function sampleResult(): ResultInit {
  return {
    outputFiles: [{ path: 'bazel-out/k8-fastbuild/bin/app', digest: toProtoDigest(digestOf(enc.encode('binary'))), isExecutable: true }],
    outputDirectories: [{ path: 'bazel-out/gen', treeDigest: toProtoDigest(digestOf(enc.encode('tree'))) }],
    outputSymlinks: [{ path: 'bazel-out/link', target: '/usr/bin/env' }],
    exitCode: 3,
    stdoutDigest: toProtoDigest(digestOf(enc.encode('stdout'))),
    stderrRaw: enc.encode('inline stderr'),
  };
}

t.test('GetActionResult of an unknown action is NOT_FOUND naming the digest', async (t) => {
  const { client } = setup();
  const err = await failure(client.getActionResult({ actionDigest: toProtoDigest(action) }));
  t.equal(err.code, Code.NotFound);
  t.equal(err.rawMessage, `no action result for action ${digestString(action)}`);
});

t.test('UpdateActionResult stores the result and GetActionResult returns it', async (t) => {
  const { client } = setup();
  const result = create(ActionResultSchema, sampleResult());
  const returned = await client.updateActionResult({
    instanceName: 'main',
    actionDigest: toProtoDigest(action),
    actionResult: result,
    digestFunction: DigestFunction_Value.SHA256,
  });
  t.ok(equals(ActionResultSchema, returned, result), 'UpdateActionResult echoes the stored result');
  const got = await client.getActionResult({ instanceName: 'main', actionDigest: toProtoDigest(action) });
  t.ok(equals(ActionResultSchema, got, result), 'GetActionResult returns what was stored');
  t.equal(got.exitCode, 3);
  t.equal(Buffer.from(got.stderrRaw).toString(), 'inline stderr');

  // A second update replaces the first.
  const second = create(ActionResultSchema, { exitCode: 0 });
  await client.updateActionResult({ actionDigest: toProtoDigest(action), actionResult: second });
  t.equal((await client.getActionResult({ actionDigest: toProtoDigest(action) })).exitCode, 0);
});

t.test('UpdateActionResult rejects invalid digests and paths, naming the field, and stores nothing', async (t) => {
  const { client, acBackend } = setup();
  const base = sampleResult();
  const cases: Array<[string, ResultInit, string]> = [
    [
      'output file digest with a bad hash',
      { ...base, outputFiles: [{ path: 'a', digest: { hash: 'zz', sizeBytes: 2n } }] },
      'action_result.output_files[0].digest: hash "zz" has length 2, SHA-256 needs 64 hex characters',
    ],
    [
      'output file without a digest',
      { ...base, outputFiles: [{ path: 'ok', digest: toProtoDigest(action) }, { path: 'b' }] },
      'action_result.output_files[1].digest: missing',
    ],
    [
      'tree digest with a negative size',
      { ...base, outputDirectories: [{ path: 'd', treeDigest: { hash: 'a'.repeat(64), sizeBytes: -1n } }] },
      'action_result.output_directories[0].tree_digest: size -1 is negative',
    ],
    [
      'root directory digest with uppercase hex',
      {
        ...base,
        outputDirectories: [{ path: 'd', treeDigest: toProtoDigest(action), rootDirectoryDigest: { hash: 'A'.repeat(64), sizeBytes: 1n } }],
      },
      `action_result.output_directories[0].root_directory_digest: hash "${'A'.repeat(64)}" is not lowercase hexadecimal`,
    ],
    [
      'output directory with neither digest',
      { ...base, outputDirectories: [{ path: 'd' }] },
      'action_result.output_directories[0]: neither tree_digest nor root_directory_digest is set',
    ],
    [
      'stdout digest too large',
      { ...base, stdoutDigest: { hash: 'a'.repeat(64), sizeBytes: 1n << 60n } },
      `action_result.stdout_digest: size ${1n << 60n} is too large`,
    ],
    [
      'stderr digest with an empty hash',
      { ...base, stderrDigest: { hash: '', sizeBytes: 0n } },
      'action_result.stderr_digest: hash is empty',
    ],
    [
      'absolute output file path',
      { ...base, outputFiles: [{ path: '/etc/passwd', digest: toProtoDigest(action) }] },
      'action_result.output_files[0].path: "/etc/passwd" is absolute, output paths are relative to the working directory',
    ],
    [
      'output file path with ..',
      { ...base, outputFiles: [{ path: 'bazel-out/../../x', digest: toProtoDigest(action) }] },
      'action_result.output_files[0].path: "bazel-out/../../x" contains a ".." segment',
    ],
    [
      'empty output file path',
      { ...base, outputFiles: [{ path: '', digest: toProtoDigest(action) }] },
      'action_result.output_files[0].path: path is empty',
    ],
    [
      'output directory path with ..',
      { ...base, outputDirectories: [{ path: '..', treeDigest: toProtoDigest(action) }] },
      'action_result.output_directories[0].path: ".." contains a ".." segment',
    ],
    [
      'absolute output symlink path',
      { ...base, outputSymlinks: [{ path: '/tmp/l', target: 'x' }] },
      'action_result.output_symlinks[0].path: "/tmp/l" is absolute, output paths are relative to the working directory',
    ],
  ];
  for (const [name, result, message] of cases) {
    const err = await failure(client.updateActionResult({ actionDigest: toProtoDigest(action), actionResult: result }));
    t.equal(err.code, Code.InvalidArgument, name);
    t.equal(err.rawMessage, message, name);
  }
  t.same(await acBackend.findMissing([action]), [action], 'nothing was stored');

  const noResult = await failure(client.updateActionResult({ actionDigest: toProtoDigest(action) }));
  t.equal(noResult.rawMessage, 'action_result: missing');
  const noDigest = await failure(client.updateActionResult({ actionResult: sampleResult() }));
  t.equal(noDigest.rawMessage, 'action_digest: missing');
  const badFn = await failure(
    client.updateActionResult({ actionDigest: toProtoDigest(action), actionResult: sampleResult(), digestFunction: DigestFunction_Value.MD5 }),
  );
  t.equal(badFn.rawMessage, 'digest_function MD5 is not supported, this server only uses SHA256');
  const badInstance = await failure(client.getActionResult({ instanceName: 'a//b', actionDigest: toProtoDigest(action) }));
  t.equal(badInstance.code, Code.InvalidArgument);
  t.equal(badInstance.rawMessage, 'instance_name "a//b" contains an empty segment ("//")');
  const badAction = await failure(client.getActionResult({ actionDigest: { hash: 'xyz', sizeBytes: 3n } }));
  t.equal(badAction.rawMessage, 'action_digest: hash "xyz" has length 3, SHA-256 needs 64 hex characters');
});

t.test('an output directory may have an empty path (the whole working directory)', async (t) => {
  const { client } = setup();
  const result = { outputDirectories: [{ path: '', rootDirectoryDigest: toProtoDigest(action) }] };
  await client.updateActionResult({ actionDigest: toProtoDigest(action), actionResult: result });
  t.equal((await client.getActionResult({ actionDigest: toProtoDigest(action) })).outputDirectories.length, 1);
});

t.test('a stored entry that does not parse is reported NOT_FOUND', async (t) => {
  const { client, acBackend } = setup();
  await acBackend.put(action, once(new Uint8Array([0xff, 0xff, 0xff])));
  const err = await failure(client.getActionResult({ actionDigest: toProtoDigest(action) }));
  t.equal(err.code, Code.NotFound);
  t.equal(err.rawMessage, `no usable action result for action ${digestString(action)}: stored entry does not parse`);
});

t.test('behind a completeness check, GetActionResult hides a result until its outputs are uploaded', async (t) => {
  const { client, cas } = setup({ completenessChecking: true });
  const output = enc.encode('compiled output');
  const result = { outputFiles: [{ path: 'out/o', digest: toProtoDigest(digestOf(output)) }] };
  await client.updateActionResult({ actionDigest: toProtoDigest(action), actionResult: result });
  const err = await failure(client.getActionResult({ actionDigest: toProtoDigest(action) }));
  t.equal(err.code, Code.NotFound);
  t.equal(
    err.rawMessage,
    `action result ${digestString(action)} references missing blob ${digestString(digestOf(output))} (output_files[0] "out/o")`,
  );
  await putBlob(cas, output);
  t.equal((await client.getActionResult({ actionDigest: toProtoDigest(action) })).outputFiles[0]!.path, 'out/o');
});

t.test('AC infrastructure errors keep their code', async (t) => {
  const down: BlobStore = {
    findMissing: async () => {
      throw new ConnectError('shard a: connection refused', Code.Unavailable);
    },
    get: async () => {
      throw new ConnectError('shard a: connection refused', Code.Unavailable);
    },
    put: async () => {
      throw new ConnectError('shard a: connection refused', Code.Unavailable);
    },
    describe: () => ({ kind: 'down' }),
    close: async () => {},
  };
  const service = createActionCacheService({
    cas: down,
    ac: down,
    logger: pino({ level: 'silent' }),
    maxBatchTotalSizeBytes: 1024,
    isReady: () => true,
  });
  const client = createClient(
    ActionCache,
    createRouterTransport((router) => {
      router.service(ActionCache, service);
    }),
  );
  const getErr = await failure(client.getActionResult({ actionDigest: toProtoDigest(action) }));
  t.equal(getErr.code, Code.Unavailable);
  t.equal(getErr.rawMessage, 'shard a: connection refused');
  const putErr = await failure(client.updateActionResult({ actionDigest: toProtoDigest(action), actionResult: {} }));
  t.equal(putErr.code, Code.Unavailable);
  t.equal(putErr.rawMessage, 'shard a: connection refused');
});

// --- instance isolation (issue 11) ------------------------------------------

/** exitCode of the result GetActionResult returns under `instanceName`, or 'not-found'. */
async function exitCodeUnder(client: Client<typeof ActionCache>, instanceName: string): Promise<number | string> {
  try {
    return (await client.getActionResult({ instanceName, actionDigest: toProtoDigest(action) })).exitCode;
  } catch (err) {
    const ce = ConnectError.from(err);
    if (ce.code === Code.NotFound) return 'not-found';
    throw err;
  }
}

async function updateUnder(client: Client<typeof ActionCache>, instanceName: string, exitCode: number): Promise<void> {
  await client.updateActionResult({ instanceName, actionDigest: toProtoDigest(action), actionResult: { exitCode } });
}

t.test('by default each instance name has its own action cache', async (t) => {
  const { client, acBackend } = setup();
  await updateUnder(client, 'a', 1);
  t.equal(await exitCodeUnder(client, 'a'), 1);
  t.equal(await exitCodeUnder(client, 'b'), 'not-found', 'an entry written under "a" is NOT_FOUND under "b"');
  t.equal(await exitCodeUnder(client, ''), 'not-found', 'and under no instance');
  t.equal(await exitCodeUnder(client, 'a/b'), 'not-found', 'a longer name is another instance, not a child');
  const miss = await failure(client.getActionResult({ instanceName: 'b', actionDigest: toProtoDigest(action) }));
  t.equal(miss.rawMessage, `no action result for action ${digestString(action)}`);

  await updateUnder(client, 'b', 2);
  await updateUnder(client, '', 3);
  t.same([await exitCodeUnder(client, 'a'), await exitCodeUnder(client, 'b'), await exitCodeUnder(client, '')], [1, 2, 3], 'no write overwrites another instance\'s');
  t.ok((await acBackend.findMissing([action], { namespace: 'a' })).length === 0, 'stored in namespace "a"');
  t.ok((await acBackend.findMissing([action])).length === 0, 'and "" holds the no-instance entry');
});

t.test('entries written before isolation (namespace "") stay readable under the empty instance name', async (t) => {
  const { client, acBackend } = setup();
  await acBackend.put(action, once(toBinary(ActionResultSchema, create(ActionResultSchema, { exitCode: 9 }))));
  t.equal(await exitCodeUnder(client, ''), 9);
  t.equal(await exitCodeUnder(client, 'main'), 'not-found');
});

t.test('aliases map several instance names to one namespace; others stay apart', async (t) => {
  const { client } = setup({
    instances: { isolateActionCache: true, aliases: new Map([['ci-linux', 'linux'], ['dev-linux', 'linux'], ['legacy', '']]) },
  });
  await updateUnder(client, 'ci-linux', 4);
  t.equal(await exitCodeUnder(client, 'dev-linux'), 4, 'an alias shares its namespace');
  t.equal(await exitCodeUnder(client, 'linux'), 4, 'the namespace is also an instance name of its own');
  t.equal(await exitCodeUnder(client, 'ci-mac'), 'not-found');
  t.equal(await exitCodeUnder(client, ''), 'not-found');
  await updateUnder(client, '', 5);
  t.equal(await exitCodeUnder(client, 'legacy'), 5, 'an alias to "" reads the default namespace (entries from before isolation)');
});

t.test('isolateActionCache: false shares one action cache among all instance names', async (t) => {
  const { client, acBackend } = setup({ instances: { isolateActionCache: false, aliases: new Map([['x', 'y']]) } });
  await updateUnder(client, 'a', 6);
  t.equal(await exitCodeUnder(client, 'b'), 6);
  t.equal(await exitCodeUnder(client, ''), 6);
  t.equal(await exitCodeUnder(client, 'x'), 6, 'aliases do not apply without isolation');
  t.ok((await acBackend.findMissing([action])).length === 0, 'stored in the default namespace');
});

t.test('completeness checking reads the result in the caller\'s namespace', async (t) => {
  const { client, cas } = setup({ completenessChecking: true });
  const out = enc.encode('checked output');
  const d = await putBlob(cas, out);
  await client.updateActionResult({
    instanceName: 'a',
    actionDigest: toProtoDigest(action),
    actionResult: { exitCode: 8, outputFiles: [{ path: 'out', digest: toProtoDigest(d) }] },
  });
  t.equal(await exitCodeUnder(client, 'a'), 8);
  t.equal(await exitCodeUnder(client, 'b'), 'not-found');
});
