/* A zip reader for artifacts held in memory: the central directory, then each member STORED or DEFLATE
 * (zlib's inflate), its CRC-32 and size checked. No zip64, no encryption: an artifact never needs them.
 * Every offset is bounds-checked, so a truncated or corrupt file is an error, never a crash. The directory's
 * declared sizes are checked against the limits of internal.h (members, sizes, compression ratio: zip bombs)
 * when the zip is opened, before anything is inflated; inflating never writes past the declared size. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "internal.h"

static uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t u32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static int corrupt(const char *what, const char *detail) {
    return bitrl_fail("%s: not a policy.bitrl artifact (not a zip, or truncated: %s); recompile it with "
                      "`bitrl-compile MODEL -o FILE`", what, detail);
}

/* The limits on one directory entry (the last one added to z), before anything is read; *total sums sizes. */
static int check_entry(const bitrl_zip *z, const bitrl_zip_entry *en, uint64_t *total, const char *what) {
    for (size_t i = 0; i + 1 < z->count; i++)
        if (strcmp(z->entries[i].name, en->name) == 0)
            return bitrl_fail("%s: the zip holds member %.80s twice (a reader would pick one at random); recompile "
                              "the artifact", what, en->name);
    if (strlen(en->name) == 0 || strlen(en->name) > 255)
        return corrupt(what, "a member name that is empty or too long");
    if (en->method != 0 && en->method != 8)
        return bitrl_fail("%s: member %.80s uses zip compression method %u (expected STORED or DEFLATE); recompile "
                          "the artifact", what, en->name, en->method);
    if (en->usize > BITRL_MAX_MEMBER)
        return bitrl_fail("%s: member %.80s declares %u bytes, more than the limit of %llu; not a policy.bitrl "
                          "artifact (or corrupt), recompile the artifact", what, en->name, en->usize,
                          (unsigned long long)BITRL_MAX_MEMBER);
    if (en->method == 0 && en->csize != en->usize)
        return bitrl_fail("%s: member %.80s is corrupt (stored sizes differ); recompile the artifact", what, en->name);
    if (en->usize > BITRL_RATIO_FROM && (uint64_t)en->usize > (uint64_t)BITRL_MAX_RATIO * (en->csize ? en->csize : 1))
        return bitrl_fail("%s: member %.80s would inflate %u bytes to %u (more than %d:1, a zip bomb); not a "
                          "policy.bitrl artifact, recompile the artifact", what, en->name, en->csize, en->usize,
                          BITRL_MAX_RATIO);
    *total += en->usize;
    if (*total > BITRL_MAX_TOTAL)
        return bitrl_fail("%s: its members declare more than the limit of %llu bytes in all; recompile the artifact",
                          what, (unsigned long long)BITRL_MAX_TOTAL);
    return 0;
}

int bitrl_zip_open(bitrl_zip *z, const uint8_t *data, size_t size, const char *what) {
    uint64_t total = 0;
    memset(z, 0, sizeof *z);
    z->data = data;
    z->size = size;
    if (size < 22) return corrupt(what, "shorter than a zip's end record");
    size_t lowest = size > 22 + 65535 ? size - 22 - 65535 : 0, eocd = SIZE_MAX;
    for (size_t i = size - 22 + 1; i-- > lowest;) {
        if (u32(data + i) == 0x06054b50 && i + 22 + u16(data + i + 20) == size) {
            eocd = i;
            break;
        }
    }
    if (eocd == SIZE_MAX) return corrupt(what, "no end of central directory");
    const uint8_t *e = data + eocd;
    uint16_t entries = u16(e + 10);
    uint32_t cd_size = u32(e + 12), cd_offset = u32(e + 16);
    if (u16(e + 4) != 0 || u16(e + 6) != 0 || entries != u16(e + 8))
        return corrupt(what, "a multi-part zip");
    if (entries == 0xffff || cd_size == 0xffffffffu || cd_offset == 0xffffffffu)
        return corrupt(what, "zip64, which artifacts never use");
    if ((uint64_t)cd_offset + cd_size > eocd) return corrupt(what, "central directory outside the file");
    if (entries > BITRL_MAX_MEMBERS)
        return bitrl_fail("%s: the zip has %u members, more than an artifact's %d; not a policy.bitrl artifact, "
                          "recompile the artifact", what, entries, BITRL_MAX_MEMBERS);
    z->entries = calloc(entries ? entries : 1, sizeof *z->entries);
    if (!z->entries) return bitrl_fail("%s: out of memory reading the zip directory", what);
    size_t pos = cd_offset, end = (size_t)cd_offset + cd_size;
    for (uint16_t i = 0; i < entries; i++) {
        if (pos + 46 > end || u32(data + pos) != 0x02014b50) {
            bitrl_zip_close(z);
            return corrupt(what, "bad central directory entry");
        }
        const uint8_t *c = data + pos;
        size_t name_len = u16(c + 28), extra = u16(c + 30), comment = u16(c + 32);
        if (pos + 46 + name_len + extra + comment > end) {
            bitrl_zip_close(z);
            return corrupt(what, "central directory entry past its end");
        }
        bitrl_zip_entry *en = &z->entries[z->count++];
        en->flags = u16(c + 8);
        en->method = u16(c + 10);
        en->crc = u32(c + 16);
        en->csize = u32(c + 20);
        en->usize = u32(c + 24);
        en->offset = u32(c + 42);
        en->name = malloc(name_len + 1);
        if (!en->name) {
            bitrl_zip_close(z);
            return bitrl_fail("%s: out of memory reading the zip directory", what);
        }
        memcpy(en->name, c + 46, name_len);
        en->name[name_len] = 0;
        pos += 46 + name_len + extra + comment;
        if (check_entry(z, en, &total, what) != 0) {
            bitrl_zip_close(z);
            return -1;
        }
    }
    return 0;
}

const bitrl_zip_entry *bitrl_zip_find(const bitrl_zip *z, const char *name) {
    for (size_t i = 0; i < z->count; i++)
        if (strcmp(z->entries[i].name, name) == 0) return &z->entries[i];
    return NULL;
}

int bitrl_zip_read(const bitrl_zip *z, const bitrl_zip_entry *e, uint8_t **out, size_t *n, const char *what) {
    *out = NULL;
    *n = 0;
    if (e->flags & 1) return bitrl_fail("%s: member %s is encrypted; recompile the artifact", what, e->name);
    if (e->usize > BITRL_MAX_MEMBER) /* bitrl_zip_open refused it already */
        return bitrl_fail("%s: member %s is corrupt (size %u); recompile the artifact", what, e->name, e->usize);
    size_t at = e->offset;
    if ((uint64_t)at + 30 > z->size || u32(z->data + at) != 0x04034b50)
        return bitrl_fail("%s: member %s is corrupt (bad local header); recompile the artifact", what, e->name);
    size_t start = at + 30 + u16(z->data + at + 26) + u16(z->data + at + 28);
    if ((uint64_t)start + e->csize > z->size)
        return bitrl_fail("%s: member %s is truncated; the file is incomplete, recompile it", what, e->name);
    uint8_t *buf = malloc(e->usize ? e->usize : 1);
    if (!buf) return bitrl_fail("%s: out of memory reading member %s", what, e->name);
    const uint8_t *src = z->data + start;
    if (e->method == 0) {
        if (e->csize != e->usize) {
            free(buf);
            return bitrl_fail("%s: member %s is corrupt (stored sizes differ); recompile the artifact", what, e->name);
        }
        memcpy(buf, src, e->usize);
    } else if (e->method == 8) {
        z_stream s;
        memset(&s, 0, sizeof s);
        if (inflateInit2(&s, -15) != Z_OK) {
            free(buf);
            return bitrl_fail("%s: zlib cannot start inflating member %s", what, e->name);
        }
        s.next_in = (Bytef *)src;
        s.avail_in = e->csize;
        s.next_out = buf;
        s.avail_out = e->usize;
        int rc = inflate(&s, Z_FINISH);
        uLong produced = s.total_out;
        inflateEnd(&s);
        if (rc != Z_STREAM_END || produced != e->usize) {
            free(buf);
            return bitrl_fail("%s: member %s is corrupt (%s); recompile the artifact", what, e->name,
                              rc == Z_DATA_ERROR ? "bad DEFLATE data" : "wrong size");
        }
    } else {
        free(buf);
        return bitrl_fail("%s: member %s uses zip compression method %u (expected STORED or DEFLATE); "
                          "recompile the artifact", what, e->name, e->method);
    }
    if ((uint32_t)crc32(0L, buf, e->usize) != e->crc) {
        free(buf);
        return bitrl_fail("%s: member %s fails its CRC-32 check (corrupt); recompile the artifact", what, e->name);
    }
    *out = buf;
    *n = e->usize;
    return 0;
}

void bitrl_zip_close(bitrl_zip *z) {
    for (size_t i = 0; i < z->count; i++) free(z->entries[i].name);
    free(z->entries);
    memset(z, 0, sizeof *z);
}
