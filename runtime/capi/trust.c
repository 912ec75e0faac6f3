/* Signatures of artifacts (docs/security.md, runtime/signing.py): trusted Ed25519 public keys read from PEM files
 * (the caller's and those of BITRL_TRUSTED_KEYS), and signatures.json checked against manifest.json's exact bytes.
 * The Ed25519 check is OpenSSL's libcrypto, opened with dlopen only when keys are configured: the few functions
 * used are declared here, so building libbitrl needs no OpenSSL headers and no link flag, for either architecture.
 *
 *   signatures.json: [{"algorithm": "ed25519", "key": KEY_ID, "signature": BASE64}, ...]
 *   KEY_ID:          sha256 (hex) of the raw 32-byte public key */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define ENV "BITRL_TRUSTED_KEYS"
#define MAX_KEY_FILE (64u << 10)
#define MAX_ENTRIES 64
#define NID_ED25519 1087 /* EVP_PKEY_ED25519 */

/* A PEM "PUBLIC KEY" of Ed25519 is this DER SubjectPublicKeyInfo prefix and the 32-byte key. */
static const uint8_t SPKI_PREFIX[12] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};

/* ------------------------------------------------------------------------------------------------- base64 */

static int b64_value(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Standard base64 (whitespace skipped, '=' padding only at the end) into out[0..cap); its length, or -1. */
static long b64_decode(const char *s, size_t n, uint8_t *out, size_t cap) {
    uint32_t acc = 0;
    int bits = 0, pad = 0;
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64_value(c);
        if (v < 0 || pad) return -1;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (len >= cap) return -1;
            out[len++] = (uint8_t)(acc >> bits);
        }
    }
    return pad > 2 ? -1 : (long)len;
}

/* --------------------------------------------------------------------------------------------------- keys */

static int add_key(bitrl_keys *k, const uint8_t raw[32]) {
    char id[65];
    bitrl_sha256_hex(raw, 32, id);
    for (size_t i = 0; i < k->count; i++)
        if (strcmp(k->ids[i], id) == 0) return 0;
    uint8_t(*keys)[32] = realloc(k->raw, (k->count + 1) * sizeof *keys);
    if (keys) k->raw = keys;
    char(*ids)[65] = realloc(k->ids, (k->count + 1) * sizeof *ids);
    if (ids) k->ids = ids;
    if (!keys || !ids) return bitrl_fail("out of memory reading trusted keys");
    memcpy(k->raw[k->count], raw, 32);
    memcpy(k->ids[k->count], id, 65);
    k->count++;
    return 0;
}

static int parse_key(const char *text, const char *file, const char *origin, uint8_t raw[32]);

/* The Ed25519 key of a PEM public key file into raw; 0, or -1 with the error naming the file and the fix. */
static int read_key(const char *file, const char *origin, uint8_t raw[32]) {
    FILE *f = fopen(file, "rbe");
    if (!f)
        return bitrl_fail("trusted key %s%s %s; fix the path%s", file, origin,
                          errno == ENOENT ? "does not exist" : "cannot be opened", origin[0] ? " or unset " ENV : "");
    char *text = malloc(MAX_KEY_FILE + 2);
    if (!text) {
        fclose(f);
        return bitrl_fail("out of memory reading trusted key %s", file);
    }
    size_t n = fread(text, 1, MAX_KEY_FILE + 1, f);
    fclose(f);
    text[n] = 0;
    int rc = n > MAX_KEY_FILE ? bitrl_fail("trusted key %s%s is too large for a public key file", file, origin)
                              : parse_key(text, file, origin, raw);
    free(text);
    return rc;
}

static int parse_key(const char *text, const char *file, const char *origin, uint8_t raw[32]) {
    const char *begin = strstr(text, "-----BEGIN ");
    if (begin && strncmp(begin + 11, "PUBLIC KEY-----", 15) != 0)
        return bitrl_fail("trusted key %s%s is not a PUBLIC KEY%s", file, origin,
                          strstr(begin, "PRIVATE KEY") ? " (this is the private key: give NAME.pub)" : "");
    const char *end = begin ? strstr(begin, "-----END PUBLIC KEY-----") : NULL;
    if (!begin || !end)
        return bitrl_fail("trusted key %s%s is not a PEM public key; give the NAME.pub file `bitrl-compile keygen` "
                          "wrote", file, origin);
    const char *body = begin + 26;
    uint8_t der[64];
    long len = b64_decode(body, (size_t)(end - body), der, sizeof der);
    if (len != (long)sizeof SPKI_PREFIX + 32 || memcmp(der, SPKI_PREFIX, sizeof SPKI_PREFIX) != 0)
        return bitrl_fail("trusted key %s%s is not an Ed25519 public key (artifacts are signed with Ed25519); make "
                          "one with `bitrl-compile keygen`", file, origin);
    memcpy(raw, der + sizeof SPKI_PREFIX, 32);
    return 0;
}

int bitrl_keys_load(bitrl_keys *k, const char *const *paths, size_t n) {
    memset(k, 0, sizeof *k);
    uint8_t raw[32];
    if (n && !paths) return bitrl_fail("bitrl_load_trusted: key_paths is NULL but n_keys is %zu", n);
    for (size_t i = 0; i < n; i++) {
        if (!paths[i]) {
            bitrl_keys_free(k);
            return bitrl_fail("bitrl_load_trusted: key_paths[%zu] is NULL; pass the paths of public key PEM files", i);
        }
        if (read_key(paths[i], "", raw) != 0 || add_key(k, raw) != 0) {
            bitrl_keys_free(k);
            return -1;
        }
    }
    const char *env = getenv(ENV);
    if (!env || !*env) return 0;
    char *list = strdup(env), *save = NULL;
    if (!list) return bitrl_fail("out of memory reading " ENV);
    for (char *item = strtok_r(list, ":", &save); item; item = strtok_r(NULL, ":", &save)) {
        if (!*item) continue;
        if (read_key(item, " (from " ENV ")", raw) != 0 || add_key(k, raw) != 0) {
            free(list);
            bitrl_keys_free(k);
            return -1;
        }
    }
    free(list);
    return 0;
}

void bitrl_keys_free(bitrl_keys *k) {
    free(k->raw);
    free(k->ids);
    memset(k, 0, sizeof *k);
}

/* ---------------------------------------------------------------------------------------------- libcrypto */

typedef struct evp_pkey_st EVP_PKEY;
typedef struct evp_md_ctx_st EVP_MD_CTX;

static struct {
    void *lib;
    EVP_PKEY *(*new_raw_public_key)(int type, void *engine, const unsigned char *key, size_t len);
    void (*pkey_free)(EVP_PKEY *key);
    EVP_MD_CTX *(*ctx_new)(void);
    void (*ctx_free)(EVP_MD_CTX *ctx);
    int (*verify_init)(EVP_MD_CTX *ctx, void **pctx, const void *md, void *engine, EVP_PKEY *key);
    int (*verify)(EVP_MD_CTX *ctx, const unsigned char *sig, size_t siglen, const unsigned char *tbs, size_t tbslen);
} crypto;
static pthread_once_t crypto_once = PTHREAD_ONCE_INIT;

static void crypto_open(void) {
    static const char *const NAMES[] = {"libcrypto.so.3", "libcrypto.so.1.1"}; /* the same ABI for these calls */
    for (size_t i = 0; i < 2 && !crypto.lib; i++) crypto.lib = dlopen(NAMES[i], RTLD_NOW | RTLD_LOCAL);
    if (!crypto.lib) return;
    *(void **)&crypto.new_raw_public_key = dlsym(crypto.lib, "EVP_PKEY_new_raw_public_key");
    *(void **)&crypto.pkey_free = dlsym(crypto.lib, "EVP_PKEY_free");
    *(void **)&crypto.ctx_new = dlsym(crypto.lib, "EVP_MD_CTX_new");
    *(void **)&crypto.ctx_free = dlsym(crypto.lib, "EVP_MD_CTX_free");
    *(void **)&crypto.verify_init = dlsym(crypto.lib, "EVP_DigestVerifyInit");
    *(void **)&crypto.verify = dlsym(crypto.lib, "EVP_DigestVerify");
    if (!crypto.new_raw_public_key || !crypto.pkey_free || !crypto.ctx_new || !crypto.ctx_free || !crypto.verify_init ||
        !crypto.verify) {
        dlclose(crypto.lib);
        crypto.lib = NULL;
    }
}

/* 1 if sig is raw's Ed25519 signature of msg, 0 if not, -1 if it could not be checked (error set). */
static int ed25519_verify(const uint8_t raw[32], const uint8_t sig[64], const uint8_t *msg, size_t n) {
    pthread_once(&crypto_once, crypto_open);
    if (!crypto.lib)
        return bitrl_fail("checking signatures needs OpenSSL's libcrypto (libcrypto.so.3), which is not installed; "
                          "install it (`apt-get install libssl3`)");
    EVP_PKEY *key = crypto.new_raw_public_key(NID_ED25519, NULL, raw, 32);
    EVP_MD_CTX *ctx = crypto.ctx_new();
    int ok = -1;
    if (key && ctx && crypto.verify_init(ctx, NULL, NULL, NULL, key) == 1) ok = crypto.verify(ctx, sig, 64, msg, n) == 1;
    if (ctx) crypto.ctx_free(ctx);
    if (key) crypto.pkey_free(key);
    return ok < 0 ? bitrl_fail("libcrypto could not check an Ed25519 signature (an OpenSSL without Ed25519?)") : ok;
}

/* ------------------------------------------------------------------------------------------------ verify */

static int is_hex64(const char *s) {
    if (!s || strlen(s) != 64) return 0;
    for (const char *c = s; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'))) return 0;
    return 1;
}

static void key_list(const bitrl_keys *k, char *out, size_t cap) {
    size_t len = 0;
    out[0] = 0;
    for (size_t i = 0; i < k->count && len + 20 < cap; i++)
        len += (size_t)snprintf(out + len, cap - len, "%s%.16s", i ? ", " : "", k->ids[i]);
}

int bitrl_verify_signatures(const char *what, const uint8_t *manifest, size_t n, const uint8_t *sigs, size_t sigs_n,
                            const bitrl_keys *k) {
    static const char FIX[] = "sign the artifact again with `bitrl-compile sign`";
    char keys[256];
    key_list(k, keys, sizeof keys);
    json list = {0};
    if (sigs) {
        char label[600];
        snprintf(label, sizeof label, "%s: signatures.json", what);
        if (json_parse((const char *)sigs, sigs_n, &list, label) != 0) return -1;
        if (list.type != JSON_ARRAY || list.count > MAX_ENTRIES) {
            json_free(&list);
            return bitrl_fail("%s: signatures.json must be a list of at most %d signatures; %s", what, MAX_ENTRIES, FIX);
        }
    }
    int verified = 0, wrong = -1, rc = 0;
    for (size_t i = 0; i < list.count && !verified && rc == 0; i++) {
        const json *e = &list.items[i], *algorithm = json_get(e, "algorithm");
        const char *key = json_str(json_get(e, "key")), *sig = json_str(json_get(e, "signature"));
        uint8_t raw_sig[66];
        if (e->type != JSON_OBJECT || (algorithm && (!json_str(algorithm) || strcmp(algorithm->string, "ed25519") != 0))) {
            rc = bitrl_fail("%s: signatures.json holds an entry that is not an ed25519 signature; %s", what, FIX);
        } else if (!is_hex64(key) || !sig) {
            rc = bitrl_fail("%s: signatures.json holds an entry without a key id and a signature; %s", what, FIX);
        } else if (b64_decode(sig, strlen(sig), raw_sig, sizeof raw_sig) != 64) {
            rc = bitrl_fail("%s: signatures.json holds a signature that is not 64 base64-encoded bytes; %s", what, FIX);
        } else {
            for (size_t j = 0; j < k->count && rc == 0; j++) {
                if (strcmp(k->ids[j], key) != 0) continue;
                int ok = ed25519_verify(k->raw[j], raw_sig, manifest, n);
                if (ok < 0) rc = -1;
                else if (ok) verified = 1;
                else wrong = (int)j;
            }
        }
    }
    json_free(&list);
    if (rc != 0 || verified) return rc;
    if (wrong >= 0)
        return bitrl_fail("%s: the signature by trusted key %.16s does not verify (the manifest was changed after "
                          "signing, or the signature is corrupt); do not use this file, or %s", what, k->ids[wrong], FIX);
    return bitrl_fail("%s is not signed by any trusted key (keys: %s); sign it with `bitrl-compile sign`, or trust "
                      "it without keys (bitrl_load without BITRL_TRUSTED_KEYS)", what, keys);
}
