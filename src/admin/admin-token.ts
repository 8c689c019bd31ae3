// Where the admin bearer token comes from: the config itself (`token`), a
// file (`tokenFile`, e.g. a mounted Kubernetes secret) or an environment
// variable (`tokenEnv`). config.ts guarantees at most one is given and has
// resolved tokenFile against the config file's directory; this reads the
// file or the variable once, at startup.
//
// Errors are ConfigErrors naming the field (`config.admin.tokenFile: ...`),
// so main.ts reports them like any other config error and exits 2. They
// never include the token or the file's content.
import { readFile } from 'node:fs/promises';
import type { AdminConfig } from '../config.ts';
import { ConfigError } from '../config.ts';

/** The token of the default config.json; anyone who read the README knows it. */
export const PLACEHOLDER_TOKEN = 'change-me';

/** Shorter tokens are accepted with a warning. */
export const MIN_TOKEN_LENGTH = 16;

export interface ResolvedAdminToken {
  /** undefined: no token configured (drain and undrain are refused). */
  readonly token: string | undefined;
  /** Which field it came from, for the startup log. */
  readonly source: 'token' | 'tokenFile' | 'tokenEnv' | undefined;
}

export interface ResolveAdminTokenOptions {
  /** Field path of the admin section in errors. Default "config.admin". */
  readonly path?: string;
  /** Where tokenEnv is looked up. Default process.env. */
  readonly env?: Readonly<Record<string, string | undefined>>;
}

type TokenFields = Pick<AdminConfig, 'token' | 'tokenFile' | 'tokenEnv'>;

/**
 * The admin token from whichever of token / tokenFile / tokenEnv is set.
 * tokenFile: its first line, trimmed; a file that cannot be read or whose
 * first line is blank is an error. tokenEnv: the variable's value, trimmed;
 * unset or blank is an error. A token must be printable ASCII (it travels
 * in an Authorization header).
 */
export async function resolveAdminToken(admin: TokenFields, opts: ResolveAdminTokenOptions = {}): Promise<ResolvedAdminToken> {
  const path = opts.path ?? 'config.admin';
  if (admin.tokenFile !== undefined) {
    const field = `${path}.tokenFile`;
    let text: string;
    try {
      text = await readFile(admin.tokenFile, 'utf8');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new ConfigError(`${field}: cannot read ${JSON.stringify(admin.tokenFile)}${code === undefined ? '' : ` (${code})`}`);
    }
    const token = firstLine(text.replace(/^\uFEFF/, '')).trim();
    if (token === '') throw new ConfigError(`${field}: ${JSON.stringify(admin.tokenFile)} is empty (the token is its first line)`);
    return { token: checked(token, field), source: 'tokenFile' };
  }
  if (admin.tokenEnv !== undefined) {
    const field = `${path}.tokenEnv`;
    const value = (opts.env ?? process.env)[admin.tokenEnv];
    if (value === undefined) throw new ConfigError(`${field}: environment variable ${admin.tokenEnv} is not set`);
    const token = value.trim();
    if (token === '') throw new ConfigError(`${field}: environment variable ${admin.tokenEnv} is empty`);
    return { token: checked(token, field), source: 'tokenEnv' };
  }
  if (admin.token !== undefined) {
    const token = admin.token.trim();
    if (token === '') throw new ConfigError(`${path}.token: is blank`);
    return { token: checked(token, `${path}.token`), source: 'token' };
  }
  return { token: undefined, source: undefined };
}

/**
 * What to warn an operator about at startup: the placeholder of the default
 * config, or a short token. Empty when there is nothing to say.
 */
export function adminTokenWarnings(resolved: ResolvedAdminToken, path = 'config.admin'): string[] {
  const { token, source } = resolved;
  if (token === undefined || source === undefined) return [];
  const field = `${path}.${source}`;
  if (token === PLACEHOLDER_TOKEN) {
    return [
      `the admin token (${field}) is the placeholder "${PLACEHOLDER_TOKEN}" of the default config: anyone who can ` +
        `reach the admin port can drain shards; put a random token in a file and name it in ${path}.tokenFile ` +
        `(or ${path}.tokenEnv)`,
    ];
  }
  if (token.length < MIN_TOKEN_LENGTH) {
    return [`the admin token (${field}) has ${token.length} characters; use at least ${MIN_TOKEN_LENGTH} random ones`];
  }
  return [];
}

function firstLine(text: string): string {
  const end = text.search(/\r?\n/);
  return end < 0 ? text : text.slice(0, end);
}

/** Printable ASCII only: a header value cannot carry the rest reliably. */
function checked(token: string, field: string): string {
  if (!/^[\x20-\x7e]+$/.test(token)) {
    throw new ConfigError(`${field}: the token may only contain printable ASCII characters`);
  }
  return token;
}
