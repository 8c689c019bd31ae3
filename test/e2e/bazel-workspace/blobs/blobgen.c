/*
 * Writes SIZE pseudo-random bytes derived from SEED to stdout (xorshift64*),
 * so genrule outputs are incompressible yet byte-identical on every build.
 * Usage: blobgen SEED SIZE
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s SEED SIZE\n", argv[0]);
    return 2;
  }
  uint64_t state = strtoull(argv[1], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
  unsigned long long remaining = strtoull(argv[2], NULL, 10);
  unsigned char buf[65536];
  while (remaining > 0) {
    size_t n = remaining < sizeof buf ? (size_t)remaining : sizeof buf;
    for (size_t i = 0; i < n; i += 8) {
      state ^= state >> 12;
      state ^= state << 25;
      state ^= state >> 27;
      uint64_t word = state * 0x2545F4914F6CDD1DULL;
      for (size_t j = 0; j < 8 && i + j < n; j++) buf[i + j] = (unsigned char)(word >> (8 * j));
    }
    if (fwrite(buf, 1, n, stdout) != n) return 1;
    remaining -= n;
  }
  return fflush(stdout) == 0 ? 0 : 1;
}
