// Instance isolation of the action cache (issue 11) with real processes, in
// the shape of the default config.json: an edge whose CAS tree is
// fallback { sharding over three storage nodes, secondary } and whose AC tree
// is the same under completenessChecking, every node a `node src/main.ts`
// child with its default instance config. An ActionResult written under one
// instance name must be NOT_FOUND under any other, through the edge, on the
// shard that holds it (where it must be stored under that instance name),
// on the secondary after replication, after a hinted handoff and after a
// journal replay. A second edge with isolateActionCache: false shows the
// shared mode; the first one maps two names to one namespace by alias.
// python3-grpcio (C-core) checks the isolation once more as a foreign client,
// if installed.
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { type Client, Code, ConnectError, createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import t from 'tap';
import type { Test } from 'tap';
import { ActionCache, ContentAddressableStorage } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../../src/digest.ts';
import { digestOf, toProtoDigest } from '../../src/digest.ts';
import { JOURNAL_FILE } from '../../src/stores/fallback-store.ts';
import { rank } from '../../src/stores/rendezvous.ts';
import { spawnNode } from '../helpers/spawn-node.ts';
import type { SpawnedNode } from '../helpers/spawn-node.ts';

const MiB = 1024 * 1024;
const SHARDS = ['shard-a', 'shard-b', 'shard-c'] as const;
const weighted = SHARDS.map((name) => ({ name, weight: 1 }));
const enc = new TextEncoder();

interface Clients {
  readonly ac: Client<typeof ActionCache>;
  readonly cas: Client<typeof ContentAddressableStorage>;
}

function clients(url: string): Clients {
  const transport = createGrpcTransport({ baseUrl: url });
  return { ac: createClient(ActionCache, transport), cas: createClient(ContentAddressableStorage, transport) };
}

/** A storage node as config.json's children are: disk CAS, plain disk AC, default instance config. */
const STORAGE_NODE = {
  logLevel: 'info', // spawnNode reads the port from an info line
  cas: { disk: { path: 'cas', maxSizeBytes: 1024 * MiB } },
  ac: { disk: { path: 'ac', maxSizeBytes: 64 * MiB } },
};

function edgeConfig(shardUrls: Map<string, string>, secondaryUrl: string, extra: Record<string, unknown>): Record<string, unknown> {
  const sharding = (tree: string) => ({
    sharding: {
      shards: Object.fromEntries(
        [...shardUrls].map(([name, url]) => [name, { weight: 1, backend: { remote: { url, timeoutMs: 5000, healthTimeoutMs: 500 } } }]),
      ),
      handoffDir: `handoff-${tree}`,
      healthCheckIntervalMs: 250,
      healthCheckTimeoutMs: 500,
    },
  });
  const fallback = (tree: string) => ({
    fallback: {
      primary: sharding(tree),
      secondary: { remote: { url: secondaryUrl, timeoutMs: 5000 } },
      journalDir: `journal-${tree}`,
      healthCheckIntervalMs: 200,
    },
  });
  return { logLevel: 'info', cas: fallback('cas'), ac: { completenessChecking: { backend: fallback('ac') } }, ...extra };
}

interface Rig {
  readonly shards: Map<string, SpawnedNode>;
  readonly secondary: SpawnedNode;
  /** Isolating edge, with aliases ci and dev -> shared. */
  readonly edge: SpawnedNode;
  /** isolateActionCache: false over the same nodes. */
  readonly sharedEdge: SpawnedNode;
  restartShard(name: string): Promise<void>;
}

async function startRig(t: Test): Promise<Rig> {
  const root = await mkdtemp(join(tmpdir(), 'reapi-isolation-e2e-'));
  const procs: { name: string; node: SpawnedNode }[] = [];
  t.teardown(async () => {
    for (const p of procs) {
      if (!t.passing()) console.error(`--- ${p.name} (pid ${p.node.pid}) log, last 25 lines ---\n${p.node.logs().slice(-25).join('\n')}`);
      await p.node.stop();
    }
    await rm(root, { recursive: true, force: true });
  });
  const spawn = async (name: string, config: Record<string, unknown>, port?: number) => {
    const dir = join(root, name);
    await mkdir(dir, { recursive: true });
    const node = await spawnNode({ dir, config, ...(port === undefined ? {} : { port }) });
    procs.push({ name, node });
    return node;
  };
  const [secondary, ...shardNodes] = await Promise.all([spawn('secondary', STORAGE_NODE), ...SHARDS.map((s) => spawn(s, STORAGE_NODE))]);
  const shards = new Map(SHARDS.map((s, i) => [s as string, shardNodes[i]!]));
  const urls = new Map([...shards].map(([n, node]) => [n, node.url]));
  const [edge, sharedEdge] = await Promise.all([
    spawn('edge', edgeConfig(urls, secondary!.url, { instances: { aliases: { ci: 'shared', dev: 'shared' } } })),
    spawn('shared-edge', edgeConfig(urls, secondary!.url, { instances: { isolateActionCache: false } })),
  ]);
  return {
    shards,
    secondary: secondary!,
    edge: edge!,
    sharedEdge: sharedEdge!,
    async restartShard(name) {
      const old = shards.get(name)!;
      if (old.exitInfo() === undefined) await old.kill('SIGKILL');
      shards.set(name, await spawn(name, STORAGE_NODE, old.port));
    },
  };
}

let counter = 0;

/** A fresh action digest whose top-ranked shard is `owner` (any when absent). */
function action(owner?: string): Digest {
  for (;;) {
    const d = digestOf(enc.encode(`isolation action ${process.pid} ${counter++}`));
    if (owner === undefined || rank(d.hash, weighted)[0] === owner) return d;
  }
}

/** Uploads a fresh output blob through `c` and returns its digest. */
async function upload(c: Clients, label: string): Promise<Digest> {
  const data = enc.encode(`isolation output ${label} ${process.pid} ${counter++}`);
  const d = digestOf(data);
  const res = await c.cas.batchUpdateBlobs({ requests: [{ digest: toProtoDigest(d), data }] }, { timeoutMs: 15_000 });
  if (res.responses[0]?.status?.code !== 0) throw new Error(`upload failed: ${JSON.stringify(res.responses[0]?.status)}`);
  return d;
}

async function update(c: Clients, instanceName: string, act: Digest, output: Digest, exitCode: number): Promise<void> {
  await c.ac.updateActionResult(
    {
      instanceName,
      actionDigest: toProtoDigest(act),
      actionResult: { exitCode, outputFiles: [{ path: 'out/file', digest: toProtoDigest(output) }] },
    },
    { timeoutMs: 15_000 },
  );
}

/** The stored result's exit code under `instanceName`, 'NOT_FOUND', or another code. */
async function lookup(c: Clients, instanceName: string, act: Digest): Promise<number | string> {
  try {
    return (await c.ac.getActionResult({ instanceName, actionDigest: toProtoDigest(act) }, { timeoutMs: 15_000 })).exitCode;
  } catch (err) {
    const ce = ConnectError.from(err);
    return ce.code === Code.NotFound ? 'NOT_FOUND' : `${Code[ce.code]}: ${ce.rawMessage}`;
  }
}

async function lookups(c: Clients, act: Digest, names: readonly string[]): Promise<Record<string, number | string>> {
  const out: Record<string, number | string> = {};
  for (const n of names) out[n] = await lookup(c, n, act);
  return out;
}

async function waitFor(what: string, timeoutMs: number, cond: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}

/** Waits until the edge logged that `shard`'s AC breaker left the closed state. */
async function waitForOpen(edge: SpawnedNode, shard: string, since: number): Promise<void> {
  await waitFor(`the edge to open ${shard}`, 10_000, async () =>
    edge.logs().some((line) => {
      if (!line.includes(`"shard":"${shard}"`) || !line.includes('"to":"open"')) return false;
      const r = JSON.parse(line) as { time: number; tree?: string };
      return r.time >= since && r.tree === 'ac';
    }),
  );
}

t.test('action cache isolation through an edge over three shards and a fallback secondary', async (t) => {
  const rig = await startRig(t);
  const edge = clients(rig.edge.url);
  const direct = (name: string) => clients(rig.shards.get(name)!.url);
  const secondary = clients(rig.secondary.url);

  await t.test('written under "a": NOT_FOUND under "b" and "" at the edge; stored under "a" on its shard and the secondary', async (t) => {
    const act = action();
    const owner = rank(act.hash, weighted)[0]!;
    const output = await upload(edge, 'plain');
    await update(edge, 'a', act, output, 11);
    t.same(await lookups(edge, act, ['a', 'b', '', 'a/b']), { a: 11, b: 'NOT_FOUND', '': 'NOT_FOUND', 'a/b': 'NOT_FOUND' });
    t.same(await lookups(direct(owner), act, ['a', 'b', '']), { a: 11, b: 'NOT_FOUND', '': 'NOT_FOUND' }, `the owner ${owner} stores it under instance "a"`);
    for (const other of SHARDS.filter((s) => s !== owner)) {
      t.equal(await lookup(direct(other), 'a', act), 'NOT_FOUND', `${other} does not hold it`);
    }
    await waitFor('replication to the secondary', 10_000, async () => (await lookup(secondary, 'a', act)) === 11);
    t.same(await lookups(secondary, act, ['a', 'b', '']), { a: 11, b: 'NOT_FOUND', '': 'NOT_FOUND' }, 'replicated under instance "a"');

    // Writes under other names never overwrite it.
    await update(edge, 'b', act, output, 12);
    await update(edge, '', act, output, 13);
    t.same(await lookups(edge, act, ['a', 'b', '']), { a: 11, b: 12, '': 13 });
    t.same(await lookups(direct(owner), act, ['a', 'b', '']), { a: 11, b: 12, '': 13 });

    // The CAS is shared: the output is present whatever instance asks.
    const res = await edge.cas.findMissingBlobs({ instanceName: 'b', blobDigests: [toProtoDigest(output)] });
    t.same(res.missingBlobDigests, [], 'CAS blobs are shared across instances');
  });

  await t.test('aliases share a namespace, which is the instance name the shards see', async (t) => {
    const act = action();
    const owner = rank(act.hash, weighted)[0]!;
    const output = await upload(edge, 'alias');
    await update(edge, 'ci', act, output, 21);
    t.same(await lookups(edge, act, ['ci', 'dev', 'shared', 'other', '']), { ci: 21, dev: 21, shared: 21, other: 'NOT_FOUND', '': 'NOT_FOUND' });
    t.same(await lookups(direct(owner), act, ['shared', 'ci', 'dev']), { shared: 21, ci: 'NOT_FOUND', dev: 'NOT_FOUND' });
  });

  await t.test('isolateActionCache: false shares one action cache, stored in the shards\' default namespace', async (t) => {
    const shared = clients(rig.sharedEdge.url);
    const act = action();
    const owner = rank(act.hash, weighted)[0]!;
    const output = await upload(shared, 'shared');
    await update(shared, 'a', act, output, 31);
    t.same(await lookups(shared, act, ['a', 'b', '']), { a: 31, b: 31, '': 31 });
    t.same(await lookups(direct(owner), act, ['', 'a']), { '': 31, a: 'NOT_FOUND' });
    t.same(await lookups(edge, act, ['', 'a']), { '': 31, a: 'NOT_FOUND' }, 'the isolating edge sees it under "" only');
  });

  await t.test('hinted handoff: written under "a" while its shard is down, it lands under "a" on that shard', async (t) => {
    const victim = 'shard-b';
    const act = action(victim);
    const since = Date.now();
    await rig.shards.get(victim)!.kill('SIGKILL');
    await waitForOpen(rig.edge, victim, since);
    const output = await upload(edge, 'handoff');
    await update(edge, 'a', act, output, 41);
    t.same(await lookups(edge, act, ['a', 'b', '']), { a: 41, b: 'NOT_FOUND', '': 'NOT_FOUND' }, 'served from the stand-in');
    const standIn = rank(act.hash, weighted)[1]!;
    t.same(await lookups(direct(standIn), act, ['a', '']), { a: 41, '': 'NOT_FOUND' }, `stand-in ${standIn} holds it under "a"`);
    const hints = await readFile(join(rig.edge.dir, 'handoff-ac', 'hints.jsonl'), 'utf8');
    t.match(hints, new RegExp(`"hash":"${act.hash}".*"ns":"a"`), 'the hint records the namespace');

    await rig.restartShard(victim);
    await waitFor('the handoff to the restarted shard', 30_000, async () => (await lookup(direct(victim), 'a', act)) === 41);
    t.same(await lookups(direct(victim), act, ['a', 'b', '']), { a: 41, b: 'NOT_FOUND', '': 'NOT_FOUND' }, 'handed off under "a"');
    t.same(await lookups(edge, act, ['a', 'b', '']), { a: 41, b: 'NOT_FOUND', '': 'NOT_FOUND' });
  });

  await t.test('journal replay: written under "a" while every shard is down, it is replayed under "a"', async (t) => {
    const act = action();
    const owner = rank(act.hash, weighted)[0]!;
    await Promise.all(SHARDS.map((s) => rig.shards.get(s)!.kill('SIGKILL')));
    const output = await upload(edge, 'journal');
    await update(edge, 'a', act, output, 51);
    t.same(await lookups(secondary, act, ['a', '']), { a: 51, '': 'NOT_FOUND' }, 'the secondary took it under "a"');
    const journal = await readFile(join(rig.edge.dir, 'journal-ac', JOURNAL_FILE), 'utf8');
    const record = journal.split('\n').filter((l) => l.includes(act.hash)).map((l) => JSON.parse(l) as { v: { ns?: string } })[0];
    t.equal(record?.v.ns, 'a', 'the journal records the namespace');
    t.same(await lookups(edge, act, ['a', 'b', '']), { a: 51, b: 'NOT_FOUND', '': 'NOT_FOUND' }, 'served from the secondary');

    for (const s of SHARDS) await rig.restartShard(s);
    await waitFor('the journal replay to the owner', 45_000, async () => (await lookup(direct(owner), 'a', act)) === 51);
    t.same(await lookups(direct(owner), act, ['a', 'b', '']), { a: 51, b: 'NOT_FOUND', '': 'NOT_FOUND' }, `replayed under "a" on ${owner}`);
  });

  await t.test('python3-grpcio: GetActionResult under another instance name is NOT_FOUND', async (t) => {
    const skip = grpcioMissing();
    if (skip !== undefined) {
      if (process.env.CI === 'true') t.fail(`${skip}, but CI=true requires this test`);
      else t.plan(0, skip);
      return;
    }
    await grpcioCheck(t, rig.edge.port, await upload(edge, 'grpcio'));
  });
});

// --- python3-grpcio ----------------------------------------------------------

const here = dirname(fileURLToPath(import.meta.url));
const grpcioMissing = pythonGrpcMissing;

// Writes under "tenant-a", reads under "tenant-a", "tenant-b" and "": prints one JSON object.
const GRPCIO_SCRIPT = `
import json, sys
sys.path.insert(0, sys.argv[2])
import grpc
from build.bazel.remote.execution.v2 import remote_execution_pb2 as re
from build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
ac = re_grpc.ActionCacheStub(grpc.insecure_channel(sys.argv[1]))
action = re.Digest(hash=sys.argv[3], size_bytes=int(sys.argv[4]))
output = re.Digest(hash=sys.argv[5], size_bytes=int(sys.argv[6]))
result = re.ActionResult(exit_code=61, output_files=[re.OutputFile(path="out/file", digest=output)])
ac.UpdateActionResult(re.UpdateActionResultRequest(instance_name="tenant-a", action_digest=action, action_result=result), timeout=30)
out = {}
for name in ["tenant-a", "tenant-b", ""]:
    try:
        out[name] = ac.GetActionResult(re.GetActionResultRequest(instance_name=name, action_digest=action), timeout=30).exit_code
    except grpc.RpcError as e:
        out[name] = e.code().name
print(json.dumps(out))
`;
import { python, pythonGrpcMissing } from '../helpers/python-grpc.ts';

async function grpcioCheck(t: Test, port: number, output: Digest): Promise<void> {
  const run = promisify(execFile);
  const stubs = await mkdtemp(join(tmpdir(), 'reapi-grpcio-stubs-'));
  t.teardown(() => rm(stubs, { recursive: true, force: true }));
  await run('bash', [join(here, 'gen-grpcio-stubs.sh'), stubs]);
  const script = join(stubs, 'isolation.py');
  await writeFile(script, GRPCIO_SCRIPT);
  const act = action();
  const { stdout } = await run(python, [script, `127.0.0.1:${port}`, stubs, act.hash, String(act.size), output.hash, String(output.size)], { timeout: 60_000 });
  t.same(JSON.parse(stdout), { 'tenant-a': 61, 'tenant-b': 'NOT_FOUND', '': 'NOT_FOUND' });
}
