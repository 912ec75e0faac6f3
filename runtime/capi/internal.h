/* The parts of libbitrl that bitrl.c uses; none of this is exported (built with -fvisibility=hidden). */
#ifndef BITRL_INTERNAL_H_
#define BITRL_INTERNAL_H_

#include <dlpack/dlpack.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define BITRL_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define BITRL_PRINTF(a, b)
#endif

/* Limits of the artifact reader, the same as runtime/artifact.py's: far above any policy, far below what would
 * exhaust a device's memory; checked on declared sizes before anything is allocated or inflated. */
#define BITRL_MAX_MEMBERS 16
#define BITRL_MAX_MEMBER (2ULL << 30)        /* one member, uncompressed (more needs zip64, never used) */
#define BITRL_MAX_TOTAL (4ULL << 30)         /* all members, uncompressed */
#define BITRL_MAX_FILE (BITRL_MAX_TOTAL + (64ULL << 20))
#define BITRL_MAX_RATIO 100                  /* inflation limit of a member over BITRL_RATIO_FROM bytes */
#define BITRL_RATIO_FROM (1u << 20)
#define BITRL_MAX_MANIFEST (16u << 20)       /* manifest.json; also the safetensors header */
#define BITRL_MAX_SIGNATURES (64u << 10)     /* signatures.json */
#define BITRL_MAX_MANIFEST_HASH 128u         /* manifest.sha256 */

/* errors: the calling thread's last error (bitrl_last_error), always one line; returns -1 */
int bitrl_fail(const char *fmt, ...) BITRL_PRINTF(1, 2);

/* sha256.c: the digest of data as 64 lowercase hex digits and a NUL */
void bitrl_sha256_hex(const uint8_t *data, size_t n, char hex[65]);

/* zip.c: the members of a zip held in memory (STORED or DEFLATE; CRC-32 checked) */
typedef struct {
    char *name;
    uint16_t method, flags;
    uint32_t crc, csize, usize, offset;
} bitrl_zip_entry;

typedef struct {
    const uint8_t *data;
    size_t size;
    bitrl_zip_entry *entries;
    size_t count;
} bitrl_zip;

/* 0, or -1 with the error "what: ..." set */
int bitrl_zip_open(bitrl_zip *z, const uint8_t *data, size_t size, const char *what);
const bitrl_zip_entry *bitrl_zip_find(const bitrl_zip *z, const char *name);
/* the member's bytes in a new malloc'ed buffer (*out, *n), or -1 with the error set */
int bitrl_zip_read(const bitrl_zip *z, const bitrl_zip_entry *e, uint8_t **out, size_t *n, const char *what);
void bitrl_zip_close(bitrl_zip *z);

/* json.c: a strict JSON parser (RFC 8259, plus NaN/Infinity as Python's json writes them) */
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json {
    json_type type;
    int boolean;
    int is_int;      /* a number written without fraction or exponent that fits int64 */
    int64_t integer; /* its value when is_int */
    double number;
    char *string;    /* NUL-terminated UTF-8 (strings) */
    size_t count;    /* items of an array or object */
    struct json *items;
    char **keys;     /* object keys, parallel to items */
} json;

/* parses text[0..n) into *out; 0, or -1 with the error "what is not valid JSON (...)" set */
int json_parse(const char *text, size_t n, json *out, const char *what);
void json_free(json *v);
const json *json_get(const json *obj, const char *key); /* NULL if obj is no object or has no such key */
const char *json_str(const json *v);                   /* NULL unless a string */
int json_int(const json *v, int64_t *out);             /* 0 if an integer */

/* manifest.c: the structure of every manifest field a reader uses (runtime/manifest.py's twin); 0, or -1 with the
 * error "path: manifest <field> <problem>; recompile the artifact" set */
int bitrl_check_manifest(const char *path, const json *m);

/* params.c: parameters from params.safetensors, base-3 weights unpacked into the kernels' layout */
#define BITRL_MAX_DIMS 8

typedef struct {
    DLDataType dtype;
    int ndim;
    int64_t shape[BITRL_MAX_DIMS];
    void *data; /* 64-byte aligned, owned (free) */
    size_t nbytes;
} bitrl_tensor;

/* the dtype of a numpy name ("float32") or a safetensors name ("F32"); 0, or -1 if unknown */
int bitrl_dtype(const char *name, int safetensors, DLDataType *out);
/* params.safetensors' header (parsed into *header, at most BITRL_MAX_MANIFEST bytes, every tensor's dtype, shape
 * and offsets checked against the file) and where its tensor bytes start; 0 or -1 */
int bitrl_safetensors_open(const uint8_t *data, size_t n, json *header, size_t *body, const char *what);
/* tensor `name` of the file, as stored, or (spec: its manifest["weights"] entry, else NULL) unpacked from
 * base-3 into its "compute" layout, exactly as runtime/weights.py's to_compute; 0 or -1 */
int bitrl_param(const uint8_t *data, size_t n, const json *header, size_t body, const char *name,
                const json *spec, bitrl_tensor *out, const char *what);
/* NL, KG and whether a compute layout name is lut<NL> (KG 1) rather than tiles<NL>x<KG>; 0, or -1 if unknown */
int bitrl_parse_layout(const char *s, int64_t *nl, int64_t *kg, int *lut);
void *bitrl_aligned_alloc(size_t nbytes); /* 64-byte aligned, zeroed; NULL if out of memory */

/* trust.c: trusted Ed25519 public keys and signatures.json (docs/security.md) */
typedef struct {
    size_t count;
    uint8_t (*raw)[32]; /* the raw public keys */
    char (*ids)[65];    /* their key ids: sha256 hex of the raw key */
} bitrl_keys;

/* the keys of the PEM files paths[0..n) and of BITRL_TRUSTED_KEYS (colon-separated paths); 0 or -1 */
int bitrl_keys_load(bitrl_keys *k, const char *const *paths, size_t n);
void bitrl_keys_free(bitrl_keys *k);
/* 0 if signatures.json (sigs, NULL when absent) holds a valid Ed25519 signature of manifest[0..n) by a key of k
 * (libcrypto is opened on first use); -1 with the error set otherwise */
int bitrl_verify_signatures(const char *what, const uint8_t *manifest, size_t n, const uint8_t *sigs, size_t sigs_n,
                            const bitrl_keys *k);

#endif /* BITRL_INTERNAL_H_ */
