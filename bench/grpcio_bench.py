#!/usr/bin/python3
"""REAPI wire benchmark with the C-core gRPC client (Debian python3-grpcio).

Measures one REAPI server (a storage node, the edge, the python anchor
test/fixtures/py-shard/shard.py or the bare node:http2 anchor
bench/anchors/bare-http2-server.ts) and prints ONE JSON object on stdout;
progress goes to stderr. bench/wire.ts runs it against each of them.

The client is kept out of the way: requests are serialized before the clock
starts, responses are taken as raw bytes (ByteStream ReadResponse data is
sliced out of the wire bytes by hand, without a protobuf object), so what is
timed is the C-core transport and the server.

Commands (each prints one JSON object):
  bytestream  ByteStream Write of a fresh random blob of --blob-mib MiB in
              64 KiB messages, Read of it back (sha256 of what arrived is
              checked), Write of another fresh blob in 16 KiB messages.
  findmissing FindMissingBlobs of 2 x --present digests: the present half is
              uploaded first with BatchUpdateBlobs (<= 3 MiB per batch) and is
              the same in every iteration (seeded); the missing half is fresh
              random digests in every iteration. --iters calls, median ms.
  gar         GetActionResult calls/s from --threads client threads over
              --actions action digests whose ActionResults (UpdateActionResult)
              name --outputs output files present in the CAS.
  stream      Write then Read of a --gib GiB blob generated on the fly from a
              seeded block (never held whole), hashed on the fly both ways.
  all         bytestream + findmissing + gar, --runs times; medians.

--settle-target HOST:PORT: after each upload, wait until that server (the
fallback pair's secondary behind an edge) holds what was uploaded, so
background replication does not overlap the next measurement.

--ca-file PEM: the target speaks TLS; its certificate must chain to this CA
(grpc.ssl_channel_credentials; the name checked is the target's host).
--token-env NAME: send "authorization: Bearer <$NAME>" on every call (as call
metadata, so no python callback runs per call; the token is never on argv).

Usage: grpcio_bench.py --target 127.0.0.1:PORT [--instance bench] COMMAND [options]
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
PROTO = os.path.join(REPO, "proto")
MiB = 1024 * 1024
MAX_MESSAGE = 64 * MiB
BATCH_BYTES = 3 * MiB
SETTLE_TIMEOUT_S = 300

PROTOS = [
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/semver/semver.proto",
    "google/bytestream/bytestream.proto",
    "google/longrunning/operations.proto",
    "google/rpc/status.proto",
]


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load_stubs(stubs_dir):
    """Generates the message classes from proto/ with grpc_tools.protoc.

    With --stubs-dir the output is kept there and reused by later runs (the
    caller owns and removes that directory); otherwise a temporary directory
    is used and removed at exit. Only message classes are needed: calls are
    made with the generic channel methods and explicit method paths.
    """
    own = stubs_dir is None
    out = stubs_dir or tempfile.mkdtemp(prefix="grpcio-bench-")
    if own:
        import atexit
        atexit.register(shutil.rmtree, out, True)
    marker = os.path.join(out, ".generated")
    if not os.path.exists(marker):
        os.makedirs(out, exist_ok=True)
        # Generate into a private dir and rename, so concurrent runs never
        # import a half-written package.
        tmp = tempfile.mkdtemp(prefix="gen-", dir=out)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I" + PROTO, "--python_out=" + tmp] + PROTOS,
                       check=True)
        gen = os.path.join(out, "gen")
        try:
            os.rename(tmp, gen)
            open(marker, "w").close()
        except OSError:
            shutil.rmtree(tmp, True)  # another run won the race
    sys.path.insert(0, os.path.join(out, "gen"))


# Set by main() after load_stubs().
grpc = None
re_pb2 = None
bs_pb2 = None

BS_READ = "/google.bytestream.ByteStream/Read"
BS_WRITE = "/google.bytestream.ByteStream/Write"
CAS_FIND_MISSING = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs"
CAS_BATCH_UPDATE = "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
AC_GET = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult"
AC_UPDATE = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"


# Call metadata sent on every call (the bearer token), or None.
METADATA = None


def channel(target, ca_pem=None):
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
    ]
    if ca_pem is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca_pem), options=options)


def identity(b):
    return b


# --- Raw protobuf helpers (only what ReadResponse needs) ---------------------

def read_varint(buf, pos):
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def read_response_data(raw):
    """The data field (10) of a serialized ReadResponse, as a memoryview (no copy)."""
    view = memoryview(raw)
    pos = 0
    data = view[0:0]
    while pos < len(view):
        key, pos = read_varint(view, pos)
        wire = key & 7
        if wire == 2:
            n, pos = read_varint(view, pos)
            if key >> 3 == 10:
                data = view[pos:pos + n]
            pos += n
        elif wire == 0:
            _, pos = read_varint(view, pos)
        else:
            raise ValueError("unexpected wire type %d in ReadResponse" % wire)
    return data


# --- Data ---------------------------------------------------------------------

def digest_of(data):
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def make_blob(mib, seed):
    return random.Random(seed).randbytes(mib * MiB)


def fresh_seed():
    return int.from_bytes(os.urandom(8), "little")


def settle(args, ch_settle, digests):
    """Waits until the settle target holds every digest (bounded)."""
    if ch_settle is None or not digests:
        return 0.0
    find = ch_settle.unary_unary(CAS_FIND_MISSING, request_serializer=re_pb2.FindMissingBlobsRequest.SerializeToString,
                                 response_deserializer=re_pb2.FindMissingBlobsResponse.FromString)
    t0 = time.monotonic()
    pending = list(digests)
    while pending:
        missing = []
        for i in range(0, len(pending), 5000):
            res = find(re_pb2.FindMissingBlobsRequest(instance_name=args.instance, blob_digests=pending[i:i + 5000]),
                       metadata=METADATA)
            missing.extend(res.missing_blob_digests)
        pending = missing
        if pending:
            if time.monotonic() - t0 > SETTLE_TIMEOUT_S:
                raise RuntimeError("settle target still lacks %d blobs after %d s" % (len(pending), SETTLE_TIMEOUT_S))
            time.sleep(0.05)
    return time.monotonic() - t0


# --- ByteStream ----------------------------------------------------------------

def write_requests(instance, hash_, size, chunks):
    """Serialized WriteRequests for the blob, one per chunk (a memoryview/bytes each)."""
    name = "%s/uploads/%s/blobs/%s/%d" % (instance, os.urandom(8).hex(), hash_, size) if instance else \
        "uploads/%s/blobs/%s/%d" % (os.urandom(8).hex(), hash_, size)
    offset = 0
    for chunk in chunks:
        n = len(chunk)
        req = bs_pb2.WriteRequest(write_offset=offset, data=bytes(chunk), finish_write=offset + n == size)
        if offset == 0:
            req.resource_name = name
        offset += n
        yield req.SerializeToString()


def bs_write(ch, instance, hash_, size, requests):
    call = ch.stream_unary(BS_WRITE, request_serializer=identity, response_deserializer=bs_pb2.WriteResponse.FromString)
    t0 = time.perf_counter()
    res = call(requests, metadata=METADATA)
    secs = time.perf_counter() - t0
    if res.committed_size != size:
        raise RuntimeError("Write of %s/%d: committed_size %d" % (hash_, size, res.committed_size))
    return size / MiB / secs


def bs_read(ch, instance, hash_, size, hash_on_the_fly=False):
    """Reads the blob; MiB/s. Its sha256 is checked after the clock stops
    (the received messages are kept until then), or on the fly for a blob too
    big to keep (hashing then shares the client's core with the transport)."""
    name = "%s/blobs/%s/%d" % (instance, hash_, size) if instance else "blobs/%s/%d" % (hash_, size)
    call = ch.unary_stream(BS_READ, request_serializer=bs_pb2.ReadRequest.SerializeToString, response_deserializer=identity)
    h = hashlib.sha256()
    kept = []
    n = 0
    t0 = time.perf_counter()
    for raw in call(bs_pb2.ReadRequest(resource_name=name), metadata=METADATA):
        if hash_on_the_fly:
            data = read_response_data(raw)
            h.update(data)
            n += len(data)
        else:
            kept.append(raw)
    secs = time.perf_counter() - t0
    for raw in kept:
        data = read_response_data(raw)
        h.update(data)
        n += len(data)
    del kept
    if n != size or h.hexdigest() != hash_:
        raise RuntimeError("Read of %s/%d returned %d bytes hashing to %s" % (hash_, size, n, h.hexdigest()))
    return size / MiB / secs


def chunks_of(data, chunk):
    view = memoryview(data)
    return [view[o:o + chunk] for o in range(0, len(data), chunk)]


def cmd_bytestream(args, ch, ch_settle):
    """One run: write 64 KiB, read it, write 16 KiB; each a fresh blob."""
    out = {}
    for kib in (64, 16):
        blob = make_blob(args.blob_mib, fresh_seed())
        hash_ = hashlib.sha256(blob).hexdigest()
        reqs = list(write_requests(args.instance, hash_, len(blob), chunks_of(blob, kib * 1024)))
        out["write_%dk_mib_s" % kib] = bs_write(ch, args.instance, hash_, len(blob), iter(reqs))
        del reqs
        log("  write %d MiB in %d KiB messages: %.0f MiB/s" % (args.blob_mib, kib, out["write_%dk_mib_s" % kib]))
        settle(args, ch_settle, [re_pb2.Digest(hash=hash_, size_bytes=len(blob))])
        if kib == 64:
            out["read_mib_s"] = bs_read(ch, args.instance, hash_, len(blob))
            log("  read %d MiB: %.0f MiB/s" % (args.blob_mib, out["read_mib_s"]))
    return out


# --- CAS / AC ------------------------------------------------------------------

def batch_upload(ch, instance, blobs):
    """BatchUpdateBlobs in batches of <= 3 MiB of data; fails on any error."""
    call = ch.unary_unary(CAS_BATCH_UPDATE, request_serializer=re_pb2.BatchUpdateBlobsRequest.SerializeToString,
                          response_deserializer=re_pb2.BatchUpdateBlobsResponse.FromString)
    batch = []
    size = 0

    def flush():
        if not batch:
            return
        res = call(re_pb2.BatchUpdateBlobsRequest(instance_name=instance, requests=batch), metadata=METADATA)
        bad = [r for r in res.responses if r.status.code != 0]
        if bad or len(res.responses) != len(batch):
            raise RuntimeError("BatchUpdateBlobs: %d of %d failed: %s" % (len(bad), len(batch),
                                                                         bad[0].status.message if bad else "short"))

    for data in blobs:
        if batch and size + len(data) > BATCH_BYTES:
            flush()
            batch, size = [], 0
        batch.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(data), data=data))
        size += len(data)
    flush()


def seeded_small_blobs(seed, count, lo=64, hi=2048):
    rnd = random.Random(seed)
    return [rnd.randbytes(rnd.randint(lo, hi)) for _ in range(count)]


def cmd_findmissing(args, ch, ch_settle):
    present_blobs = seeded_small_blobs(args.seed, args.present)
    batch_upload(ch, args.instance, present_blobs)
    present = [digest_of(b) for b in present_blobs]
    settle(args, ch_settle, present)
    call = ch.unary_unary(CAS_FIND_MISSING, request_serializer=identity, response_deserializer=identity)
    times = []
    windows = []
    rnd = random.Random(fresh_seed())
    for _ in range(args.iters):
        missing = [re_pb2.Digest(hash=rnd.randbytes(32).hex(), size_bytes=rnd.randint(64, 2048))
                   for _ in range(args.present)]
        mixed = present + missing
        rnd.shuffle(mixed)
        req = re_pb2.FindMissingBlobsRequest(instance_name=args.instance, blob_digests=mixed).SerializeToString()
        start_ms = time.time() * 1000
        t0 = time.perf_counter()
        raw = call(req, metadata=METADATA)
        times.append((time.perf_counter() - t0) * 1000)
        windows.append([start_ms, time.time() * 1000])
        got = {d.hash for d in re_pb2.FindMissingBlobsResponse.FromString(raw).missing_blob_digests}
        want = {d.hash for d in missing}
        if got != want:
            raise RuntimeError("FindMissingBlobs: %d reported missing, %d expected, %d wrong" %
                               (len(got), len(want), len(got ^ want)))
    log("  FindMissingBlobs %d digests: %s ms" % (2 * args.present, ", ".join("%.1f" % t for t in times)))
    return {"findmissing_ms": statistics.median(times), "findmissing_all_ms": times, "findmissing_windows": windows}


def cmd_gar(args, ch, ch_settle):
    rnd = random.Random(args.seed + 1)
    outputs = [rnd.randbytes(rnd.randint(100, 4096)) for _ in range(args.actions * args.outputs)]
    batch_upload(ch, args.instance, outputs)
    settle(args, ch_settle, [digest_of(b) for b in outputs])
    update = ch.unary_unary(AC_UPDATE, request_serializer=re_pb2.UpdateActionResultRequest.SerializeToString,
                            response_deserializer=re_pb2.ActionResult.FromString)
    get = ch.unary_unary(AC_GET, request_serializer=identity, response_deserializer=identity)
    requests = []
    for a in range(args.actions):
        action = digest_of(rnd.randbytes(140))
        result = re_pb2.ActionResult(exit_code=0, output_files=[
            re_pb2.OutputFile(path="out/%d/%d" % (a, k), digest=digest_of(outputs[a * args.outputs + k]))
            for k in range(args.outputs)])
        update(re_pb2.UpdateActionResultRequest(instance_name=args.instance, action_digest=action, action_result=result),
               metadata=METADATA)
        requests.append(re_pb2.GetActionResultRequest(instance_name=args.instance, action_digest=action).SerializeToString())
    # Every action answers with all its outputs before the clock starts.
    for req in requests:
        res = re_pb2.ActionResult.FromString(get(req, metadata=METADATA))
        if len(res.output_files) != args.outputs:
            raise RuntimeError("GetActionResult returned %d output files, expected %d" % (len(res.output_files), args.outputs))
    counts = [0] * args.threads
    errors = []
    deadline = time.perf_counter() + args.seconds

    def worker(i):
        n = 0
        k = i
        try:
            while time.perf_counter() < deadline:
                get(requests[k % len(requests)], metadata=METADATA)
                k += args.threads
                n += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    if errors:
        raise RuntimeError("GetActionResult failed: %s" % errors[0])
    rate = sum(counts) / secs
    log("  GetActionResult, %d threads: %.0f calls/s" % (args.threads, rate))
    return {"gar_calls_s": rate}


def cmd_stream(args, ch, ch_settle):
    """A --gib GiB blob, generated per MiB from a seeded block plus a counter."""
    base = random.Random(args.seed).randbytes(MiB)
    blocks = args.gib * 1024
    chunk = args.chunk_kib * 1024

    def block(i):
        return struct.pack("<Q", i) + base[8:]

    def chunks():
        for i in range(blocks):
            view = memoryview(block(i))
            for o in range(0, MiB, chunk):
                yield view[o:o + chunk]

    h = hashlib.sha256()
    for i in range(blocks):
        h.update(block(i))
    hash_ = h.hexdigest()
    size = blocks * MiB
    out = {"stream_bytes": size}
    mark = lambda what: out.setdefault("marks", []).append([what, time.time() * 1000])  # noqa: E731
    mark("write-start")
    out["stream_write_mib_s"] = bs_write(ch, args.instance, hash_, size, write_requests(args.instance, hash_, size, chunks()))
    mark("write-end")
    log("  stream write %d GiB: %.0f MiB/s" % (args.gib, out["stream_write_mib_s"]))
    out["stream_settle_s"] = settle(args, ch_settle, [re_pb2.Digest(hash=hash_, size_bytes=size)])
    mark("read-start")
    out["stream_read_mib_s"] = bs_read(ch, args.instance, hash_, size, hash_on_the_fly=True)
    mark("read-end")
    log("  stream read %d GiB: %.0f MiB/s" % (args.gib, out["stream_read_mib_s"]))
    return out


def median_of(runs):
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def cmd_all(args, ch, ch_settle):
    runs = []
    for i in range(args.runs):
        log("run %d of %d" % (i + 1, args.runs))
        r = {}
        if "bytestream" in args.workloads:
            r.update(cmd_bytestream(args, ch, ch_settle))
        if "findmissing" in args.workloads:
            r.update(cmd_findmissing(args, ch, ch_settle))
        if "gar" in args.workloads:
            r.update(cmd_gar(args, ch, ch_settle))
        runs.append(r)
    out = median_of(runs)
    out["runs"] = args.runs
    return out


def main():
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="host:port")
    p.add_argument("--instance", default="bench")
    p.add_argument("--settle-target", help="host:port that must hold each upload before the next measurement")
    p.add_argument("--stubs-dir", help="where generated stubs are kept between runs")
    p.add_argument("--ca-file", help="the target speaks TLS: PEM of the CA its certificate chains to")
    p.add_argument("--token-env", help="environment variable holding a bearer token sent on every call")
    p.add_argument("--seed", type=int, default=1, help="seed of the present digests and action results")
    p.add_argument("command", choices=["bytestream", "findmissing", "gar", "stream", "all"])
    p.add_argument("--blob-mib", type=int, default=int(env.get("BENCH_BLOB_MIB", "128")))
    p.add_argument("--runs", type=int, default=int(env.get("BENCH_RUNS", "3")))
    p.add_argument("--workloads", default="bytestream,findmissing,gar")
    p.add_argument("--present", type=int, default=5000, help="present digests (as many missing) per FindMissing")
    p.add_argument("--iters", type=int, default=5, help="FindMissing calls")
    p.add_argument("--actions", type=int, default=200)
    p.add_argument("--outputs", type=int, default=3, help="output files per ActionResult")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--gib", type=int, default=4)
    p.add_argument("--chunk-kib", type=int, default=64)
    args = p.parse_args()
    args.workloads = set(args.workloads.split(","))

    load_stubs(args.stubs_dir)
    global grpc, re_pb2, bs_pb2
    import grpc as grpc_mod
    from build.bazel.remote.execution.v2 import remote_execution_pb2
    from google.bytestream import bytestream_pb2
    grpc, re_pb2, bs_pb2 = grpc_mod, remote_execution_pb2, bytestream_pb2
    global METADATA
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            p.error("--token-env %s: the variable is not set" % args.token_env)
        METADATA = (("authorization", "Bearer " + token),)
    ca_pem = None
    if args.ca_file:
        with open(args.ca_file, "rb") as f:
            ca_pem = f.read()

    ch = channel(args.target, ca_pem)
    ch_settle = channel(args.settle_target) if args.settle_target else None
    try:
        grpc.channel_ready_future(ch).result(timeout=20)
        fn = {"bytestream": cmd_bytestream, "findmissing": cmd_findmissing, "gar": cmd_gar,
              "stream": cmd_stream, "all": cmd_all}[args.command]
        out = fn(args, ch, ch_settle)
    finally:
        ch.close()
        if ch_settle is not None:
            ch_settle.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
