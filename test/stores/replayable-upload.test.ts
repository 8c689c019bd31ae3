import { Code } from '@connectrpc/connect';
import t from 'tap';
import { ReplayableUpload } from '../../src/stores/replayable-upload.ts';
import { collect } from '../../src/streams.ts';
import { failure } from '../helpers/failure.ts';

const enc = new TextEncoder();
const dec = new TextDecoder();

interface Deferred<T> {
  readonly promise: Promise<T>;
  resolve(v: T): void;
  reject(err: unknown): void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (err: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** A client stream whose every next() waits until the test settles it. */
class ManualSource implements AsyncIterable<Uint8Array> {
  pulls = 0;
  returned = 0;
  readonly #waiting: Deferred<IteratorResult<Uint8Array>>[] = [];

  [Symbol.asyncIterator](): AsyncIterator<Uint8Array> {
    return {
      next: () => {
        this.pulls++;
        const w = deferred<IteratorResult<Uint8Array>>();
        this.#waiting.push(w);
        return w.promise;
      },
      return: async () => {
        this.returned++;
        return { done: true, value: undefined };
      },
    };
  }

  send(text: string): void {
    this.#take().resolve({ done: false, value: enc.encode(text) });
  }

  end(): void {
    this.#take().resolve({ done: true, value: undefined });
  }

  fail(err: unknown): void {
    this.#take().reject(err);
  }

  #take(): Deferred<IteratorResult<Uint8Array>> {
    const w = this.#waiting.shift();
    if (w === undefined) throw new Error('no pull is waiting');
    return w;
  }
}

/** A client stream of `texts` that counts its pulls. */
function counted(texts: string[], then?: unknown): { source: AsyncIterable<Uint8Array>; pulls: () => number } {
  let pulls = 0;
  const source = {
    [Symbol.asyncIterator]: () => {
      let i = 0;
      return {
        next: async (): Promise<IteratorResult<Uint8Array>> => {
          pulls++;
          if (i < texts.length) return { done: false, value: enc.encode(texts[i++]!) };
          if (then !== undefined) throw then;
          return { done: true, value: undefined };
        },
      };
    },
  };
  return { source, pulls: () => pulls };
}

function reader(up: ReplayableUpload): AsyncIterator<Uint8Array> {
  return up.stream()[Symbol.asyncIterator]();
}

async function text(p: Promise<IteratorResult<Uint8Array>>): Promise<string | undefined> {
  const r = await p;
  return r.done === true ? undefined : dec.decode(r.value);
}

t.test('consumers share one pull: the chunk a cut-off consumer waited for goes to the next one', async (t) => {
  const src = new ManualSource();
  const up = new ReplayableUpload(src, 1024);
  const first = reader(up);
  const firstWaits = first.next();
  await Promise.resolve();
  t.equal(src.pulls, 1);
  const second = reader(up);
  const secondWaits = second.next();
  await Promise.resolve();
  t.equal(src.pulls, 1, 'the second consumer waits on the pull already in flight');
  src.send('ab');
  t.equal(await text(secondWaits), 'ab');
  const cut = await failure(firstWaits);
  t.equal(cut.code, Code.Aborted);
  t.equal(cut.rawMessage, 'upload was handed to another store');
  const more = second.next();
  await Promise.resolve();
  src.send('cd');
  t.equal(await text(more), 'cd');
  const end = second.next();
  await Promise.resolve();
  src.end();
  t.equal(await text(end), undefined);
  t.equal(src.pulls, 3, 'each chunk was pulled from the client once');
});

t.test('after a failure within the limit the next consumer gets the whole upload, each chunk pulled once', async (t) => {
  const { source, pulls } = counted(['ab', 'cd', 'ef']);
  const up = new ReplayableUpload(source, 4);
  const first = reader(up);
  t.equal(await text(first.next()), 'ab');
  t.equal(await text(first.next()), 'cd');
  t.ok(up.replayable, 'exactly `limit` bytes pulled is still replayable');
  t.equal(dec.decode(await collect(up.stream())), 'abcdef');
  t.equal(pulls(), 4);
  t.notOk(up.failed);
});

t.test('pulling more than the limit makes the upload non-replayable', async (t) => {
  const { source } = counted(['ab', 'cd']);
  const up = new ReplayableUpload(source, 3);
  const first = reader(up);
  t.equal(await text(first.next()), 'ab');
  t.ok(up.replayable);
  t.equal(await text(first.next()), 'cd');
  t.notOk(up.replayable);
  const err = await failure(collect(up.stream()));
  t.equal(err.code, Code.Aborted);
  t.equal(err.rawMessage, 'upload can no longer be replayed');
});

t.test('a consumer cut off by a newer one, or by detach(), fails with ABORTED on its next read', async (t) => {
  const { source } = counted(['ab', 'cd']);
  const up = new ReplayableUpload(source, 1024);
  const first = reader(up);
  t.equal(await text(first.next()), 'ab');
  const second = reader(up);
  const err = await failure(first.next());
  t.equal(err.code, Code.Aborted);
  t.equal(err.rawMessage, 'upload was handed to another store');
  t.equal(await text(second.next()), 'ab');
  await up.detach();
  t.equal((await failure(second.next())).code, Code.Aborted);
  t.equal(dec.decode(await collect(up.stream())), 'abcd', 'a consumer after detach() still gets the whole upload');
});

t.test('a failure of the client stream is reported as such, to every consumer', async (t) => {
  const clientErr = new Error('client went away');
  const { source } = counted(['ab'], clientErr);
  const clientErrors = new WeakSet<object>();
  const up = new ReplayableUpload(source, 1024, { clientErrors });
  const first = reader(up);
  t.equal(await text(first.next()), 'ab');
  t.notOk(up.failed);
  t.equal(await first.next().catch((e: unknown) => e), clientErr);
  t.ok(up.failed);
  t.ok(clientErrors.has(clientErr), 'the error is tagged as the client\'s');
  const second = reader(up);
  t.equal(await text(second.next()), 'ab', 'what was pulled is still replayed');
  t.equal(await second.next().catch((e: unknown) => e), clientErr);
});

t.test('detach() waits for a pull left in flight, so `failed` accounts for it', async (t) => {
  const src = new ManualSource();
  const up = new ReplayableUpload(src, 1024);
  const first = reader(up);
  const firstWaits = first.next().catch((e: unknown) => e);
  await Promise.resolve();
  let detached = false;
  const detaching = up.detach().then(() => {
    detached = true;
  });
  await new Promise((resolve) => setImmediate(resolve));
  t.notOk(detached, 'detach() waits while the pull is in flight');
  const clientErr = new Error('reset');
  src.fail(clientErr);
  await detaching;
  t.ok(up.failed);
  t.equal(await firstWaits, clientErr);
});

t.test('dispose() releases the client stream once, and not after it ended', async (t) => {
  const src = new ManualSource();
  const up = new ReplayableUpload(src, 1024);
  const first = reader(up);
  const waits = first.next();
  await Promise.resolve();
  src.send('ab');
  t.equal(await text(waits), 'ab');
  up.dispose();
  up.dispose();
  await Promise.resolve();
  t.equal(src.returned, 1);

  const { source } = counted(['ab']);
  let returned = 0;
  const ended = new ReplayableUpload(
    {
      [Symbol.asyncIterator]: () => {
        const it = source[Symbol.asyncIterator]();
        return {
          next: () => it.next(),
          return: async () => {
            returned++;
            return { done: true, value: undefined };
          },
        };
      },
    },
    1024,
  );
  t.equal(dec.decode(await collect(ended.stream())), 'ab');
  ended.dispose();
  await Promise.resolve();
  t.equal(returned, 0, 'a stream read to its end is not returned');
});
