/* The manifest's structure, checked once after it is parsed: the C twin of runtime/manifest.py (same fields, same
 * limits), so that the two readers refuse the same malformed manifests, each in one line naming the field. What is
 * left to bitrl.c and params.c is what needs lib.so or params.safetensors (symbols, tensor shapes). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_NAME 200
#define MAX_BATCH (1LL << 30)
#define MAX_WEIGHT_DIM (1LL << 24)
#define MAX_DIM (1LL << 32)

typedef struct {
    const char *path;
    const char **params; /* the manifest's parameter names, sorted (bsearch) */
    size_t nparams;
} checker;

static const char *kind(const json *v) {
    if (!v) return "missing";
    switch (v->type) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "a boolean";
    case JSON_NUMBER: return v->is_int ? "an integer" : "a number";
    case JSON_STRING: return "a string";
    case JSON_ARRAY: return "a list";
    default: return "an object";
    }
}

static int fail(const checker *c, const char *where, const char *problem, const char *detail) {
    return bitrl_fail("%s: manifest %.120s %s%.60s; recompile the artifact", c->path, where, problem, detail);
}

static int is(const checker *c, const json *v, json_type type, const char *where) {
    static const char *const names[] = {"null", "a boolean", "a number", "a string", "a list", "an object"};
    if (v && v->type == type) return 0;
    char problem[64];
    snprintf(problem, sizeof problem, "is not %s (", names[type]);
    return bitrl_fail("%s: manifest %.120s %s%s); recompile the artifact", c->path, where, problem, kind(v));
}

static int integer(const checker *c, const json *v, const char *where, int64_t low, int64_t high, int64_t *out) {
    int64_t x;
    if (json_int(v, &x) != 0)
        return bitrl_fail("%s: manifest %.120s is not an integer (%s); recompile the artifact", c->path, where, kind(v));
    if (x < low || x > high)
        return bitrl_fail("%s: manifest %.120s is %lld, not in [%lld, %lld]; recompile the artifact", c->path, where,
                          (long long)x, (long long)low, (long long)high);
    if (out) *out = x;
    return 0;
}

static int optional_strings(const checker *c, const json *obj, const char *const *keys, const char *where) {
    char at[200];
    for (size_t i = 0; keys[i]; i++) {
        const json *v = json_get(obj, keys[i]);
        snprintf(at, sizeof at, "%.120s.%s", where, keys[i]);
        if (v && is(c, v, JSON_STRING, at) != 0) return -1;
    }
    return 0;
}

static int by_name(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static int known_param(const checker *c, const char *name) {
    return bsearch(&name, c->params, c->nparams, sizeof *c->params, by_name) != NULL;
}

static int check_params(checker *c, const json *params) {
    if (is(c, params, JSON_ARRAY, "params") != 0) return -1;
    c->params = calloc(params->count + 1, sizeof *c->params);
    if (!c->params) return bitrl_fail("%s: out of memory", c->path);
    for (size_t i = 0; i < params->count; i++) {
        const char *name = json_str(&params->items[i]);
        if (!name || !name[0] || strlen(name) > MAX_NAME)
            return bitrl_fail("%s: manifest params[%zu] is not a parameter name (a string of 1 to %d characters); "
                              "recompile the artifact", c->path, i, MAX_NAME);
        c->params[i] = name;
    }
    c->nparams = params->count;
    qsort(c->params, c->nparams, sizeof *c->params, by_name);
    for (size_t i = 1; i < c->nparams; i++)
        if (strcmp(c->params[i - 1], c->params[i]) == 0) return fail(c, "params", "repeats the name ", c->params[i]);
    return 0;
}

static int check_target(const checker *c, const json *target) {
    static const char *const keys[] = {"name", "device", "tvm", NULL};
    if (is(c, target, JSON_OBJECT, "target") != 0 || is(c, json_get(target, "arch"), JSON_STRING, "target.arch") != 0 ||
        optional_strings(c, target, keys, "target") != 0)
        return -1;
    const json *features = json_get(target, "cpu_features");
    if (!features) return 0;
    if (is(c, features, JSON_ARRAY, "target.cpu_features") != 0) return -1;
    for (size_t i = 0; i < features->count; i++)
        if (features->items[i].type != JSON_STRING) return fail(c, "target.cpu_features", "holds a non-string", "");
    return 0;
}

static int check_weights(const checker *c, const json *weights) {
    if (!weights) return 0;
    if (is(c, weights, JSON_OBJECT, "weights") != 0) return -1;
    char at[200];
    for (size_t i = 0; i < weights->count; i++) {
        const char *name = weights->keys[i];
        const json *spec = &weights->items[i];
        if (!known_param(c, name)) return fail(c, "weights", "lists a name not in manifest params: ", name);
        snprintf(at, sizeof at, "weights.%.60s", name);
        if (is(c, spec, JSON_OBJECT, at) != 0) return -1;
        const char *storage = json_str(json_get(spec, "storage"));
        if (!storage || strcmp(storage, "base3") != 0) return fail(c, at, "has a storage other than 'base3'", "");
        int64_t nl, kg;
        int lut;
        const char *compute = json_str(json_get(spec, "compute"));
        if (bitrl_parse_layout(compute, &nl, &kg, &lut) != 0)
            return fail(c, at, "has a compute layout that is not tiles<NL>x<KG> or lut<NL> with NL, KG in [1, 4096]: ",
                        compute ? compute : "(none)");
        const json *shape = json_get(spec, "shape");
        snprintf(at, sizeof at, "weights.%.60s.shape", name);
        if (is(c, shape, JSON_ARRAY, at) != 0) return -1;
        if (shape->count != 2) return fail(c, at, "does not have 2 values, expected [N, K]", "");
        for (size_t d = 0; d < 2; d++)
            if (integer(c, &shape->items[d], at, 1, MAX_WEIGHT_DIM, NULL) != 0) return -1;
    }
    return 0;
}

static int check_batch(const checker *c, const json *batch) {
    int64_t low;
    if (!batch) return 0;
    if (is(c, batch, JSON_OBJECT, "batch") != 0 || integer(c, json_get(batch, "min"), "batch.min", 1, MAX_BATCH, &low) != 0)
        return -1;
    const json *high = json_get(batch, "max");
    return high && high->type == JSON_NULL ? 0 : integer(c, high, "batch.max", low, MAX_BATCH, NULL);
}

/* A plan tensor's form; the dtype, rank and sizes are parsed again (with the batch) by bitrl.c's parse_tensor. */
static int check_tensors(const checker *c, const json *list, const char *where, int io, size_t *count) {
    if (!list && !io) return *count = 0, 0;
    if (is(c, list, JSON_ARRAY, where) != 0) return -1;
    if (io && list->count == 0) return fail(c, where, "is empty", "");
    char at[200];
    for (size_t i = 0; i < list->count; i++) {
        const json *t = &list->items[i], *shape = json_get(t, "shape");
        snprintf(at, sizeof at, "%.120s[%zu]", where, i);
        if (is(c, t, JSON_OBJECT, at) != 0) return -1;
        DLDataType dtype;
        if (bitrl_dtype(json_str(json_get(t, "dtype")), 0, &dtype) != 0) return fail(c, at, "has an unknown dtype", "");
        snprintf(at, sizeof at, "%.120s[%zu].shape", where, i);
        if (is(c, shape, JSON_ARRAY, at) != 0) return -1;
        if (shape->count > BITRL_MAX_DIMS || (io && shape->count == 0)) return fail(c, at, "has too many dimensions", "");
        for (size_t d = 0; d < shape->count; d++) {
            const json *dim = &shape->items[d];
            int batch = json_str(dim) && strcmp(dim->string, "batch") == 0;
            if (io && (d == 0) != batch) return fail(c, at, "is not [\"batch\", sizes...]", "");
            if (!batch && integer(c, dim, at, 0, MAX_DIM, NULL) != 0) return -1;
        }
    }
    *count = list->count;
    return 0;
}

static int check_plan(const checker *c, const char *name, const json *plan) {
    char where[120], at[200];
    size_t counts[3];
    snprintf(where, sizeof where, "entry_points.%.60s", name);
    if (is(c, plan, JSON_OBJECT, where) != 0) return -1;
    static const char *const parts[] = {"inputs", "outputs", "buffers"};
    for (int k = 0; k < 3; k++) {
        snprintf(at, sizeof at, "%.120s.%s", where, parts[k]);
        if (check_tensors(c, json_get(plan, parts[k]), at, k < 2, &counts[k]) != 0) return -1;
    }
    const json *buffers = json_get(plan, "buffers");
    for (size_t k = 0; buffers && k < buffers->count; k++) { /* a view: "input:I" or "buffer:J" that is no view */
        const json *view = json_get(&buffers->items[k], "view");
        if (!view) continue;
        const char *v = json_str(view);
        int input = v && strncmp(v, "input:", 6) == 0, buffer = v && strncmp(v, "buffer:", 7) == 0;
        const char *digits = input ? v + 6 : buffer ? v + 7 : "";
        size_t n = strlen(digits), index = n >= 1 && n <= 9 && strspn(digits, "0123456789") == n
                                               ? (size_t)strtoul(digits, NULL, 10) : (size_t)-1;
        snprintf(at, sizeof at, "%.120s.buffers[%zu].view", where, k);
        if (index >= counts[input ? 0 : 2] || (!input && !buffer) ||
            (buffer && json_get(&buffers->items[index], "view")))
            return fail(c, at, "is not an input:I or a buffer:I that is no view: ", v ? v : "(not a string)");
    }
    const json *calls = json_get(plan, "calls");
    snprintf(at, sizeof at, "%.120s.calls", where);
    if (is(c, calls, JSON_ARRAY, at) != 0) return -1;
    for (size_t k = 0; k < calls->count; k++) {
        const json *call = &calls->items[k], *args = json_get(call, "args");
        snprintf(at, sizeof at, "%.120s.calls[%zu]", where, k);
        if (is(c, call, JSON_OBJECT, at) != 0) return -1;
        const char *func = json_str(json_get(call, "func"));
        if (!func || !func[0] || strlen(func) > MAX_NAME || strspn(func, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                                     "0123456789_") != strlen(func) || (func[0] >= '0' && func[0] <= '9'))
            return fail(c, at, "has no function name (func)", "");
        snprintf(at, sizeof at, "%.120s.calls[%zu].args", where, k);
        if (is(c, args, JSON_ARRAY, at) != 0) return -1;
        for (size_t j = 0; j < args->count; j++) {
            const char *arg = json_str(&args->items[j]);
            snprintf(at, sizeof at, "%.120s.calls[%zu].args[%zu]", where, k, j);
            if (!arg) return fail(c, at, "is not a string", "");
            if (strncmp(arg, "param:", 6) == 0) {
                if (!known_param(c, arg + 6)) return fail(c, at, "is a parameter not in manifest params: ", arg);
                continue;
            }
            static const char *const prefixes[] = {"input:", "output:", "buffer:"};
            int slot = -1;
            for (int q = 0; q < 3; q++)
                if (strncmp(arg, prefixes[q], strlen(prefixes[q])) == 0) slot = q;
            const char *digits = slot < 0 ? "" : arg + strlen(prefixes[slot]);
            size_t n = strlen(digits);
            if (slot < 0 || n < 1 || n > 9 || strspn(digits, "0123456789") != n)
                return fail(c, at, "is not input:I, output:I, buffer:I or param:NAME: ", arg);
            if ((size_t)strtoul(digits, NULL, 10) >= counts[slot]) return fail(c, at, "is out of range: ", arg);
        }
    }
    return 0;
}

static int check_vm_params(const checker *c, const json *vm) {
    if (!vm) return 0;
    if (is(c, vm, JSON_OBJECT, "vm_params") != 0) return -1;
    for (size_t i = 0; i < vm->count; i++) {
        const json *names = &vm->items[i];
        if (names->type != JSON_ARRAY) return fail(c, "vm_params", "holds a value that is not a list", "");
        for (size_t j = 0; j < names->count; j++)
            if (!json_str(&names->items[j]) || !known_param(c, names->items[j].string))
                return fail(c, "vm_params", "names a parameter not in manifest params", "");
    }
    return 0;
}

static int numbers_only(const json *obj) {
    for (size_t i = 0; i < obj->count; i++)
        if (obj->items[i].type != JSON_NUMBER) return 0;
    return 1;
}

/* kernels, layers, versions, source, stats: what `inspect` prints; checked so that every reader refuses alike. */
static int check_tables(const checker *c, const json *m) {
    static const char *const kernel_strings[] = {"kernel", "isa", "layout", "schedule", "reason", NULL};
    static const char *const layer_strings[] = {"activation", "layout", "compute_layout", "scale", NULL};
    const json *kernels = json_get(m, "kernels"), *layers = json_get(m, "layers");
    char at[64];
    if (kernels && is(c, kernels, JSON_ARRAY, "kernels") != 0) return -1;
    for (size_t i = 0; kernels && i < kernels->count; i++) {
        const json *k = &kernels->items[i], *knobs = json_get(k, "knobs");
        snprintf(at, sizeof at, "kernels[%zu]", i);
        if (is(c, k, JSON_OBJECT, at) != 0 || optional_strings(c, k, kernel_strings, at) != 0) return -1;
        if (knobs && (knobs->type != JSON_OBJECT || !numbers_only(knobs))) return fail(c, at, "has malformed knobs", "");
        static const char *const tuned[] = {"gemv", "gemm"};
        for (int t = 0; t < 2; t++) {
            const json *d = json_get(k, tuned[t]);
            int64_t b;
            if (d && (d->type != JSON_OBJECT || json_int(json_get(d, "batch"), &b) != 0 || b < 0 ||
                      !json_get(d, "us") || json_get(d, "us")->type != JSON_NUMBER || !json_get(d, "default_us") ||
                      json_get(d, "default_us")->type != JSON_NUMBER))
                return fail(c, at, "has a malformed tuning record", "");
        }
        const json *in = json_get(k, "in"), *out = json_get(k, "out");
        if ((in && integer(c, in, at, 0, 1LL << 62, NULL) != 0) || (out && integer(c, out, at, 0, 1LL << 62, NULL) != 0))
            return -1;
    }
    if (layers && is(c, layers, JSON_ARRAY, "layers") != 0) return -1;
    for (size_t i = 0; layers && i < layers->count; i++) {
        const json *l = &layers->items[i];
        snprintf(at, sizeof at, "layers[%zu]", i);
        if (is(c, l, JSON_OBJECT, at) != 0 || optional_strings(c, l, layer_strings, at) != 0) return -1;
        snprintf(at, sizeof at, "layers[%zu].name", i);
        if (is(c, json_get(l, "name"), JSON_STRING, at) != 0) return -1;
        snprintf(at, sizeof at, "layers[%zu].in", i);
        if (integer(c, json_get(l, "in"), at, 0, MAX_WEIGHT_DIM, NULL) != 0) return -1;
        snprintf(at, sizeof at, "layers[%zu].out", i);
        if (integer(c, json_get(l, "out"), at, 0, MAX_WEIGHT_DIM, NULL) != 0) return -1;
        /* optional (mixed precision): index, bytes, precision "ternary" | "int8", shape [N, K] */
        const json *index = json_get(l, "index"), *bytes = json_get(l, "bytes"), *precision = json_get(l, "precision");
        const json *shape = json_get(l, "shape");
        snprintf(at, sizeof at, "layers[%zu].index", i);
        if (index && integer(c, index, at, 0, MAX_WEIGHT_DIM, NULL) != 0) return -1;
        snprintf(at, sizeof at, "layers[%zu].bytes", i);
        if (bytes && integer(c, bytes, at, 0, 1LL << 62, NULL) != 0) return -1;
        snprintf(at, sizeof at, "layers[%zu].precision", i);
        if (precision && (is(c, precision, JSON_STRING, at) != 0 ||
                          (strcmp(precision->string, "ternary") != 0 && strcmp(precision->string, "int8") != 0)))
            return precision->type == JSON_STRING ? fail(c, at, "is not one of ternary, int8: ", precision->string) : -1;
        snprintf(at, sizeof at, "layers[%zu].shape", i);
        if (shape && (is(c, shape, JSON_ARRAY, at) != 0)) return -1;
        if (shape && shape->count != 2) return fail(c, at, "does not have 2 values, expected [N, K]", "");
        for (size_t d = 0; shape && d < 2; d++) {
            snprintf(at, sizeof at, "layers[%zu].shape[%zu]", i, d);
            if (integer(c, &shape->items[d], at, 0, MAX_WEIGHT_DIM, NULL) != 0) return -1;
        }
    }
    static const char *const texts[] = {"versions", "source"};
    for (int t = 0; t < 2; t++) {
        const json *v = json_get(m, texts[t]);
        if (!v) continue;
        if (is(c, v, JSON_OBJECT, texts[t]) != 0) return -1;
        for (size_t i = 0; i < v->count; i++)
            if (v->items[i].type != JSON_STRING) return fail(c, texts[t], "holds a value that is not a string", "");
    }
    const json *stats = json_get(m, "stats");
    if (stats && (is(c, stats, JSON_OBJECT, "stats") != 0)) return -1;
    static const char *const counts[] = {"ternary_weights", "int8_weights", "param_bytes"};
    for (int t = 0; stats && t < 3; t++) {
        const json *v = json_get(stats, counts[t]);
        snprintf(at, sizeof at, "stats.%s", counts[t]);
        if (v && integer(c, v, at, 0, 1LL << 62, NULL) != 0) return -1;
    }
    return 0;
}

/* A Dict observation's keys (runtime/specs.py's check_input_keys): the input is one flat vector [total], preprocess
 * none, and the keys (1 to 64; unique names of 1 to 200 bytes; shapes of positive ints, at most 2^20 values each;
 * dtypes of KEY_DTYPES; preprocess none, image or onehot; normalize a boolean) hold total values in all. A onehot
 * key (a Discrete space) has n in [1, 2^20], shape [1] (its index) and is not normalised. */
#define MAX_KEYS 64
#define MAX_VALUES (1LL << 20)

static int check_input_keys(const checker *c, const json *input) {
    static const char *const dtypes[] = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                                         "uint16", "uint32", "uint64", "bool", NULL};
    const json *kindv = json_get(input, "kind"), *keys = json_get(input, "keys");
    if (kindv && is(c, kindv, JSON_STRING, "input.kind") != 0) return -1;
    const char *kind = kindv ? kindv->string : "flat";
    if (strcmp(kind, "flat") != 0 && strcmp(kind, "dict") != 0) return fail(c, "input.kind", "is not flat or dict: ", kind);
    if (strcmp(kind, "flat") == 0) return keys ? fail(c, "input.keys", "is only for a Dict observation (kind dict)", "") : 0;
    if (is(c, keys, JSON_ARRAY, "input.keys") != 0) return -1;
    if (keys->count < 1 || keys->count > MAX_KEYS) return fail(c, "input.keys", "does not hold 1 to 64 keys", "");
    const json *shape = json_get(input, "shape"), *pre = json_get(input, "preprocess");
    int64_t total = -1, sum = 0;
    if (!shape || shape->type != JSON_ARRAY || shape->count != 1 || json_int(&shape->items[0], &total) != 0 || total < 1 ||
        (pre && (!json_str(pre) || strcmp(pre->string, "none") != 0)))
        return fail(c, "input", "of a Dict observation is not one flat vector (shape [total], preprocess none)", "");
    char at[240];
    for (size_t i = 0; i < keys->count; i++) {
        const json *k = &keys->items[i];
        snprintf(at, sizeof at, "input.keys[%zu]", i);
        if (is(c, k, JSON_OBJECT, at) != 0) return -1;
        const char *name = json_str(json_get(k, "name"));
        if (!name || !name[0] || strlen(name) > MAX_NAME)
            return fail(c, at, "has no name (a string of 1 to 200 bytes)", "");
        for (size_t j = 0; j < i; j++)
            if (strcmp(name, json_str(json_get(&keys->items[j], "name"))) == 0) return fail(c, at, "repeats the key ", name);
        const json *ks = json_get(k, "shape"), *dtype = json_get(k, "dtype"), *kp = json_get(k, "preprocess");
        const json *norm = json_get(k, "normalize");
        snprintf(at, sizeof at, "input.keys[%zu].shape", i);
        if (is(c, ks, JSON_ARRAY, at) != 0) return -1;
        if (ks->count < 1) return fail(c, at, "is empty", "");
        int64_t size = 1;
        for (size_t d = 0; d < ks->count; d++) {
            int64_t v;
            if (integer(c, &ks->items[d], at, 1, MAX_VALUES, &v) != 0) return -1;
            size *= v;
            if (size > MAX_VALUES) return fail(c, at, "holds more than 2^20 values", "");
        }
        sum += size;
        snprintf(at, sizeof at, "input.keys[%zu].dtype", i);
        int known = dtype == NULL;
        for (size_t t = 0; dtype && dtypes[t]; t++) known |= json_str(dtype) && strcmp(dtype->string, dtypes[t]) == 0;
        if (!known) return fail(c, at, "is not a real dtype (float32, int64, uint8, bool, ...)", "");
        snprintf(at, sizeof at, "input.keys[%zu].preprocess", i);
        int onehot = kp && json_str(kp) && strcmp(kp->string, "onehot") == 0;
        if (kp && !onehot && (!json_str(kp) || (strcmp(kp->string, "none") != 0 && strcmp(kp->string, "image") != 0)))
            return fail(c, at, "is not none, image or onehot", "");
        snprintf(at, sizeof at, "input.keys[%zu].normalize", i);
        if (norm && is(c, norm, JSON_BOOL, at) != 0) return -1;
        snprintf(at, sizeof at, "input.keys[%zu]", i);
        if (onehot && size != 1) return fail(c, at, "is onehot but its shape is not [1] (the index)", "");
        if (onehot && norm && norm->boolean) return fail(c, at, "is onehot but normalised (an index cannot be)", "");
        snprintf(at, sizeof at, "input.keys[%zu].n", i);
        if (onehot && integer(c, json_get(k, "n"), at, 1, MAX_VALUES, NULL) != 0) return -1;
    }
    if (sum != total) return fail(c, "input.keys", "hold a number of values other than the observation shape's", "");
    return 0;
}

/* A recurrent policy's state (runtime/specs.py's check_recurrent): {layers 1..64, hidden 1..2^16,
 * state_size = 2 * layers * hidden}. */
static int check_recurrent(const checker *c, const json *input) {
    const json *rec = json_get(input, "recurrent");
    if (!rec || rec->type == JSON_NULL) return 0;
    if (is(c, rec, JSON_OBJECT, "input.recurrent") != 0) return -1;
    int64_t layers, hidden, size;
    if (integer(c, json_get(rec, "layers"), "input.recurrent.layers", 1, 64, &layers) != 0 ||
        integer(c, json_get(rec, "hidden"), "input.recurrent.hidden", 1, 1LL << 16, &hidden) != 0 ||
        integer(c, json_get(rec, "state_size"), "input.recurrent.state_size", 1, MAX_VALUES, &size) != 0)
        return -1;
    if (size != 2 * layers * hidden)
        return fail(c, "input.recurrent.state_size", "is not 2 x layers x hidden (h and c of every layer)", "");
    return 0;
}

int bitrl_check_manifest(const char *path, const json *m) {
    checker c = {path, NULL, 0};
    int rc = check_target(&c, json_get(m, "target"));
    if (rc == 0) rc = is(&c, json_get(m, "input"), JSON_OBJECT, "input");
    if (rc == 0) rc = check_input_keys(&c, json_get(m, "input"));
    if (rc == 0) rc = check_recurrent(&c, json_get(m, "input"));
    if (rc == 0) rc = is(&c, json_get(m, "output"), JSON_OBJECT, "output");
    if (rc == 0) rc = is(&c, json_get(json_get(m, "output"), "kind"), JSON_STRING, "output.kind");
    if (rc == 0) rc = check_params(&c, json_get(m, "params"));
    if (rc == 0) rc = check_weights(&c, json_get(m, "weights"));
    if (rc == 0) rc = check_batch(&c, json_get(m, "batch"));
    const json *eps = json_get(m, "entry_points");
    if (rc == 0 && eps) rc = is(&c, eps, JSON_OBJECT, "entry_points");
    for (size_t i = 0; rc == 0 && eps && i < eps->count; i++) rc = check_plan(&c, eps->keys[i], &eps->items[i]);
    if (rc == 0) rc = check_vm_params(&c, json_get(m, "vm_params"));
    if (rc == 0) rc = check_tables(&c, m);
    free(c.params);
    return rc;
}
