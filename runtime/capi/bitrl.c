/* libbitrl: the C API of bitrl.h. A policy.bitrl is opened without TVM: the zip is read and checked here
 * (zip.c, sha256.c, json.c), the parameters are unpacked (params.c), the compiled kernels (lib.so) are
 * dlopen'ed from memory, and each entry point's call plan (manifest["entry_points"], runtime/plan.py) is
 * run by calling the kernels' exported functions `__tvm_ffi_<name>` directly, TVMFFISafeCallType with
 * DLTensor* arguments. The few runtime hooks the kernels use are ours: workspace allocation, a
 * single-threaded parallel launch, and the error-reporting function of their argument checks.
 *
 *   load:  trusted keys -> file -> zip (limits) -> manifest checks -> manifest.sha256 -> signature (when keys
 *          are configured) -> sha256 of every member -> machine checks (arch, CPU, AMX) -> params.safetensors'
 *          header -> lib.so in memory (the first native code of the artifact) -> parameters (base-3 unpacked)
 *          -> plan resolved -> one test call
 *   call:  this thread's buffers for the policy (made once, grown for a bigger batch) -> obs copied in,
 *          checked finite -> the plan's kernel calls -> the output copied out
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <tvm/ffi/c_api.h>

#include "bitrl.h"
#include "internal.h"

#if defined(__x86_64__)
#define HOST_ARCH "x86_64"
#elif defined(__aarch64__)
#define HOST_ARCH "aarch64"
#else
#error "libbitrl is built for x86_64 and aarch64"
#endif

#define FORMAT_VERSION 2 /* 2: manifest.sha256 and optional signatures.json; 1: the manifest was not hashed */
#define DEFAULT_BATCH_MAX 1048576
#define RECOMPILE "recompile it with `bitrl-compile MODEL -o FILE`"

/* ----------------------------------------------------------------------------------------------- errors */

static _Thread_local char last_error[1024];
static _Thread_local char kernel_error[512]; /* what a kernel's argument check reported */
static _Thread_local int kernel_error_set;

int bitrl_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    for (char *c = last_error; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    return -1;
}

const char *bitrl_last_error(void) { return last_error; }

const char *bitrl_version(void) { return BITRL_VERSION; }

/* The kernels' one undefined symbol (their argument checks report through it); with tvm-ffi it would
 * raise a Python-visible error, here it becomes part of bitrl_last_error(). */
TVM_FFI_DLL void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts, int32_t num_parts) {
    size_t len = (size_t)snprintf(kernel_error, sizeof kernel_error, "%s: ", kind ? kind : "Error");
    for (int32_t i = 0; i < num_parts && len < sizeof kernel_error - 1; i++) {
        if (!parts[i]) continue;
        len += (size_t)snprintf(kernel_error + len, sizeof kernel_error - len, "%s", parts[i]);
    }
    for (char *c = kernel_error; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';
    kernel_error_set = 1;
}

/* ------------------------------------------------------------------------ the runtime hooks of lib.so */

typedef struct {
    void *sync_handle;
    int32_t num_task;
} parallel_env; /* TVMParallelGroupEnv (tvm/runtime/c_backend_api.h) */
typedef int (*parallel_lambda)(int task_id, parallel_env *penv, void *cdata);

/* Kernel workspace (e.g. a layer's activations quantised to int8): the generated code allocates and frees
 * it in LIFO order within one call, so each thread keeps one stack of 64-byte aligned blocks and a call costs
 * two additions. A request that does not fit goes to the heap and makes the stack grow once it is empty. */
typedef struct {
    char *base;
    size_t cap, top, want;
} workspace_stack;
static pthread_key_t workspace_key;
static pthread_once_t workspace_once = PTHREAD_ONCE_INIT;
static _Thread_local workspace_stack *workspace;

static void workspace_release(void *value) {
    workspace_stack *w = value;
    free(w->base);
    free(w);
}

static void workspace_init(void) { (void)pthread_key_create(&workspace_key, workspace_release); }

static void *alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code_hint, int bits_hint) {
    (void)device_type, (void)device_id, (void)code_hint, (void)bits_hint;
    if (nbytes > SIZE_MAX / 2) return NULL;
    size_t size = nbytes ? ((size_t)nbytes + 63) / 64 * 64 : 64;
    workspace_stack *w = workspace;
    if (!w) {
        pthread_once(&workspace_once, workspace_init);
        w = calloc(1, sizeof *w);
        if (!w) return NULL;
        if (pthread_setspecific(workspace_key, w) != 0) {
            free(w);
            return NULL;
        }
        workspace = w;
    }
    if (w->top == 0 && w->want > w->cap) { /* empty: grow to what the last calls needed */
        char *grown = aligned_alloc(64, w->want);
        if (grown) {
            free(w->base);
            w->base = grown;
            w->cap = w->want;
        }
    }
    if (w->top + size <= w->cap) {
        void *ptr = w->base + w->top;
        w->top += size;
        return ptr;
    }
    if (w->top + size > w->want) w->want = (w->top + size) * 2;
    return aligned_alloc(64, size);
}

static int free_workspace(int device_type, int device_id, void *ptr) {
    (void)device_type, (void)device_id;
    workspace_stack *w = workspace;
    if (w && (char *)ptr >= w->base && (char *)ptr < w->base + w->cap)
        w->top = (size_t)((char *)ptr - w->base); /* LIFO: everything above it is free too */
    else
        free(ptr);
    return 0;
}

/* TVM's generated code splits the work into num_task parts: one task does all of it, on this thread. */
static int parallel_launch(parallel_lambda f, void *cdata, int num_task) {
    (void)num_task;
    parallel_env env = {NULL, 1};
    return f(0, &env, cdata);
}

static int parallel_barrier(int task_id, parallel_env *penv) {
    (void)task_id, (void)penv;
    return 0;
}

static void error_set_raised(const char *kind, const char *message) {
    const char *parts[1] = {message};
    TVMFFIErrorSetRaisedFromCStrParts(kind, parts, 1);
}

static int no_function_call(void *func, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result) {
    (void)func, (void)args, (void)num_args, (void)result;
    error_set_raised("RuntimeError", "a kernel called a packed function, which the C runtime does not provide");
    return -1;
}

static int no_env_function(void *mod, const char *name, void **out) {
    (void)mod, (void)out;
    const char *parts[3] = {"a kernel needs the function ", name, " from the TVM runtime, which the C runtime does not provide"};
    TVMFFIErrorSetRaisedFromCStrParts("RuntimeError", parts, 3);
    return -1;
}

static int no_init_once(void **handle, void *init) {
    (void)handle, (void)init;
    error_set_raised("RuntimeError", "a kernel needs TVM's module initialisation, which the C runtime does not provide");
    return -1;
}

static const struct {
    const char *name;
    void *fn;
} HOOKS[] = {
    {"__TVMBackendAllocWorkspace", (void *)alloc_workspace},
    {"__TVMBackendFreeWorkspace", (void *)free_workspace},
    {"__TVMBackendParallelLaunch", (void *)parallel_launch},
    {"__TVMBackendParallelBarrier", (void *)parallel_barrier},
    {"__TVMFFIErrorSetRaisedFromCStr", (void *)error_set_raised},
    {"__TVMFFIFunctionCall", (void *)no_function_call},
    {"__TVMBackendGetFuncFromEnv", (void *)no_env_function},
    {"__TVMFFIEnvModLookupFromImports", (void *)no_env_function},
    {"__TVMFFIHandleInitOnce", (void *)no_init_once},
};

/* ------------------------------------------------------------------------------------------ the policy */

enum { FORWARD, ACT, SAMPLE, FEATURES, N_ENTRIES };
static const char *const ENTRY_NAMES[N_ENTRIES] = {"forward", "act", "sample", "features"};
enum { ARG_INPUT, ARG_OUTPUT, ARG_BUFFER, ARG_PARAM };

typedef struct {
    DLDataType dtype;
    int ndim;
    int64_t dims[BITRL_MAX_DIMS]; /* -1: the call's batch size */
    size_t elem;
    int view; /* a buffer with "view": the index (in its entry's specs) of the tensor whose memory it is; else -1 */
} tensor_spec;

typedef struct {
    char *func;
    TVMFFISafeCallType fn;
    int nargs, first_arg; /* its arguments: entry.kinds/indices[first_arg .. first_arg + nargs) */
} call_spec;

typedef struct {
    int present;
    int ninputs, noutputs, nbuffers; /* specs: inputs, then outputs, then buffers */
    tensor_spec *specs;
    int ncalls, nargs;
    call_spec *calls;
    int *kinds, *indices; /* per argument of all calls */
} entry;

typedef struct thread_ctx thread_ctx;

struct bitrl_policy {
    char *path;
    void *lib;
    int lib_fd; /* the memfd (or unlinked file) lib was opened from */
    int nparams;
    char **param_names;
    bitrl_tensor *params;
    DLTensor *param_tensors;
    entry entries[N_ENTRIES];
    int64_t obs_size, output_size, action_size, batch_max;
    int64_t state_size; /* a recurrent policy's state values per row (manifest input.recurrent), 0 otherwise */
    int discrete;
    int64_t nkeys; /* a Dict observation's keys (manifest input.keys), 0 for one array */
    char **key_names;
    int64_t *key_offsets, *key_sizes;
    int64_t *key_n; /* a Discrete key's n (preprocess "onehot": its one float is the index), 0 for the others */
    pthread_key_t key;
    int key_made;
    pthread_mutex_t mutex; /* guards ctxs */
    thread_ctx *ctxs;
};

/* One thread's buffers for one policy: DLTensors of every entry's inputs, outputs and buffers, the
 * argument arrays of every call, and one 64-byte aligned arena sized for `capacity` rows. */
typedef struct {
    DLTensor *tensors;
    int64_t *shapes;
    TVMFFIAny *args;
    int64_t batch; /* the batch the shapes are set for; -1: none yet */
} entry_ctx;

struct thread_ctx {
    thread_ctx *prev, *next;
    bitrl_policy *policy;
    int64_t capacity;
    void *arena;
    entry_ctx e[N_ENTRIES];
};

static size_t tensor_bytes(const tensor_spec *t, int64_t batch) {
    size_t n = t->elem;
    for (int d = 0; d < t->ndim; d++) n *= (size_t)(t->dims[d] < 0 ? batch : t->dims[d]);
    return n;
}

static int64_t row_size(const tensor_spec *t) { /* elements per row: the product of the non-batch dims */
    int64_t n = 1;
    for (int d = 1; d < t->ndim; d++) n *= t->dims[d];
    return n;
}

/* ------------------------------------------------------------------------------------ per-thread state */

static void ctx_free(thread_ctx *c) {
    if (!c) return;
    for (int i = 0; i < N_ENTRIES; i++) {
        free(c->e[i].tensors);
        free(c->e[i].shapes);
        free(c->e[i].args);
    }
    free(c->arena);
    free(c);
}

static void ctx_unlink(thread_ctx *c) {
    bitrl_policy *p = c->policy;
    if (c->prev) c->prev->next = c->next;
    else p->ctxs = c->next;
    if (c->next) c->next->prev = c->prev;
}

static void ctx_thread_exit(void *value) { /* a thread that called the policy ends: drop its buffers */
    thread_ctx *c = value;
    pthread_mutex_lock(&c->policy->mutex);
    ctx_unlink(c);
    pthread_mutex_unlock(&c->policy->mutex);
    ctx_free(c);
}

static thread_ctx *ctx_new(bitrl_policy *p) {
    thread_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->policy = p;
    for (int i = 0; i < N_ENTRIES; i++) {
        entry *e = &p->entries[i];
        entry_ctx *x = &c->e[i];
        x->batch = -1;
        if (!e->present) continue;
        int nt = e->ninputs + e->noutputs + e->nbuffers, ndims = 0;
        for (int t = 0; t < nt; t++) ndims += e->specs[t].ndim;
        x->tensors = calloc((size_t)nt + 1, sizeof *x->tensors);
        x->shapes = calloc((size_t)ndims + 1, sizeof *x->shapes);
        x->args = calloc((size_t)e->nargs + 1, sizeof *x->args);
        if (!x->tensors || !x->shapes || !x->args) {
            ctx_free(c);
            return NULL;
        }
        int64_t *shape = x->shapes;
        for (int t = 0; t < nt; t++) {
            DLTensor *d = &x->tensors[t];
            d->device.device_type = kDLCPU;
            d->ndim = e->specs[t].ndim;
            d->dtype = e->specs[t].dtype;
            d->shape = shape;
            for (int k = 0; k < d->ndim; k++) shape[k] = e->specs[t].dims[k];
            shape += d->ndim;
        }
        for (int a = 0; a < e->nargs; a++) {
            int base = e->kinds[a] == ARG_INPUT ? 0 : e->kinds[a] == ARG_OUTPUT ? e->ninputs : e->ninputs + e->noutputs;
            x->args[a].type_index = kTVMFFIDLTensorPtr;
            x->args[a].v_ptr = e->kinds[a] == ARG_PARAM ? &p->param_tensors[e->indices[a]] : &x->tensors[base + e->indices[a]];
        }
    }
    return c;
}

/* Room for `batch` rows in every entry's tensors: a new arena when the batch is bigger than any before. */
static int ctx_reserve(thread_ctx *c, int64_t batch) {
    bitrl_policy *p = c->policy;
    size_t need = 0;
    for (int i = 0; i < N_ENTRIES; i++) {
        entry *e = &p->entries[i];
        size_t sum = 0;
        for (int t = 0; e->present && t < e->ninputs + e->noutputs + e->nbuffers; t++)
            if (e->specs[t].view < 0) sum += (tensor_bytes(&e->specs[t], batch) + 63) / 64 * 64;
        if (sum > need) need = sum;
    }
    void *arena = bitrl_aligned_alloc(need);
    if (!arena) return bitrl_fail("out of memory for the buffers of a batch of %lld", (long long)batch);
    free(c->arena);
    c->arena = arena;
    c->capacity = batch;
    for (int i = 0; i < N_ENTRIES; i++) {
        entry *e = &p->entries[i];
        char *at = arena;
        for (int t = 0; e->present && t < e->ninputs + e->noutputs + e->nbuffers; t++) {
            if (e->specs[t].view >= 0) continue;
            c->e[i].tensors[t].data = at;
            at += (tensor_bytes(&e->specs[t], batch) + 63) / 64 * 64;
        }
        for (int t = 0; e->present && t < e->ninputs + e->noutputs + e->nbuffers; t++) /* views: no copy */
            if (e->specs[t].view >= 0) c->e[i].tensors[t].data = c->e[i].tensors[e->specs[t].view].data;
    }
    return 0;
}

static thread_ctx *ctx_get(bitrl_policy *p, int64_t batch) {
    thread_ctx *c = pthread_getspecific(p->key);
    if (c && c->capacity >= batch) return c; /* the hot path */
    if (!c) {
        c = ctx_new(p);
        if (!c) {
            bitrl_fail("%s: out of memory for this thread's buffers", p->path);
            return NULL;
        }
        if (pthread_setspecific(p->key, c) != 0) {
            ctx_free(c);
            bitrl_fail("%s: cannot keep this thread's buffers (pthread_setspecific failed)", p->path);
            return NULL;
        }
        pthread_mutex_lock(&p->mutex);
        c->next = p->ctxs;
        if (p->ctxs) p->ctxs->prev = c;
        p->ctxs = c;
        pthread_mutex_unlock(&p->mutex);
    }
    int64_t grow = c->capacity * 2 > batch ? c->capacity * 2 : batch; /* fewer regrowths with mixed batches */
    if (grow > p->batch_max) grow = p->batch_max;
    if (ctx_reserve(c, grow) != 0 && (grow == batch || ctx_reserve(c, batch) != 0)) return NULL;
    return c;
}

/* ---------------------------------------------------------------------------------------------- calls */

static int check_common(const bitrl_policy *p, const void *obs, int64_t batch, const void *dst, const char *fn,
                        const char *dst_name) {
    if (!p) return bitrl_fail("%s: the policy is NULL; pass what bitrl_load returned (and check it for NULL)", fn);
    if (!obs) return bitrl_fail("%s: obs is NULL; pass float[batch * %lld] observations", fn, (long long)p->obs_size);
    if (!dst) return bitrl_fail("%s: %s is NULL; pass a buffer for the results", fn, dst_name);
    if (batch <= 0 || batch > p->batch_max)
        return bitrl_fail("%s: batch is %lld; give 1 to %lld observations per call", fn, (long long)batch,
                          (long long)p->batch_max);
    return 0;
}

static int copy_finite(float *dst, const float *src, int64_t n, int64_t row, const char *fn, const char *name) {
    for (int64_t i = 0; i < n; i++) {
        float v = src[i];
        if (!isfinite(v))
            return bitrl_fail("%s: %s[%lld] is %s (row %lld, value %lld); %s must be finite", fn, name, (long long)i,
                              isnan(v) ? "NaN" : v > 0 ? "+Inf" : "-Inf", (long long)(i / row), (long long)(i % row), name);
        dst[i] = v;
    }
    return 0;
}

/* An image policy whose first convolution reads the frame's uint8 pixels (a uint8 observation input: see
 * passes/entry_points.py): the floats must be whole numbers in [0, 255], which convert exactly (runtime/plan.py's
 * to_pixels refuses the same). */
static int copy_pixels(uint8_t *dst, const float *src, int64_t n, int64_t row, const char *fn, const char *name) {
    for (int64_t i = 0; i < n; i++) {
        float v = src[i];
        if (!(v >= 0.0f && v <= 255.0f) || v != (float)(int)v)
            return bitrl_fail("%s: %s[%lld] is %g (row %lld, value %lld); this image policy reads whole pixel values "
                              "in [0, 255]", fn, name, (long long)i, (double)v, (long long)(i / row), (long long)(i % row));
        dst[i] = (uint8_t)v;
    }
    return 0;
}

/* A Dict observation's Discrete keys (runtime/policy.py's _key_index refuses the same): the key's one float in each
 * row is its index, a whole number in [0, n), which the compiled module one-hot encodes (another value would give a
 * row of zeros, silently). Checked before the copy, so that a NaN index names its key too. */
static int check_key_indices(const bitrl_policy *p, const float *obs, int64_t batch, const char *fn) {
    for (int64_t k = 0; k < p->nkeys; k++) {
        int64_t n = p->key_n[k];
        for (int64_t b = 0; n && b < batch; b++) {
            float v = obs[b * p->obs_size + p->key_offsets[k]];
            if (!(v >= 0.0f && v < (float)n) || v != (float)(int64_t)v)
                return bitrl_fail("%s: observation key '%s' is %g (row %lld, obs[%lld]); it is a Discrete(%lld) index: "
                                  "give a whole number in [0, %lld)", fn, p->key_names[k], (double)v, (long long)b,
                                  (long long)(b * p->obs_size + p->key_offsets[k]), (long long)n, (long long)n);
        }
    }
    return 0;
}

/* Run entry point `which` on `batch` rows: inputs[] copied in (checked finite, or whole pixel values for a uint8
 * observation), the plan, output 0 copied to dst
 * and, when dst2 is given, output 1 (a recurrent policy's next state) to dst2. */
static int run(bitrl_policy *p, int which, const float *const *inputs, int64_t batch, void *dst, void *dst2,
               const char *fn) {
    entry *e = &p->entries[which];
    thread_ctx *c = ctx_get(p, batch);
    if (!c) return -1;
    entry_ctx *x = &c->e[which];
    if (x->batch != batch) { /* set the batch dimension of every tensor */
        for (int t = 0; t < e->ninputs + e->noutputs + e->nbuffers; t++)
            for (int d = 0; d < e->specs[t].ndim; d++)
                if (e->specs[t].dims[d] < 0) x->tensors[t].shape[d] = batch;
        x->batch = batch;
    }
    if (check_key_indices(p, inputs[0], batch, fn) != 0) return -1;
    static const char *const INPUT_NAMES[] = {"obs", "noise"};
    static const char *const RECURRENT_NAMES[] = {"obs", "state", "episode_start", "noise"};
    for (int i = 0; i < e->ninputs; i++) {
        const tensor_spec *s = &e->specs[i];
        int64_t row = row_size(s);
        const char *name = p->state_size ? (i < 4 ? RECURRENT_NAMES[i] : "input") : i < 2 ? INPUT_NAMES[i] : "input";
        if ((s->dtype.code == kDLUInt ? copy_pixels(x->tensors[i].data, inputs[i], batch * row, row, fn, name)
                                      : copy_finite(x->tensors[i].data, inputs[i], batch * row, row, fn, name)) != 0)
            return -1;
    }
    const TVMFFIAny *args = x->args;
    for (int k = 0; k < e->ncalls; k++) {
        const call_spec *cs = &e->calls[k];
        TVMFFIAny result;
        memset(&result, 0, sizeof result);
        if (cs->fn(NULL, args + cs->first_arg, cs->nargs, &result) != 0) {
            int known = kernel_error_set;
            kernel_error_set = 0;
            return bitrl_fail("%s: kernel %s of entry point %s failed%s%s", fn, cs->func, ENTRY_NAMES[which],
                              known ? ": " : " (no message)", known ? kernel_error : "");
        }
    }
    memcpy(dst, x->tensors[e->ninputs].data, tensor_bytes(&e->specs[e->ninputs], batch));
    if (dst2) memcpy(dst2, x->tensors[e->ninputs + 1].data, tensor_bytes(&e->specs[e->ninputs + 1], batch));
    return 0;
}

static int not_recurrent(const bitrl_policy *p, const char *fn) {
    if (p && p->state_size)
        return bitrl_fail("%s: %s is a recurrent policy (its state: %lld values per row); call %s_recurrent with "
                          "the state", fn, p->path, (long long)p->state_size, fn);
    return 0;
}

static int check_state(const bitrl_policy *p, const float *state, const float *episode_start, const float *next,
                       const char *fn) {
    if (!p->state_size)
        return bitrl_fail("%s: %s is not a recurrent policy (bitrl_state_size is 0); call %.*s", fn, p->path,
                          (int)(strlen(fn) - strlen("_recurrent")), fn);
    if (!state) return bitrl_fail("%s: state is NULL; pass float[batch * %lld] (zeros at the start)", fn,
                                  (long long)p->state_size);
    if (!episode_start) return bitrl_fail("%s: episode_start is NULL; pass float[batch], 1 where an episode begins", fn);
    if (!next) return bitrl_fail("%s: next_state is NULL; pass float[batch * %lld] (it may be state itself)", fn,
                                 (long long)p->state_size);
    return 0;
}

int bitrl_act_recurrent(bitrl_policy *p, const float *obs, const float *state, const float *episode_start,
                        int64_t batch, void *actions, float *next_state) {
    const char *fn = "bitrl_act_recurrent";
    if (check_common(p, obs, batch, actions, fn, "actions") != 0) return -1;
    if (check_state(p, state, episode_start, next_state, fn) != 0) return -1;
    const float *inputs[3] = {obs, state, episode_start};
    return run(p, ACT, inputs, batch, actions, next_state, fn);
}

int bitrl_forward_recurrent(bitrl_policy *p, const float *obs, const float *state, const float *episode_start,
                            int64_t batch, float *out, float *next_state) {
    const char *fn = "bitrl_forward_recurrent";
    if (check_common(p, obs, batch, out, fn, "out") != 0) return -1;
    if (check_state(p, state, episode_start, next_state, fn) != 0) return -1;
    const float *inputs[3] = {obs, state, episode_start};
    return run(p, FORWARD, inputs, batch, out, next_state, fn);
}

int bitrl_sample_recurrent(bitrl_policy *p, const float *obs, const float *state, const float *episode_start,
                           const float *noise, int64_t batch, void *actions, float *next_state) {
    const char *fn = "bitrl_sample_recurrent";
    if (check_common(p, obs, batch, actions, fn, "actions") != 0) return -1;
    if (check_state(p, state, episode_start, next_state, fn) != 0) return -1;
    if (!noise) return bitrl_fail("%s: noise is NULL; pass uniform [0, 1) (Discrete) or standard normal (Box) noise", fn);
    if (!p->entries[SAMPLE].present)
        return bitrl_fail("%s: %s has no \"sample\" entry point (its actions are deterministic); call "
                          "bitrl_act_recurrent", fn, p->path);
    const float *inputs[4] = {obs, state, episode_start, noise};
    return run(p, SAMPLE, inputs, batch, actions, next_state, fn);
}

int64_t bitrl_state_size(const bitrl_policy *p) { return p ? p->state_size : -1; }

int bitrl_forward(bitrl_policy *p, const float *obs, int64_t batch, float *out) {
    if (check_common(p, obs, batch, out, "bitrl_forward", "out") != 0) return -1;
    if (not_recurrent(p, "bitrl_forward") != 0) return -1;
    return run(p, FORWARD, &obs, batch, out, NULL, "bitrl_forward");
}

int bitrl_act(bitrl_policy *p, const float *obs, int64_t batch, void *actions) {
    if (check_common(p, obs, batch, actions, "bitrl_act", "actions") != 0) return -1;
    if (not_recurrent(p, "bitrl_act") != 0) return -1;
    if (!p->entries[ACT].present)
        return bitrl_fail("bitrl_act: %s is a backbone (output kind \"features\"), which has no actions; call "
                          "bitrl_forward for its features", p->path);
    return run(p, ACT, &obs, batch, actions, NULL, "bitrl_act");
}

int bitrl_sample(bitrl_policy *p, const float *obs, const float *noise, int64_t batch, void *actions) {
    if (check_common(p, obs, batch, actions, "bitrl_sample", "actions") != 0) return -1;
    if (not_recurrent(p, "bitrl_sample") != 0) return -1;
    if (!noise) return bitrl_fail("bitrl_sample: noise is NULL; pass uniform [0, 1) (Discrete) or standard normal (Box) noise");
    if (!p->entries[SAMPLE].present)
        return bitrl_fail("bitrl_sample: %s has no \"sample\" entry point (its actions are deterministic, or it "
                          "is a backbone); call bitrl_act", p->path);
    const float *inputs[2] = {obs, noise};
    return run(p, SAMPLE, inputs, batch, actions, NULL, "bitrl_sample");
}

int64_t bitrl_obs_size(const bitrl_policy *p) { return p ? p->obs_size : -1; }
int64_t bitrl_output_size(const bitrl_policy *p) { return p ? p->output_size : -1; }
int64_t bitrl_action_size(const bitrl_policy *p) { return p ? p->action_size : -1; }
int64_t bitrl_max_batch(const bitrl_policy *p) { return p ? p->batch_max : -1; }
int bitrl_is_discrete(const bitrl_policy *p) { return p ? p->discrete : -1; }
int bitrl_has_sample(const bitrl_policy *p) { return p ? p->entries[SAMPLE].present : -1; }
int64_t bitrl_input_keys(const bitrl_policy *p) { return p ? p->nkeys : -1; }

int bitrl_input_key(const bitrl_policy *p, int64_t i, const char **name, int64_t *offset, int64_t *size) {
    if (!p) return bitrl_fail("bitrl_input_key: p is NULL; pass a policy of bitrl_load");
    if (i < 0 || i >= p->nkeys)
        return bitrl_fail("bitrl_input_key: key %lld is out of range: %s has %lld keys (bitrl_input_keys)", (long long)i,
                          p->path, (long long)p->nkeys);
    if (name) *name = p->key_names[i];
    if (offset) *offset = p->key_offsets[i];
    if (size) *size = p->key_sizes[i];
    return 0;
}

/* A Dict observation's keys (checked by bitrl_check_manifest): names, offsets and sizes in one row of floats. */
static int load_keys(bitrl_policy *p, const json *m) {
    const json *keys = json_get(json_get(m, "input"), "keys");
    const char *kind = json_str(json_get(json_get(m, "input"), "kind"));
    if (!kind || strcmp(kind, "dict") != 0 || !keys) return 0;
    p->key_names = calloc(keys->count, sizeof *p->key_names);
    p->key_offsets = calloc(keys->count, sizeof *p->key_offsets);
    p->key_sizes = calloc(keys->count, sizeof *p->key_sizes);
    p->key_n = calloc(keys->count, sizeof *p->key_n);
    if (!p->key_names || !p->key_offsets || !p->key_sizes || !p->key_n)
        return bitrl_fail("%s: out of memory", p->path);
    int64_t offset = 0;
    for (size_t i = 0; i < keys->count; i++) {
        const json *shape = json_get(&keys->items[i], "shape");
        int64_t size = 1, v;
        for (size_t d = 0; d < shape->count; d++) size *= json_int(&shape->items[d], &v) == 0 ? v : 0;
        if (!(p->key_names[i] = strdup(json_str(json_get(&keys->items[i], "name")))))
            return bitrl_fail("%s: out of memory", p->path);
        p->nkeys = (int64_t)i + 1;
        p->key_offsets[i] = offset, p->key_sizes[i] = size;
        const char *pre = json_str(json_get(&keys->items[i], "preprocess"));
        if (pre && strcmp(pre, "onehot") == 0 && json_int(json_get(&keys->items[i], "n"), &v) == 0) p->key_n[i] = v;
        offset += size;
    }
    if (offset != p->obs_size)
        return bitrl_fail("%s: manifest input.keys hold %lld values but entry point forward takes %lld per observation; "
                          RECOMPILE, p->path, (long long)offset, (long long)p->obs_size);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- load */

static int read_file(const char *path, uint8_t **out, size_t *n) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? bitrl_fail("%s: no such artifact file", path)
                               : bitrl_fail("%s: cannot open the artifact (%s)", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return bitrl_fail("%s: not a regular file; give the path of a policy.bitrl artifact", path);
    }
    if ((uint64_t)st.st_size > BITRL_MAX_FILE) {
        close(fd);
        return bitrl_fail("%s: %lld bytes, more than an artifact's limit of %llu; not a policy.bitrl artifact", path,
                          (long long)st.st_size, (unsigned long long)BITRL_MAX_FILE);
    }
    size_t size = (size_t)st.st_size, got = 0;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) {
        close(fd);
        return bitrl_fail("%s: out of memory reading %zu bytes", path, size);
    }
    while (got < size) {
        ssize_t r = read(fd, buf + got, size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            free(buf);
            close(fd);
            return bitrl_fail("%s: cannot read the artifact (%s)", path, r < 0 ? strerror(errno) : "it shrank while reading");
        }
        got += (size_t)r;
    }
    close(fd);
    *out = buf;
    *n = size;
    return 0;
}

static int has_word(const char *list, const char *word) {
    size_t len = strlen(word);
    for (const char *s = list; (s = strstr(s, word)) != NULL; s += len)
        if ((s == list || s[-1] == ' ') && (s[len] == ' ' || s[len] == 0)) return 1;
    return 0;
}

/* The CPU's feature flags, space-separated, from /proc/cpuinfo ("flags" on x86, "Features" on ARM); "" if unknown. */
static char *cpu_flags(void) {
    FILE *f = fopen("/proc/cpuinfo", "re");
    size_t cap = 256, len = 0;
    char *flags = calloc(cap, 1), *line = NULL;
    size_t line_cap = 0;
    if (!f || !flags) {
        if (f) fclose(f);
        return flags;
    }
    while (getline(&line, &line_cap, f) > 0) {
        if (strncmp(line, "flags", 5) != 0 && strncmp(line, "Features", 8) != 0) continue;
        char *colon = strchr(line, ':');
        if (!colon) continue;
        for (char *tok = strtok(colon + 1, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
            if (has_word(flags, tok)) continue;
            size_t need = len + strlen(tok) + 2;
            if (need > cap) {
                char *grown = realloc(flags, cap = need * 2);
                if (!grown) break;
                flags = grown;
            }
            if (len) flags[len++] = ' ';
            strcpy(flags + len, tok);
            len += strlen(tok);
        }
    }
    free(line);
    fclose(f);
    return flags;
}

static int enable_amx(void) { /* ask Linux once for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM) */
#if defined(__x86_64__)
    static atomic_int state; /* 0 unknown, 1 granted, -1 refused */
    if (atomic_load(&state) == 0) atomic_store(&state, syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1);
    return atomic_load(&state) == 1;
#else
    return 0;
#endif
}

static int check_runnable_here(const char *path, const json *m) {
    const json *target = json_get(m, "target");
    const char *arch = json_str(json_get(target, "arch")), *name = json_str(json_get(target, "name"));
    if (!arch || strcmp(arch, HOST_ARCH) != 0)
        return bitrl_fail("%s: compiled for %s (target %s) and this machine is %s; run it on the target device, or "
                          "recompile it with `--target host`", path, arch ? arch : "(none)", name ? name : "(none)", HOST_ARCH);
    const json *features = json_get(target, "cpu_features");
    if (features && features->type != JSON_ARRAY)
        return bitrl_fail("%s: manifest target.cpu_features is not a list; " RECOMPILE, path);
    if (!features || features->count == 0) return 0;
    char *flags = cpu_flags();
    char missing[256] = "";
    int amx = 0;
    for (size_t i = 0; i < features->count; i++) {
        const char *f = json_str(&features->items[i]);
        if (!f) {
            free(flags);
            return bitrl_fail("%s: manifest target.cpu_features holds a non-string; " RECOMPILE, path);
        }
        amx |= strcmp(f, "amx_tile") == 0;
        if (flags && flags[0] && !has_word(flags, f) && strlen(missing) + strlen(f) + 3 < sizeof missing)
            strcat(strcat(missing, missing[0] ? ", " : ""), f);
    }
    free(flags);
    if (missing[0])
        return bitrl_fail("%s: target %s needs CPU features [%s] that this CPU lacks; recompile with `--target host`",
                          path, name ? name : "(none)", missing);
    if (amx && !enable_amx())
        return bitrl_fail("%s: its kernels use AMX, and Linux did not grant this process the AMX state (needs Linux "
                          ">= 5.16); recompile with `--target x86-avx512`", path);
    return 0;
}

/* A truncated or corrupt ELF makes the dynamic loader map segments past the end of the file, and the first touch
 * of such a page is SIGBUS: check that the header, the program headers and every segment's bytes lie inside the
 * file, and the class and machine are this one's, before dlopen. 0, or -1 with the error set. */
static uint64_t le(const uint8_t *p, int bytes) {
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static int check_elf(const char *path, const uint8_t *b, size_t n) {
#if defined(__x86_64__)
    const unsigned machine = 62;
#else
    const unsigned machine = 183;
#endif
    if (n < 64 || memcmp(b, "\x7f" "ELF", 4) != 0)
        return bitrl_fail("%s: lib.so cannot be loaded (not an ELF library); recompile the artifact for this machine", path);
    if (b[4] != 2 || b[5] != 1 || le(b + 18, 2) != machine)
        return bitrl_fail("%s: lib.so cannot be loaded (a library for another machine, ELF machine %u, and this one is "
                          "%s); recompile the artifact for this machine", path, (unsigned)le(b + 18, 2), HOST_ARCH);
    uint64_t phoff = le(b + 32, 8), phentsize = le(b + 54, 2), phnum = le(b + 56, 2);
    if (phentsize < 56 || phoff > n || phnum * phentsize > n - phoff)
        return bitrl_fail("%s: lib.so cannot be loaded (truncated or corrupt ELF program headers); recompile the artifact", path);
    for (uint64_t i = 0; i < phnum; i++) {
        const uint8_t *ph = b + phoff + i * phentsize;
        uint64_t offset = le(ph + 8, 8), filesz = le(ph + 32, 8);
        if (le(ph, 4) != 0 && (offset > n || filesz > n - offset))
            return bitrl_fail("%s: lib.so cannot be loaded (truncated: a segment ends past the file); recompile the artifact",
                              path);
    }
    return 0;
}

static _Thread_local char dlopen_error[256]; /* what the dynamic loader said first (later calls clear dlerror) */

static void *try_dlopen(const char *where) {
    void *lib = dlopen(where, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        const char *why = dlerror();
        snprintf(dlopen_error, sizeof dlopen_error, "%s", why ? why : "unknown");
        /* The kernels' undefined TVMFFIErrorSetRaisedFromCStrParts resolves in the global scope: when this
         * library was itself dlopen'ed locally (ctypes, a plugin), make it global and try again. */
        Dl_info self;
        if (dladdr((void *)&bitrl_load, &self) && self.dli_fname && dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL))
            lib = dlopen(where, RTLD_NOW | RTLD_LOCAL);
    }
    return lib;
}

/* lib.so's bytes as a loaded library: a memfd (no file), else a temporary file removed at once, opened as
 * /proc/self/fd/N. The descriptor stays open until bitrl_free: the dynamic loader knows libraries by name, and
 * a descriptor number reused while another policy's library is loaded would give back that library. */
static void *open_library(const char *path, const uint8_t *bytes, size_t n, int *fd_out) {
    char tmp[4096] = "", where[64];
    int fd = -1;
    if (check_elf(path, bytes, n) != 0) return NULL;
#ifdef MFD_CLOEXEC
    fd = memfd_create("bitrl-lib.so", MFD_CLOEXEC);
#endif
    if (fd < 0) {
        const char *dir = getenv("TMPDIR");
        snprintf(tmp, sizeof tmp, "%s/bitrl-lib-XXXXXX", dir && *dir ? dir : "/tmp");
        fd = mkstemp(tmp);
        if (fd < 0) {
            bitrl_fail("%s: cannot write lib.so to memory or a temporary file in %s (%s); set TMPDIR to a writable "
                       "folder", path, dir && *dir ? dir : "/tmp", strerror(errno));
            return NULL;
        }
    }
    void *lib = NULL;
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, bytes + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        done += (size_t)w;
    }
    if (done < n) {
        bitrl_fail("%s: cannot write lib.so out for loading (%s)", path, strerror(errno));
    } else {
        snprintf(where, sizeof where, "/proc/self/fd/%d", fd);
        void *other = dlopen(where, RTLD_LAZY | RTLD_NOLOAD); /* a library someone loaded by this name */
        if (other) {
            dlclose(other);
            snprintf(where, sizeof where, "/proc/%ld/fd/%d", (long)getpid(), fd);
            other = dlopen(where, RTLD_LAZY | RTLD_NOLOAD);
            if (other) dlclose(other);
        }
        lib = other ? NULL : try_dlopen(where);
        if (!lib && tmp[0]) lib = try_dlopen(tmp); /* no /proc */
        if (!lib) {
            const char *why = strrchr(dlopen_error, ':'); /* "/proc/self/fd/7: invalid ELF header": the reason */
            bitrl_fail("%s: lib.so cannot be loaded (%s); recompile the artifact for this machine", path,
                       why && why[1] ? why + 2 : dlopen_error[0] ? dlopen_error : "unknown");
        }
    }
    if (tmp[0]) unlink(tmp);
    if (!lib) close(fd);
    else *fd_out = fd;
    return lib;
}

static int parse_dim(const json *v, int64_t *out) {
    if (json_str(v) && strcmp(v->string, "batch") == 0) {
        *out = -1;
        return 0;
    }
    return json_int(v, out) == 0 && *out >= 0 && *out <= (1LL << 32) ? 0 : -1;
}

static int parse_tensor(const char *path, const char *ename, const json *t, tensor_spec *out, int io) {
    const json *shape = json_get(t, "shape");
    if (bitrl_dtype(json_str(json_get(t, "dtype")), 0, &out->dtype) != 0)
        return bitrl_fail("%s: entry point %s has a tensor of unknown dtype %s; " RECOMPILE, path, ename,
                          json_str(json_get(t, "dtype")) ? json_get(t, "dtype")->string : "(none)");
    if (!shape || shape->type != JSON_ARRAY || shape->count > BITRL_MAX_DIMS)
        return bitrl_fail("%s: entry point %s has a tensor without a valid shape; " RECOMPILE, path, ename);
    out->ndim = (int)shape->count;
    out->elem = out->dtype.bits / 8;
    for (int d = 0; d < out->ndim; d++) {
        if (parse_dim(&shape->items[d], &out->dims[d]) != 0 || (io && (d == 0) != (out->dims[d] < 0)))
            return bitrl_fail("%s: entry point %s: an input or output must have shape [\"batch\", sizes...]; " RECOMPILE,
                              path, ename);
    }
    return 0;
}

/* A buffer's "view" (runtime/plan.py): "input:I" or "buffer:J" (no view itself), of its dtype and values per row. */
static int parse_view(const char *path, const char *ename, entry *e, int t, const json *buffers) {
    const json *view = json_get(&buffers->items[t - e->ninputs - e->noutputs], "view");
    if (!view) return 0;
    const char *v = json_str(view), *rest = NULL;
    int base = -1, limit = 0;
    if (v && strncmp(v, "input:", 6) == 0) rest = v + 6, base = 0, limit = e->ninputs;
    if (v && strncmp(v, "buffer:", 7) == 0) rest = v + 7, base = e->ninputs + e->noutputs, limit = e->nbuffers;
    char *end = NULL;
    long k = rest && *rest >= '0' && *rest <= '9' ? strtol(rest, &end, 10) : -1;
    if (k < 0 || *end != 0 || k >= limit || (base && json_get(&buffers->items[k], "view")))
        return bitrl_fail("%s: entry point %s has a buffer viewing %s, not an input or a buffer that is no view; "
                          RECOMPILE, path, ename, v ? v : "(not a string)");
    const tensor_spec *a = &e->specs[t], *b = &e->specs[base + k];
    int batch_a = 0, batch_b = 0;
    int64_t size_a = 1, size_b = 1;
    for (int d = 0; d < a->ndim; d++)
        if (a->dims[d] < 0) batch_a++;
        else size_a *= a->dims[d];
    for (int d = 0; d < b->ndim; d++)
        if (b->dims[d] < 0) batch_b++;
        else size_b *= b->dims[d];
    if (a->dtype.code != b->dtype.code || a->dtype.bits != b->dtype.bits || batch_a != batch_b || size_a != size_b)
        return bitrl_fail("%s: entry point %s has a buffer viewing %s with another dtype or number of values; "
                          RECOMPILE, path, ename, v);
    e->specs[t].view = base + (int)k;
    return 0;
}

static int find_param(bitrl_policy *p, const char *name) {
    for (int i = 0; i < p->nparams; i++)
        if (strcmp(p->param_names[i], name) == 0) return i;
    return -1;
}

static int add_param(bitrl_policy *p, const char *name, const uint8_t *st, size_t st_n, const json *header,
                     size_t body, const json *weights) {
    int i = find_param(p, name);
    if (i >= 0) return i;
    i = p->nparams;
    char **names = realloc(p->param_names, (size_t)(i + 1) * sizeof *names);
    if (names) p->param_names = names;
    bitrl_tensor *params = realloc(p->params, (size_t)(i + 1) * sizeof *params);
    if (params) p->params = params;
    if (!names || !params) return bitrl_fail("%s: out of memory", p->path);
    p->param_names[i] = strdup(name);
    if (!p->param_names[i]) return bitrl_fail("%s: out of memory", p->path);
    p->nparams++;
    if (bitrl_param(st, st_n, header, body, name, json_get(weights, name), &p->params[i], p->path) != 0) return -1;
    return i;
}

static int parse_entry(bitrl_policy *p, int which, const json *ej, const uint8_t *st, size_t st_n,
                       const json *header, size_t body, const json *weights) {
    const char *ename = ENTRY_NAMES[which];
    entry *e = &p->entries[which];
    const json *inputs = json_get(ej, "inputs"), *outputs = json_get(ej, "outputs"), *buffers = json_get(ej, "buffers");
    const json *calls = json_get(ej, "calls");
    if (!inputs || inputs->type != JSON_ARRAY || inputs->count < 1 || !outputs || outputs->type != JSON_ARRAY ||
        outputs->count < 1 || (buffers && buffers->type != JSON_ARRAY) || !calls || calls->type != JSON_ARRAY)
        return bitrl_fail("%s: entry point %s lacks inputs, outputs or calls; " RECOMPILE, p->path, ename);
    e->ninputs = (int)inputs->count, e->noutputs = (int)outputs->count, e->nbuffers = buffers ? (int)buffers->count : 0;
    e->specs = calloc((size_t)(e->ninputs + e->noutputs + e->nbuffers), sizeof *e->specs);
    if (!e->specs) return bitrl_fail("%s: out of memory", p->path);
    for (int t = 0; t < e->ninputs + e->noutputs + e->nbuffers; t++) {
        const json *tj = t < e->ninputs ? &inputs->items[t]
                         : t < e->ninputs + e->noutputs ? &outputs->items[t - e->ninputs]
                                                        : &buffers->items[t - e->ninputs - e->noutputs];
        if (parse_tensor(p->path, ename, tj, &e->specs[t], t < e->ninputs + e->noutputs) != 0) return -1;
        e->specs[t].view = -1;
        if (tensor_bytes(&e->specs[t], p->batch_max) / e->specs[t].elem > (1ULL << 40) / p->batch_max * p->batch_max)
            return bitrl_fail("%s: entry point %s has a tensor too large for batch %lld; " RECOMPILE, p->path, ename,
                              (long long)p->batch_max);
    }
    for (int t = e->ninputs + e->noutputs; t < e->ninputs + e->noutputs + e->nbuffers; t++)
        if (parse_view(p->path, ename, e, t, buffers) != 0) return -1;
    for (int i = 0; i < e->ninputs; i++) /* float32, or the observation as uint8 pixels (copy_pixels) */
        if ((e->specs[i].dtype.code != kDLFloat || e->specs[i].dtype.bits != 32) &&
            (i != 0 || e->specs[i].dtype.code != kDLUInt || e->specs[i].dtype.bits != 8))
            return bitrl_fail("%s: entry point %s takes an input that is neither float32 nor (the observation) uint8; "
                              "this C runtime passes only those; upgrade libbitrl", p->path, ename);
    e->ncalls = (int)calls->count;
    e->calls = calloc(calls->count + 1, sizeof *e->calls);
    if (!e->calls) return bitrl_fail("%s: out of memory", p->path);
    int nargs = 0;
    for (size_t k = 0; k < calls->count; k++) {
        const json *args = json_get(&calls->items[k], "args");
        if (!json_str(json_get(&calls->items[k], "func")) || !args || args->type != JSON_ARRAY)
            return bitrl_fail("%s: entry point %s has a call without func or args; " RECOMPILE, p->path, ename);
        nargs += (int)args->count;
    }
    e->nargs = nargs;
    e->kinds = calloc((size_t)nargs + 1, sizeof *e->kinds);
    e->indices = calloc((size_t)nargs + 1, sizeof *e->indices);
    if (!e->kinds || !e->indices) return bitrl_fail("%s: out of memory", p->path);
    int a = 0;
    for (size_t k = 0; k < calls->count; k++) {
        call_spec *cs = &e->calls[k];
        const char *func = json_get(&calls->items[k], "func")->string;
        const json *args = json_get(&calls->items[k], "args");
        cs->func = strdup(func);
        char symbol[512];
        snprintf(symbol, sizeof symbol, "__tvm_ffi_%s", func);
        cs->fn = cs->func ? (TVMFFISafeCallType)dlsym(p->lib, symbol) : NULL;
        if (!cs->fn)
            return bitrl_fail("%s: entry point %s calls %s, which its lib.so does not export; " RECOMPILE, p->path, ename, func);
        cs->first_arg = a, cs->nargs = (int)args->count;
        for (size_t j = 0; j < args->count; j++, a++) {
            const char *arg = json_str(&args->items[j]);
            static const struct { const char *prefix; int kind; } KINDS[] = {
                {"input:", ARG_INPUT}, {"output:", ARG_OUTPUT}, {"buffer:", ARG_BUFFER}, {"param:", ARG_PARAM}};
            int kind = -1;
            const char *rest = NULL;
            for (size_t q = 0; arg && q < 4; q++)
                if (strncmp(arg, KINDS[q].prefix, strlen(KINDS[q].prefix)) == 0)
                    kind = KINDS[q].kind, rest = arg + strlen(KINDS[q].prefix);
            int index = -1, limit = kind == ARG_INPUT ? e->ninputs : kind == ARG_OUTPUT ? e->noutputs : e->nbuffers;
            if (kind == ARG_PARAM) {
                index = add_param(p, rest, st, st_n, header, body, weights);
                if (index < 0) return -1;
            } else if (kind >= 0) {
                char *end;
                long v = strtol(rest, &end, 10);
                if (*rest >= '0' && *rest <= '9' && *end == 0 && v < limit) index = (int)v;
            }
            if (index < 0)
                return bitrl_fail("%s: entry point %s: call %s has an invalid argument %s; " RECOMPILE, p->path, ename,
                                  func, arg ? arg : "(not a string)");
            e->kinds[a] = kind, e->indices[a] = index;
        }
    }
    e->present = 1;
    return 0;
}

/* The manifest's sizes and entry points, the parameters they use, and lib.so's functions. */
/* Every entry point returns one tensor, or (recurrent policies: manifest input.recurrent, whose fields
 * bitrl_check_manifest checked) takes (obs, state, episode_start[, noise]) and returns (result, state), the state
 * float32 [batch, state_size]: runtime/manifest.py's _state_io. */
static int is_row(const tensor_spec *t, int64_t size, int float32) {
    return t->ndim == (size ? 2 : 1) && t->dims[0] < 0 && (!size || t->dims[1] == size) &&
           (!float32 || (t->dtype.code == kDLFloat && t->dtype.bits == 32));
}

static int check_state_io(bitrl_policy *p, const json *input) {
    int64_t size = 0;
    const json *rec = json_get(input, "recurrent");
    if (rec && rec->type != JSON_NULL && json_int(json_get(rec, "state_size"), &size) != 0)
        return bitrl_fail("%s: manifest input.recurrent.state_size is not an integer; " RECOMPILE, p->path);
    p->state_size = size;
    for (int i = 0; i < N_ENTRIES; i++) {
        const entry *e = &p->entries[i];
        if (!e->present) continue;
        int want = (i == SAMPLE ? 2 : 1) + (size ? 2 : 0); /* obs[, state, episode_start][, noise]: what calls pass */
        if (e->ninputs != want)
            return bitrl_fail("%s: manifest entry_points.%s takes %d inputs, not %d; " RECOMPILE, p->path,
                              ENTRY_NAMES[i], e->ninputs, want);
        if (!size && e->noutputs != 1)
            return bitrl_fail("%s: manifest entry_points.%s returns %d tensors; only a recurrent policy's entry points "
                              "return a state (input recurrent); " RECOMPILE, p->path, ENTRY_NAMES[i], e->noutputs);
        if (size && (e->ninputs < 3 || e->noutputs != 2 || !is_row(&e->specs[1], size, 1) ||
                     !is_row(&e->specs[2], 0, 1) || !is_row(&e->specs[e->ninputs + 1], size, 1)))
            return bitrl_fail("%s: manifest entry_points.%s does not take (obs, state, episode_start) and return "
                              "(result, state) with the %lld float32 state values of input recurrent; " RECOMPILE,
                              p->path, ENTRY_NAMES[i], (long long)size);
    }
    return 0;
}

static int load_plan(bitrl_policy *p, const json *m, const uint8_t *st, size_t st_n, const json *header, size_t body) {
    const json *eps = json_get(m, "entry_points"), *input = json_get(m, "input"), *output = json_get(m, "output");
    const char *preprocess = json_str(json_get(input, "preprocess")), *kind = json_str(json_get(output, "kind"));
    if (preprocess && strcmp(preprocess, "text") == 0)
        return bitrl_fail("%s: its observations are serialised to text (a text state encoder), which the C API does not "
                          "do; use the Python runtime (bitrl_compile.runtime.load)", p->path);
    if (!eps || eps->type != JSON_OBJECT || !json_get(eps, "forward"))
        return bitrl_fail("%s: the artifact has no entry_points (compiled by an older bitrl-compile), which the C API "
                          "needs; " RECOMPILE, p->path);
    if (!kind) return bitrl_fail("%s: manifest output.kind is missing; " RECOMPILE, p->path);
    p->batch_max = DEFAULT_BATCH_MAX;
    const json *batch = json_get(m, "batch");
    const json *batch_max = json_get(batch, "max"); /* checked by bitrl_check_manifest; null: unbounded */
    if (batch_max && batch_max->type != JSON_NULL && json_int(batch_max, &p->batch_max) != 0)
        return bitrl_fail("%s: manifest batch.max is not a positive integer; " RECOMPILE, p->path);
    const json *weights = json_get(m, "weights");
    for (int i = 0; i < N_ENTRIES; i++)
        if (json_get(eps, ENTRY_NAMES[i]) && parse_entry(p, i, json_get(eps, ENTRY_NAMES[i]), st, st_n, header, body, weights) != 0)
            return -1;
    p->param_tensors = calloc((size_t)p->nparams + 1, sizeof *p->param_tensors);
    if (!p->param_tensors) return bitrl_fail("%s: out of memory", p->path);
    for (int i = 0; i < p->nparams; i++) {
        DLTensor *t = &p->param_tensors[i];
        t->data = p->params[i].data;
        t->device.device_type = kDLCPU;
        t->ndim = p->params[i].ndim;
        t->dtype = p->params[i].dtype;
        t->shape = p->params[i].shape;
    }
    entry *fwd = &p->entries[FORWARD], *act = &p->entries[ACT];
    const tensor_spec *out = &fwd->specs[fwd->ninputs];
    if (out->dtype.code != kDLFloat || out->dtype.bits != 32)
        return bitrl_fail("%s: entry point forward has a non-float32 output; " RECOMPILE, p->path);
    p->obs_size = row_size(&fwd->specs[0]);
    p->output_size = row_size(out);
    p->discrete = strcmp(kind, "discrete") == 0;
    if (check_state_io(p, input) != 0) return -1;
    int64_t expected = -1; /* the output spec's width, as runtime/specs.py's output_size */
    const json *shape = json_get(output, "shape");
    if (!p->discrete && strcmp(kind, "features") != 0 && strcmp(kind, "continuous") != 0)
        return bitrl_fail("%s: manifest output.kind is '%.40s', not discrete, continuous or features; " RECOMPILE,
                          p->path, kind);
    if (p->discrete) (void)json_int(json_get(output, "n"), &expected);
    else if (strcmp(kind, "features") == 0) (void)json_int(json_get(output, "dim"), &expected);
    else if (shape && shape->type == JSON_ARRAY) {
        expected = 1;
        for (size_t d = 0; d < shape->count && expected >= 0; d++) {
            int64_t v;
            expected = json_int(&shape->items[d], &v) == 0 && v > 0 && v <= (1LL << 20) ? expected * v : -1;
            if (expected > (1LL << 20)) expected = -1;
        }
    }
    if (expected != p->output_size)
        return bitrl_fail("%s: manifest output says %lld values per observation but entry point forward outputs %lld; "
                          RECOMPILE, p->path, (long long)expected, (long long)p->output_size);
    if (strcmp(kind, "features") == 0) return 0;
    if (!act->present) return bitrl_fail("%s: the artifact has no \"act\" entry point; " RECOMPILE, p->path);
    const tensor_spec *a = &act->specs[act->ninputs];
    p->action_size = row_size(a);
    int want_int = p->discrete;
    if ((want_int && (a->dtype.code != kDLInt || a->dtype.bits != 64 || p->action_size != 1)) ||
        (!want_int && (a->dtype.code != kDLFloat || a->dtype.bits != 32)))
        return bitrl_fail("%s: entry point act returns %s, expected %s actions; " RECOMPILE, p->path,
                          want_int ? "something else" : "non-float32", want_int ? "one int64 per row of" : "float32");
    entry *s = &p->entries[SAMPLE];
    if (s->present) {
        /* the noise is its last input, as many values per row as the caller's (bitrl.h): 1 (Discrete), action_size */
        const tensor_spec *so = &s->specs[s->ninputs], *noise = &s->specs[s->ninputs - 1];
        if (s->ninputs != (p->state_size ? 4 : 2) || so->dtype.code != a->dtype.code || so->dtype.bits != a->dtype.bits ||
            row_size(so) != p->action_size || row_size(noise) != (p->discrete ? 1 : p->action_size))
            return bitrl_fail("%s: entry point sample does not take (obs%s, noise) and return act's actions; " RECOMPILE,
                              p->path, p->state_size ? ", state, episode_start" : "");
    }
    return 0;
}

static int is_payload(const char *name) {
    return strcmp(name, "lib.so") == 0 || strcmp(name, "params.safetensors") == 0 || strcmp(name, "libtvm_runtime.so") == 0;
}

/* The zip holds only an artifact's members, the small ones within their limits. */
static int check_names(const char *path, const bitrl_zip *z) {
    static const struct { const char *name; uint32_t limit; } SMALL[] = {
        {"manifest.json", BITRL_MAX_MANIFEST}, {"manifest.sha256", BITRL_MAX_MANIFEST_HASH},
        {"signatures.json", BITRL_MAX_SIGNATURES}};
    for (size_t i = 0; i < z->count; i++) {
        const bitrl_zip_entry *e = &z->entries[i];
        int known = is_payload(e->name);
        for (size_t j = 0; j < 3; j++) {
            if (strcmp(e->name, SMALL[j].name) != 0) continue;
            known = 1;
            if (e->usize > SMALL[j].limit)
                return bitrl_fail("%s: member %s declares %u bytes, more than the limit of %u; not a policy.bitrl "
                                  "artifact (or corrupt), recompile the artifact", path, e->name, e->usize, SMALL[j].limit);
        }
        if (!known)
            return bitrl_fail("%s: unknown member '%.80s' (an artifact holds only manifest.json, manifest.sha256, lib.so, "
                              "params.safetensors, libtvm_runtime.so, signatures.json); recompile the artifact", path, e->name);
    }
    return 0;
}

static int verify_members(const char *path, const json *m, const bitrl_zip *z, uint8_t **lib, size_t *lib_n,
                          uint8_t **st, size_t *st_n) {
    const json *members = json_get(m, "members");
    if (!members || members->type != JSON_OBJECT) return bitrl_fail("%s: manifest has no members list; " RECOMPILE, path);
    for (size_t i = 0; i < members->count; i++) {
        const char *name = members->keys[i], *digest = json_str(&members->items[i]);
        if (!is_payload(name))
            return bitrl_fail("%s: manifest lists unknown member '%.80s' (members are lib.so, params.safetensors, "
                              "libtvm_runtime.so); recompile the artifact", path, name);
        if (!digest || strlen(digest) != 64)
            return bitrl_fail("%s: manifest lists member %s with an invalid sha256; recompile the artifact", path, name);
    }
    for (size_t i = 0; i < z->count; i++)
        if (is_payload(z->entries[i].name) && !json_get(members, z->entries[i].name))
            return bitrl_fail("%s: member %s is in the zip but not in the manifest's members list (added after "
                              "compiling?); recompile the artifact", path, z->entries[i].name);
    for (size_t i = 0; i < members->count; i++) {
        const char *name = members->keys[i], *digest = json_str(&members->items[i]);
        const bitrl_zip_entry *e = bitrl_zip_find(z, name);
        if (!e) return bitrl_fail("%s: member %s is missing; the file is incomplete, recompile it", path, name);
        if (strcmp(name, "libtvm_runtime.so") == 0) continue; /* the C API does not use TVM's runtime */
        uint8_t *data;
        size_t n;
        if (bitrl_zip_read(z, e, &data, &n, path) != 0) return -1;
        char hex[65];
        bitrl_sha256_hex(data, n, hex);
        if (strcmp(hex, digest) != 0) {
            free(data);
            return bitrl_fail("%s: member %s fails its sha256 check (tampered or corrupt); recompile the artifact", path, name);
        }
        if (strcmp(name, "lib.so") == 0 && !*lib) *lib = data, *lib_n = n;
        else if (strcmp(name, "params.safetensors") == 0 && !*st) *st = data, *st_n = n;
        else free(data);
    }
    if (!*lib) return bitrl_fail("%s: member lib.so is missing; recompile the artifact", path);
    if (!*st) return bitrl_fail("%s: member params.safetensors is missing; recompile the artifact", path);
    return 0;
}

/* A small member's bytes (NULL and 0 when the zip has none); 0 or -1. */
static int read_small(const char *path, const bitrl_zip *z, const char *name, uint8_t **out, size_t *n) {
    const bitrl_zip_entry *e = bitrl_zip_find(z, name);
    *out = NULL, *n = 0;
    return e ? bitrl_zip_read(z, e, out, n, path) : 0;
}

/* manifest.json's form and version, its sha256 (manifest.sha256), and its signature when keys are configured. */
static int check_manifest(const char *path, const bitrl_zip *z, const uint8_t *text, size_t text_n, const json *m,
                          const bitrl_keys *keys) {
    const char *format = json_str(json_get(m, "format"));
    int64_t version;
    if (m->type != JSON_OBJECT)
        return bitrl_fail("%s: manifest.json holds no JSON object; not a policy.bitrl artifact, recompile the artifact", path);
    if (!format || strcmp(format, "bitrl") != 0)
        return bitrl_fail("%s: manifest format is %.40s, expected 'bitrl'; not a policy.bitrl artifact", path,
                          format ? format : "missing");
    if (json_int(json_get(m, "format_version"), &version) != 0 || version < 1)
        return bitrl_fail("%s: manifest format_version is not a positive integer; recompile the artifact", path);
    if (version > FORMAT_VERSION)
        return bitrl_fail("%s: artifact format version %lld is newer than this runtime reads (%d); upgrade bitrl-compile "
                          "on this device", path, (long long)version, FORMAT_VERSION);
    uint8_t *hash, *sigs;
    size_t hash_n, sigs_n;
    if (read_small(path, z, "manifest.sha256", &hash, &hash_n) != 0) return -1;
    if (!hash && version >= 2)
        return bitrl_fail("%s: member manifest.sha256 is missing; the file is incomplete, recompile it", path);
    if (hash) {
        char hex[65];
        bitrl_sha256_hex(text, text_n, hex);
        while (hash_n && (hash[hash_n - 1] == '\n' || hash[hash_n - 1] == '\r' || hash[hash_n - 1] == ' ')) hash_n--;
        int same = hash_n == 64 && memcmp(hash, hex, 64) == 0;
        free(hash);
        if (!same)
            return bitrl_fail("%s: manifest.json fails its sha256 check (tampered or corrupt); recompile the artifact", path);
    }
    if (keys->count == 0) return 0;
    if (version < 2)
        return bitrl_fail("%s: format %lld artifacts cannot be signed, and trusted keys are configured; recompile it, "
                          "sign it with `bitrl-compile sign`, or load it without trusted keys", path, (long long)version);
    if (read_small(path, z, "signatures.json", &sigs, &sigs_n) != 0) return -1;
    int rc = bitrl_verify_signatures(path, text, text_n, sigs, sigs_n, keys);
    free(sigs);
    return rc;
}

/* Takes `file` (the artifact's bytes) and frees it once its members are read: the file, the parameters as stored and
 * the unpacked weights are never all held at once. */
static int load_into(bitrl_policy *p, uint8_t *file, size_t size, const bitrl_keys *keys) {
    const char *path = p->path;
    bitrl_zip z;
    if (bitrl_zip_open(&z, file, size, path) != 0) {
        free(file);
        return -1;
    }
    const bitrl_zip_entry *me = bitrl_zip_find(&z, "manifest.json");
    int rc = check_names(path, &z);
    if (rc == 0 && !me) rc = bitrl_fail("%s: no manifest.json inside; not a policy.bitrl artifact", path);
    if (rc != 0) {
        bitrl_zip_close(&z);
        free(file);
        return -1;
    }
    uint8_t *text = NULL, *lib = NULL, *st = NULL;
    size_t text_n, lib_n = 0, st_n = 0, body = 0;
    json m = {0}, header = {0};
    char label[600];
    snprintf(label, sizeof label, "%s: manifest.json", path);
    rc = bitrl_zip_read(&z, me, &text, &text_n, path);
    if (rc == 0 && json_parse((const char *)text, text_n, &m, label) != 0) {
        char why[sizeof last_error];
        snprintf(why, sizeof why, "%s", last_error);
        rc = bitrl_fail("%s; recompile the artifact", why);
    }
    if (rc == 0) rc = check_manifest(path, &z, text, text_n, &m, keys);
    if (rc == 0) rc = bitrl_check_manifest(path, &m);
    free(text);
    if (rc == 0) rc = verify_members(path, &m, &z, &lib, &lib_n, &st, &st_n);
    bitrl_zip_close(&z);
    free(file); /* every member needed is out of it */
    if (rc == 0) rc = check_runnable_here(path, &m);
    if (rc == 0) rc = bitrl_safetensors_open(st, st_n, &header, &body, path);
    if (rc == 0) { /* every check passed: the artifact's native code is loaded now, not before */
        p->lib = open_library(path, lib, lib_n, &p->lib_fd);
        rc = p->lib ? 0 : -1;
    }
    if (rc == 0)
        for (size_t i = 0; i < sizeof HOOKS / sizeof *HOOKS; i++) {
            void **slot = dlsym(p->lib, HOOKS[i].name);
            if (slot) *slot = HOOKS[i].fn;
        }
    if (rc == 0) rc = load_plan(p, &m, st, st_n, &header, body);
    if (rc == 0) rc = load_keys(p, &m);
    free(lib);
    free(st);
    json_free(&header);
    json_free(&m);
    return rc;
}

void bitrl_free(bitrl_policy *p) {
    if (!p) return;
    if (p->key_made) {
        pthread_key_delete(p->key); /* no thread-exit destructor runs for this policy after this */
        pthread_mutex_lock(&p->mutex);
        while (p->ctxs) {
            thread_ctx *c = p->ctxs;
            ctx_unlink(c);
            ctx_free(c);
        }
        pthread_mutex_unlock(&p->mutex);
        pthread_mutex_destroy(&p->mutex);
    }
    for (int i = 0; i < N_ENTRIES; i++) {
        entry *e = &p->entries[i];
        for (int k = 0; e->calls && k < e->ncalls; k++) free(e->calls[k].func);
        free(e->calls);
        free(e->specs);
        free(e->kinds);
        free(e->indices);
    }
    for (int i = 0; i < p->nparams; i++) {
        free(p->param_names[i]);
        free(p->params[i].data);
    }
    for (int64_t i = 0; i < p->nkeys; i++) free(p->key_names[i]);
    free(p->key_names);
    free(p->key_offsets);
    free(p->key_sizes);
    free(p->key_n);
    free(p->param_names);
    free(p->params);
    free(p->param_tensors);
    if (p->lib) {
        dlclose(p->lib);
        close(p->lib_fd);
    }
    free(p->path);
    free(p);
}

bitrl_policy *bitrl_load(const char *path) { return bitrl_load_trusted(path, NULL, 0); }

bitrl_policy *bitrl_load_trusted(const char *path, const char *const *key_paths, size_t n_keys) {
    if (!path) {
        bitrl_fail("bitrl_load: path is NULL; pass the path of a policy.bitrl artifact");
        return NULL;
    }
    bitrl_keys keys;
    if (bitrl_keys_load(&keys, key_paths, n_keys) != 0) {
        char why[sizeof last_error];
        snprintf(why, sizeof why, "%s", last_error);
        bitrl_fail("%s: %s", path, why);
        return NULL;
    }
    bitrl_policy *p = calloc(1, sizeof *p);
    if (!p || !(p->path = strdup(path))) {
        free(p);
        bitrl_keys_free(&keys);
        bitrl_fail("%s: out of memory", path);
        return NULL;
    }
    uint8_t *file = NULL;
    size_t size = 0;
    if (read_file(path, &file, &size) != 0) {
        bitrl_keys_free(&keys);
        bitrl_free(p);
        return NULL;
    }
    int rc = load_into(p, file, size, &keys); /* frees file */
    bitrl_keys_free(&keys);
    if (rc == 0) {
        if (pthread_key_create(&p->key, ctx_thread_exit) != 0) {
            bitrl_fail("%s: too many policies loaded at once (no pthread key left); free some with bitrl_free", path);
            rc = -1;
        } else {
            pthread_mutex_init(&p->mutex, NULL);
            p->key_made = 1;
        }
    }
    if (rc == 0) { /* one call of every entry point on zeros: a plan that does not fit its kernels fails here */
        for (int i = 0; i < N_ENTRIES && rc == 0; i++) {
            entry *e = &p->entries[i];
            if (!e->present) continue;
            int64_t row = 1;
            for (int k = 0; k < e->ninputs; k++) row = row_size(&e->specs[k]) > row ? row_size(&e->specs[k]) : row;
            float *zeros = calloc((size_t)row, sizeof *zeros);
            void *sink = malloc(tensor_bytes(&e->specs[e->ninputs], 1) + 1);
            void *sink2 = p->state_size ? malloc(tensor_bytes(&e->specs[e->ninputs + 1], 1) + 1) : NULL;
            const float *inputs[4] = {zeros, zeros, zeros, zeros};
            if (!zeros || !sink || (p->state_size && !sink2)) rc = bitrl_fail("%s: out of memory", path);
            else if (e->ninputs <= 4 && run(p, i, inputs, 1, sink, sink2, "bitrl_load") != 0) {
                char why[sizeof last_error];
                snprintf(why, sizeof why, "%s", last_error);
                rc = bitrl_fail("%s: a test call failed (%s); " RECOMPILE, path, why);
            }
            free(zeros);
            free(sink);
            free(sink2);
        }
    }
    if (rc != 0) {
        bitrl_free(p);
        return NULL;
    }
    return p;
}
