// The admin page in a real headless Chromium against a real cluster: three
// storage-node child processes as shards, a ShardingStore of RemoteStores
// over them (health-checked with grpc.health.v1), and buildAdminApp served on
// port 0. The page must show the three shards closed, show a killed node's
// shard open without a reload, drain and undrain a shard through its buttons
// (confirm dialog, token field), refuse a drain without the token and say so,
// fit a phone's width, and load nothing from outside its origin. Then the
// attacks a browser can make: a DNS-rebinding name for 127.0.0.1 gets 421,
// and a page on another site can neither read the state nor post a drain.
//
// Screenshots go to test-output/; docs/admin-page.png is written when it is
// missing or REAPI_UPDATE_SCREENSHOT=1.
import { randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser, type Page } from 'playwright-core';
import t from 'tap';
import type { Test } from 'tap';
import { buildAdminApp } from '../../src/admin/admin-app.ts';
import { createMetricsRegistry } from '../../src/admin/metrics.ts';
import { shardControl } from '../../src/admin/shard-control.ts';
import { digestOf } from '../../src/digest.ts';
import { collect, once } from '../../src/streams.ts';
import { CompletenessCheckingStore } from '../../src/stores/completeness-checking-store.ts';
import { FallbackStore } from '../../src/stores/fallback-store.ts';
import { MemoryStore } from '../../src/stores/memory-store.ts';
import { MetricsStore } from '../../src/stores/metrics-store.ts';
import { RemoteStore } from '../../src/stores/remote-store.ts';
import { ShardingStore } from '../../src/stores/sharding-store.ts';
import type { ChildState } from '../../src/supervisor.ts';
import { spawnNode } from '../helpers/spawn-node.ts';

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const outDir = join(repoRoot, 'test-output');
const docsShot = join(repoRoot, 'docs', 'admin-page.png');
const CHROMIUM = '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  // The attacker's names: evil.example resolves to 127.0.0.1, as after a DNS rebinding.
  '--host-resolver-rules=MAP evil.example 127.0.0.1',
];
const TOKEN = 'e2e-admin-token';
const NAMES = ['a', 'b', 'c'];

if (!existsSync(CHROMIUM)) {
  if (process.env.CI) t.fail(`${CHROMIUM} not found, but CI requires this test (apt-get install chromium)`);
  else t.plan(0, `${CHROMIUM} not found (apt-get install chromium)`);
} else {
  // A subtest, not the root: tap ends a root test with teardowns once it looks idle.
  t.test('admin page in headless Chromium over three storage-node processes', main);
}

async function main(t: Test): Promise<void> {
  const nodes = await Promise.all(NAMES.map(() => spawnNode()));
  const started = nodes.map(() => Date.now());
  t.teardown(async () => {
    if (!t.passing()) {
      for (const [i, n] of nodes.entries()) console.error(`--- node ${NAMES[i]} (last 20 lines) ---\n${n.logs().slice(-20).join('\n')}`);
    }
    await Promise.all(nodes.map((n) => n.stop()));
  });

  const registry = createMetricsRegistry();
  const remotes = nodes.map((n, i) => new RemoteStore({ name: NAMES[i], url: n.url, tree: 'cas', timeoutMs: 3000, healthTimeoutMs: 400 }));
  const hintDir = mkdtempSync(join(tmpdir(), 'admin-page-e2e-'));
  const cas = await ShardingStore.open({
    shards: NAMES.map((name, i) => ({
      name,
      weight: 1,
      store: new MetricsStore(remotes[i]!, { registry, tree: 'cas', name }),
      check: (signal: AbortSignal) => remotes[i]!.healthCheck(signal),
    })),
    handoff: { dir: hintDir },
    healthCheckIntervalMs: 200,
    healthCheckTimeoutMs: 600,
    // A long backoff keeps the killed shard open (rather than cycling through
    // half-open) while the page is looked at.
    breaker: { healthCheckFailures: 2, closeAfterProbes: 2, backoffInitialMs: 120_000 },
  });
  const casTree = new MetricsStore(cas, { registry, tree: 'cas', name: 'root' });
  // The AC tree: completeness checking over a fallback pair, to show nesting.
  const acPair = await FallbackStore.open({
    primary: new MemoryStore({ maxSizeBytes: 64 << 20, contentAddressed: false }),
    secondary: new MemoryStore({ maxSizeBytes: 64 << 20, contentAddressed: false }),
    journalDir: join(hintDir, 'ac-journal'),
  });
  const ac = new CompletenessCheckingStore({ backend: acPair, cas: casTree });
  t.teardown(async () => {
    await ac.close();
    await casTree.close();
    rmSync(hintDir, { recursive: true, force: true });
  });

  const processes = (): ChildState[] =>
    nodes.map((n, i) => {
      const exit = n.exitInfo();
      return {
        name: `storage-node-${NAMES[i]}`,
        pid: n.pid,
        running: exit === undefined,
        restarts: 0,
        since: started[i]!,
        lastExit: exit === undefined ? undefined : exit.signal !== null ? `signal ${exit.signal}` : `exit code ${exit.code}`,
      };
    });
  const app = await buildAdminApp({
    describe: () => ({ cas: casTree.describe(), ac: ac.describe() }),
    processes,
    isReady: () => true,
    drain: shardControl({ cas: [cas], ac: [] }),
    token: TOKEN,
    registry,
  });
  t.teardown(() => app.close());
  await app.listen({ host: '127.0.0.1', port: 0 });
  const { port } = app.server.address() as { port: number };
  const base = `http://127.0.0.1:${port}`;

  // Steady traffic, so rates and charts have something to show.
  let traffic = true;
  const trafficLoop = (async () => {
    while (traffic) {
      const data = randomBytes(2048 + Math.floor(Math.random() * 60_000));
      const d = digestOf(data);
      try {
        await casTree.put(d, once(data));
        await collect(await casTree.get(d));
        await casTree.findMissing([d, digestOf(randomBytes(8))]);
      } catch {
        // a shard being killed or drained; the page shows it
      }
      await new Promise((r) => setTimeout(r, 40));
    }
  })();
  t.teardown(async () => {
    traffic = false;
    await trafficLoop;
  });

  const browser: Browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
  t.teardown(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  const problems: string[] = [];
  let refusals = 0;
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    // Chromium logs the refused drain of step 6, which is expected.
    if (/status of 401 \(Unauthorized\)/.test(m.text())) refusals++;
    else problems.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('request', (req) => {
    if (!req.url().startsWith(base)) problems.push(`request outside the origin: ${req.url()}`);
  });
  const dialogs: string[] = [];
  let answer = true;
  page.on('dialog', (d) => {
    dialogs.push(d.message());
    void (answer ? d.accept() : d.dismiss());
  });

  const loaded = await page.goto(base);
  t.match(
    loaded?.headers(),
    { 'content-security-policy': /script-src 'self'.*frame-ancestors 'none'/, 'x-frame-options': 'DENY', 'cross-origin-opener-policy': 'same-origin' },
    'the page is served with its security headers (and renders under them: see the console check at the end)',
  );
  const row = (shard: string) => `tr[data-tree="cas"][data-shard="${shard}"]`;
  const stateOf = (shard: string) => page.getAttribute(`${row(shard)} .state`, 'data-state');
  const waitState = (shard: string, state: string, timeout = 10_000) =>
    page.waitForSelector(`${row(shard)} .state[data-state="${state}"]`, { timeout });

  // 1. Three healthy shards.
  for (const name of NAMES) await waitState(name, 'closed');
  t.pass('the page shows shards a, b and c closed');
  t.equal(await page.textContent('#conn'), 'live', 'the event stream is connected');
  await page.waitForFunction(`document.querySelectorAll('tr[data-process]').length === 3`);
  t.match(await page.textContent('#tree-ac'), /completenessChecking.*fallback.*primary.*secondary/s, 'the AC tree is shown too');
  t.equal(await page.getAttribute('#tree-ac [data-serving]', 'data-serving'), 'primary', 'the fallback pair serves from its primary');

  // 2. SIGKILL node a: its shard opens on the page, live.
  const killedAt = Date.now();
  await nodes[0]!.kill('SIGKILL');
  await waitState('a', 'open', 10_000);
  const detectMs = Date.now() - killedAt;
  t.ok(detectMs < 5000, `shard a shown open ${detectMs} ms after SIGKILL, without a reload`);
  // Health checks or the traffic's failures, whichever tripped it first.
  t.match(await page.getAttribute(`${row('a')} .state`, 'title'), /health check|infrastructure failures|requests failed/, 'the badge says why');
  t.match(await page.textContent('tr[data-process="storage-node-a"]'), /exited.*signal SIGKILL/);
  t.equal(await stateOf('b'), 'closed');

  // 3. Drain b with the button: token typed in, confirm accepted.
  await page.fill('#token', TOKEN);
  await page.click(`${row('b')} button[data-action="drain"]`);
  await waitState('b', 'drained', 5000);
  t.match(dialogs.at(-1), /^Drain shard "b" of the CAS tree\?/, 'a confirm dialog asked first');
  t.match(await page.textContent(row('b')), /manual/, 'the drain shows as manual');
  t.match(await page.textContent('#message'), /Shard b \(CAS\) drained/);
  t.equal(await page.evaluate(`sessionStorage.getItem('reapi-edge-admin-token')`), TOKEN, 'the token is kept for this tab');
  t.equal(await stateOf('c'), 'closed');

  // Let the charts gather a few points, then take the picture: a open, b drained, c serving.
  await page.waitForTimeout(4000);
  // (Browser-side code goes in as strings: the tests compile without DOM types.)
  const inked = await page.evaluate<number>(`(() => {
    const canvas = document.querySelector(${JSON.stringify(`${row('c')} canvas`)});
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
    return n;
  })()`);
  t.ok(inked > 50, `shard c's chart is drawn (${inked} pixels)`);
  mkdirSync(outDir, { recursive: true });
  const shot = join(outDir, 'admin-page.png');
  await page.screenshot({ path: shot, fullPage: true });
  if (!existsSync(docsShot) || process.env.REAPI_UPDATE_SCREENSHOT === '1') {
    mkdirSync(dirname(docsShot), { recursive: true });
    copyFileSync(shot, docsShot);
  }

  // 4. Undrain b: half-open, then closed once its probes pass.
  await page.click(`${row('b')} button[data-action="undrain"]`);
  t.match(dialogs.at(-1), /^Undrain shard "b"/);
  await waitState('b', 'closed', 10_000);
  t.pass('shard b is closed again after the undrain');

  // 5. A dismissed confirm does nothing.
  answer = false;
  await page.click(`${row('c')} button[data-action="drain"]`);
  answer = true;
  await page.waitForTimeout(500);
  t.equal(await stateOf('c'), 'closed', 'dismissing the dialog left c alone');

  // 6. Without the token: the API refuses, and the page says so.
  const bare = await fetch(`${base}/api/shards/cas/c/drain`, { method: 'POST' });
  t.equal(bare.status, 401);
  t.match(await bare.json(), { error: /missing bearer token/ });
  await page.fill('#token', '');
  await page.click(`${row('c')} button[data-action="drain"]`);
  await page.waitForSelector('#message.error', { timeout: 5000 });
  t.match(await page.textContent('#message'), /drain c refused: 401 missing bearer token/);
  t.equal(await stateOf('c'), 'closed', 'c was not drained');
  t.equal(refusals, 1, 'exactly one request was refused');

  // 7. A phone's width: the page fits, wide tables scroll inside their box.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const fits = await page.evaluate<{ page: number; viewport: number }>(
    `({ page: document.documentElement.scrollWidth, viewport: window.innerWidth })`,
  );
  t.ok(fits.page <= fits.viewport, `no horizontal page scroll on a phone (${fits.page} <= ${fits.viewport})`);
  await page.screenshot({ path: join(outDir, 'admin-page-phone.png'), fullPage: true });

  t.same(problems, [], 'no console errors, page errors or requests outside the origin');
  await closePage(page);

  await attacks(t, browser, base, port, () => (cas.describe().shards as { name: string; state: string }[]).find((s) => s.name === 'c')?.state);
}

/**
 * 8. What a hostile web page can do from the operator's browser: read the
 * admin API through a rebound DNS name (refused by the Host check), read it
 * cross-origin (no CORS), or post a form to the drain URL (refused as
 * cross-site, before the token is even looked at).
 */
async function attacks(t: Test, browser: Browser, base: string, port: number, stateOfC: () => string | undefined): Promise<void> {
  const context = await browser.newContext();
  t.teardown(() => context.close());
  const evilPage = await context.newPage();

  // DNS rebinding: evil.example now resolves to the admin's address.
  const rebound = await evilPage.goto(`http://evil.example:${port}/api/state`);
  t.equal(rebound?.status(), 421, 'a rebound name gets 421 Misdirected Request');
  t.notMatch(await rebound?.text(), /trees|version/, 'and nothing of the state');
  const reboundPage = await evilPage.goto(`http://evil.example:${port}/`);
  t.equal(reboundPage?.status(), 421, 'the page itself is refused under that name too');

  // A page on another site, served by a server of its own.
  const html =
    '<!doctype html><title>evil</title>' +
    `<form id="f" method="POST" action="${base}/api/shards/cas/c/drain" enctype="text/plain">` +
    '<input name="{&quot;x&quot;:&quot;" value="&quot;}"></form>';
  const evil = createServer((_req, res) => res.writeHead(200, { 'content-type': 'text/html' }).end(html));
  await new Promise<void>((r) => evil.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => evil.close(() => r())));
  const evilPort = (evil.address() as { port: number }).port;
  await evilPage.goto(`http://evil.example:${evilPort}/`);

  const read = await evilPage.evaluate<string>(`fetch(${JSON.stringify(`${base}/api/state`)}).then(() => 'read', (e) => 'blocked: ' + e.name)`);
  t.equal(read, 'blocked: TypeError', 'another site cannot read /api/state (no CORS)');

  const [posted] = await Promise.all([
    evilPage.waitForResponse((r) => r.url().endsWith('/api/shards/cas/c/drain')),
    evilPage.evaluate(`document.getElementById('f').submit()`),
  ]);
  t.equal(posted.status(), 403, 'a cross-site form post to the drain URL is refused');
  t.match(await posted.text(), /cross-origin request refused \(Sec-Fetch-Site: cross-site\)/);
  t.equal(stateOfC(), 'closed', 'c was not drained');
}

async function closePage(page: Page): Promise<void> {
  await page.close().catch(() => {});
}
