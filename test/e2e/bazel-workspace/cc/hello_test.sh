#!/bin/sh
set -eu
grep -q 'hello from a remotely cached binary' cc/hello_out.txt
