/* act_harness.c: act() per call from C, for bench/act.py (issue 13's benchmark). One process, one thread.
 *
 *     cc -O2 bench/act_harness.c -o act_harness $(bitrl-compile capi --cflags --libs) -ldl \
 *        [-DBITRL_BENCH_ORT -I DIR_WITH_onnxruntime_c_api.h]
 *     ./act_harness [options] policy.bitrl [fp32.onnx [int8.onnx]]
 *
 * Options:
 *     --obs FILE      observations, raw float32, row-major (default: one observation of zeros)
 *     --calls N       calls per round and implementation (default 10000)
 *     --rounds R      rounds; implementations alternate within each round, order reversed every other round
 *     --warmup W      calls of each implementation before the first round (default 1000)
 *     --ort LIB       libonnxruntime.so, dlopen'ed (only with -DBITRL_BENCH_ORT): ONNX Runtime's C API on the
 *                     .onnx files, CPU execution provider, 1 intra-op and 1 inter-op thread
 *     --count         instead of timing: warm up, then for the k-th implementation make the qemu plugin's marker
 *                     system call (bitrl_compile/bench/qemu_insn_plugin.c) with label 2k, make N calls, marker 2k+1
 *
 * Every implementation does what an application's act() does: copy one observation in, run, and leave the
 * argmax (Discrete) or the action values in the caller's memory. Ours is bitrl_act (argmax inside the
 * artifact). ONNX Runtime: "run" is OrtApi::Run with the input and the output OrtValues created once over
 * caller memory, "iobinding" is OrtApi::RunWithBinding on an OrtIoBinding bound once to the same values;
 * both followed by the same argmax in C.
 *
 * Output (stdout), one line each:
 *     impl NAME                      the implementations, in measuring order
 *     actions NAME a0 a1 ...         the action of every observation of --obs (Discrete: an integer)
 *     ns NAME t_1 ... t_R            nanoseconds per call in each round (timing mode)
 *     block K NAME N                 marker labels 2K and 2K+1 enclose N calls of NAME (--count)
 * Errors: one line on stderr, exit status 1.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "bitrl.h"

#ifdef BITRL_BENCH_ORT
#include "onnxruntime_c_api.h"
#endif

#define MARKER_SYSCALL 0xB17 /* bitrl_compile/bench/child.py: MARKER_SYSCALL, MARK_COUNT */
#define MARK_COUNT 2
#define MAX_IMPLS 8

static void die(const char *what, const char *why) {
    fprintf(stderr, "act_harness: %s: %s\n", what, why);
    exit(1);
}

typedef struct impl {
    const char *name;
    int (*act)(struct impl *self, const float *obs, void *action); /* one observation -> action */
    void *state;
} impl;

static int64_t obs_size, action_size;
static int discrete;

/* ours */
static int ours_act(impl *self, const float *obs, void *action) {
    return bitrl_act((bitrl_policy *)self->state, obs, 1, action);
}

#ifdef BITRL_BENCH_ORT
static const OrtApi *ort;

typedef struct {
    OrtSession *session;
    OrtValue *input, *output;
    OrtIoBinding *binding;
    float *in, *out;
    int64_t out_size;
    const char *in_name, *out_name;
} ort_state;

static void ort_check(OrtStatus *status, const char *what) {
    if (status) {
        char line[512];
        snprintf(line, sizeof line, "%s", ort->GetErrorMessage(status));
        ort->ReleaseStatus(status);
        die(what, line);
    }
}

static void ort_action(const ort_state *s, void *action) {
    if (discrete) {
        int64_t best = 0;
        for (int64_t i = 1; i < s->out_size; i++)
            if (s->out[i] > s->out[best]) best = i;
        *(int64_t *)action = best;
    } else {
        memcpy(action, s->out, (size_t)action_size * sizeof(float));
    }
}

static int ort_run(impl *self, const float *obs, void *action) {
    ort_state *s = self->state;
    memcpy(s->in, obs, (size_t)obs_size * sizeof(float));
    OrtStatus *status = ort->Run(s->session, NULL, &s->in_name, (const OrtValue *const *)&s->input, 1,
                                 &s->out_name, 1, &s->output);
    if (status) { ort_check(status, "OrtApi::Run"); return -1; }
    ort_action(s, action);
    return 0;
}

static int ort_iobinding(impl *self, const float *obs, void *action) {
    ort_state *s = self->state;
    memcpy(s->in, obs, (size_t)obs_size * sizeof(float));
    OrtStatus *status = ort->RunWithBinding(s->session, NULL, s->binding);
    if (status) { ort_check(status, "OrtApi::RunWithBinding"); return -1; }
    ort_action(s, action);
    return 0;
}

static ort_state *ort_open(const char *path, OrtEnv *env, int64_t out_size) {
    ort_state *s = calloc(1, sizeof *s);
    OrtSessionOptions *options;
    ort_check(ort->CreateSessionOptions(&options), "CreateSessionOptions");
    ort_check(ort->SetIntraOpNumThreads(options, 1), "SetIntraOpNumThreads");
    ort_check(ort->SetInterOpNumThreads(options, 1), "SetInterOpNumThreads");
    ort_check(ort->SetSessionExecutionMode(options, ORT_SEQUENTIAL), "SetSessionExecutionMode");
    ort_check(ort->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL), "SetSessionGraphOptimizationLevel");
    ort_check(ort->CreateSession(env, path, options, &s->session), path);
    ort->ReleaseSessionOptions(options);
    OrtAllocator *allocator;
    ort_check(ort->GetAllocatorWithDefaultOptions(&allocator), "GetAllocatorWithDefaultOptions");
    char *name;
    ort_check(ort->SessionGetInputName(s->session, 0, allocator, &name), "SessionGetInputName");
    s->in_name = strdup(name);
    ort_check(ort->AllocatorFree(allocator, name), "AllocatorFree");
    ort_check(ort->SessionGetOutputName(s->session, 0, allocator, &name), "SessionGetOutputName");
    s->out_name = strdup(name);
    ort_check(ort->AllocatorFree(allocator, name), "AllocatorFree");
    OrtMemoryInfo *memory;
    ort_check(ort->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &memory), "CreateCpuMemoryInfo");
    s->out_size = out_size;
    if (posix_memalign((void **)&s->in, 64, 64 + (size_t)obs_size * sizeof(float)) ||
        posix_memalign((void **)&s->out, 64, 64 + (size_t)out_size * sizeof(float)))
        die("posix_memalign", "out of memory");
    int64_t in_shape[2] = {1, obs_size}, out_shape[2] = {1, out_size};
    ort_check(ort->CreateTensorWithDataAsOrtValue(memory, s->in, (size_t)obs_size * sizeof(float), in_shape, 2,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &s->input), "input value");
    ort_check(ort->CreateTensorWithDataAsOrtValue(memory, s->out, (size_t)out_size * sizeof(float), out_shape, 2,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &s->output), "output value");
    ort->ReleaseMemoryInfo(memory);
    ort_check(ort->CreateIoBinding(s->session, &s->binding), "CreateIoBinding");
    ort_check(ort->BindInput(s->binding, s->in_name, s->input), "BindInput");
    ort_check(ort->BindOutput(s->binding, s->out_name, s->output), "BindOutput");
    return s;
}
#endif

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static void marker(long label) { syscall(MARKER_SYSCALL, (long)MARK_COUNT, label, 0L); }

int main(int argc, char **argv) {
    const char *obs_file = NULL, *ort_lib = NULL, *files[3] = {0};
    long calls = 10000, rounds = 10, warmup = 1000;
    int count = 0, n_files = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--obs") && i + 1 < argc) obs_file = argv[++i];
        else if (!strcmp(argv[i], "--calls") && i + 1 < argc) calls = atol(argv[++i]);
        else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) rounds = atol(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atol(argv[++i]);
        else if (!strcmp(argv[i], "--ort") && i + 1 < argc) ort_lib = argv[++i];
        else if (!strcmp(argv[i], "--count")) count = 1;
        else if (argv[i][0] == '-') die(argv[i], "unknown option (see the comment at the top of act_harness.c)");
        else if (n_files < 3) files[n_files++] = argv[i];
        else die(argv[i], "too many files: give policy.bitrl [fp32.onnx [int8.onnx]]");
    }
    if (!files[0]) die("usage", "act_harness [--obs F] [--calls N] [--rounds R] [--warmup W] [--ort LIB] [--count] "
                                "policy.bitrl [fp32.onnx [int8.onnx]]");
    if (calls < 1 || rounds < 1 || warmup < 0) die("--calls/--rounds/--warmup", "must be positive");

    bitrl_policy *policy = bitrl_load(files[0]);
    if (!policy) die(files[0], bitrl_last_error());
    obs_size = bitrl_obs_size(policy);
    action_size = bitrl_action_size(policy);
    discrete = bitrl_is_discrete(policy);
    size_t action_bytes = discrete ? sizeof(int64_t) : (size_t)action_size * sizeof(float);

    /* observations: 64-byte aligned, as the Python side's */
    long n_obs = 1;
    float *obs;
    if (obs_file) {
        FILE *f = fopen(obs_file, "rb");
        if (!f) die(obs_file, "cannot open");
        fseek(f, 0, SEEK_END);
        long bytes = ftell(f);
        fseek(f, 0, SEEK_SET);
        n_obs = bytes / (long)(obs_size * (int64_t)sizeof(float));
        if (n_obs < 1 || bytes % (long)(obs_size * (int64_t)sizeof(float)))
            die(obs_file, "size is not a whole number of observations");
        if (posix_memalign((void **)&obs, 64, (size_t)bytes)) die("posix_memalign", "out of memory");
        if (fread(obs, 1, (size_t)bytes, f) != (size_t)bytes) die(obs_file, "short read");
        fclose(f);
    } else {
        if (posix_memalign((void **)&obs, 64, 64 + (size_t)obs_size * sizeof(float))) die("posix_memalign", "oom");
        memset(obs, 0, (size_t)obs_size * sizeof(float));
    }

    impl impls[MAX_IMPLS];
    int n = 0;
    impls[n++] = (impl){"bitrl", ours_act, policy};
    if (n_files > 1) {
#ifdef BITRL_BENCH_ORT
        if (!ort_lib) die("--ort", "give libonnxruntime.so to measure the .onnx files");
        void *lib = dlopen(ort_lib, RTLD_NOW | RTLD_LOCAL);
        if (!lib) die(ort_lib, dlerror());
        const OrtApiBase *(*get_base)(void) = (const OrtApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
        if (!get_base) die(ort_lib, "no OrtGetApiBase");
        ort = get_base()->GetApi(ORT_API_VERSION);
        if (!ort) die(ort_lib, "does not offer this header's ORT_API_VERSION");
        OrtEnv *env;
        ort_check(ort->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "act_harness", &env), "CreateEnv");
        static const char *labels[2][2] = {{"ort-fp32-run", "ort-fp32-iobinding"},
                                           {"ort-int8-run", "ort-int8-iobinding"}};
        int64_t out_size = bitrl_output_size(policy);
        for (int f = 1; f < n_files; f++) {
            ort_state *s = ort_open(files[f], env, out_size);
            impls[n++] = (impl){labels[f - 1][0], ort_run, s};
            impls[n++] = (impl){labels[f - 1][1], ort_iobinding, s};
        }
#else
        (void)ort_lib;
        die("onnx files given", "this harness was built without ONNX Runtime (-DBITRL_BENCH_ORT)");
#endif
    }

    void *action = aligned_alloc(64, 64 + action_bytes * (size_t)n_obs);
    for (int i = 0; i < n; i++) {
        printf("impl %s\nactions %s", impls[i].name, impls[i].name);
        for (long k = 0; k < n_obs; k++) {
            char *a = (char *)action + k * (long)action_bytes;
            if (impls[i].act(&impls[i], obs + k * obs_size, a) != 0) die(impls[i].name, bitrl_last_error());
            if (discrete) printf(" %lld", (long long)*(int64_t *)a);
            else for (int64_t j = 0; j < action_size; j++) printf(" %.9g", (double)((float *)a)[j]);
        }
        printf("\n");
        for (long c = 0; c < warmup; c++) impls[i].act(&impls[i], obs, action);
    }
    fflush(stdout);

    if (count) {
        for (int i = 0; i < n; i++) {
            marker(2L * i);
            for (long c = 0; c < calls; c++) impls[i].act(&impls[i], obs, action);
            marker(2L * i + 1);
            printf("block %d %s %ld\n", i, impls[i].name, calls);
        }
        return 0;
    }
    double *ns = calloc((size_t)(n * rounds), sizeof(double));
    for (long r = 0; r < rounds; r++)
        for (int j = 0; j < n; j++) {
            int i = r % 2 ? n - 1 - j : j;
            int (*act)(impl *, const float *, void *) = impls[i].act;
            double t0 = now_ns();
            for (long c = 0; c < calls; c++) act(&impls[i], obs, action);
            ns[i * rounds + r] = (now_ns() - t0) / (double)calls;
        }
    for (int i = 0; i < n; i++) {
        printf("ns %s", impls[i].name);
        for (long r = 0; r < rounds; r++) printf(" %.2f", ns[i * rounds + r]);
        printf("\n");
    }
    bitrl_free(policy);
    return 0;
}
