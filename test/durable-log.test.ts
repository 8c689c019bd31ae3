import { appendFile, mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import t from 'tap';
import { DurableLog, DurableLogCorruptError, DurableLogFullError, type DurableLogFormat } from '../src/durable-log.ts';

interface Rec {
  readonly n: number;
}

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'durable-log-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

function keys(log: DurableLog<Rec>): string[] {
  return [...log.entries()].map((e) => e.key);
}

t.test('appends and deletes survive a reopen, oldest first', async (t) => {
  const path = join(await tempDir(), 'sub', 'log.jsonl');
  const log = await DurableLog.open<Rec>(path);
  await log.append('a', { n: 1 });
  await log.append('b', { n: 2 });
  await log.append('c', { n: 3 });
  t.equal(await log.delete('b'), true);
  t.equal(await log.delete('b'), false, 'deleting an absent key is a no-op');
  await log.append('a', { n: 4 }); // a rewrite moves the key to the end
  t.same(keys(log), ['c', 'a']);
  await log.close();

  const again = await DurableLog.open<Rec>(path);
  t.same(keys(again), ['c', 'a']);
  t.same(again.get('a')?.value, { n: 4 });
  t.equal(again.size, 2);
  t.equal(again.stats().tornTailBytes, 0);
  await again.close();
});

t.test('delete with a sequence number removes only that version', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  const log = await DurableLog.open<Rec>(path);
  const v1 = await log.append('k', { n: 1 });
  const v2 = await log.append('k', { n: 2 });
  t.ok(v2 > v1);
  t.equal(await log.delete('k', v1), false, 'an older version does not remove the newer one');
  t.same(log.get('k'), { key: 'k', value: { n: 2 }, seq: v2 });
  t.equal(await log.delete('k', v2), true);
  t.equal(log.size, 0);
  await log.close();
  const again = await DurableLog.open<Rec>(path);
  t.equal(again.size, 0);
  // Sequence numbers keep growing across reopen.
  t.ok((await again.append('k', { n: 3 })) > v2);
  await again.close();
});

t.test('concurrent appends share write+fsync rounds (group commit)', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  const log = await DurableLog.open<Rec>(path);
  const seqs = await Promise.all(Array.from({ length: 200 }, (_, i) => log.append(`k${i}`, { n: i })));
  t.equal(new Set(seqs).size, 200, 'every append got its own version');
  const { commits, records } = log.stats();
  t.equal(records, 200);
  t.ok(commits <= 3, `200 appends took ${commits} commits`);
  await log.close();
  const again = await DurableLog.open<Rec>(path);
  t.equal(again.size, 200);
  await again.close();
});

t.test('a torn last line is dropped and cut off; appends after it stay readable', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  const log = await DurableLog.open<Rec>(path);
  await log.append('a', { n: 1 });
  await log.append('b', { n: 2 });
  await log.close();
  // A crash mid-write: half a record, no newline.
  await appendFile(path, '{"k":"c","s":3,"v":{"n"');
  const sizeBefore = (await stat(path)).size;

  const reopened = await DurableLog.open<Rec>(path);
  t.same(keys(reopened), ['a', 'b']);
  t.equal(reopened.stats().tornTailBytes, '{"k":"c","s":3,"v":{"n"'.length);
  t.equal((await stat(path)).size, sizeBefore - reopened.stats().tornTailBytes, 'the torn bytes were truncated');
  await reopened.append('d', { n: 4 });
  await reopened.close();

  const third = await DurableLog.open<Rec>(path);
  t.same(keys(third), ['a', 'b', 'd']);
  t.equal(third.stats().tornTailBytes, 0);
  await third.close();
});

t.test('a zero-filled tail (complete lines of garbage at the end) is treated as torn', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  const log = await DurableLog.open<Rec>(path);
  await log.append('a', { n: 1 });
  await log.close();
  await appendFile(path, Buffer.concat([Buffer.alloc(40), Buffer.from('\n'), Buffer.alloc(7)]));
  const reopened = await DurableLog.open<Rec>(path);
  t.same(keys(reopened), ['a']);
  t.equal(reopened.stats().tornTailBytes, 48);
  await reopened.close();
});

t.test('a corrupt record followed by valid ones fails the open', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  await writeFile(path, '{"k":"a","s":1,"v":{"n":1}}\nnot json\n{"k":"b","s":2,"v":{"n":2}}\n');
  await t.rejects(DurableLog.open<Rec>(path), DurableLogCorruptError);
  await t.rejects(DurableLog.open<Rec>(path), { message: /line 2 is corrupt \(not JSON\)/ });
});

t.test('maxEntries bounds live entries; rewriting a present key is always allowed', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  const log = await DurableLog.open<Rec>(path, { maxEntries: 2 });
  await log.append('a', { n: 1 });
  await log.append('b', { n: 2 });
  await t.rejects(log.append('c', { n: 3 }), DurableLogFullError);
  await t.rejects(log.append('c', { n: 3 }), { message: /is full \(2 entries\)/ });
  await log.append('a', { n: 10 });
  await log.delete('b');
  await log.append('c', { n: 3 });
  t.same(keys(log), ['a', 'c']);
  await log.close();
});

t.test('compaction rewrites the file once most records are dead, keeping the live ones', async (t) => {
  const dir = await tempDir();
  const path = join(dir, 'log.jsonl');
  const log = await DurableLog.open<Rec>(path, { compactMinRecords: 100 });
  await Promise.all(Array.from({ length: 500 }, (_, i) => log.append(`k${i}`, { n: i })));
  const big = (await stat(path)).size;
  // In waves, so that some deletes are queued while a compaction runs.
  for (let w = 0; w < 490; w += 49) {
    await Promise.all(Array.from({ length: 49 }, (_, i) => log.delete(`k${w + i}`)));
  }
  const stats = log.stats();
  t.ok(stats.compactions >= 1, `compacted ${stats.compactions} times`);
  t.ok(stats.records <= 2 * stats.size + 100, `file holds ${stats.records} records for ${stats.size} live`);
  t.ok((await stat(path)).size < big / 4, 'the file shrank');
  // Still appendable after the rename.
  await log.append('after', { n: -1 });
  await log.close();

  const again = await DurableLog.open<Rec>(path);
  t.same(keys(again), [...Array.from({ length: 10 }, (_, i) => `k${490 + i}`), 'after']);
  t.same(again.get('k495')?.value, { n: 495 });
  await again.close();
});

t.test('a leftover compaction temp file is discarded on open', async (t) => {
  const dir = await tempDir();
  const path = join(dir, 'log.jsonl');
  await writeFile(path, '{"k":"a","s":1,"v":{"n":1}}\n');
  await writeFile(`${path}.compact`, '{"k":"half');
  const log = await DurableLog.open<Rec>(path);
  t.same(keys(log), ['a']);
  await t.rejects(stat(`${path}.compact`), { code: 'ENOENT' });
  await log.close();
});

t.test('close waits for pending commits, is idempotent, and refuses later calls', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  const log = await DurableLog.open<Rec>(path);
  const pending = log.append('a', { n: 1 });
  const closed = log.close();
  await pending;
  await closed;
  await log.close();
  await t.rejects(log.append('b', { n: 2 }), { message: /is closed/ });
  t.match(await readFile(path, 'utf8'), /"k":"a"/);
});

t.test('a format without sequence numbers replays in file order, deletes included', async (t) => {
  const path = join(await tempDir(), 'log.jsonl');
  // One line per record: "+key n" or "-key".
  const format: DurableLogFormat<Rec> = {
    put: (e) => `+${e.key} ${e.value.n}`,
    delete: (e) => `-${e.key}`,
    decode(line) {
      const m = /^([+-])(\w+)(?: (\d+))?$/.exec(line);
      if (m === null) return 'not a record';
      return m[1] === '+' ? { key: m[2]!, value: { n: Number(m[3]) } } : { key: m[2]!, deleted: true };
    },
  };
  const log = await DurableLog.open<Rec>(path, { format, compactMinRecords: 1000 });
  const v1 = await log.append('a', { n: 1 });
  await log.append('b', { n: 2 });
  t.equal(await log.delete('a', v1), true);
  await log.append('a', { n: 3 });
  await log.delete('b');
  await log.append('c', { n: 4 });
  await log.close();
  t.equal(await readFile(path, 'utf8'), '+a 1\n+b 2\n-a\n+a 3\n-b\n+c 4\n');

  const again = await DurableLog.open<Rec>(path, { format });
  t.same([...again.entries()].map((e) => [e.key, e.value.n]), [['a', 3], ['c', 4]]);
  const a = again.get('a')!;
  t.equal(await again.delete('a', a.seq + 1), false, 'loaded entries still have distinct versions');
  t.equal(await again.delete('a', a.seq), true);
  await again.close();
});
