#!/usr/bin/python3
"""An anchor for bench/wire.ts, not product code: the python grpcio REAPI
server (test/fixtures/py-shard/shard.py, unchanged) listening with TLS.

shard.py binds with add_insecure_port; this wrapper makes grpc.server()
hand out servers whose add_insecure_port binds with add_secure_port and
grpc.ssl_server_credentials over the given certificate and key instead, then
runs shard.py as __main__ with the remaining arguments. Everything else
(stubs, servicers, "LISTENING <port>" on stdout) is shard.py's.

Usage: py-shard-tls.py --tls-cert server.pem --tls-key server.key [shard.py options]
"""

import os
import runpy
import sys

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
SHARD = os.path.abspath(os.path.join(HERE, "..", "..", "test", "fixtures", "py-shard", "shard.py"))


def take(argv, flag):
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i:i + 2]
    return value


def main():
    argv = sys.argv[1:]
    with open(take(argv, "--tls-cert"), "rb") as f:
        cert = f.read()
    with open(take(argv, "--tls-key"), "rb") as f:
        key = f.read()
    credentials = grpc.ssl_server_credentials([(key, cert)])
    plain_server = grpc.server

    def tls_server(*args, **kwargs):
        server = plain_server(*args, **kwargs)
        server.add_insecure_port = lambda address: server.add_secure_port(address, credentials)
        return server

    grpc.server = tls_server
    sys.argv = [SHARD] + argv
    runpy.run_path(SHARD, run_name="__main__")


if __name__ == "__main__":
    main()
