/*
 * Guest instruction counts for `bitrl-compile bench` on aarch64 targets: a qemu-user TCG plugin.
 *
 * Built by bitrl_compile.bench with the host C compiler (gcc -shared -fPIC) and loaded with
 *     QEMU_PLUGIN=file=libbitrl_insn.so,out=COUNTS.txt qemu-aarch64 ...
 * Debian 12's qemu-user (7.2) supports plugins (plugin API version 1) but ships none, and no
 * header: the few API functions used here are declared below, as QEMU 7.2 exports them.
 *
 * Every translated block (TB) gets a record {guest address, instructions, executions}; an inline
 * add (no helper call) bumps its execution count each time the block runs. The guest talks to the
 * plugin through a system call number that Linux does not use (qemu answers it with ENOSYS):
 *     syscall(0xB17, 1, lo, hi)     register the address range [lo, hi) (a library's code)
 *     syscall(0xB17, 2, label, 0)   append "label total n_0 n_1 ..." to COUNTS.txt: instructions
 *                                    executed so far, in all and inside each registered range
 * Counts are of instructions in blocks entered; a block left early by a fault counts whole.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;
struct qemu_plugin_tb;
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                             uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op, void *ptr,
                                              uint64_t imm);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
uint64_t qemu_plugin_tb_vaddr(const struct qemu_plugin_tb *tb);

#define EXPORT __attribute__((visibility("default")))
EXPORT int qemu_plugin_version = 1;

#define MARKER 0xB17
#define MAX_RANGES 16
#define CHUNK 65536

struct block { uint64_t vaddr, n_insns, executions; };
struct chunk { struct chunk *next; size_t used; struct block blocks[CHUNK]; };

static struct chunk *chunks;  /* never moved: the inline adds hold pointers into them */
static uint64_t range_lo[MAX_RANGES], range_hi[MAX_RANGES];
static int n_ranges;
static FILE *out;

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    if (!chunks || chunks->used == CHUNK) {
        struct chunk *c = calloc(1, sizeof(*c));
        if (!c) return;
        c->next = chunks;
        chunks = c;
    }
    struct block *b = &chunks->blocks[chunks->used++];
    b->vaddr = qemu_plugin_tb_vaddr(tb);
    b->n_insns = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &b->executions, 1);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    if (num != MARKER) return;
    if (a1 == 1 && n_ranges < MAX_RANGES) {
        range_lo[n_ranges] = a2;
        range_hi[n_ranges++] = a3;
    } else if (a1 == 2) {
        uint64_t total = 0, in_range[MAX_RANGES] = {0};
        for (struct chunk *c = chunks; c; c = c->next)
            for (size_t i = 0; i < c->used; i++) {
                uint64_t insns = c->blocks[i].n_insns * c->blocks[i].executions;
                total += insns;
                for (int r = 0; r < n_ranges; r++)
                    if (c->blocks[i].vaddr >= range_lo[r] && c->blocks[i].vaddr < range_hi[r])
                        in_range[r] += insns;
            }
        fprintf(out, "%llu %llu", (unsigned long long)a2, (unsigned long long)total);
        for (int r = 0; r < n_ranges; r++) fprintf(out, " %llu", (unsigned long long)in_range[r]);
        fputc('\n', out);
        fflush(out);
    }
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "out=", 4) == 0) out = fopen(argv[i] + 4, "w");
    if (!out) {
        fprintf(stderr, "libbitrl_insn: give an output file: -plugin file=...,out=PATH\n");
        return 1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    return 0;
}
