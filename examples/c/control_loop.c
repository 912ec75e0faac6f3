/* A control loop on the C API: observations in, actions out, one per line.
 *
 *     cc control_loop.c $(bitrl-compile capi --cflags --libs) -o control_loop
 *     printf '0.01 -0.02 0.03 0.04\n' | ./control_loop policy.bitrl              # prints the action: 0 or 1
 *     ./control_loop --forward policy.bitrl < observations.txt                    # the network's raw outputs
 *
 * Each input line holds bitrl_obs_size() numbers separated by spaces. Each output line is the action: an
 * integer (Discrete) or bitrl_action_size() floats (Box); with --forward, bitrl_output_size() floats. Floats
 * are printed with 9 significant digits, which give back the exact float32. On any error it prints one line
 * on stderr and exits with status 1. A robot's loop would read its sensors where this reads stdin. */
#define _POSIX_C_SOURCE 200809L /* getline */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitrl.h"

int main(int argc, char **argv) {
    int forward = argc == 3 && strcmp(argv[1], "--forward") == 0;
    if (argc != 2 + forward) {
        fprintf(stderr, "usage: %s [--forward] POLICY.bitrl < observations (one per line)\n", argv[0]);
        return 2;
    }
    bitrl_policy *policy = bitrl_load(argv[1 + forward]);
    if (!policy) {
        fprintf(stderr, "control_loop: %s\n", bitrl_last_error());
        return 1;
    }
    int64_t n_obs = bitrl_obs_size(policy);
    int64_t n_out = forward ? bitrl_output_size(policy) : bitrl_action_size(policy);
    int discrete = !forward && bitrl_is_discrete(policy);
    float *obs = malloc((size_t)n_obs * sizeof *obs);
    float *out = malloc((size_t)(n_out > 0 ? n_out : 1) * sizeof *out);
    int64_t action = 0;
    char *line = NULL;
    size_t cap = 0;
    long step = 0;
    int status = 0;
    while (getline(&line, &cap, stdin) > 0) {
        step++;
        if (strspn(line, " \t\r\n") == strlen(line)) continue; /* a blank line */
        char *at = line, *end;
        for (int64_t i = 0; i < n_obs; i++, at = end) {
            errno = 0;
            obs[i] = strtof(at, &end);
            if (end == at || errno == ERANGE) {
                fprintf(stderr, "control_loop: line %ld: expected %lld numbers\n", step, (long long)n_obs);
                status = 1;
                goto done;
            }
        }
        int rc = forward ? bitrl_forward(policy, obs, 1, out) : bitrl_act(policy, obs, 1, discrete ? (void *)&action : out);
        if (rc != 0) {
            fprintf(stderr, "control_loop: line %ld: %s\n", step, bitrl_last_error());
            status = 1;
            goto done;
        }
        if (discrete) {
            printf("%lld\n", (long long)action);
        } else {
            for (int64_t i = 0; i < n_out; i++) printf(i ? " %.9g" : "%.9g", out[i]);
            printf("\n");
        }
        fflush(stdout);
    }
done:
    free(line);
    free(obs);
    free(out);
    bitrl_free(policy);
    return status;
}
