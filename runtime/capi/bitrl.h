/* bitrl.h: run a compiled policy (policy.bitrl) from C or C++, without Python and without TVM.
 *
 *     bitrl_policy *p = bitrl_load("policy.bitrl");
 *     if (!p) { fprintf(stderr, "%s\n", bitrl_last_error()); return 1; }
 *     float obs[4] = {0.01f, -0.02f, 0.03f, 0.04f};      // bitrl_obs_size(p) floats per observation
 *     int64_t action;                                     // Discrete: one int64_t per observation
 *     if (bitrl_act(p, obs, 1, &action) != 0) fprintf(stderr, "%s\n", bitrl_last_error());
 *     bitrl_free(p);
 *
 * Build an application with `cc app.c $(bitrl-compile capi --cflags --libs)` (host) or
 * `aarch64-linux-gnu-gcc app.c $(bitrl-compile capi --target rasp4 --cflags --libs)` (Raspberry Pi).
 * libbitrl.so needs only libc, libdl, libm, libpthread and zlib; no TVM library, no Python.
 *
 * What bitrl_load does: reads the zip (refusing more than 16 members, members over 2 GiB or 4 GiB in all,
 * and members that inflate more than 100:1, from the zip directory before inflating anything), checks the
 * sha256 of manifest.json (manifest.sha256) and of every member the manifest lists, the signature when trusted
 * keys are configured (bitrl_load_trusted, BITRL_TRUSTED_KEYS), checks that this machine can run the artifact (architecture; the CPU features of its kernels, from /proc/cpuinfo;
 * asks Linux for the AMX state when the kernels use AMX), unpacks the base-3 weights into the kernels'
 * layout once, and opens the compiled kernels (lib.so) in memory. The artifact's "entry_points" (its
 * call plan) say which kernels compute forward / act / sample; observation pre-processing (normalisation,
 * /255, one-hot) and action post-processing (argmax, tanh squash and rescaling, clipping) are kernels
 * of the artifact, so the C API gives the same actions as the Python runtime's `Policy.act`.
 *
 * Errors: functions returning int return 0 on success and -1 on failure; bitrl_load returns NULL on
 * failure. bitrl_last_error() then gives one line that names the problem and the fix. Bad input
 * (NULL pointers, batch <= 0 or above the artifact's limit, a NaN or infinite observation, a corrupt,
 * truncated or tampered file, an artifact for another machine) never aborts the process.
 *
 * Trust: loading an artifact runs native code (its lib.so) compiled by whoever made the file, as loading a
 * shared library does; nothing of it is loaded before every check above has passed. The hashes catch corruption,
 * not an attacker; a signature by a trusted key says who made it. See docs/security.md.
 *
 * Thread safety: a bitrl_policy is immutable after bitrl_load; any number of threads may call
 * bitrl_act / bitrl_forward / bitrl_sample (and their _recurrent forms) on the same policy at once. Each thread gets its own 64-byte
 * aligned buffers for that policy, made on its first call and grown when it calls with a bigger batch
 * (no lock after that). bitrl_free must not run while another thread uses the policy.
 *
 * Layouts: all arrays are C-contiguous, row-major, one row per observation.
 *   obs      float[batch * bitrl_obs_size(p)]   (one-hot policies: one float per observation, the index; image
 *            policies: pixel values, whole numbers in [0, 255], which some artifacts' kernels read as uint8)
 *   out      float[batch * bitrl_output_size(p)]   (bitrl_forward: logits, Q-values, action mean, features)
 *   actions  Discrete (bitrl_is_discrete(p) == 1): int64_t[batch]
 *            Box      (bitrl_is_discrete(p) == 0): float[batch * bitrl_action_size(p)], inside the bounds
 *
 * Dict observations (SB3 MultiInputPolicy; bitrl_input_keys(p) > 0): an observation is still one row of
 * bitrl_obs_size(p) floats, the keys' arrays each flattened (row-major) and concatenated in the manifest's key
 * order (`bitrl-compile inspect` lists them). bitrl_input_key(p, i, &name, &offset, &size) says where key i goes:
 *     for (int64_t i = 0; i < bitrl_input_keys(p); i++) {
 *         const char *name; int64_t offset, size;
 *         bitrl_input_key(p, i, &name, &offset, &size);   // copy key `name` into obs[offset .. offset + size)
 *     }
 * A Discrete(n) key has size 1: its float is the index, a whole number in [0, n) (the calls refuse another
 * value, naming the key); the compiled policy one-hot encodes it.
 */
#ifndef BITRL_H_
#define BITRL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define BITRL_API __attribute__((visibility("default")))
#else
#define BITRL_API
#endif

#define BITRL_VERSION "0.1.0"

typedef struct bitrl_policy bitrl_policy;

/* Load and verify an artifact. Returns NULL on failure (bitrl_last_error() says why). The caller owns the
 * policy and releases it with bitrl_free. When the environment variable BITRL_TRUSTED_KEYS names public keys
 * (colon-separated paths of PEM files), the artifact must be signed by one of them, as with bitrl_load_trusted. */
BITRL_API bitrl_policy *bitrl_load(const char *path);

/* bitrl_load, refusing an artifact that does not carry a valid Ed25519 signature (`bitrl-compile sign`) by one of
 * the trusted public keys: the PEM files key_paths[0 .. n_keys) (NAME.pub of `bitrl-compile keygen`) and those of
 * BITRL_TRUSTED_KEYS. With no key at all (n_keys 0, the variable unset) it is bitrl_load. The signature is checked
 * with OpenSSL's libcrypto (libcrypto.so.3, Debian's libssl3), opened only when keys are configured; without it
 * the load fails with one line saying so. Returns NULL on failure (bitrl_last_error() says why). */
BITRL_API bitrl_policy *bitrl_load_trusted(const char *path, const char *const *key_paths, size_t n_keys);

/* The last error of the calling thread, one line (never NULL; "" if there was none). Valid until the
 * thread's next call into this library. */
BITRL_API const char *bitrl_last_error(void);

/* The library's version, e.g. "0.1.0". */
BITRL_API const char *bitrl_version(void);

/* Floats per observation (the product of the observation shape; 1 for one-hot observations). -1 if p is NULL. */
BITRL_API int64_t bitrl_obs_size(const bitrl_policy *p);

/* Floats per row of bitrl_forward's output. -1 if p is NULL. */
BITRL_API int64_t bitrl_output_size(const bitrl_policy *p);

/* Action values per observation: 1 for Discrete, the product of the Box shape for Box; 0 for a backbone
 * (output kind "features", which has no actions). -1 if p is NULL. */
BITRL_API int64_t bitrl_action_size(const bitrl_policy *p);

/* 1 if actions are Discrete (int64_t), 0 if Box (float) or a backbone; -1 if p is NULL. */
BITRL_API int bitrl_is_discrete(const bitrl_policy *p);

/* The largest batch a call accepts (the manifest's batch limit). -1 if p is NULL. */
BITRL_API int64_t bitrl_max_batch(const bitrl_policy *p);

/* Deterministic actions for `batch` observations: int64_t[batch] (Discrete) or float[batch*action_size]
 * (Box) into `actions`. Returns 0, or -1 with bitrl_last_error(). */
BITRL_API int bitrl_act(bitrl_policy *p, const float *obs, int64_t batch, void *actions);

/* The network's raw output for `batch` observations: float[batch * bitrl_output_size(p)] into `out`.
 * Returns 0, or -1 with bitrl_last_error(). */
BITRL_API int bitrl_forward(bitrl_policy *p, const float *obs, int64_t batch, float *out);

/* Stochastic actions from caller-supplied noise, for policies that sample (bitrl_has_sample(p) == 1):
 * noise is float[batch] uniform in [0, 1) for Discrete, float[batch * action_size] standard normal for Box.
 * Returns 0, or -1 with bitrl_last_error(). */
BITRL_API int bitrl_sample(bitrl_policy *p, const float *obs, const float *noise, int64_t batch, void *actions);

/* A recurrent policy's state (manifest input "recurrent": sb3-contrib RecurrentPPO's LSTM): float values per
 * row, h of every LSTM layer then c; 0 for other policies; -1 if p is NULL. bitrl_act/bitrl_forward/bitrl_sample
 * refuse a recurrent policy: call the _recurrent functions. */
BITRL_API int64_t bitrl_state_size(const bitrl_policy *p);

/* One step of a recurrent policy for `batch` environments: obs float[batch * obs_size], state
 * float[batch * state_size] (zeros at the start, then the next_state the previous step wrote), episode_start
 * float[batch] (1 where an episode begins: that row's state is reset first, as SB3 does). Writes the actions
 * as bitrl_act does and next_state float[batch * state_size], which may be `state` itself. Returns 0, or -1
 * with bitrl_last_error(). */
BITRL_API int bitrl_act_recurrent(bitrl_policy *p, const float *obs, const float *state, const float *episode_start,
                                  int64_t batch, void *actions, float *next_state);

/* The raw output (as bitrl_forward) and next state of one recurrent step; arguments as bitrl_act_recurrent. */
BITRL_API int bitrl_forward_recurrent(bitrl_policy *p, const float *obs, const float *state,
                                      const float *episode_start, int64_t batch, float *out, float *next_state);

/* Stochastic actions and the next state of one recurrent step, from caller-supplied noise (as bitrl_sample's:
 * float[batch] uniform in [0, 1) for Discrete, float[batch * action_size] standard normal for Box), for recurrent
 * policies that sample (bitrl_has_sample(p) == 1); the other arguments as bitrl_act_recurrent. The same actions
 * and next state as the Python runtime's `policy.act(obs, state, episode_start, deterministic=False)` given that
 * noise. Returns 0, or -1 with bitrl_last_error() (a policy that is not recurrent, or has no "sample" entry
 * point, is refused). */
BITRL_API int bitrl_sample_recurrent(bitrl_policy *p, const float *obs, const float *state, const float *episode_start,
                                     const float *noise, int64_t batch, void *actions, float *next_state);

/* 1 if the artifact has a "sample" entry point (bitrl_sample or bitrl_sample_recurrent works), 0 if not, -1 if p
 * is NULL. */
BITRL_API int bitrl_has_sample(const bitrl_policy *p);

/* The keys of a Dict observation (manifest input kind "dict"): their number, 0 when the observation is one
 * array; -1 if p is NULL. */
BITRL_API int64_t bitrl_input_keys(const bitrl_policy *p);

/* Key i (0 <= i < bitrl_input_keys(p)) of a Dict observation: its name (owned by p, valid until bitrl_free), and
 * the offset and number of its floats within one observation's row. name, offset and size may each be NULL.
 * Returns 0, or -1 with bitrl_last_error(). */
BITRL_API int bitrl_input_key(const bitrl_policy *p, int64_t i, const char **name, int64_t *offset, int64_t *size);

/* Release the policy: its buffers, the buffers of every thread that called it, and the kernels'
 * library mapping. NULL is ignored. No other thread may be using p. */
BITRL_API void bitrl_free(bitrl_policy *p);

#ifdef __cplusplus
}
#endif

#endif /* BITRL_H_ */
