// Starts the storage node as a real child process (`node src/main.ts <config>`)
// for end-to-end tests that need a separate process: real clients (Bazel,
// Python grpcio), crash and restart tests. In-process tests should use
// test/helpers/node.ts instead, which is faster.
//
// The node listens on port 0 and the port is read back from its pino log, so
// parallel test files never race for a port. Every child is also killed when
// the test process exits, so a failed test leaves no process behind.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { V8_FLAGS } from '../../src/runtime-flags.ts';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const mainPath = join(repoRoot, 'src', 'main.ts');
const setpriv = '/usr/bin/setpriv';

export interface SpawnNodeOptions {
  /**
   * Directory for config.json and the stores' data (relative store paths in
   * the config resolve against it). Created in the OS temp dir and removed by
   * stop() when omitted; a given dir is kept, so a node can be restarted on it.
   */
  readonly dir?: string;
  /** Port to listen on; 0 (the default) lets the kernel pick a free one. */
  readonly port?: number;
  /** Replaces the default config's store trees and log level (shallow merge). */
  readonly config?: Record<string, unknown>;
  /** Extra environment for the child. */
  readonly env?: Record<string, string>;
  /** How long to wait for the node to accept connections. Default 30 s. */
  readonly startTimeoutMs?: number;
}

export interface SpawnedNode {
  readonly port: number;
  /** http://127.0.0.1:PORT (gRPC over h2c and Connect JSON on one port). */
  readonly url: string;
  /** grpc://127.0.0.1:PORT, the form Bazel's --remote_cache takes. */
  readonly grpcUrl: string;
  /** The directory holding config.json and the store data. */
  readonly dir: string;
  readonly configPath: string;
  readonly pid: number;
  /** Everything the child wrote so far (stdout and stderr lines, in order). */
  logs(): string[];
  /** How the process ended, or undefined while it runs. */
  exitInfo(): ExitInfo | undefined;
  /** Sends a signal and resolves when the process has exited. */
  kill(signal?: NodeJS.Signals): Promise<ExitInfo>;
  /** Graceful stop: SIGTERM, SIGKILL after 10 s; removes a temp dir we made. Idempotent. */
  stop(): Promise<ExitInfo>;
}

export interface ExitInfo {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

/** A storage node config: disk CAS, completeness-checked disk AC, both under `dir`. */
export function defaultNodeConfig(port: number): Record<string, unknown> {
  return {
    logLevel: 'info',
    listen: `127.0.0.1:${port}`,
    cas: { disk: { path: 'cas', maxSizeBytes: 2 * 1024 * 1024 * 1024 } },
    ac: {
      completenessChecking: {
        backend: { disk: { path: 'ac', maxSizeBytes: 256 * 1024 * 1024 } },
      },
    },
  };
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Last resort if a test forgot stop() or crashed: never leave a node running.
  process.on('exit', () => {
    for (const child of live) child.kill('SIGKILL');
  });
}

/** Starts `node src/main.ts <dir>/config.json` and waits until it accepts connections. */
export async function spawnNode(options: SpawnNodeOptions = {}): Promise<SpawnedNode> {
  const ownDir = options.dir === undefined;
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), 'reapi-node-')));
  const config = { ...defaultNodeConfig(options.port ?? 0), ...options.config };
  const configPath = join(dir, 'config.json');
  await writeFile(configPath, `${JSON.stringify(config, null, 2)}\n`);

  installExitHook();
  // setpriv (util-linux) makes the kernel kill the node if this test process
  // dies without running exit hooks (e.g. tap's timeout kill).
  const argv = [process.execPath, ...V8_FLAGS, mainPath, configPath];
  const [cmd, ...args] = existsSync(setpriv) ? [setpriv, '--pdeathsig', 'SIGKILL', '--', ...argv] : argv;
  const child = spawn(cmd, args, {
    cwd: repoRoot,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  const exited = new Promise<ExitInfo>((res) => {
    child.once('exit', (code, signal) => {
      live.delete(child);
      res({ code, signal });
    });
  });
  let exitInfo: ExitInfo | undefined;
  void exited.then((info) => {
    exitInfo = info;
  });

  const lines: string[] = [];
  let onPort: ((port: number) => void) | undefined;
  const portFromLog = new Promise<number>((res) => {
    onPort = res;
  });
  for (const stream of [child.stdout, child.stderr]) {
    createInterface({ input: stream }).on('line', (line) => {
      lines.push(line);
      if (lines.length > 5000) lines.splice(0, lines.length - 5000);
      const port = listeningPort(line);
      if (port !== undefined) onPort?.(port);
    });
  }

  const describe = () =>
    `node ${mainPath} ${configPath} (pid ${child.pid})` +
    `${exitInfo ? ` exited with code ${exitInfo.code} signal ${exitInfo.signal}` : ''}\n` +
    `--- last output ---\n${lines.slice(-40).join('\n')}`;

  const kill = async (signal: NodeJS.Signals = 'SIGKILL'): Promise<ExitInfo> => {
    if (exitInfo === undefined) child.kill(signal);
    return exited;
  };
  let stopping: Promise<ExitInfo> | undefined;
  const stop = (): Promise<ExitInfo> => {
    stopping ??= (async () => {
      if (exitInfo === undefined) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        try {
          await exited;
        } finally {
          clearTimeout(timer);
        }
      }
      if (ownDir) await rm(dir, { recursive: true, force: true });
      return exited;
    })();
    return stopping;
  };

  const timeoutMs = options.startTimeoutMs ?? 30_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    const port = await Promise.race([
      options.port ? Promise.resolve(options.port) : portFromLog,
      exited.then(() => {
        throw new Error(`storage node exited before listening: ${describe()}`);
      }),
      new Promise<never>((_, rej) => {
        timer = setTimeout(
          () => rej(new Error(`storage node did not log a listening address in ${timeoutMs} ms: ${describe()}`)),
          timeoutMs,
        );
      }),
    ]);
    await waitForConnect(port, timeoutMs, () => exitInfo !== undefined);
    if (exitInfo !== undefined) throw new Error(`storage node exited during startup: ${describe()}`);
    return {
      port,
      url: `http://127.0.0.1:${port}`,
      grpcUrl: `grpc://127.0.0.1:${port}`,
      dir,
      configPath,
      pid: child.pid ?? -1,
      logs: () => [...lines],
      exitInfo: () => exitInfo,
      kill,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Finds the port in a log line announcing the listening address. Accepts pino
 * JSON with an `address`/`url`/`port` field or a message such as fastify's
 * "Server listening at http://127.0.0.1:PORT"; port 0 (the configured value
 * echoed back) is ignored.
 */
export function listeningPort(line: string): number | undefined {
  let record: Record<string, unknown> | undefined;
  try {
    const parsed: unknown = JSON.parse(line);
    if (parsed && typeof parsed === 'object') record = parsed as Record<string, unknown>;
  } catch {
    // not JSON: fall through to the text match
  }
  const text = record ? String(record.msg ?? '') : line;
  if (!/listen/i.test(text) && !/listen/i.test(line)) return undefined;
  if (record) {
    for (const key of ['port', 'address', 'url', 'addr', 'listen']) {
      const value = record[key];
      const port = typeof value === 'number' ? value : typeof value === 'string' ? portIn(value) : undefined;
      if (port) return port;
    }
  }
  return portIn(line);
}

function portIn(text: string): number | undefined {
  const m = /(?:127\.0\.0\.1|localhost|\[::1?\]|0\.0\.0\.0|::):(\d{1,5})\b/.exec(text);
  const port = m ? Number(m[1]) : 0;
  return port > 0 && port < 65536 ? port : undefined;
}

async function waitForConnect(port: number, timeoutMs: number, gaveUp: () => boolean): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const socket = connect({ host: '127.0.0.1', port });
    try {
      await once(socket, 'connect');
      socket.destroy();
      return;
    } catch (err) {
      socket.destroy();
      if (gaveUp() || Date.now() > deadline) throw new Error(`cannot connect to 127.0.0.1:${port}: ${String(err)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
