/* Thread safety of the C API (tests/test_capi.py builds and runs it): one bitrl_policy, THREADS threads x CALLS
 * calls of bitrl_forward and bitrl_act with mixed batch sizes, every result equal (bytes) to the same call made
 * sequentially before the threads start. Prints "ok N" or the first mismatch; exit status 0 only if all agree.
 *
 *     capi_threads POLICY.bitrl [THREADS] [CALLS] [TRUSTED_KEY.pub]
 *
 * With TRUSTED_KEY the policy is loaded with bitrl_load_trusted (its signature checked, tests/test_capi.py). */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitrl.h"

#define CASES 64
#define MAX_BATCH 40

static bitrl_policy *policy;
static int64_t n_obs, n_out, n_act;
static int discrete;
static float *obs[CASES];
static int64_t batch[CASES];
static void *want_out[CASES], *want_act[CASES];
static int calls = 1000;

static size_t act_bytes(int64_t b) { return (size_t)b * (discrete ? sizeof(int64_t) : (size_t)n_act * sizeof(float)); }

static void *worker(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 2654435761u + 1;
    float *out = malloc(MAX_BATCH * (size_t)n_out * sizeof(float));
    void *act = malloc(act_bytes(MAX_BATCH));
    long bad = 0;
    for (int i = 0; i < calls && !bad; i++) {
        seed = seed * 1103515245u + 12345u;
        int c = (int)((seed >> 8) % CASES);
        if (bitrl_forward(policy, obs[c], batch[c], out) != 0 || bitrl_act(policy, obs[c], batch[c], act) != 0) {
            fprintf(stderr, "call failed: %s\n", bitrl_last_error());
            bad = 1;
        } else if (memcmp(out, want_out[c], (size_t)batch[c] * (size_t)n_out * sizeof(float)) != 0 ||
                   memcmp(act, want_act[c], act_bytes(batch[c])) != 0) {
            fprintf(stderr, "thread %lu call %d (batch %lld): differs from the sequential result\n",
                    (unsigned long)(uintptr_t)arg, i, (long long)batch[c]);
            bad = 1;
        }
    }
    free(out);
    free(act);
    return (void *)bad;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s POLICY.bitrl [THREADS] [CALLS] [TRUSTED_KEY.pub]\n", argv[0]);
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 8;
    calls = argc > 3 ? atoi(argv[3]) : 1000;
    const char *key = argc > 4 ? argv[4] : NULL;
    policy = key ? bitrl_load_trusted(argv[1], &key, 1) : bitrl_load(argv[1]);
    if (!policy) {
        fprintf(stderr, "%s\n", bitrl_last_error());
        return 1;
    }
    n_obs = bitrl_obs_size(policy), n_out = bitrl_output_size(policy), n_act = bitrl_action_size(policy);
    discrete = bitrl_is_discrete(policy);
    unsigned seed = 7;
    for (int c = 0; c < CASES; c++) {
        batch[c] = 1 + c % MAX_BATCH;
        obs[c] = malloc((size_t)(batch[c] * n_obs) * sizeof(float));
        for (int64_t i = 0; i < batch[c] * n_obs; i++) {
            seed = seed * 1103515245u + 12345u;
            obs[c][i] = ((float)((seed >> 8) & 0xffff) / 65535.0f - 0.5f) * 4.0f;
        }
        want_out[c] = malloc((size_t)(batch[c] * n_out) * sizeof(float));
        want_act[c] = malloc(act_bytes(batch[c]));
        if (bitrl_forward(policy, obs[c], batch[c], want_out[c]) != 0 || bitrl_act(policy, obs[c], batch[c], want_act[c]) != 0) {
            fprintf(stderr, "sequential call failed: %s\n", bitrl_last_error());
            return 1;
        }
    }
    pthread_t tid[64];
    if (threads < 1 || threads > 64) threads = 8;
    for (int t = 0; t < threads; t++) pthread_create(&tid[t], NULL, worker, (void *)(uintptr_t)t);
    long failed = 0;
    for (int t = 0; t < threads; t++) {
        void *r;
        pthread_join(tid[t], &r);
        failed += (long)(uintptr_t)r;
    }
    for (int c = 0; c < CASES; c++) free(obs[c]), free(want_out[c]), free(want_act[c]);
    bitrl_free(policy);
    if (failed) return 1;
    printf("ok %d threads x %d calls\n", threads, calls);
    return 0;
}
