import { setTimeout as sleep } from 'node:timers/promises';
import type { MessageInitShape } from '@bufbuild/protobuf';
import type { ServiceImpl } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import { Health, HealthCheckResponse_ServingStatus } from '../../gen/grpc/health/v1/health_pb.ts';
import type { HealthCheckResponseSchema } from '../../gen/grpc/health/v1/health_pb.ts';

type Status = HealthCheckResponse_ServingStatus;
const { SERVING, NOT_SERVING, SERVICE_UNKNOWN } = HealthCheckResponse_ServingStatus;

export interface HealthServiceOptions {
  /** Whether the process is ready to serve; polled by Watch. */
  readonly isReady: () => boolean;
  /** Fully qualified names of the services this server exposes ("" is implied). */
  readonly services: readonly string[];
  /**
   * Fires when the server starts shutting down: Watch streams send
   * NOT_SERVING and end, so they do not hold the shutdown up.
   */
  readonly draining?: AbortSignal | undefined;
  /** How often Watch re-reads isReady(). */
  readonly pollIntervalMs?: number | undefined;
}

/**
 * grpc.health.v1.Health. One status for the whole process: "" and every
 * served service are SERVING while isReady() says so and NOT_SERVING
 * otherwise (including while draining). Check answers NOT_FOUND for a name
 * we do not serve; Watch answers SERVICE_UNKNOWN for it and keeps watching,
 * as the health protocol asks. Watch polls isReady() (default every second)
 * and sends a message only when the status changes.
 */
export function createHealthService(opts: HealthServiceOptions): ServiceImpl<typeof Health> {
  const known = new Set(['', ...opts.services]);
  const pollMs = opts.pollIntervalMs ?? 1000;
  const current = (): Status => (opts.isReady() && opts.draining?.aborted !== true ? SERVING : NOT_SERVING);

  return {
    check(req) {
      if (!known.has(req.service)) {
        throw new ConnectError(`unknown service "${req.service}"`, Code.NotFound);
      }
      return { status: current() };
    },

    list() {
      const statuses: Record<string, { status: Status }> = {};
      const status = current();
      for (const name of known) statuses[name] = { status };
      return { statuses };
    },

    async *watch(req, ctx): AsyncGenerator<MessageInitShape<typeof HealthCheckResponseSchema>> {
      const isKnown = known.has(req.service);
      const signals = opts.draining === undefined ? [ctx.signal] : [ctx.signal, opts.draining];
      const stop = AbortSignal.any(signals);
      let last: Status | undefined;
      for (;;) {
        const status = isKnown ? current() : SERVICE_UNKNOWN;
        if (status !== last) {
          last = status;
          yield { status };
        }
        if (stop.aborted) return;
        try {
          await sleep(pollMs, undefined, { signal: stop });
        } catch {
          // Aborted: the client went away (nothing more to send) or the
          // server is draining (loop once more to send NOT_SERVING).
          if (ctx.signal.aborted) return;
        }
      }
    },
  };
}
