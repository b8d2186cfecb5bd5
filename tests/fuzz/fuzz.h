/* fuzz.h -- what every fuzz target in tests/fuzz/ shares. Each target defines libFuzzer's entry
 * point, LLVMFuzzerTestOneInput, over one parser of bytes that come from outside a process. Built
 * with clang and -DTP_FUZZ=ON, a target is a libFuzzer binary (ASan+UBSan); in every build the
 * same file is also linked with replay.c into a program that runs the kept corpus and the crash
 * regression inputs once, as an ordinary ctest test. */
#ifndef TP_FUZZ_H
#define TP_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Where targets add up the values a parser handed back, so that reading them is not optimised
 * away: every element must be readable (ASan checks the reads). */
extern volatile float fuzz_sink;

/* A memfd holding data, for parsers that take a path: "/proc/self/fd/N" is written to path.
 * Returns the fd (the caller closes it), or -1. */
int fuzz_memfile(const uint8_t *data, size_t size, char *path, size_t path_len);

#endif
