import { ConnectError } from '@connectrpc/connect';

/** Awaits `p`, which must reject, and returns its error as a ConnectError. */
export async function failure(p: Promise<unknown>): Promise<ConnectError> {
  try {
    await p;
  } catch (err) {
    return ConnectError.from(err);
  }
  throw new Error('expected the call to fail');
}
