// Starts test/fixtures/py-shard/shard.py, a small in-memory REAPI server on
// the C-core gRPC stack (Debian python3-grpcio), as a child process: "a gRPC
// server this project did not write". The shard binds port 0 unless told
// otherwise and announces "LISTENING <port>" on stdout.
//
// Children are killed when the test process exits, and setpriv makes the
// kernel kill them if the test process dies without running exit hooks.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const shardPath = join(repoRoot, 'test', 'fixtures', 'py-shard', 'shard.py');
const python = '/usr/bin/python3';
const setpriv = '/usr/bin/setpriv';

export interface PyShardOptions {
  /** Port to bind; 0 (the default) lets the kernel pick one. */
  readonly port?: number;
  /** Size of each ByteStream ReadResponse. Default 64 KiB. */
  readonly readChunkBytes?: number;
  /** Leave grpc.health.v1 unimplemented, like some REAPI servers. */
  readonly noHealth?: boolean;
  /** GetActionResult answers NOT_FOUND unless every output is in the CAS (--check-completeness). */
  readonly checkCompleteness?: boolean;
  /** How long to wait for "LISTENING". Default 20 s. */
  readonly startTimeoutMs?: number;
}

export interface PyShard {
  readonly port: number;
  /** http://127.0.0.1:PORT */
  readonly url: string;
  readonly pid: number;
  /** Everything the child wrote (stdout and stderr lines). */
  logs(): string[];
  /** SIGSTOP: the socket stays open and accepts, nothing answers (a blackhole). */
  pause(): void;
  /** SIGCONT after pause(). */
  resume(): void;
  /** Sends a signal (default SIGKILL) and resolves once the process has exited. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Kills the shard (resuming it first if paused). Idempotent. */
  stop(): Promise<void>;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;

/** Spawns the python shard and waits until it accepts calls. */
export async function startPyShard(options: PyShardOptions = {}): Promise<PyShard> {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const child of live) {
        child.kill('SIGCONT');
        child.kill('SIGKILL');
      }
    });
  }
  const argv = [python, shardPath, '--port', String(options.port ?? 0)];
  if (options.readChunkBytes !== undefined) argv.push('--read-chunk-bytes', String(options.readChunkBytes));
  if (options.noHealth) argv.push('--no-health');
  if (options.checkCompleteness) argv.push('--check-completeness');
  const [cmd, ...args] = existsSync(setpriv) ? [setpriv, '--pdeathsig', 'SIGKILL', '--', ...argv] : argv;
  const child = spawn(cmd!, args, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let exited = false;
  const exit = new Promise<void>((res) => {
    child.once('exit', () => {
      exited = true;
      live.delete(child);
      res();
    });
  });

  const lines: string[] = [];
  let onPort: ((port: number) => void) | undefined;
  const announced = new Promise<number>((res) => {
    onPort = res;
  });
  for (const stream of [child.stdout, child.stderr]) {
    createInterface({ input: stream }).on('line', (line) => {
      lines.push(line);
      if (lines.length > 2000) lines.splice(0, lines.length - 2000);
      const m = /^LISTENING (\d+)$/.exec(line);
      if (m) onPort?.(Number(m[1]));
    });
  }

  const kill = async (signal: NodeJS.Signals = 'SIGKILL'): Promise<void> => {
    if (!exited) {
      child.kill('SIGCONT');
      child.kill(signal);
    }
    await exit;
  };

  const timeoutMs = options.startTimeoutMs ?? 20_000;
  let timer: NodeJS.Timeout | undefined;
  try {
    const port = await Promise.race([
      announced,
      exit.then(() => {
        throw new Error(`py-shard exited before listening:\n${lines.join('\n')}`);
      }),
      new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new Error(`py-shard did not listen within ${timeoutMs} ms:\n${lines.join('\n')}`)), timeoutMs);
      }),
    ]);
    return {
      port,
      url: `http://127.0.0.1:${port}`,
      pid: child.pid ?? -1,
      logs: () => [...lines],
      pause: () => {
        if (!exited) child.kill('SIGSTOP');
      },
      resume: () => {
        if (!exited) child.kill('SIGCONT');
      },
      kill,
      stop: () => kill('SIGKILL'),
    };
  } catch (err) {
    await kill('SIGKILL');
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
