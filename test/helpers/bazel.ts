// Shared pieces of the end-to-end tests that drive a real Bazel 4.2.3
// (test/e2e/bazel.test.ts against one storage node, test/e2e/edge-bazel.test.ts
// through an edge over shards): finding Bazel, preparing a private copy of
// test/e2e/bazel-workspace, running Bazel and reading its process summary,
// and hashing the outputs.
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, cp, lstat, mkdir, mkdtemp, readdir, realpath, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const workspaceSource = join(repoRoot, 'test', 'e2e', 'bazel-workspace');
export const bazelTimeoutMs = 300_000;

/** The bazel on PATH, or '' if there is none. */
export const bazelPath = spawnSync('/bin/sh', ['-c', 'command -v bazel'], { encoding: 'utf8' }).stdout?.trim() ?? '';

/**
 * Registers the Bazel test `fn` as a subtest of `t`, or skips (fails under
 * CI=true) when bazel is not installed. A subtest, not the root: tap ends a
 * root test that has a teardown once it looks idle, which a long await (a
 * Bazel build) would trigger.
 */
export function bazelTest(t: Test, name: string, fn: (t: Test) => Promise<void>): void {
  if (!bazelPath) {
    if (process.env.CI === 'true') {
      t.fail('bazel is not installed, but CI=true requires this test (apt-get install bazel-bootstrap)');
    } else {
      t.plan(0, 'bazel is not installed (apt-get install bazel-bootstrap bazel-bootstrap-source)');
    }
  } else {
    t.test(name, fn);
  }
}

export interface BazelWorkspace {
  /** Temp dir holding everything below; removed by remove(). */
  readonly root: string;
  readonly workspace: string;
  readonly outputUserRoot: string;
  /** Runs `bazel <args>` in the workspace with its own output root. */
  bazel(args: string[]): Promise<BazelRun>;
  /** Shuts Bazel's server down; a no-op if none runs. */
  shutdown(): void;
  /** Removes the temp dir (Bazel's read-only parts included). */
  remove(): Promise<void>;
}

/**
 * Copies test/e2e/bazel-workspace into a fresh temp dir with its own Bazel
 * output root. `startupArgs` go before the command (e.g. --host_jvm_args).
 */
export async function prepareWorkspace(prefix: string, startupArgs: readonly string[] = []): Promise<BazelWorkspace> {
  const root = await mkdtemp(join(tmpdir(), prefix));
  const workspace = join(root, 'ws');
  const outputUserRoot = join(root, 'bazel-root');
  await cp(workspaceSource, workspace, {
    recursive: true,
    // a developer may have run bazel in the source dir: skip its symlinks
    filter: (src) => !basename(src).startsWith('bazel-') || src === workspaceSource,
  });
  return {
    root,
    workspace,
    outputUserRoot,
    bazel: (args) => runBazel(bazelPath, outputUserRoot, workspace, args, startupArgs),
    shutdown() {
      spawnSync(bazelPath, [`--output_user_root=${outputUserRoot}`, 'shutdown'], { cwd: workspace, stdio: 'ignore' });
    },
    async remove() {
      // Bazel makes parts of its output root read-only; make them writable first.
      spawnSync('chmod', ['-R', 'u+w', root]);
      await rm(root, { recursive: true, force: true });
    },
  };
}

export interface ProcessSummary {
  total: number;
  internal: number;
  remoteCacheHit: number;
  /** Processes that ran on this machine (any sandbox, local or worker strategy). */
  executed: number;
  byStrategy: Record<string, number>;
}

export interface BazelRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  ms: number;
  output: string;
  summaryLine: string;
  processes: ProcessSummary;
}

export async function runBazel(
  bazelPath: string,
  outputUserRoot: string,
  cwd: string,
  args: string[],
  startupArgs: readonly string[] = [],
): Promise<BazelRun> {
  const started = Date.now();
  const child = spawn(
    bazelPath,
    [`--output_user_root=${outputUserRoot}`, '--nohome_rc', '--max_idle_secs=120', ...startupArgs, ...args],
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
export function parseSummary(line: string): ProcessSummary {
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

export function assertSucceeded(tap: Test, what: string, run: BazelRun): boolean {
  const ok = run.code === 0 && run.processes.total >= 0;
  tap.ok(ok, `${what} exits 0 with a process summary`, {
    code: run.code,
    signal: run.signal,
    summary: run.summaryLine,
    output: ok ? undefined : run.output.split('\n').slice(-60).join('\n'),
  });
  return ok;
}

export interface OutputFile {
  path: string;
  size: number;
  sha256: string;
  executable: boolean;
}

/**
 * sha256 of every regular file under bazel-bin, keyed by its path there.
 * Runfiles trees and symlinks are skipped: they are local links, not outputs.
 */
export async function hashOutputs(bazelBin: string): Promise<Map<string, OutputFile>> {
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

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) total += (await lstat(join(entry.parentPath, entry.name))).size;
  }
  return total;
}

/**
 * Startup flags that let Debian's Bazel 4.2.3 speak gRPC over TLS, or
 * undefined (with the reason) when they cannot be made.
 *
 * Debian builds Bazel against its own netty, whose JDK TLS provider has ALPN
 * taken out ("Failed to init TLS infrastructure: JDK provider does not support
 * ALPN protocol", exit 37), so a grpcs:// remote cache needs netty's OpenSSL
 * provider: the JNI library of libnetty-tcnative-jni. Netty looks for it as
 * libnetty_tcnative.so and the library checks its own file name, while Debian
 * installs it as libnetty-tcnative.so: a copy (not a symlink) under the
 * expected name in `dir`, on java.library.path, does it.
 */
export async function bazelTlsStartupArgs(dir: string): Promise<{ args: string[] } | { missing: string }> {
  const installed = '/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so';
  try {
    await stat(installed);
  } catch {
    return { missing: `${installed} is missing (apt-get install libnetty-tcnative-jni)` };
  }
  const jni = join(dir, 'jni');
  await mkdir(jni, { recursive: true });
  await copyFile(installed, join(jni, 'libnetty_tcnative.so'));
  return { args: [`--host_jvm_args=-Djava.library.path=${jni}`] };
}
