/* What a guard page costs the pool, per slot: MADV_GUARD_INSTALL of one
 * page in each of 8,192 fresh slots 132 KiB apart (as pool slots are),
 * one madvise per slot or k ranges per process_madvise; the mean of five
 * runs per line, three rounds. Used in BENCHMARKS.md:
 *   gcc -O2 scripts/guard-batch.c -o /tmp/guard-batch && /tmp/guard-batch
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
#define SLOTS 8192
static int pidfd;
static struct iovec ranges[1024];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* ns per guard, installing k ranges per system call. */
static double run(int k) {
    size_t len = (size_t)SLOT * SLOTS;
    char *p = mmap(0, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    double t0 = now();
    for (size_t i = 0; i < SLOTS; i += k) {
        for (int j = 0; j < k; j++) {
            ranges[j].iov_base = p + (i + j) * SLOT;
            ranges[j].iov_len = 4096;
        }
        long r = k == 1 ? madvise(ranges[0].iov_base, 4096, MADV_GUARD_INSTALL)
                        : syscall(SYS_process_madvise, pidfd, ranges, k, MADV_GUARD_INSTALL, 0);
        if (r < 0) { perror("guard install"); exit(1); }
    }
    double t1 = now();
    munmap(p, len);
    return (t1 - t0) / SLOTS;
}

int main(void) {
    pidfd = syscall(SYS_pidfd_open, getpid(), 0);
    if (pidfd < 0) { perror("pidfd_open"); return 1; }
    int ks[] = {1, 8, 32, 128, 512, 1024};
    for (int round = 0; round < 3; round++) {
        for (int m = 0; m < 6; m++) {
            double sum = 0;
            for (int i = 0; i < 5; i++) sum += run(ks[m]);
            printf("k=%d %.0f ns | ", ks[m], sum / 5);
        }
        printf("\n");
    }
    return 0;
}
