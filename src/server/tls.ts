// TLS material for the REAPI port: the certificate chain, its key and the
// client CA named in config.json's `tls`, read and checked at startup (each
// error names the config field and the file), reloaded on SIGHUP and when
// one of the files changes. A reload that fails (a half-written file, a key
// that does not match the certificate) is logged and the previous material
// stays in use; connections already open are never touched, since the
// server only swaps the context that new handshakes use
// (tls.Server#setSecureContext).
import { createPrivateKey, X509Certificate } from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import { unwatchFile, watchFile } from 'node:fs';
import type { Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createSecureContext } from 'node:tls';
import type { SecureContextOptions } from 'node:tls';
import type { Logger } from 'pino';
import { ConfigError } from '../config.ts';
import type { ServerTlsConfig } from '../config.ts';

/** What a loaded certificate looks like, for logs. */
export interface CertificateSummary {
  readonly subject: string;
  readonly validTo: string;
  readonly fingerprint256: string;
}

/** The PEM files' contents, checked. */
export interface TlsMaterial {
  readonly cert: Buffer;
  readonly key: Buffer;
  readonly ca: Buffer | undefined;
  readonly leaf: CertificateSummary;
}

export interface TlsContextOptions {
  /** How config errors name the section, e.g. "config.tls" (the default). */
  readonly field?: string | undefined;
  readonly logger?: Logger | undefined;
  /** How often the files are stat'ed for changes while someone is subscribed. Default 1000 ms. */
  readonly watchIntervalMs?: number | undefined;
  /** A change is acted on once the files have been quiet this long (cert and key are often written one after the other). Default 250 ms. */
  readonly debounceMs?: number | undefined;
}

type Listener = (material: TlsMaterial) => void;

/**
 * The server's TLS material, current and reloadable. createOnePortServer
 * subscribes to it; while anyone is subscribed the files are watched
 * (fs.watchFile: by path, so a file replaced by rename, as certificate
 * tooling and Kubernetes secret volumes do it, is still seen).
 */
export class TlsContext {
  readonly config: ServerTlsConfig;
  readonly #field: string;
  readonly #log: Logger | undefined;
  readonly #watchIntervalMs: number;
  readonly #debounceMs: number;
  readonly #listeners = new Set<Listener>();
  #material: TlsMaterial;
  #watching = false;
  #debounce: NodeJS.Timeout | undefined;
  /** Reloads run one at a time, in order. */
  #queue: Promise<unknown> = Promise.resolve();
  #reloads = 0;
  #failedReloads = 0;

  private constructor(config: ServerTlsConfig, material: TlsMaterial, opts: TlsContextOptions) {
    this.config = config;
    this.#material = material;
    this.#field = opts.field ?? 'config.tls';
    this.#log = opts.logger;
    this.#watchIntervalMs = opts.watchIntervalMs ?? 1000;
    this.#debounceMs = opts.debounceMs ?? 250;
  }

  /** Reads and checks the files; throws a ConfigError naming the field and the file. */
  static async load(config: ServerTlsConfig, opts: TlsContextOptions = {}): Promise<TlsContext> {
    const material = await loadTlsMaterial(config, opts.field ?? 'config.tls');
    warnIfExpired(material, opts.logger);
    return new TlsContext(config, material, opts);
  }

  get material(): TlsMaterial {
    return this.#material;
  }

  /** What tls.createServer / setSecureContext take for the current material. */
  secureContextOptions(): SecureContextOptions {
    const m = this.#material;
    return m.ca === undefined ? { cert: m.cert, key: m.key } : { cert: m.cert, key: m.key, ca: m.ca };
  }

  /** 'none' without clientCaFile; else the configured mode. */
  get clientCert(): 'none' | 'require' | 'optional' {
    return this.config.clientCaFile === undefined ? 'none' : this.config.clientCert;
  }

  /** Reloads so far that succeeded and failed. */
  stats(): { reloads: number; failedReloads: number } {
    return { reloads: this.#reloads, failedReloads: this.#failedReloads };
  }

  /**
   * Re-reads the files. On success the subscribers get the new material
   * and this resolves true; on failure the error is logged, the old material
   * stays, and this resolves false. Never rejects.
   */
  reload(reason: string): Promise<boolean> {
    const run = async (): Promise<boolean> => {
      let material: TlsMaterial;
      try {
        material = await loadTlsMaterial(this.config, this.#field);
      } catch (err) {
        this.#failedReloads++;
        this.#log?.error(
          { reason, error: err instanceof Error ? err.message : String(err) },
          'TLS reload failed; still serving the previous certificate',
        );
        return false;
      }
      this.#material = material;
      this.#reloads++;
      this.#log?.info({ reason, certificate: material.leaf }, 'TLS certificate reloaded');
      warnIfExpired(material, this.#log);
      for (const listener of this.#listeners) {
        try {
          listener(material);
        } catch (err) {
          // Only a bug in a listener gets here: the material was validated.
          this.#log?.error({ err }, 'applying the reloaded TLS material failed');
        }
      }
      return true;
    };
    const result = this.#queue.then(run);
    this.#queue = result;
    return result;
  }

  /**
   * Calls `listener` with every successfully reloaded material, and watches
   * the files while there is at least one subscriber. Returns the
   * unsubscribe function.
   */
  subscribe(listener: Listener): () => void {
    this.#listeners.add(listener);
    this.#startWatching();
    return () => {
      this.#listeners.delete(listener);
      if (this.#listeners.size === 0) this.#stopWatching();
    };
  }

  #files(): string[] {
    const files = [this.config.certFile, this.config.keyFile];
    if (this.config.clientCaFile !== undefined) files.push(this.config.clientCaFile);
    return [...new Set(files)];
  }

  readonly #onChange = (curr: Stats, prev: Stats): void => {
    if (curr.mtimeMs === prev.mtimeMs && curr.ino === prev.ino && curr.size === prev.size) return;
    clearTimeout(this.#debounce);
    this.#debounce = setTimeout(() => {
      this.#debounce = undefined;
      void this.reload('file changed');
    }, this.#debounceMs);
    this.#debounce.unref();
  };

  #startWatching(): void {
    if (this.#watching) return;
    this.#watching = true;
    for (const file of this.#files()) {
      watchFile(file, { interval: this.#watchIntervalMs, persistent: false }, this.#onChange);
    }
  }

  #stopWatching(): void {
    if (!this.#watching) return;
    this.#watching = false;
    clearTimeout(this.#debounce);
    this.#debounce = undefined;
    for (const file of this.#files()) unwatchFile(file, this.#onChange);
  }
}

/**
 * Reads and checks the server's PEM files: a certificate chain, the private
 * key of its first certificate, and the client CA bundle if configured.
 * Every error is a ConfigError naming the field and the file.
 */
export async function loadTlsMaterial(config: ServerTlsConfig, field = 'config.tls'): Promise<TlsMaterial> {
  const certField = `${field}.certFile`;
  const keyField = `${field}.keyFile`;
  const [cert, key, ca] = await Promise.all([
    readPem(config.certFile, certField),
    readPem(config.keyFile, keyField),
    config.clientCaFile === undefined ? undefined : readPem(config.clientCaFile, `${field}.clientCaFile`),
  ]);
  const chain = parseCertificates(cert, config.certFile, certField);
  const leaf = chain[0]!;
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(key);
  } catch (err) {
    throw new ConfigError(`${keyField}: ${config.keyFile} is not an unencrypted PEM private key (${errorText(err)})`);
  }
  if (!leaf.checkPrivateKey(privateKey)) {
    throw new ConfigError(`${keyField}: the key in ${config.keyFile} does not belong to the certificate in ${config.certFile} (${certField})`);
  }
  if (ca !== undefined) parseCertificates(ca, config.clientCaFile!, `${field}.clientCaFile`);
  // Last check: what OpenSSL itself makes of them together.
  try {
    createSecureContext(ca === undefined ? { cert, key } : { cert, key, ca });
  } catch (err) {
    throw new ConfigError(`${field}: OpenSSL refuses ${config.certFile} with ${config.keyFile}: ${errorText(err)}`);
  }
  return {
    cert,
    key,
    ca,
    leaf: { subject: leaf.subject.replaceAll('\n', ', '), validTo: leaf.validTo, fingerprint256: leaf.fingerprint256 },
  };
}

async function readPem(file: string, field: string): Promise<Buffer> {
  try {
    return await readFile(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new ConfigError(`${field}: cannot read ${file}: ${code ?? errorText(err)}`);
  }
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

function parseCertificates(pem: Buffer, file: string, field: string): X509Certificate[] {
  const blocks = pem.toString('latin1').match(PEM_CERTIFICATE) ?? [];
  if (blocks.length === 0) throw new ConfigError(`${field}: ${file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`);
  return blocks.map((block, i) => {
    try {
      return new X509Certificate(block);
    } catch (err) {
      throw new ConfigError(`${field}: certificate ${i + 1} in ${file} is not valid: ${errorText(err)}`);
    }
  });
}

function warnIfExpired(material: TlsMaterial, logger: Logger | undefined): void {
  const validTo = Date.parse(material.leaf.validTo);
  if (Number.isFinite(validTo) && validTo < Date.now()) {
    logger?.warn({ certificate: material.leaf }, 'the TLS certificate has expired: clients will refuse it');
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
