/* A strict JSON parser (RFC 8259) into a small tree, for manifest.json and the safetensors header.
 * Also accepts NaN, Infinity and -Infinity, which Python's json module writes. Numbers are parsed in the
 * "C" locale whatever the application's locale is; depth is limited, so no input can exhaust the stack. */
#define _GNU_SOURCE
#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_DEPTH 64

typedef struct {
    const char *s;
    size_t n, i;
    const char *what;
    locale_t c_locale;
} parser;

static int bad(parser *p, const char *expected) {
    return bitrl_fail("%s is not valid JSON (byte %zu: expected %s)", p->what, p->i, expected);
}

static void skip_ws(parser *p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r')) p->i++;
}

static int literal(parser *p, const char *word) {
    size_t len = strlen(word);
    if (p->n - p->i < len || memcmp(p->s + p->i, word, len) != 0) return 0;
    p->i += len;
    return 1;
}

static int hex4(parser *p, unsigned *out) {
    if (p->n - p->i < 4) return -1;
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p->s[p->i++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static int parse_string(parser *p, char **out) {
    p->i++; /* the opening quote */
    size_t end = p->i; /* the closing quote: the decoded string is never longer than the text up to it */
    while (end < p->n && p->s[end] != '"') end += p->s[end] == '\\' ? 2 : 1;
    if (end > p->n) end = p->n;
    char *buf = malloc(end - p->i + 1);
    if (!buf) return bitrl_fail("%s: out of memory", p->what);
    size_t len = 0;
    for (;;) {
        if (p->i >= p->n) {
            free(buf);
            return bad(p, "the end of a string");
        }
        unsigned char c = (unsigned char)p->s[p->i++];
        if (c == '"') break;
        if (c < 0x20) {
            free(buf);
            return bad(p, "no control character in a string");
        }
        if (c != '\\') {
            buf[len++] = (char)c;
            continue;
        }
        if (p->i >= p->n) {
            free(buf);
            return bad(p, "an escape");
        }
        char e = p->s[p->i++];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            buf[len++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
            continue;
        }
        unsigned cp;
        if (e != 'u' || hex4(p, &cp) != 0) {
            free(buf);
            return bad(p, "a valid escape");
        }
        if (cp >= 0xd800 && cp <= 0xdbff) { /* a surrogate pair */
            unsigned lo;
            if (!literal(p, "\\u") || hex4(p, &lo) != 0 || lo < 0xdc00 || lo > 0xdfff) {
                free(buf);
                return bad(p, "a low surrogate");
            }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            free(buf);
            return bad(p, "no lone low surrogate");
        }
        if (cp == 0) {
            free(buf);
            return bad(p, "no NUL character in a string");
        }
        if (cp < 0x80) buf[len++] = (char)cp;
        else if (cp < 0x800) buf[len++] = (char)(0xc0 | cp >> 6), buf[len++] = (char)(0x80 | (cp & 0x3f));
        else if (cp < 0x10000) {
            buf[len++] = (char)(0xe0 | cp >> 12);
            buf[len++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            buf[len++] = (char)(0x80 | (cp & 0x3f));
        } else {
            buf[len++] = (char)(0xf0 | cp >> 18);
            buf[len++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            buf[len++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            buf[len++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    buf[len] = 0;
    *out = buf;
    return 0;
}

static int digits(parser *p) {
    size_t start = p->i;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++;
    return p->i > start;
}

static int parse_number(parser *p, json *v) {
    size_t start = p->i;
    int integral = 1;
    if (p->s[p->i] == '-') p->i++;
    if (literal(p, "Infinity")) {
        v->type = JSON_NUMBER;
        v->number = p->s[start] == '-' ? -INFINITY : INFINITY;
        return 0;
    }
    if (p->i < p->n && p->s[p->i] == '0') p->i++;
    else if (!digits(p)) return bad(p, "a number");
    if (p->i < p->n && p->s[p->i] == '.') {
        p->i++, integral = 0;
        if (!digits(p)) return bad(p, "digits after '.'");
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        p->i++, integral = 0;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-')) p->i++;
        if (!digits(p)) return bad(p, "digits in an exponent");
    }
    char tmp[64];
    size_t len = p->i - start;
    char *text = len < sizeof tmp ? tmp : malloc(len + 1);
    if (!text) return bitrl_fail("%s: out of memory", p->what);
    memcpy(text, p->s + start, len);
    text[len] = 0;
    v->type = JSON_NUMBER;
    v->number = strtod_l(text, NULL, p->c_locale);
    if (integral) {
        errno = 0;
        v->integer = strtoll(text, NULL, 10); /* digits only: the locale does not matter */
        v->is_int = errno == 0;
    }
    if (text != tmp) free(text);
    return 0;
}

static int parse_value(parser *p, json *v, int depth);

static int parse_container(parser *p, json *v, int depth, int object) {
    if (depth + 1 > MAX_DEPTH) return bad(p, "at most 64 levels of nesting");
    p->i++;
    v->type = object ? JSON_OBJECT : JSON_ARRAY;
    size_t cap = 0;
    skip_ws(p);
    if (p->i < p->n && p->s[p->i] == (object ? '}' : ']')) {
        p->i++;
        return 0;
    }
    for (;;) {
        if (v->count == cap) {
            cap = cap ? 2 * cap : 4;
            json *items = realloc(v->items, cap * sizeof *items);
            if (items) v->items = items;
            char **keys = object ? realloc(v->keys, cap * sizeof *keys) : NULL;
            if (keys) v->keys = keys;
            if (!items || (object && !keys)) return bitrl_fail("%s: out of memory", p->what);
        }
        json *item = &v->items[v->count];
        memset(item, 0, sizeof *item);
        skip_ws(p);
        if (object) {
            v->keys[v->count] = NULL;
            if (p->i >= p->n || p->s[p->i] != '"') return bad(p, "a key string");
            v->count++;
            if (parse_string(p, &v->keys[v->count - 1]) != 0) return -1;
            skip_ws(p);
            if (p->i >= p->n || p->s[p->i] != ':') return bad(p, "':'");
            p->i++;
        } else {
            v->count++;
        }
        if (parse_value(p, item, depth + 1) != 0) return -1;
        skip_ws(p);
        if (p->i < p->n && p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->i < p->n && p->s[p->i] == (object ? '}' : ']')) {
            p->i++;
            return 0;
        }
        return bad(p, object ? "',' or '}'" : "',' or ']'");
    }
}

static int parse_value(parser *p, json *v, int depth) {
    skip_ws(p);
    if (p->i >= p->n) return bad(p, "a value");
    char c = p->s[p->i];
    if (c == '{' || c == '[') return parse_container(p, v, depth, c == '{');
    if (c == '"') {
        v->type = JSON_STRING;
        return parse_string(p, &v->string);
    }
    if (c == '-' || (c >= '0' && c <= '9') || c == 'I') {
        if (c == 'I') {
            if (!literal(p, "Infinity")) return bad(p, "a value");
            v->type = JSON_NUMBER, v->number = INFINITY;
            return 0;
        }
        return parse_number(p, v);
    }
    if (literal(p, "NaN")) v->type = JSON_NUMBER, v->number = NAN;
    else if (literal(p, "true")) v->type = JSON_BOOL, v->boolean = 1;
    else if (literal(p, "false")) v->type = JSON_BOOL, v->boolean = 0;
    else if (literal(p, "null")) v->type = JSON_NULL;
    else return bad(p, "a value");
    return 0;
}

int json_parse(const char *text, size_t n, json *out, const char *what) {
    memset(out, 0, sizeof *out);
    parser p = {text, n, 0, what, newlocale(LC_NUMERIC_MASK, "C", (locale_t)0)};
    if (p.c_locale == (locale_t)0) return bitrl_fail("%s: cannot create the C locale to parse numbers", what);
    int rc = parse_value(&p, out, 0);
    if (rc == 0) {
        skip_ws(&p);
        if (p.i != n) rc = bad(&p, "the end of the text");
    }
    freelocale(p.c_locale);
    if (rc != 0) json_free(out);
    return rc;
}

void json_free(json *v) {
    if (!v) return;
    for (size_t i = 0; i < v->count; i++) {
        json_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->string);
    memset(v, 0, sizeof *v);
}

const json *json_get(const json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (size_t i = obj->count; i-- > 0;) /* the last of duplicate keys, as Python's json */
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

const char *json_str(const json *v) { return v && v->type == JSON_STRING ? v->string : NULL; }

int json_int(const json *v, int64_t *out) {
    if (!v || v->type != JSON_NUMBER || !v->is_int) return -1;
    *out = v->integer;
    return 0;
}
