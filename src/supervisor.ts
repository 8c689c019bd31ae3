import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import type { Logger } from 'pino';

export interface ChildSpec {
  /** Name of the child section in the config file (`children.<name>`). */
  readonly name: string;
  /** Restart the process when it exits unexpectedly. */
  readonly restart: boolean;
  /** Where the child listens, if known, so start-up can wait for it. */
  readonly address?: { readonly host: string; readonly port: number } | undefined;
}

export interface SupervisorOptions {
  readonly configPath: string;
  readonly children: readonly ChildSpec[];
  readonly logger: Logger;
  /** The entry point to run for each child; defaults to this project's main.ts. */
  readonly mainScript?: string;
  /** First restart delay; doubles on each quick death up to maxBackoffMs. */
  readonly minBackoffMs?: number;
  readonly maxBackoffMs?: number;
}

export interface ChildState {
  readonly name: string;
  readonly pid: number | undefined;
  readonly running: boolean;
  readonly restarts: number;
  readonly since: number;
  readonly lastExit: string | undefined;
}

interface Child {
  spec: ChildSpec;
  proc: ChildProcess | undefined;
  restarts: number;
  since: number;
  backoffMs: number;
  lastExit: string | undefined;
  timer: NodeJS.Timeout | undefined;
}

const SETPRIV = '/usr/bin/setpriv';

/** A child that ran this long before dying gets its backoff reset. */
const STABLE_AFTER_MS = 30_000;

/**
 * Runs storage-node processes of the local cluster as children of the edge
 * process: `node main.ts <config> --child <name>` reads its own section of the
 * same config file. A child that dies is restarted after a backoff that grows
 * while it keeps dying quickly, unless its spec says not to, so an operator can
 * kill a shard and watch the edge drain it and take it back.
 *
 * Children's stdout and stderr (pino JSON lines) pass straight through to ours.
 * stop() sends SIGTERM, then SIGKILL to any child still alive after a grace period.
 */
export class Supervisor {
  readonly #opts: SupervisorOptions;
  readonly #children: Child[];
  #stopping = false;

  constructor(opts: SupervisorOptions) {
    this.#opts = opts;
    const min = opts.minBackoffMs ?? 500;
    this.#children = opts.children.map((spec) => ({
      spec,
      proc: undefined,
      restarts: 0,
      since: Date.now(),
      backoffMs: min,
      lastExit: undefined,
      timer: undefined,
    }));
  }

  start(): void {
    for (const c of this.#children) this.#spawn(c);
  }

  /**
   * Resolves once every child with a known address accepts TCP connections,
   * or after timeoutMs (a child that is slow to start is then handled like any
   * shard that is down: its breaker opens and traffic goes elsewhere).
   */
  async waitUntilListening(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    const results = await Promise.all(
      this.#children.map(async (c) => {
        const a = c.spec.address;
        if (a === undefined || a.port === 0) return true;
        while (Date.now() < deadline && !this.#stopping) {
          if (await accepts(a.host, a.port)) return true;
          await new Promise((r) => setTimeout(r, 50));
        }
        return false;
      }),
    );
    return results.every(Boolean);
  }

  states(): ChildState[] {
    return this.#children.map((c) => ({
      name: c.spec.name,
      pid: c.proc?.pid,
      running: c.proc !== undefined && c.proc.exitCode === null && c.proc.signalCode === null,
      restarts: c.restarts,
      since: c.since,
      lastExit: c.lastExit,
    }));
  }

  /** Sends a signal to one child (for tests and operators). */
  kill(name: string, signal: NodeJS.Signals = 'SIGKILL'): boolean {
    const c = this.#children.find((x) => x.spec.name === name);
    return c?.proc?.kill(signal) ?? false;
  }

  async stop(graceMs = 5000): Promise<void> {
    this.#stopping = true;
    await Promise.all(
      this.#children.map(async (c) => {
        clearTimeout(c.timer);
        const p = c.proc;
        if (p === undefined || p.exitCode !== null || p.signalCode !== null) return;
        const exited = once(p, 'exit');
        p.kill('SIGTERM');
        const t = setTimeout(() => p.kill('SIGKILL'), graceMs);
        await exited;
        clearTimeout(t);
      }),
    );
  }

  #spawn(c: Child): void {
    const script = this.#opts.mainScript ?? new URL('./main.ts', import.meta.url).pathname;
    const argv = [process.execPath, ...process.execArgv, script, this.#opts.configPath, '--child', c.spec.name];
    // setpriv makes the kernel kill the child if this process dies without
    // stopping it (SIGKILL, OOM); a detached process group keeps a terminal's
    // Ctrl-C from reaching children directly, so shutdown stays ordered.
    const [cmd, ...args] = existsSync(SETPRIV) ? [SETPRIV, '--pdeathsig', 'SIGKILL', '--', ...argv] : argv;
    const proc = spawn(cmd!, args, { stdio: ['ignore', 'inherit', 'inherit'], detached: true });
    c.proc = proc;
    c.since = Date.now();
    this.#opts.logger.info({ child: c.spec.name, pid: proc.pid }, 'started storage node process');
    proc.on('error', (err) => {
      this.#opts.logger.error({ child: c.spec.name, err }, 'could not start storage node process');
    });
    proc.on('exit', (code, signal) => {
      const ranMs = Date.now() - c.since;
      c.lastExit = signal !== null ? `signal ${signal}` : `exit code ${code}`;
      c.since = Date.now();
      if (this.#stopping) return;
      const min = this.#opts.minBackoffMs ?? 500;
      const max = this.#opts.maxBackoffMs ?? 30_000;
      if (ranMs >= STABLE_AFTER_MS) c.backoffMs = min;
      if (!c.spec.restart) {
        this.#opts.logger.warn({ child: c.spec.name, exit: c.lastExit }, 'storage node process exited; not restarting');
        return;
      }
      this.#opts.logger.warn(
        { child: c.spec.name, exit: c.lastExit, restartInMs: c.backoffMs },
        'storage node process exited; restarting',
      );
      c.timer = setTimeout(() => {
        c.restarts++;
        this.#spawn(c);
      }, c.backoffMs);
      c.backoffMs = Math.min(max, c.backoffMs * 2);
    });
  }
}

function accepts(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}
