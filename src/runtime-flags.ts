/**
 * V8 flags every reapi-edge process should start with: `npm start` passes
 * them (package.json), the supervisor's children inherit them with the
 * parent's execArgv, and tests and benchmarks that spawn a node add them.
 *
 * --initial-heap-size=128 (MB): streaming allocates a buffer per chunk read
 * from disk or received from the network, outside the JS heap. V8 counts
 * that memory toward a limit derived from the heap's size and runs a full
 * mark-compact each time it is crossed; with the default (a heap of ~20 MB)
 * that was one every ~20 MiB streamed, ~40% of a storage node's CPU for a
 * ByteStream Read. A larger initial heap raises the limit: measured on a
 * storage node serving 1 GiB of reads to the C-core client, mark-compacts
 * went from 64 to 23 and CPU from 2.6 to 1.5 s (64 MB: 35 and 2.0 s), for
 * ~80 MB more peak RSS while streaming. The heap still grows and shrinks
 * as it always does; only the first collections come later.
 */
export const V8_FLAGS: readonly string[] = ['--initial-heap-size=128'];
