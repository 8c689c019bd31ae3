// End to end with a real client: Bazel 4.2.3 builds test/e2e/bazel-workspace
// against a storage node running as a child process.
//   1. cold build: every cacheable action runs locally and is uploaded;
//   2. clean --expunge, warm build: every cacheable action is a remote cache
//      hit and all outputs are byte-identical to the cold build's;
//   3. clean --expunge, --remote_download_minimal build succeeds from the cache
//      alone (Builds without the Bytes trusts what the cache vouched for).
import { create } from '@bufbuild/protobuf';
import { createClient } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { cp, lstat, mkdir, mkdtemp, readdir, realpath, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import type { Test } from 'tap';
import {
  ContentAddressableStorage,
  DigestSchema,
} from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { spawnNode } from '../helpers/spawn-node.ts';
import type { SpawnedNode } from '../helpers/spawn-node.ts';

const here = dirname(fileURLToPath(import.meta.url));
const workspaceSource = join(here, 'bazel-workspace');
const instanceName = 'ci/main';
const bazelTimeoutMs = 300_000;
const targets = ['//...'];

const bazelPath = spawnSync('/bin/sh', ['-c', 'command -v bazel'], { encoding: 'utf8' }).stdout?.trim() ?? '';
if (!bazelPath) {
  if (process.env.CI === 'true') {
    t.fail('bazel is not installed, but CI=true requires this test (apt-get install bazel-bootstrap)');
  } else {
    t.plan(0, 'bazel is not installed (apt-get install bazel-bootstrap bazel-bootstrap-source)');
  }
} else {
  // A subtest, not the root: tap ends a root test that has a teardown once it
  // looks idle, which a long await (a Bazel build) would trigger.
  t.test('Bazel 4.2.3 against a storage node: cold, warm, --remote_download_minimal', main);
}

async function main(t: Test): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), 'reapi-bazel-e2e-'));
  const workspace = join(root, 'ws');
  const outputUserRoot = join(root, 'bazel-root');
  const nodeDir = join(root, 'node');
  await cp(workspaceSource, workspace, {
    recursive: true,
    // a developer may have run bazel in the source dir: skip its symlinks
    filter: (src) => !basename(src).startsWith('bazel-') || src === workspaceSource,
  });
  let node: SpawnedNode | undefined;
  // One teardown, so the order is explicit: Bazel's server (even after a build
  // failed half way; a no-op if none runs), then the node, then the files.
  t.teardown(async () => {
    spawnSync(bazelPath, [`--output_user_root=${outputUserRoot}`, 'shutdown'], { cwd: workspace, stdio: 'ignore' });
    if (node && !t.passing()) {
      console.error(`--- storage node log (last 60 lines) ---\n${node.logs().slice(-60).join('\n')}`);
    }
    await node?.stop();
    // Bazel makes parts of its output root read-only; make them writable first.
    spawnSync('chmod', ['-R', 'u+w', root]);
    await rm(root, { recursive: true, force: true });
  });
  await mkdir(nodeDir);
  node = await spawnNode({ dir: nodeDir });
  t.comment(`storage node pid ${node.pid} on ${node.url}, bazel ${bazelPath}`);

  const remoteFlags = [
    `--remote_cache=${node.grpcUrl}`,
    `--remote_instance_name=${instanceName}`,
    '--disk_cache=',
    '--remote_timeout=60',
  ];
  const bazel = (args: string[]) => runBazel(bazelPath, outputUserRoot, workspace, args);

  // 1. Cold build: an empty cache, so everything runs locally and is uploaded.
  const cold = await bazel(['test', ...remoteFlags, ...targets]);
  t.comment(`cold build ${cold.ms} ms: ${cold.summaryLine}`);
  if (!assertSucceeded(t, 'cold build', cold)) return;
  t.equal(cold.processes.remoteCacheHit, 0, 'cold build: no remote cache hits on an empty cache');
  t.ok(cold.processes.executed > 0, `cold build: ${cold.processes.executed} processes executed locally`);

  const bin = join(workspace, 'bazel-bin');
  const coldOutputs = await hashOutputs(bin);
  const sizes = [...coldOutputs.values()].map((o) => o.size);
  t.ok(coldOutputs.size >= 10, `cold build produced ${coldOutputs.size} output files`);
  t.ok(sizes.includes(24 * 1024 * 1024), 'the 24 MiB output exists');
  t.ok(sizes.includes(10), 'the 10 byte output exists');
  t.ok(
    [...coldOutputs.keys()].some((p) => p.startsWith('tree/tree/sub/deeper/')),
    'the tree artifact has its nested directory',
  );

  // The uploads reached the node: FindMissing over gRPC, and bytes on disk.
  const cas = createClient(ContentAddressableStorage, createGrpcTransport({ baseUrl: node.url }));
  // .params files are written by Bazel itself, not by a spawn, so never uploaded.
  const uploaded = [...coldOutputs.values()].filter((o) => !o.path.endsWith('.params'));
  const missing = await cas.findMissingBlobs({
    instanceName,
    blobDigests: uploaded.map((o) => create(DigestSchema, { hash: o.sha256, sizeBytes: BigInt(o.size) })),
  });
  t.same(
    missing.missingBlobDigests.map((d) => `${d.hash}/${d.sizeBytes}`),
    [],
    `FindMissingBlobs: all ${uploaded.length} output blobs are in the node`,
  );
  const stored = await diskUsage(nodeDir);
  t.ok(
    stored >= 29 * 1024 * 1024,
    `node data dir holds ${(stored / 1048576).toFixed(1)} MiB (>= the 24 MiB + 5 MiB outputs)`,
  );

  // 2. Warm build from the cache only.
  const cleaned = await bazel(['clean', '--expunge']);
  t.equal(cleaned.code, 0, 'bazel clean --expunge');
  const warm = await bazel(['test', ...remoteFlags, ...targets]);
  t.comment(`warm build ${warm.ms} ms: ${warm.summaryLine}`);
  if (!assertSucceeded(t, 'warm build', warm)) return;
  t.equal(warm.processes.executed, 0, 'warm build: no cacheable process executed locally', {
    breakdown: warm.processes.byStrategy,
  });
  t.equal(
    warm.processes.remoteCacheHit,
    cold.processes.executed,
    `warm build: every process the cold build executed (${cold.processes.executed}) is a remote cache hit`,
  );
  t.equal(warm.processes.total, cold.processes.total, 'warm build: same number of processes as the cold build');
  const warmOutputs = await hashOutputs(bin);
  t.same([...warmOutputs.keys()].sort(), [...coldOutputs.keys()].sort(), 'warm build: the same output files');
  const differing = [...coldOutputs.values()]
    .filter((o) => warmOutputs.get(o.path)?.sha256 !== o.sha256)
    .map((o) => o.path);
  t.same(differing, [], `warm build: all ${coldOutputs.size} outputs byte-identical (sha256)`);
  const executable = [...coldOutputs.values()].filter((o) => o.executable).map((o) => o.path);
  t.same(
    [...warmOutputs.values()].filter((o) => o.executable).map((o) => o.path),
    executable,
    'warm build: executable bits preserved',
  );

  // 3. Builds without the Bytes: nothing is downloaded, so the build only
  // succeeds if every blob behind every AC hit is really there.
  await bazel(['clean', '--expunge']);
  const minimal = await bazel(['test', ...remoteFlags, '--remote_download_minimal', ...targets]);
  t.comment(`--remote_download_minimal build ${minimal.ms} ms: ${minimal.summaryLine}`);
  if (!assertSucceeded(t, '--remote_download_minimal build', minimal)) return;
  t.equal(minimal.processes.executed, 0, '--remote_download_minimal: no process executed locally', {
    breakdown: minimal.processes.byStrategy,
  });
  t.equal(
    minimal.processes.remoteCacheHit,
    cold.processes.executed,
    '--remote_download_minimal: every cacheable process is a remote cache hit',
  );

  const fetched = await hashOutputs(bin);
  t.notOk(
    fetched.has('blobs/blob_24mib.bin'),
    '--remote_download_minimal: the 24 MiB output stayed in the cache (not downloaded)',
  );

  const warnings = node.logs().filter((line) => /"level":40/.test(line));
  if (warnings.length > 0) t.comment(`storage node warnings: ${warnings.length}, first: ${warnings[0]}`);
  const problems = node.logs().filter((line) => /"level":(50|60)/.test(line));
  t.same(problems, [], 'the storage node logged no errors during the builds');

  await bazel(['clean', '--expunge']);
  const shutdown = await bazel(['shutdown']);
  t.equal(shutdown.code, 0, 'bazel shutdown');
  t.comment(`timings: cold ${cold.ms} ms, warm ${warm.ms} ms, minimal ${minimal.ms} ms`);
}

interface ProcessSummary {
  total: number;
  internal: number;
  remoteCacheHit: number;
  /** Processes that ran on this machine (any sandbox, local or worker strategy). */
  executed: number;
  byStrategy: Record<string, number>;
}

interface BazelRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  ms: number;
  output: string;
  summaryLine: string;
  processes: ProcessSummary;
}

async function runBazel(bazelPath: string, outputUserRoot: string, cwd: string, args: string[]): Promise<BazelRun> {
  const started = Date.now();
  const child = spawn(
    bazelPath,
    [`--output_user_root=${outputUserRoot}`, '--nohome_rc', '--max_idle_secs=120', ...args],
    { cwd, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (output += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (output += s));
  const timer = setTimeout(() => child.kill('SIGKILL'), bazelTimeoutMs);
  const [code, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((res) =>
    child.on('close', (c, s) => res([c, s])),
  );
  clearTimeout(timer);
  const summaryLine = /^INFO: \d+ process(?:es)?\b.*$/m.exec(output)?.[0] ?? '(no process summary line)';
  return { code, signal, ms: Date.now() - started, output, summaryLine, processes: parseSummary(summaryLine) };
}

/**
 * Parses Bazel's "INFO: 34 processes: 15 internal, 19 remote cache hit." line.
 * Everything that is neither "internal" (not a spawn) nor a remote cache hit
 * ran here: linux-sandbox, processwrapper-sandbox, local, worker, ...
 */
function parseSummary(line: string): ProcessSummary {
  const m = /^INFO: (\d+) process(?:es)?(?:: (.*?))?\.?$/.exec(line);
  const byStrategy: Record<string, number> = {};
  if (!m) return { total: -1, internal: -1, remoteCacheHit: -1, executed: -1, byStrategy };
  for (const part of (m[2] ?? '').split(',')) {
    const pm = /^\s*(\d+) (.+?)\s*$/.exec(part);
    if (pm) byStrategy[pm[2]!] = Number(pm[1]);
  }
  const total = Number(m[1]);
  const internal = byStrategy.internal ?? 0;
  const remoteCacheHit = byStrategy['remote cache hit'] ?? 0;
  return { total, internal, remoteCacheHit, executed: total - internal - remoteCacheHit, byStrategy };
}

function assertSucceeded(tap: Test, what: string, run: BazelRun): boolean {
  const ok = run.code === 0 && run.processes.total >= 0;
  tap.ok(ok, `${what} exits 0 with a process summary`, {
    code: run.code,
    signal: run.signal,
    summary: run.summaryLine,
    output: ok ? undefined : run.output.split('\n').slice(-60).join('\n'),
  });
  return ok;
}

interface OutputFile {
  path: string;
  size: number;
  sha256: string;
  executable: boolean;
}

/**
 * sha256 of every regular file under bazel-bin, keyed by its path there.
 * Runfiles trees and symlinks are skipped: they are local links, not outputs.
 */
async function hashOutputs(bazelBin: string): Promise<Map<string, OutputFile>> {
  const rootDir = await realpath(bazelBin);
  const outputs = new Map<string, OutputFile>();
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const full = join(dir, entry.name);
      if (entry.isDirectory()) {
        if (!entry.name.endsWith('.runfiles')) await walk(full);
      } else if (entry.isFile() && !entry.name.endsWith('.runfiles_manifest')) {
        const st = await stat(full);
        const path = relative(rootDir, full);
        outputs.set(path, { path, size: st.size, sha256: await sha256File(full), executable: (st.mode & 0o100) !== 0 });
      }
    }
  };
  await walk(rootDir);
  return outputs;
}

async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await lstat(join(entry.parentPath, entry.name))).size;
  }
  return total;
}
