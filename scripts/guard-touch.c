/* Whether guard markers slow the first touch of a slot's top page: 4,096
 * slots 132 KiB apart, only the touches timed (clock reads included), with
 * no guards, with every guard installed first, with guards installed 32 at
 * a time as the pool does, or with each slot's guard installed just before
 * its touch; the mean of five runs per line, four rounds. Used in
 * BENCHMARKS.md:
 *   gcc -O2 scripts/guard-touch.c -o /tmp/guard-touch && /tmp/guard-touch
 * Needs Linux 6.13+ (MADV_GUARD_INSTALL) and process_madvise (5.10+).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#define MADV_GUARD_INSTALL 102
#define SLOT (132 * 1024)
#define SLOTS 4096
static int pidfd;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* Installs the guards (lowest page) of slots first..first+k-1. */
static void guards(char *p, size_t first, int k) {
    struct iovec ranges[32];
    for (int j = 0; j < k; j++) {
        ranges[j].iov_base = p + (first + j) * SLOT;
        ranges[j].iov_len = 4096;
    }
    if (syscall(SYS_process_madvise, pidfd, ranges, k, MADV_GUARD_INSTALL, 0) < 0) {
        perror("guard install");
        exit(1);
    }
}

/* mode 0: no guards; 1: all guards first; 2: 32 at a time, interleaved;
 * 3: each slot's guard just before its touch. ns per touch. */
static double run(int mode) {
    size_t len = (size_t)SLOT * SLOTS;
    char *p = mmap(0, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    if (mode == 1)
        for (size_t i = 0; i < SLOTS; i += 32) guards(p, i, 32);
    double total = 0;
    for (size_t i = 0; i < SLOTS; i++) {
        if (mode == 2 && i % 32 == 0) guards(p, i, 32);
        if (mode == 3) guards(p, i, 1);
        volatile char *top = p + (i + 1) * SLOT - 64;
        double t0 = now();
        *top = 1;
        total += now() - t0;
    }
    munmap(p, len);
    return total / SLOTS;
}

int main(void) {
    pidfd = syscall(SYS_pidfd_open, getpid(), 0);
    if (pidfd < 0) { perror("pidfd_open"); return 1; }
    const char *names[] = {"no guards", "all guards first", "guards 32 at a time",
                           "guard just before"};
    for (int round = 0; round < 4; round++) {
        for (int m = 0; m < 4; m++) {
            double sum = 0;
            for (int i = 0; i < 5; i++) sum += run(m);
            printf("%s %.0f ns | ", names[m], sum / 5);
        }
        printf("\n");
    }
    return 0;
}
