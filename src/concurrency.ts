import { throwIfAborted } from './errors.ts';

/**
 * Calls `fn` on every item with at most `limit` calls in flight (a limit
 * below 1 counts as 1) and resolves with the results in item order.
 *
 * The first rejection stops further calls from starting and is what mapLimit
 * rejects with. Calls already running are not waited for and their outcome
 * is dropped, so give `fn` a signal to cancel them if that matters.
 */
export async function mapLimit<T, R>(
  items: readonly T[],
  limit: number,
  fn: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const i = next++;
      try {
        results[i] = await fn(items[i]!, i);
      } catch (err) {
        failed = true; // the first error wins; start nothing new
        throw err;
      }
    }
  };
  const workers = Math.min(Math.max(1, Math.floor(limit)), items.length);
  await Promise.all(Array.from({ length: workers }, worker));
  return results;
}

/**
 * mapLimit for calls that take a signal: each call gets one linked to
 * `signal`, and the first failure aborts it, cancelling the calls still
 * running (a fan-out's first failure cancels its siblings). When the
 * caller's own signal fired, it rejects with CANCELED.
 */
export async function mapLimitCancelling<T, R>(
  items: readonly T[],
  limit: number,
  signal: AbortSignal | undefined,
  fn: (item: T, signal: AbortSignal) => Promise<R>,
): Promise<R[]> {
  const ctl = new AbortController();
  const linked = signal === undefined ? ctl.signal : AbortSignal.any([signal, ctl.signal]);
  try {
    return await mapLimit(items, limit, (item) => {
      throwIfAborted(linked);
      return fn(item, linked);
    });
  } catch (err) {
    ctl.abort(err);
    throwIfAborted(signal);
    throw err;
  }
}

/**
 * Settles like `p`, or rejects with the signal's reason as soon as it fires,
 * for work that might not honour the signal itself. `p` keeps running; its
 * late outcome is ignored (never an unhandled rejection).
 */
export function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    p.catch(() => {});
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}
