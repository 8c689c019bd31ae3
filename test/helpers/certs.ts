// A private PKI for TLS tests, made with the openssl CLI at test time in a
// temp dir: a CA, a server certificate for localhost / 127.0.0.1, client
// certificates with a given subject CN, and a second, unrelated CA whose
// certificates the first one does not vouch for.
//
//   const pki = await createPki();           // skip the test if opensslMissing
//   t.teardown(pki.remove);
//   const server = pki.server;               // { certFile, keyFile, cert, key }
//   const client = await pki.issueClient('runner-7');
//   const rogue = await pki.issueClient('runner-7', { ca: 'other' });
//
// EC P-256 keys: quick to make, and every client here (node, python grpcio,
// curl) takes them.
import { execFile, spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Why TLS tests cannot run here, or undefined when openssl is on PATH. */
export const opensslMissing: string | undefined =
  spawnSync('openssl', ['version']).status === 0 ? undefined : 'the openssl CLI is not installed (apt-get install openssl)';

export interface IssuedCert {
  readonly certFile: string;
  readonly keyFile: string;
  /** PEM text of the certificate and key. */
  readonly cert: string;
  readonly key: string;
}

export interface Pki {
  readonly dir: string;
  /** The CA that signs the server and (by default) client certificates. */
  readonly caFile: string;
  readonly ca: string;
  /** An unrelated CA (for certificates the main CA must not accept). */
  readonly otherCaFile: string;
  /** A server certificate for DNS:localhost and IP:127.0.0.1, CN "localhost". */
  readonly server: IssuedCert;
  /** Another server certificate (for reloads); `cn` shows in its subject. */
  issueServer(cn: string, opts?: { ca?: 'main' | 'other'; name?: string }): Promise<IssuedCert>;
  /** A client certificate (extendedKeyUsage clientAuth) with subject CN `cn`. */
  issueClient(cn: string, opts?: { ca?: 'main' | 'other'; name?: string }): Promise<IssuedCert>;
  remove(): Promise<void>;
}

let serial = 1;

export async function createPki(): Promise<Pki> {
  const dir = await mkdtemp(join(tmpdir(), 'reapi-pki-'));
  const makeCa = async (name: string) => {
    const keyFile = join(dir, `${name}.key`);
    const certFile = join(dir, `${name}.pem`);
    await openssl([
      'req', '-x509', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', `/CN=reapi-edge test ${name}`,
      '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    ]);
    return { keyFile, certFile };
  };
  const main = await makeCa('ca');
  const other = await makeCa('other-ca');

  const issue = async (
    name: string,
    cn: string,
    ca: { keyFile: string; certFile: string },
    extensions: string,
  ): Promise<IssuedCert> => {
    const keyFile = join(dir, `${name}.key`);
    const csrFile = join(dir, `${name}.csr`);
    const certFile = join(dir, `${name}.pem`);
    const extFile = join(dir, `${name}.ext`);
    await writeFile(extFile, extensions);
    await openssl([
      'req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', keyFile, '-out', csrFile, '-subj', `/CN=${cn}`,
    ]);
    await openssl([
      'x509', '-req', '-in', csrFile, '-CA', ca.certFile, '-CAkey', ca.keyFile,
      '-set_serial', String(1000 + serial++), '-days', '2', '-out', certFile, '-extfile', extFile,
    ]);
    return { certFile, keyFile, cert: await readFile(certFile, 'utf8'), key: await readFile(keyFile, 'utf8') };
  };
  const serverExt =
    'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n';
  const clientExt = 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n';
  const caOf = (which: 'main' | 'other' | undefined) => (which === 'other' ? other : main);
  let issued = 0;

  const server = await issue('server', 'localhost', main, serverExt);
  return {
    dir,
    caFile: main.certFile,
    ca: await readFile(main.certFile, 'utf8'),
    otherCaFile: other.certFile,
    server,
    issueServer: (cn, opts) => issue(opts?.name ?? `server-${++issued}`, cn, caOf(opts?.ca), serverExt),
    issueClient: (cn, opts) => issue(opts?.name ?? `client-${++issued}`, cn, caOf(opts?.ca), clientExt),
    remove: () => rm(dir, { recursive: true, force: true }),
  };
}

async function openssl(args: string[]): Promise<void> {
  try {
    await run('openssl', args, { timeout: 30_000 });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`openssl ${args.slice(0, 2).join(' ')} failed: ${e.stderr ?? e.message}`);
  }
}
