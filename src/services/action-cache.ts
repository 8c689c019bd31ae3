import { fromBinary, toBinary } from '@bufbuild/protobuf';
import type { ServiceImpl } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import type { ActionResult } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import { ActionCache, ActionResultSchema } from '../../gen/build/bazel/remote/execution/v2/remote_execution_pb.ts';
import type { Digest } from '../digest.ts';
import { digestString, fromProtoDigest } from '../digest.ts';
import { isCode, notFound, toConnectError } from '../errors.ts';
import { once, readAtMost } from '../streams.ts';
import type { ServiceDeps } from './deps.ts';
import { checkDigestFunction } from './cas.ts';
import { DEFAULT_INSTANCES } from '../config.ts';
import { acNamespace, validateInstanceName } from './instance-name.ts';

/**
 * Largest serialized ActionResult accepted or served. Real results are a few
 * KiB; this only stops a broken or hostile entry from being buffered whole.
 */
export const MAX_ACTION_RESULT_BYTES = 16 * 1024 * 1024;

/**
 * The ActionCache service over the AC store tree. Keys are action digests,
 * values serialized ActionResult messages.
 *
 * Decisions worth knowing:
 * - GetActionResult never inlines stdout, stderr or output files: the spec
 *   lets the server decline, and inlining would add CAS reads (and failure
 *   modes) to the hottest call. Bazel fetches outputs from the CAS anyway.
 * - A stored entry that no longer parses (or is absurdly large) is reported
 *   as NOT_FOUND and logged: Bazel then reruns the action and its
 *   UpdateActionResult overwrites the bad entry. Failing the build instead
 *   would make one corrupt entry a permanent outage for that action.
 * - UpdateActionResult validates every digest and output path in the result
 *   (INVALID_ARGUMENT naming the field) but does not check that referenced
 *   blobs exist. The spec allows FAILED_PRECONDITION there, but clients
 *   upload outputs first anyway, and the completenessChecking store already
 *   hides any result whose blobs are not readable when it is served, which is
 *   the moment that matters.
 * - Entries are kept per namespace (acNamespace(): the instance name, or
 *   its alias, or "" for all with isolation off): a result written under
 *   one instance is NOT_FOUND under another, so one tenant cannot poison
 *   another's builds. The CAS stays shared: content-addressed blobs cannot
 *   be poisoned, only added (what sharing still tells a tenant: whether a
 *   blob of a digest it already knows exists).
 */
export function createActionCacheService(deps: ServiceDeps): ServiceImpl<typeof ActionCache> {
  const { ac } = deps;
  const instances = deps.instances ?? DEFAULT_INSTANCES;

  return {
    async getActionResult(req, ctx) {
      validateInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      const action = fromProtoDigest(req.actionDigest, 'action_digest');
      const namespace = acNamespace(instances, req.instanceName);
      let bytes: Uint8Array | undefined;
      try {
        bytes = await readAtMost(await ac.get(action, { signal: ctx.signal, namespace }), MAX_ACTION_RESULT_BYTES);
      } catch (err) {
        if (isCode(err, Code.NotFound)) throw missingResult(action, err as ConnectError);
        throw toConnectError(err);
      }
      if (bytes === undefined) {
        deps.logger.warn({ action: digestString(action), namespace }, `stored action result exceeds ${MAX_ACTION_RESULT_BYTES} bytes, ignoring it`);
        throw new ConnectError(`no usable action result for action ${digestString(action)}: stored entry is too large`, Code.NotFound);
      }
      try {
        return fromBinary(ActionResultSchema, bytes);
      } catch (err) {
        deps.logger.warn({ err, action: digestString(action), namespace }, 'stored action result does not parse, ignoring it');
        throw new ConnectError(`no usable action result for action ${digestString(action)}: stored entry does not parse`, Code.NotFound);
      }
    },

    async updateActionResult(req, ctx) {
      validateInstanceName(req.instanceName);
      checkDigestFunction(req.digestFunction);
      const action = fromProtoDigest(req.actionDigest, 'action_digest');
      if (req.actionResult === undefined) {
        throw new ConnectError('action_result: missing', Code.InvalidArgument);
      }
      validateActionResult(req.actionResult, 'action_result');
      const bytes = toBinary(ActionResultSchema, req.actionResult);
      if (bytes.byteLength > MAX_ACTION_RESULT_BYTES) {
        throw new ConnectError(
          `action_result: serialized size ${bytes.byteLength} bytes exceeds the limit of ${MAX_ACTION_RESULT_BYTES}; ` +
            'upload outputs to the CAS instead of inlining them',
          Code.InvalidArgument,
        );
      }
      try {
        await ac.put(action, once(bytes), { signal: ctx.signal, namespace: acNamespace(instances, req.instanceName) });
      } catch (err) {
        throw toConnectError(err);
      }
      return req.actionResult;
    },
  };
}

/**
 * A plain miss gets a message naming the action; a decorator's more specific
 * NOT_FOUND (e.g. "references missing blob ...") is kept as is.
 */
function missingResult(action: Digest, err: ConnectError): ConnectError {
  if (err.rawMessage === notFound(action).rawMessage) {
    return new ConnectError(`no action result for action ${digestString(action)}`, Code.NotFound);
  }
  return new ConnectError(err.rawMessage, Code.NotFound, undefined, undefined, err);
}

/**
 * Checks every digest and output path of an ActionResult; throws
 * INVALID_ARGUMENT naming the offending field.
 */
export function validateActionResult(r: ActionResult, what: string): void {
  r.outputFiles.forEach((f, i) => {
    validateOutputPath(f.path, `${what}.output_files[${i}].path`, false);
    fromProtoDigest(f.digest, `${what}.output_files[${i}].digest`);
  });
  r.outputDirectories.forEach((d, i) => {
    // "" is allowed: it names the whole working directory.
    validateOutputPath(d.path, `${what}.output_directories[${i}].path`, true);
    if (d.treeDigest === undefined && d.rootDirectoryDigest === undefined) {
      throw new ConnectError(
        `${what}.output_directories[${i}]: neither tree_digest nor root_directory_digest is set`,
        Code.InvalidArgument,
      );
    }
    if (d.treeDigest !== undefined) fromProtoDigest(d.treeDigest, `${what}.output_directories[${i}].tree_digest`);
    if (d.rootDirectoryDigest !== undefined) {
      fromProtoDigest(d.rootDirectoryDigest, `${what}.output_directories[${i}].root_directory_digest`);
    }
  });
  r.outputSymlinks.forEach((s, i) => validateOutputPath(s.path, `${what}.output_symlinks[${i}].path`, false));
  // The deprecated symlink lists still reach older clients; hold them to the same rule.
  r.outputFileSymlinks.forEach((s, i) => validateOutputPath(s.path, `${what}.output_file_symlinks[${i}].path`, false));
  r.outputDirectorySymlinks.forEach((s, i) =>
    validateOutputPath(s.path, `${what}.output_directory_symlinks[${i}].path`, false),
  );
  if (r.stdoutDigest !== undefined) fromProtoDigest(r.stdoutDigest, `${what}.stdout_digest`);
  if (r.stderrDigest !== undefined) fromProtoDigest(r.stderrDigest, `${what}.stderr_digest`);
}

/**
 * Output paths are relative to the working directory: no leading "/", no
 * ".." segment that could escape it. (Symlink targets are not checked: the
 * client decides whether absolute targets are acceptable.)
 */
function validateOutputPath(path: string, what: string, allowEmpty: boolean): void {
  if (path === '') {
    if (allowEmpty) return;
    throw new ConnectError(`${what}: path is empty`, Code.InvalidArgument);
  }
  if (path.startsWith('/')) {
    throw new ConnectError(`${what}: "${path}" is absolute, output paths are relative to the working directory`, Code.InvalidArgument);
  }
  if (path.split('/').includes('..')) {
    throw new ConnectError(`${what}: "${path}" contains a ".." segment`, Code.InvalidArgument);
  }
}
