import { createContextKey } from '@connectrpc/connect';

/**
 * Who is on the other end of a call's connection, as the transport knows it:
 * set once per connection by the server (all three call paths: the ByteStream
 * fast path, direct gRPC routes and fastify) and read by the authorizer and
 * the log line.
 */
export interface PeerInfo {
  /** Remote IP address. */
  readonly address: string | undefined;
  /** Whether the connection is TLS. */
  readonly tls: boolean;
  /**
   * Subject CN of the client certificate, only when the certificate was
   * verified against the configured client CA.
   */
  readonly certCommonName: string | undefined;
}

export const ANONYMOUS_PEER: PeerInfo = { address: undefined, tls: false, certCommonName: undefined };

export const kPeer = createContextKey<PeerInfo>(ANONYMOUS_PEER, { description: 'the connection peer' });
