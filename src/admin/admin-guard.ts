// The admin surface's browser-facing defences, as plain functions that
// admin-app.ts wires into fastify hooks:
//
// - Host check: a request whose Host header is not one of the admin's own
//   names is refused with 421. This is what defeats DNS rebinding: a page on
//   evil.example that re-points its name at 127.0.0.1 makes the browser send
//   `Host: evil.example:8990`, which is not on the list, so the page never
//   reads /api/state or /metrics. (Same-origin policy alone does not help
//   there: to the browser it *is* the same origin.)
// - Cross-origin writes: a state-changing request with an Origin other than
//   the admin's own, or with Sec-Fetch-Site other than same-origin/none, is
//   refused, and a request body must be application/json (no form posts).
//   Writes also need the bearer token (admin-app.ts), which a browser never
//   attaches on its own; these checks are a second, independent lock.
// - Security headers on every response (see securityHeaders()).
import { isIP } from 'node:net';
import { networkInterfaces } from 'node:os';
import { ConfigError } from '../config.ts';

/** A Host header value or an allowedHosts entry, normalized. */
export interface HostPattern {
  /** Lower case; an IPv6 address in brackets, in its canonical (compressed) form. */
  readonly name: string;
  /** undefined: in an entry, any port; in a Host header, the default port (80). */
  readonly port: number | undefined;
}

/**
 * Parses "name", "name:port", "[v6]", "[v6]:port" (and, for config entries, a
 * bare IPv6 address). undefined when it is none of these.
 */
export function parseHost(text: string): HostPattern | undefined {
  const s = text.trim().toLowerCase();
  const bracketed = /^\[([0-9a-f:.]+)\](?::(\d{1,5}))?$/.exec(s);
  if (bracketed !== null) {
    const port = portOf(bracketed[2]);
    return isIP(bracketed[1]!) === 6 && port !== null ? { name: canonicalV6(bracketed[1]!), port } : undefined;
  }
  if (isIP(s) === 6) return { name: canonicalV6(s), port: undefined };
  const named = /^([a-z0-9_-]+(?:\.[a-z0-9_-]+)*)(?::(\d{1,5}))?$/.exec(s);
  if (named === null) return undefined;
  const port = portOf(named[2]);
  return port === null ? undefined : { name: named[1]!, port };
}

/** Validates config.admin.allowedHosts; errors name the entry. */
export function parseAllowedHosts(list: readonly string[], path = 'config.admin.allowedHosts'): HostPattern[] {
  return list.map((entry, i) => {
    const host = parseHost(entry);
    if (host === undefined) {
      throw new ConfigError(`${path}[${i}]: expected "name", "name:port" or "[ipv6]:port", got ${JSON.stringify(entry)}`);
    }
    return host;
  });
}

/**
 * The names the admin answers to when allowedHosts is not configured, each
 * with `port` (undefined: any port, for an app that is not listening):
 * - the listen host itself;
 * - on loopback (127.x, ::1, localhost): also localhost, 127.0.0.1 and [::1];
 * - on a wildcard address (0.0.0.0, ::): localhost and every address of this
 *   machine's interfaces, so a probe or a Prometheus scrape by pod IP and a
 *   `kubectl port-forward` work. DNS names must then be listed explicitly.
 */
export function defaultAllowedHosts(listenHost: string, port: number | undefined): HostPattern[] {
  const names = new Set<string>();
  const add = (host: string) => {
    const parsed = parseHost(host);
    if (parsed !== undefined) names.add(parsed.name);
  };
  add(listenHost);
  if (isWildcard(listenHost)) {
    names.delete(canonicalHost(listenHost));
    add('localhost');
    for (const list of Object.values(networkInterfaces())) {
      for (const a of list ?? []) {
        // A zone (fe80::1%eth0) cannot be written in a URL; such a Host never comes.
        if (a.family === 'IPv6' && (a.scopeid ?? 0) !== 0) continue;
        add(a.address);
      }
    }
  } else if (isLoopback(listenHost)) {
    for (const h of ['localhost', '127.0.0.1', '::1']) add(h);
  }
  return [...names].map((name) => ({ name, port }));
}

/** True when the Host header value matches one of `allowed`. */
export function hostAllowed(header: string | undefined, allowed: readonly HostPattern[]): boolean {
  if (header === undefined || header === '') return false;
  const host = parseHost(header);
  if (host === undefined) return false;
  const port = host.port ?? 80;
  return allowed.some((a) => a.name === host.name && (a.port === undefined || a.port === port));
}

/** How a HostPattern is written, for logs. */
export function formatHost(h: HostPattern): string {
  return h.port === undefined ? h.name : `${h.name}:${h.port}`;
}

type Headers = Readonly<Record<string, string | string[] | undefined>>;

/**
 * Why a state-changing request must be refused as cross-origin, or
 * undefined. `host` is the request's (already allowed) Host header.
 * - Sec-Fetch-Site (sent by every current browser): only "same-origin" and
 *   "none" pass; "same-site" is refused too (another port on the same host
 *   is same-site, e.g. the REAPI port).
 * - Origin: when present it must be http(s) and name the same host and port
 *   as the Host header ("null", from sandboxed frames and file: pages, fails).
 * Requests without either header (curl, scripts) pass: they carry no
 * ambient browser credentials, and still need the bearer token.
 */
export function crossOriginProblem(headers: Headers, host: string | undefined): string | undefined {
  const site = single(headers['sec-fetch-site']);
  if (site !== undefined && site !== 'same-origin' && site !== 'none') {
    return `cross-origin request refused (Sec-Fetch-Site: ${site})`;
  }
  const origin = single(headers.origin);
  if (origin === undefined) return undefined;
  let url: URL | undefined;
  try {
    url = new URL(origin);
  } catch {
    url = undefined;
  }
  const own = host === undefined ? undefined : parseHost(host);
  const theirs = url === undefined || (url.protocol !== 'http:' && url.protocol !== 'https:') ? undefined : parseHost(url.host);
  if (own === undefined || theirs === undefined || own.name !== theirs.name || originPort(own) !== originPort(theirs)) {
    return `cross-origin request refused: Origin ${JSON.stringify(origin.slice(0, 100))} is not this admin server`;
  }
  return undefined;
}

/**
 * Why a request body must be refused, or undefined: a body is accepted only
 * as application/json, so no HTML form (urlencoded, multipart, text/plain)
 * can post to the API. A request without a body passes.
 */
export function bodyProblem(headers: Headers): string | undefined {
  const length = single(headers['content-length']);
  const hasBody = headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
  if (!hasBody) return undefined;
  const type = (single(headers['content-type']) ?? '').split(';')[0]!.trim().toLowerCase();
  if (type === 'application/json') return undefined;
  return `request body must be application/json, got ${type === '' ? 'no content-type' : JSON.stringify(type.slice(0, 60))}`;
}

/** For the page: its own scripts and styles only, no inline code, no frames, no DOM-XSS sinks. */
export const PAGE_CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
  "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; " +
  "require-trusted-types-for 'script'; trusted-types 'none'";

/** For everything else (JSON, Prometheus text, event streams, errors): nothing may run or load. */
export const API_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/**
 * The headers every admin response carries; the page's routes replace the
 * CSP with PAGE_CSP. No Strict-Transport-Security: the admin port speaks
 * plain HTTP and browsers ignore HSTS there.
 */
export const SECURITY_HEADERS: Readonly<Record<string, string>> = {
  'content-security-policy': API_CSP,
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
  'referrer-policy': 'no-referrer',
  'cross-origin-opener-policy': 'same-origin',
  'cross-origin-resource-policy': 'same-origin',
  'cross-origin-embedder-policy': 'require-corp',
  'origin-agent-cluster': '?1',
  'permissions-policy':
    'accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), payment=(), usb=()',
  'cache-control': 'no-store',
};

/**
 * A port for comparing an Origin with a Host header: a TLS proxy in front
 * receives https://name (port 443) and passes on Host: name (port 80), so
 * no port, 80 and 443 all count as the default.
 */
function originPort(h: HostPattern): number | 'default' {
  return h.port === undefined || h.port === 80 || h.port === 443 ? 'default' : h.port;
}

function portOf(text: string | undefined): number | undefined | null {
  if (text === undefined) return undefined;
  const port = Number(text);
  return port <= 65535 ? port : null;
}

function canonicalV6(address: string): string {
  return new URL(`http://[${address}]/`).hostname;
}

function canonicalHost(host: string): string {
  return parseHost(host)?.name ?? host.toLowerCase();
}

function isWildcard(host: string): boolean {
  const name = canonicalHost(host);
  return name === '0.0.0.0' || name === '[::]';
}

function isLoopback(host: string): boolean {
  const name = canonicalHost(host);
  return name === 'localhost' || name === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(name) || /^\[::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}\]$/.test(name);
}

function single(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value[0] : value;
}
