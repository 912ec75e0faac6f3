/* Parameters: params.safetensors read strictly, and the base-3 weights unpacked once into the layout the
 * kernels read. The layouts are drawn in runtime/weights.py; this is its `to_compute` in C:
 *
 *   base3 [N, ceil(K/5)] uint8, 5 codes c = trit + 1 per byte: c[n, 5j + t] = byte[n, j] / 3^t % 3
 *   tiles{NL}x{KG}  [ceil(N/NL), ceil(K/4KG), NL, KG]: byte [jo, kb, i, j] = sum_q c[jo NL + i, 4 KG kb + q KG + j] << 2q
 *   lut{NL}         [ceil(N/NL), 2 ceil(K/8), NL, 1]: byte [jo, kb, i, 0] = (c[n, 4kb] + 3 c[n, 4kb+1])
 *                                                                        | (c[n, 4kb+2] + 3 c[n, 4kb+3]) << 4
 * with code 1 (weight 0) for the padding outside [N, K]. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

void *bitrl_aligned_alloc(size_t nbytes) {
    size_t rounded = (nbytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (p) memset(p, 0, rounded ? rounded : 64);
    return p;
}

int bitrl_dtype(const char *name, int safetensors, DLDataType *out) {
    static const struct { const char *numpy, *st; uint8_t code, bits; } table[] = {
        {"float32", "F32", kDLFloat, 32}, {"float64", "F64", kDLFloat, 64}, {"float16", "F16", kDLFloat, 16},
        {"int8", "I8", kDLInt, 8},        {"int16", "I16", kDLInt, 16},     {"int32", "I32", kDLInt, 32},
        {"int64", "I64", kDLInt, 64},     {"uint8", "U8", kDLUInt, 8},      {"uint16", "U16", kDLUInt, 16},
        {"uint32", "U32", kDLUInt, 32},   {"uint64", "U64", kDLUInt, 64},   {"bool", "BOOL", kDLBool, 8},
    };
    if (!name) return -1;
    for (size_t i = 0; i < sizeof table / sizeof *table; i++) {
        if (strcmp(name, safetensors ? table[i].st : table[i].numpy) == 0) {
            out->code = table[i].code, out->bits = table[i].bits, out->lanes = 1;
            return 0;
        }
    }
    return -1;
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static int describe(size_t n, const json *info, size_t body, const char *name, bitrl_tensor *t, int64_t *begin,
                    const char *what);

int bitrl_safetensors_open(const uint8_t *data, size_t n, json *header, size_t *body, const char *what) {
    if (n < 8) return bitrl_fail("%s: params.safetensors is unreadable (shorter than its 8-byte header length); "
                                 "recompile the artifact", what);
    uint64_t len = le64(data);
    if (len > n - 8) return bitrl_fail("%s: params.safetensors is unreadable (header length exceeds the file size); "
                                       "recompile the artifact", what);
    if (len > BITRL_MAX_MANIFEST)
        return bitrl_fail("%s: params.safetensors declares a header of %llu bytes, more than the limit of %u; "
                          "recompile the artifact", what, (unsigned long long)len, BITRL_MAX_MANIFEST);
    char label[600];
    snprintf(label, sizeof label, "%s: the header of params.safetensors", what);
    if (json_parse((const char *)data + 8, (size_t)len, header, label) != 0) return -1;
    if (header->type != JSON_OBJECT) {
        json_free(header);
        return bitrl_fail("%s: params.safetensors is unreadable (its header is no JSON object); recompile the artifact", what);
    }
    *body = 8 + (size_t)len;
    for (size_t i = 0; i < header->count; i++) { /* every tensor's entry, before anything is allocated for it */
        bitrl_tensor t;
        int64_t begin;
        if (strcmp(header->keys[i], "__metadata__") == 0) continue;
        if (describe(n, &header->items[i], *body, header->keys[i], &t, &begin, what) != 0) {
            json_free(header);
            return -1;
        }
    }
    return 0;
}

int bitrl_parse_layout(const char *s, int64_t *nl, int64_t *kg, int *lut) {
    char *end;
    if (!s) return -1;
    if (strncmp(s, "tiles", 5) == 0) {
        *lut = 0;
        if (s[5] < '0' || s[5] > '9') return -1;
        *nl = strtoll(s + 5, &end, 10);
        if (*end != 'x' || end[1] < '0' || end[1] > '9') return -1;
        *kg = strtoll(end + 1, &end, 10);
    } else if (strncmp(s, "lut", 3) == 0) {
        *lut = 1, *kg = 1;
        if (s[3] < '0' || s[3] > '9') return -1;
        *nl = strtoll(s + 3, &end, 10);
    } else {
        return -1;
    }
    return *end == 0 && *nl > 0 && *nl <= 4096 && *kg > 0 && *kg <= 4096 ? 0 : -1;
}

static int unpack(const char *name, const bitrl_tensor *stored, const json *spec, bitrl_tensor *out, const char *what) {
    const char *storage = json_str(json_get(spec, "storage")), *compute = json_str(json_get(spec, "compute"));
    const json *shape = json_get(spec, "shape");
    int64_t n, k, nl, kg;
    int lut;
    if (!storage || strcmp(storage, "base3") != 0)
        return bitrl_fail("%s: weight %s has storage %s, expected base3; recompile the artifact", what, name,
                          storage ? storage : "(none)");
    if (!shape || shape->type != JSON_ARRAY || shape->count != 2 || json_int(&shape->items[0], &n) != 0 ||
        json_int(&shape->items[1], &k) != 0 || n < 1 || k < 1 || n > (1 << 24) || k > (1 << 24))
        return bitrl_fail("%s: weight %s has no valid [N, K] shape in the manifest; recompile the artifact", what, name);
    if (bitrl_parse_layout(compute, &nl, &kg, &lut) != 0)
        return bitrl_fail("%s: weight %s has unknown compute layout %s (expected tiles<NL>x<KG> or lut<NL>); "
                          "upgrade bitrl-compile's C runtime or recompile", what, name, compute ? compute : "(none)");
    int64_t row = (k + 4) / 5;
    if (stored->dtype.code != kDLUInt || stored->dtype.bits != 8 || stored->ndim != 2 || stored->shape[0] != n ||
        stored->shape[1] != row)
        return bitrl_fail("%s: weight %s cannot be unpacked: base-3 weights must be uint8 [%lld, %lld] for K = %lld; "
                          "recompile the artifact", what, name, (long long)n, (long long)row, (long long)k);
    const uint8_t *src = stored->data;
    for (int64_t i = 0; i < n * row; i++)
        if (src[i] > 242)
            return bitrl_fail("%s: weight %s cannot be unpacked: base-3 byte out of range (> 242): corrupt packed "
                              "weights; recompile the artifact", what, name);
    int64_t nt = (n + nl - 1) / nl, kb = lut ? 2 * ((k + 7) / 8) : (k + 4 * kg - 1) / (4 * kg);
    out->dtype = stored->dtype;
    out->ndim = 4;
    out->shape[0] = nt, out->shape[1] = kb, out->shape[2] = nl, out->shape[3] = kg;
    out->nbytes = (size_t)(nt * kb * nl * kg);
    out->data = bitrl_aligned_alloc(out->nbytes);
    if (!out->data) return bitrl_fail("%s: out of memory unpacking weight %s", what, name);
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
#define CODE(r, c) ((r) < n && (c) < k ? src[(r) * row + (c) / 5] / pow3[(c) % 5] % 3 : 1)
    uint8_t *dst = out->data;
    for (int64_t jo = 0; jo < nt; jo++)
        for (int64_t b = 0; b < kb; b++)
            for (int64_t i = 0; i < nl; i++)
                for (int64_t j = 0; j < kg; j++) {
                    int64_t r = jo * nl + i, c0 = b * 4 * kg + j;
                    unsigned v;
                    if (lut)
                        v = (unsigned)(CODE(r, c0) + 3 * CODE(r, c0 + 1)) | (unsigned)(CODE(r, c0 + 2) + 3 * CODE(r, c0 + 3)) << 4;
                    else
                        v = (unsigned)CODE(r, c0) | (unsigned)CODE(r, c0 + kg) << 2 | (unsigned)CODE(r, c0 + 2 * kg) << 4 |
                            (unsigned)CODE(r, c0 + 3 * kg) << 6;
                    *dst++ = (uint8_t)v;
                }
#undef CODE
    return 0;
}

/* Tensor `name`'s header entry as a bitrl_tensor without data (dtype, shape, nbytes) and where its bytes begin:
 * dtype known, shape of non-negative ints, offsets inside the file, and the byte length the shape's. 0 or -1. */
static int describe(size_t n, const json *info, size_t body, const char *name, bitrl_tensor *t, int64_t *begin,
                    const char *what) {
    memset(t, 0, sizeof *t);
    const json *shape = json_get(info, "shape"), *offsets = json_get(info, "data_offsets");
    int64_t count = 1, end;
    if (!info || info->type != JSON_OBJECT || bitrl_dtype(json_str(json_get(info, "dtype")), 1, &t->dtype) != 0)
        return bitrl_fail("%s: parameter %.80s has an unsupported dtype in params.safetensors; recompile the artifact",
                          what, name);
    if (!shape || shape->type != JSON_ARRAY || shape->count > BITRL_MAX_DIMS)
        return bitrl_fail("%s: parameter %.80s has no valid shape in params.safetensors; recompile the artifact", what, name);
    t->ndim = (int)shape->count;
    for (int d = 0; d < t->ndim; d++) {
        if (json_int(&shape->items[d], &t->shape[d]) != 0 || t->shape[d] < 0 || t->shape[d] > (1LL << 40))
            return bitrl_fail("%s: parameter %.80s has no valid shape in params.safetensors; recompile the artifact",
                              what, name);
        count *= t->shape[d];
        if (count > (1LL << 40))
            return bitrl_fail("%s: parameter %.80s is impossibly large; recompile the artifact", what, name);
    }
    t->nbytes = (size_t)count * (t->dtype.bits / 8);
    if (!offsets || offsets->type != JSON_ARRAY || offsets->count != 2 || json_int(&offsets->items[0], begin) != 0 ||
        json_int(&offsets->items[1], &end) != 0 || *begin < 0 || end < *begin || (uint64_t)end > n - body)
        return bitrl_fail("%s: params.safetensors is truncated or corrupt: tensor %.80s ends past the file; "
                          "recompile the artifact", what, name);
    if ((size_t)(end - *begin) != t->nbytes)
        return bitrl_fail("%s: params.safetensors is corrupt: tensor %.80s has %lld bytes for its shape's %zu; "
                          "recompile the artifact", what, name, (long long)(end - *begin), t->nbytes);
    return 0;
}

int bitrl_param(const uint8_t *data, size_t n, const json *header, size_t body, const char *name,
                const json *spec, bitrl_tensor *out, const char *what) {
    memset(out, 0, sizeof *out);
    const json *info = json_get(header, name);
    if (!info || strcmp(name, "__metadata__") == 0)
        return bitrl_fail("%s: parameter %s is missing from params.safetensors; recompile the artifact", what, name);
    bitrl_tensor t;
    int64_t begin;
    if (describe(n, info, body, name, &t, &begin, what) != 0) return -1; /* before allocating */
    t.data = bitrl_aligned_alloc(t.nbytes);
    if (!t.data) return bitrl_fail("%s: out of memory reading parameter %s", what, name);
    memcpy(t.data, data + body + begin, t.nbytes); /* little-endian on every target we build for */
    if (!spec) {
        *out = t;
        return 0;
    }
    int rc = unpack(name, &t, spec, out, what);
    free(t.data);
    return rc;
}
