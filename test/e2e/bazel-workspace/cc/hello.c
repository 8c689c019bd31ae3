#include <stdio.h>

int main(void) {
  printf("hello from a remotely cached binary\n");
  return 0;
}
