import { createContextKey } from '@connectrpc/connect';

/**
 * Who a call was authorized as: an identity's name, "anonymous", or
 * undefined (no authorizer configured, or the credentials were rejected).
 * Set by the authorizer, read by the per-RPC log line.
 */
export const kIdentity = createContextKey<string | undefined>(undefined, { description: 'the authorized identity' });
