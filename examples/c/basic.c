/*
 * gpupool from C: allocate, free, free twice (reported, not fatal), then the statistics as
 * JSON and the dashboard.
 *
 *     examples/c/build.sh && target/release/examples-c/basic
 *     GPUPOOL_BACKEND=host GPUPOOL_CONFIG=steps_per_doubling=4 target/release/examples-c/basic
 *
 * The backend comes from GPUPOOL_BACKEND (cuda, host, sim), else CUDA when a driver is found,
 * else host; the configuration from GPUPOOL_CONFIG. Pointers are device memory on CUDA: this
 * program never touches them.
 */
#include <stdio.h>

#include "gpupool.h"

/* Prints the last error of this thread under a heading. */
static void print_last_error(const char *heading) {
    const char *message = gpupool_last_error();
    printf("%s: %s\n", heading, message != NULL ? message : "(none)");
}

int main(void) {
    const char *backend = gpupool_backend();
    if (backend == NULL) {
        print_last_error("no backend");
        return 1;
    }
    printf("backend: %s\n", backend);

    const ssize_t small = 1000;
    const ssize_t large = (ssize_t)3 << 20;
    void *first = gpupool_alloc(small, 0, NULL);
    void *second = gpupool_alloc(large, 0, NULL);
    if (first == NULL || second == NULL) {
        print_last_error("allocation failed");
        return 1;
    }
    printf("allocated %zd bytes at %p and %zd bytes at %p\n", small, first, large, second);

    gpupool_free(first, small, 0, NULL);
    gpupool_free(first, small, 0, NULL); /* a double free: reported and counted, nothing freed */
    print_last_error("second free of the same pointer");
    gpupool_free(second, large, 0, NULL);

    void *again = gpupool_alloc(small, 0, NULL);
    printf("allocated again: %s\n", again == first ? "the cached block" : "a new block");
    gpupool_free(again, small, 0, NULL);

    char *stats = gpupool_stats_json(0);
    if (stats == NULL) {
        print_last_error("no statistics");
        return 1;
    }
    printf("stats: %s\n", stats);
    gpupool_string_free(stats);

    char *dashboard = gpupool_dashboard(0);
    if (dashboard == NULL) {
        print_last_error("no dashboard");
        return 1;
    }
    fputs(dashboard, stdout);
    gpupool_string_free(dashboard);
    return 0;
}
