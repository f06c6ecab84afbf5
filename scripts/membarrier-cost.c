/* The cost of one membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED), the RCU
 * updater's heavy barrier, with the process alone on CPU 0 and with a
 * second thread spinning on CPU 1 (which the barrier must interrupt). A
 * grace period with a reader on the other CPU issues two. Used in
 * BENCHMARKS.md:
 *   gcc -O2 scripts/membarrier-cost.c -o /tmp/membarrier-cost -lpthread && /tmp/membarrier-cost
 */
#define _GNU_SOURCE
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;

static double now_ns(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

static void pin(int cpu) {
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof set, &set);
}

static void *spin(void *arg) {
	(void)arg;
	pin(1);
	while (!atomic_load(&stop))
		;
	return NULL;
}

int main(void) {
	pin(0);
	if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0)) {
		perror("membarrier register");
		return 1;
	}
	for (int with = 0; with < 2; with++) {
		pthread_t thread;
		if (with)
			pthread_create(&thread, NULL, spin, NULL);
		usleep(10000);
		double start = now_ns();
		for (int i = 0; i < 20000; i++)
			syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
		printf("%s: %.2f us per membarrier\n",
		       with ? "a thread spinning on CPU 1" : "alone",
		       (now_ns() - start) / 20000 / 1000);
		if (with) {
			atomic_store(&stop, 1);
			pthread_join(thread, NULL);
		}
	}
	return 0;
}
