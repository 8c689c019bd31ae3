// Makes the secrets for config.json's "auth" section, which stores only hashes.
//
//   node scripts/hash-secret.ts token            a fresh random token, and its tokenSha256 for config
//   node scripts/hash-secret.ts token <token>    the tokenSha256 of an existing token ("-": read it from stdin)
//   node scripts/hash-secret.ts password         a password read from stdin (or typed, unechoed, at a
//                                                terminal) as "scrypt$N$r$p$salt$hash" for basic.passwordHash
//
// The token or password goes to the client (Bazel: --remote_header=Authorization=Bearer <token>,
// or a credential helper); only what this prints for config goes into config.json.
import { createHash, randomBytes } from 'node:crypto';
import { hashPassword } from '../src/auth/password.ts';

const USAGE = 'usage: hash-secret token [<token> | -]\n       hash-secret password   (the password on stdin)';

async function main(argv: readonly string[]): Promise<number> {
  const [what, arg, ...extra] = argv;
  if (extra.length > 0) return usage();
  if (what === 'token') {
    let token: string;
    if (arg === undefined) {
      token = randomBytes(32).toString('base64url');
      process.stdout.write(`token: ${token}\n`);
    } else {
      token = arg === '-' ? stripNewline(await readStdin()) : arg;
      if (token === '') return fail('the token is empty');
    }
    process.stdout.write(`"tokenSha256": "${createHash('sha256').update(token).digest('hex')}"\n`);
    return 0;
  }
  if (what === 'password' && arg === undefined) {
    const password = process.stdin.isTTY ? await readHidden('password: ') : stripNewline(await readStdin());
    if (password === '') return fail('the password is empty');
    process.stdout.write(`${await hashPassword(Buffer.from(password, 'utf8'))}\n`);
    return 0;
  }
  return usage();
}

function usage(): number {
  process.stderr.write(`${USAGE}\n`);
  return 2;
}

function fail(message: string): number {
  process.stderr.write(`hash-secret: ${message}\n`);
  return 2;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

/** One trailing line ending (what `echo` or a file adds) is not part of the secret. */
function stripNewline(s: string): string {
  return s.replace(/\r?\n$/, '');
}

/** Reads a line at a terminal without echoing it. */
function readHidden(prompt: string): Promise<string> {
  const stdin = process.stdin;
  process.stderr.write(prompt);
  stdin.setRawMode(true);
  stdin.setEncoding('utf8');
  stdin.resume();
  return new Promise((resolve, reject) => {
    let line = '';
    const done = (err?: Error) => {
      stdin.setRawMode(false);
      stdin.pause();
      stdin.off('data', onData);
      process.stderr.write('\n');
      if (err === undefined) resolve(line);
      else reject(err);
    };
    const onData = (s: string) => {
      for (const c of s) {
        if (c === '\r' || c === '\n') return done();
        if (c === '\u0003' || c === '\u0004') return done(new Error('cancelled'));
        if (c === '\u007f' || c === '\b') line = line.slice(0, -1);
        else line += c;
      }
    };
    stdin.on('data', onData);
  });
}

main(process.argv.slice(2)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    process.stderr.write(`hash-secret: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  },
);
