// The admin page. It renders the state that /api/events pushes (the same
// JSON as /api/state) and posts drains and undrains. No dependencies and no
// external resources: the server's Content-Security-Policy allows only this
// origin. All text goes in through text nodes, never HTML.
'use strict';

const TOKEN_KEY = 'reapi-edge-admin-token';
/** The per-shard charts show this much history. */
const HISTORY_MS = 5 * 60 * 1000;
/** CircuitBreaker's default sliding window, for shards whose store keeps no request counters. */
const BREAKER_WINDOW_S = 30;

/** key -> [{t, req, err}] for the charts. key: tree|store path|shard. */
const series = new Map();
/** key -> the counters of the previous update, to turn totals into rates. */
const previous = new Map();
/** key -> {req, err, in, out} per second, from the last two updates. */
const rates = new Map();
let skewMs = 0; // local clock minus server clock
let current = null;

// ---- tiny DOM helpers -------------------------------------------------------

/** Builds an element: h('td', {class: 'x', 'data-shard': 'a'}, 'text', child, [more]). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    el.setAttribute(k, v === true ? '' : String(v));
  }
  const add = (c) => {
    if (c === undefined || c === null || c === false) return;
    if (Array.isArray(c)) c.forEach(add);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  };
  children.forEach(add);
  return el;
}

/**
 * Makes `cur` look like `next`, reusing the nodes that match (same tag and
 * data-key), so buttons, open <details> and canvases survive an update.
 */
function morph(cur, next) {
  if (cur.nodeType !== next.nodeType || cur.nodeName !== next.nodeName ||
      (cur.nodeType === Node.ELEMENT_NODE && cur.getAttribute('data-key') !== next.getAttribute('data-key'))) {
    cur.replaceWith(next);
    return;
  }
  if (cur.nodeType !== Node.ELEMENT_NODE) {
    if (cur.nodeValue !== next.nodeValue) cur.nodeValue = next.nodeValue;
    return;
  }
  const keep = cur.nodeName === 'CANVAS' ? ['width', 'height'] : cur.nodeName === 'DETAILS' ? ['open'] : [];
  for (const { name } of [...cur.attributes]) {
    if (!next.hasAttribute(name) && !keep.includes(name)) cur.removeAttribute(name);
  }
  for (const { name, value } of [...next.attributes]) {
    if (cur.getAttribute(name) !== value) cur.setAttribute(name, value);
  }
  const a = [...cur.childNodes];
  const b = [...next.childNodes];
  for (let i = 0; i < b.length; i++) {
    if (i < a.length) morph(a[i], b[i]);
    else cur.append(b[i]);
  }
  for (let i = b.length; i < a.length; i++) a[i].remove();
}

function update(container, ...children) {
  const next = h(container.nodeName.toLowerCase(), {}, ...children);
  for (const { name, value } of [...container.attributes]) next.setAttribute(name, value);
  morph(container, next);
}

// ---- formatting -------------------------------------------------------------

function isNum(v) {
  return typeof v === 'number' && Number.isFinite(v);
}

function fmtNum(v) {
  return isNum(v) ? v.toLocaleString('en-US') : '–';
}

function fmtBytes(v) {
  if (!isNum(v)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? Math.round(v) : v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

function fmtRate(v) {
  return isNum(v) ? `${fmtBytes(v)}/s` : '–';
}

function fmtPerSec(v) {
  if (!isNum(v)) return '–';
  return `${v >= 10 ? Math.round(v) : v.toFixed(v >= 1 ? 1 : 2)}/s`;
}

function fmtMs(v) {
  if (!isNum(v)) return '–';
  return v >= 10_000 ? `${(v / 1000).toFixed(0)} s` : v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`;
}

/** "12s ago", "3m 4s ago" from a server timestamp. */
function ago(ts) {
  if (!isNum(ts)) return '–';
  const s = Math.max(0, Math.round((Date.now() - skewMs - ts) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function badge(text, cls, attrs) {
  return h('span', { class: `badge ${cls ?? ''}`, ...attrs }, text);
}

function stateBadge(state, reason) {
  return badge(state, `state state-${state}`, { 'data-state': state, title: reason || undefined });
}

/** A wrapping list of label/value pairs; pairs with an undefined value are left out. */
function kv(pairs) {
  return h('dl', { class: 'kv' },
    pairs.filter(([, v]) => v !== undefined).map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))));
}

function table(head, rows, attrs) {
  return h('div', { class: 'scroll' },
    h('table', attrs ?? {}, h('thead', {}, h('tr', {}, head.map((c) => h('th', { scope: 'col' }, c)))), h('tbody', {}, rows)));
}

// ---- the store trees --------------------------------------------------------

/** A child's path segment: its role (fallback), name (shard) or kind; as in src/admin/tree.ts. */
function segment(node) {
  if (typeof node.role === 'string' && node.role) return node.role;
  if (typeof node.name === 'string' && node.name) return node.name;
  return node.kind;
}

function walk(node, path, visit) {
  visit(node, path);
  for (const child of node.children ?? []) walk(child, `${path}/${segment(child)}`, visit);
}

/** Turns the counters of this update into rates and chart points. */
function ingest(state) {
  const t = state.now;
  const live = new Set();
  for (const tree of ['cas', 'ac']) {
    walk(state.trees[tree], segment(state.trees[tree]), (node, path) => {
      if (node.kind !== 'sharding' || !Array.isArray(node.shards)) return;
      for (const s of node.shards) {
        const key = `${tree}|${path}|${s.name}`;
        live.add(key);
        const child = (node.children ?? []).find((c) => c.name === s.name) ?? {};
        const cur = { t, requests: child.requests, failures: child.failures, bytesIn: s.bytesIn, bytesOut: s.bytesOut };
        const prev = previous.get(key);
        // An extra update right after a drain would give jumpy rates over a
        // few milliseconds: rates are taken over at least half a second.
        if (prev && t - prev.t < 500) continue;
        previous.set(key, cur);
        const r = {};
        if (prev) {
          const dt = (t - prev.t) / 1000;
          const per = (a, b) => (isNum(a) && isNum(b) ? Math.max(0, (a - b) / dt) : undefined);
          r.in = per(cur.bytesIn, prev.bytesIn);
          r.out = per(cur.bytesOut, prev.bytesOut);
          r.req = per(cur.requests, prev.requests);
          r.err = per(cur.failures, prev.failures);
        }
        // A shard whose store keeps no counters: estimate from the breaker's window.
        if (!isNum(child.requests)) {
          r.req = (s.recentRequests ?? 0) / BREAKER_WINDOW_S;
          r.err = (s.recentFailures ?? 0) / BREAKER_WINDOW_S;
          r.estimated = true;
        }
        rates.set(key, r);
        if (isNum(r.req)) {
          const points = series.get(key) ?? [];
          points.push({ t, req: r.req, err: r.err ?? 0 });
          while (points.length > 0 && points[0].t < t - HISTORY_MS) points.shift();
          series.set(key, points);
        }
      }
    });
  }
  for (const map of [series, previous, rates]) {
    for (const key of map.keys()) if (!live.has(key)) map.delete(key);
  }
}

function renderNode(tree, node, path, state) {
  const head = h('div', { class: 'node-head' },
    h('span', { class: 'kind' }, node.kind),
    node.role ? badge(node.role, 'role') : null,
    node.name && node.kind !== 'sharding' ? h('span', { class: 'name' }, node.name) : null);
  let body;
  let children = node.children ?? [];
  switch (node.kind) {
    case 'sharding':
      body = renderSharding(tree, node, path, state);
      break;
    case 'fallback':
      body = renderFallback(node);
      break;
    case 'disk':
    case 'memory':
      body = renderLeaf(node);
      break;
    case 'remote':
      body = renderRemote(node);
      break;
    case 'completenessChecking':
      body = kv([['hidden results', fmtNum(node.hiddenResults)]]);
      break;
    default:
      body = renderGeneric(node);
  }
  let childBlock = null;
  if (children.length > 0) {
    const rendered = children.map((c) => renderNode(tree, c, `${path}/${segment(c)}`, state));
    childBlock = node.kind === 'sharding'
      ? h('details', { class: 'children', 'data-key': `details|${tree}|${path}` },
          h('summary', {}, `Shard stores (${children.length})`), rendered)
      : h('div', { class: 'children' }, rendered);
  }
  return h('div', { class: `node kind-${node.kind}`, 'data-key': `${tree}|${path}`, 'data-path': path }, head, body, childBlock);
}

function renderSharding(tree, node, path, state) {
  const summary = kv([
    ['hints pending', `${fmtNum(node.hintsPending)} / ${fmtNum(node.maxHints)}`],
    ['hint overflows', fmtNum(node.hintOverflows)],
    ['handed off', fmtNum(node.handoffCopied)],
    ['handoff lost', fmtNum(node.handoffLost)],
    ['probing', node.probing ? 'on' : 'off'],
    ['probe hits', fmtNum(node.probeHits)],
    ['retries', fmtNum(node.retries)],
  ]);
  const rows = (node.shards ?? []).map((s) => {
    const key = `${tree}|${path}|${s.name}`;
    const r = rates.get(key) ?? {};
    const errPct = s.recentRequests > 0 ? ` (${Math.round((100 * s.recentFailures) / s.recentRequests)}%)` : '';
    const health = s.lastHealthCheckOk === null || s.lastHealthCheckOk === undefined
      ? h('span', { class: 'muted' }, 'not yet')
      : h('span', { class: s.lastHealthCheckOk ? 'ok' : 'bad', title: s.lastHealthCheckError || undefined },
          `${s.lastHealthCheckOk ? '✓' : '✗'} ${fmtMs(s.lastHealthCheckMs)}`);
    const drained = s.state === 'drained';
    const action = drained ? 'undrain' : 'drain';
    return h('tr', { 'data-key': key, 'data-tree': tree, 'data-store': path, 'data-shard': s.name },
      h('th', { scope: 'row' }, s.name, s.weight !== 1 ? h('span', { class: 'muted' }, ` ×${s.weight}`) : null),
      h('td', {}, stateBadge(s.state, s.reason)),
      h('td', { class: 'nowrap' }, ago(s.since)),
      h('td', {}, s.manual ? badge('manual', 'manual') : h('span', { class: 'muted' }, 'auto')),
      h('td', { class: 'num' }, `${fmtNum(s.recentFailures)} / ${fmtNum(s.recentRequests)}${errPct}`),
      h('td', { class: 'nowrap' }, health),
      h('td', { class: 'num' }, fmtNum(s.inFlight)),
      h('td', { class: 'num nowrap' }, fmtRate(r.in)),
      h('td', { class: 'num nowrap' }, fmtRate(r.out)),
      h('td', { class: 'num', title: 'pending for this shard / held as stand-in' }, `${fmtNum(s.hintsPending)} / ${fmtNum(s.hintsHeld)}`),
      h('td', { class: 'chart-cell' },
        h('canvas', { class: 'chart', 'data-key': key, 'data-series': key, role: 'img',
          'aria-label': `requests and errors per second of shard ${s.name}, up to the last 5 minutes`,
          title: `now: ${fmtPerSec(r.req)} requests, ${fmtPerSec(r.err)} errors${r.estimated ? ' (estimated from the breaker window)' : ''}` })),
      h('td', {},
        h('button', {
          type: 'button', class: `action ${action}`, 'data-action': action, 'data-tree': tree, 'data-shard': s.name,
          disabled: !state.tokenConfigured,
          title: state.tokenConfigured ? undefined : 'the server has no admin token configured',
        }, drained ? 'Undrain' : 'Drain')),
      h('td', { class: 'reason' }, s.reason ?? ''));
  });
  return h('div', {}, summary,
    table(['Shard', 'State', 'Since', 'Drain', 'Errors (window)', 'Health check', 'In flight', 'Write', 'Read', 'Hints',
      h('span', {}, h('span', { class: 'key-req' }, 'requests'), ' / ', h('span', { class: 'key-err' }, 'errors'), ' per s'),
      '', 'Reason'], rows, { class: 'shards' }));
}

function renderFallback(node) {
  const b = node.breaker ?? {};
  const repl = node.replication ?? {};
  const journal = node.journal ?? {};
  const repairs = node.repairs ?? {};
  const serving = node.serving ?? '?';
  const sb = node.secondaryBreaker;
  const sj = node.secondaryJournal;
  // Sync mode acknowledges a write on both sides; "one copy" while a side is down.
  const copies = node.oneCopy
    ? badge('one copy', 'copies state-half-open', { 'data-copies': '1', title: node.oneCopy })
    : badge(node.copies === 2 ? 'two copies' : 'one copy, then replicated', `copies ${node.copies === 2 ? 'state-closed' : ''}`,
      { 'data-copies': String(node.copies ?? '?') });
  return h('div', {},
    kv([
      ['serving', badge(serving, `serving serving-${serving}`, { 'data-serving': serving })],
      ['durability', h('span', { 'data-durability': node.durability ?? 'async' }, node.durability ?? 'async')],
      ['writes land on', h('span', {}, copies, node.oneCopy ? h('span', { class: 'muted' }, ` ${node.oneCopy}`) : null)],
      ['primary breaker', h('span', {}, stateBadge(b.state ?? '?', b.reason), ' ', h('span', { class: 'muted' }, ago(b.since)))],
      sb ? ['secondary breaker', h('span', {}, stateBadge(sb.state ?? '?', sb.reason), ' ', h('span', { class: 'muted' }, ago(sb.since)))] : null,
      ['failovers', fmtNum(node.failovers)],
      ['one-copy writes', fmtNum(node.oneCopyWrites)],
    ].filter(Boolean)),
    table(['', 'Queued', 'In flight', 'Lag', 'Done', 'Failed / lost', 'Overflow'], [
      h('tr', {}, h('th', { scope: 'row' }, 'Replication → secondary'), h('td', { class: 'num' }, fmtNum(repl.queued)),
        h('td', { class: 'num' }, fmtNum(repl.inFlight)), h('td', { class: 'num' }, fmtMs(repl.lagMs)),
        h('td', { class: 'num' }, fmtNum(repl.done)), h('td', { class: 'num' }, fmtNum((repl.failed ?? 0) + (repl.vanished ?? 0))),
        h('td', { class: 'num', title: repl.overflowPolicy ? `on overflow: ${repl.overflowPolicy}` : undefined },
          `${fmtNum(repl.overflow)}${repl.overflowPolicy ? ` (${repl.overflowPolicy})` : ''}`)),
      h('tr', {}, h('th', { scope: 'row' }, 'Journal → primary'),
        h('td', { class: 'num' }, `${fmtNum(journal.backlog)} / ${fmtNum(journal.maxEntries)}`),
        h('td', { class: 'num' }, fmtNum(journal.inFlight)), h('td', { class: 'num' }, fmtMs(journal.lagMs)),
        h('td', { class: 'num' }, fmtNum(journal.replayed)), h('td', { class: 'num' }, fmtNum(journal.lost)), h('td', {}, '–')),
      sj ? h('tr', {}, h('th', { scope: 'row' }, 'Journal → secondary'),
        h('td', { class: 'num' }, `${fmtNum(sj.backlog)} / ${fmtNum(sj.maxEntries)}`),
        h('td', { class: 'num' }, fmtNum(sj.inFlight)), h('td', { class: 'num' }, fmtMs(sj.lagMs)),
        h('td', { class: 'num' }, fmtNum(sj.replayed)), h('td', { class: 'num' }, fmtNum(sj.lost)), h('td', {}, '–')) : null,
      h('tr', {}, h('th', { scope: 'row' }, 'Read repairs → primary'), h('td', { class: 'num' }, fmtNum(repairs.queued)),
        h('td', { class: 'num' }, fmtNum(repairs.inFlight)), h('td', {}, '–'), h('td', { class: 'num' }, fmtNum(repairs.done)),
        h('td', { class: 'num' }, fmtNum(repairs.failed)), h('td', { class: 'num' }, fmtNum(repairs.dropped))),
    ], { class: 'background' }));
}

function renderLeaf(node) {
  const max = node.maxSizeBytes;
  const used = node.bytes;
  const pct = isNum(max) && max > 0 && isNum(used) ? Math.round((100 * used) / max) : undefined;
  return h('div', {},
    isNum(max) && max > 0
      ? h('div', { class: 'usage' },
          h('meter', { min: 0, max, value: used ?? 0, high: max * 0.9, 'aria-label': 'usage' }),
          h('span', {}, `${fmtBytes(used)} of ${fmtBytes(max)}${pct !== undefined ? ` (${pct}%)` : ''}`))
      : null,
    kv([
      ['blobs', fmtNum(node.blobs)],
      ['evictions', fmtNum(node.evictions)],
      ['path', node.path],
      ['writes in flight', isNum(node.writesInFlight) ? fmtNum(node.writesInFlight) : undefined],
    ]));
}

function renderRemote(node) {
  return kv([
    ['url', node.url],
    ['session', node.session ? badge(node.session, `session session-${node.session}`) : undefined],
    ['in flight', fmtNum(node.inFlight)],
    ['requests', fmtNum(node.requests)],
    ['failures', fmtNum(node.failures)],
    ['health checks', `${fmtNum(node.healthChecks)} (${fmtNum(node.healthFailures)} failed)`],
    ['sent', fmtBytes(node.bytesOut)],
    ['received', fmtBytes(node.bytesIn)],
  ]);
}

function renderGeneric(node) {
  const pairs = [];
  for (const [k, v] of Object.entries(node)) {
    if (k === 'kind' || k === 'children' || k === 'role' || k === 'name') continue;
    if (typeof v === 'number') pairs.push([k, fmtNum(v)]);
    else if (typeof v === 'string' || typeof v === 'boolean') pairs.push([k, String(v)]);
  }
  return kv(pairs);
}

function renderProcesses(processes) {
  if (processes.length === 0) return h('p', { class: 'muted' }, 'No supervised processes.');
  return table(['Name', 'State', 'PID', 'Since', 'Restarts', 'Last exit'], processes.map((p) =>
    h('tr', { 'data-key': `proc|${p.name}`, 'data-process': p.name },
      h('th', { scope: 'row' }, p.name),
      h('td', {}, badge(p.running ? 'running' : 'exited', p.running ? 'state-closed' : 'state-open')),
      h('td', { class: 'num' }, p.pid ?? '–'),
      h('td', { class: 'nowrap' }, ago(p.since)),
      h('td', { class: 'num' }, fmtNum(p.restarts)),
      h('td', {}, p.lastExit ?? '–'))));
}

function renderActions(actions) {
  if (actions.length === 0) return h('p', { class: 'muted' }, 'No drains or undrains since this process started.');
  return table(['When', 'Action', 'Tree', 'Shard', 'From'], actions.map((a) =>
    h('tr', {}, h('td', { class: 'nowrap' }, ago(a.at)), h('td', {}, a.action), h('td', {}, a.tree.toUpperCase()),
      h('td', {}, a.shard), h('td', {}, a.peer))));
}

function render(state) {
  current = state;
  skewMs = Date.now() - state.now;
  ingest(state);
  document.getElementById('version').textContent = `v${state.version}`;
  const ready = document.getElementById('ready');
  const degraded = state.ready && (state.degraded ?? []).length > 0;
  ready.textContent = !state.ready ? 'not ready' : degraded ? 'ready, one copy' : 'ready';
  ready.className = `badge ${!state.ready ? 'state-open' : degraded ? 'state-half-open' : 'state-closed'}`;
  ready.title = degraded ? state.degraded.join('\n') : '';
  document.getElementById('updated').textContent = `updated ${new Date(state.now).toLocaleTimeString()}`;
  document.getElementById('token-note').hidden = state.tokenConfigured;
  for (const tree of ['cas', 'ac']) {
    const root = state.trees[tree];
    update(document.getElementById(`tree-${tree}`), renderNode(tree, root, segment(root), state));
  }
  update(document.getElementById('processes'), renderProcesses(state.processes ?? []));
  update(document.getElementById('actions'), renderActions(state.actions ?? []));
  for (const canvas of document.querySelectorAll('canvas[data-series]')) {
    drawChart(canvas, series.get(canvas.getAttribute('data-series')) ?? [], state.now);
  }
}

// ---- charts -----------------------------------------------------------------

function drawChart(canvas, points, now) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 160;
  const ht = canvas.clientHeight || 40;
  if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
  if (canvas.height !== Math.round(ht * dpr)) canvas.height = Math.round(ht * dpr);
  const ctx = canvas.getContext('2d');
  if (!ctx) return;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, ht);
  const css = getComputedStyle(canvas);
  const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const top = 10;
  const bottom = ht - 2;
  let max = 0;
  for (const p of points) max = Math.max(max, p.req, p.err);
  max = niceCeil(Math.max(max, 1));
  ctx.strokeStyle = color('--grid', '#ccc');
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(0, bottom + 0.5);
  ctx.lineTo(w, bottom + 0.5);
  ctx.stroke();
  // The window grows with the history, from 30 s up to HISTORY_MS, so a
  // fresh page shows its first seconds across the chart, not as a sliver.
  const span = Math.min(HISTORY_MS, Math.max(30_000, points.length > 0 ? now - points[0].t : 0));
  const x = (t) => w - ((now - t) / span) * w;
  const y = (v) => bottom - (v / max) * (bottom - top);
  for (const [field, name, fallback] of [['req', '--chart-req', '#2563eb'], ['err', '--chart-err', '#dc2626']]) {
    if (points.length === 0) continue;
    ctx.strokeStyle = color(name, fallback);
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p.t), y(p[field])) : ctx.lineTo(x(p.t), y(p[field]))));
    ctx.stroke();
  }
  ctx.fillStyle = color('--muted', '#666');
  ctx.font = '9px system-ui, sans-serif';
  ctx.textBaseline = 'top';
  ctx.fillText(`${fmtPerSec(max)} max`, 2, 0);
  const label = span >= 60_000 ? `last ${Math.round(span / 60_000)} min` : `last ${Math.round(span / 1000)} s`;
  ctx.textAlign = 'right';
  ctx.fillText(label, w - 2, 0);
  ctx.textAlign = 'left';
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

// ---- messages, token, drain controls ---------------------------------------

let messageTimer;
function showMessage(kind, text) {
  const box = document.getElementById('message');
  document.getElementById('message-text').textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
  clearTimeout(messageTimer);
  if (kind !== 'error') messageTimer = setTimeout(() => (box.hidden = true), 6000);
}

function token() {
  return document.getElementById('token').value.trim();
}

async function shardAction(action, tree, shard) {
  const what = `${action === 'drain' ? 'Drain' : 'Undrain'} shard "${shard}" of the ${tree.toUpperCase()} tree?`;
  const why = action === 'drain'
    ? '\n\nIt takes no traffic until it is undrained; its blobs are served by stand-ins meanwhile.'
    : '\n\nIt goes half-open and takes traffic again once its health checks pass.';
  if (!confirm(what + why)) return;
  const headers = {};
  if (token() !== '') headers.Authorization = `Bearer ${token()}`;
  let res;
  try {
    res = await fetch(`/api/shards/${encodeURIComponent(tree)}/${encodeURIComponent(shard)}/${action}`, { method: 'POST', headers });
  } catch (err) {
    showMessage('error', `${action} ${shard}: request failed: ${err.message}`);
    return;
  }
  let body = {};
  try {
    body = await res.json();
  } catch {
    // not JSON; the status says enough
  }
  if (!res.ok) {
    showMessage('error', `${action} ${shard} refused: ${res.status} ${body.error ?? res.statusText}`);
    return;
  }
  showMessage('ok', `Shard ${shard} (${tree.toUpperCase()}) ${action}ed.`);
  try {
    const state = await fetch('/api/state').then((r) => r.json());
    render(state);
  } catch {
    // the event stream will bring it
  }
}

function setConn(kind, text) {
  const el = document.getElementById('conn');
  el.setAttribute('data-conn', kind);
  el.className = `badge conn-${kind}`;
  el.textContent = text;
}

function start() {
  const input = document.getElementById('token');
  input.value = sessionStorage.getItem(TOKEN_KEY) ?? '';
  input.addEventListener('input', () => sessionStorage.setItem(TOKEN_KEY, input.value));
  document.getElementById('token-form').addEventListener('submit', (ev) => ev.preventDefault());
  document.getElementById('message-close').addEventListener('click', () => {
    document.getElementById('message').hidden = true;
  });
  document.addEventListener('click', (ev) => {
    const button = ev.target instanceof Element ? ev.target.closest('button[data-action]') : null;
    if (button === null || button.disabled) return;
    void shardAction(button.getAttribute('data-action'), button.getAttribute('data-tree'), button.getAttribute('data-shard'));
  });

  const events = new EventSource('/api/events');
  events.addEventListener('open', () => setConn('live', 'live'));
  events.addEventListener('error', () => setConn('down', 'reconnecting…'));
  events.addEventListener('state', (ev) => {
    setConn('live', 'live');
    try {
      render(JSON.parse(ev.data));
    } catch (err) {
      showMessage('error', `could not show the update: ${err.message}`);
    }
  });
  // Relative times keep moving between updates, and charts follow the width.
  window.addEventListener('resize', () => current && render(current));
}

start();
