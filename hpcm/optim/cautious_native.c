/* Cautious Adam update of one float32 bucket, fused (CPU), see cautious_native.py.
 *
 * Parameters, gradients and moments are passed as one pointer per tensor (contiguous float32).
 * Every element goes through the same IEEE float operations, in the same order, as the torch ops
 * of cautious_adam.single_tensor_update (the definition):
 *   m.mul_(b1).add_(g, alpha=1-b1)          -> fmaf(g, 1-b1, m*b1)   (ATen's add with alpha is a fused multiply-add)
 *   v.mul_(b2).addcmul_(g, g, value=1-b2)   -> fmaf((1-b2)*g, g, v*b2)
 *   phi = 1[g*m > 0], s = min(1 / max(count/numel, floor), cap)   (count is exact)
 *   p.mul_(decay); p.add_(((phi*s)*m) / (sqrt(v)/c2 + eps), alpha=-step_size)
 * The square root must be torch's: its CPU sqrt is MKL's vsSqrt where torch is built with MKL
 * (not always the correctly rounded result), so the caller passes that function (or NULL for the
 * correctly rounded sqrtf, where torch's sqrt is that) after checking it on a probe. Build with
 * -ffp-contract=off: only the fmaf calls written here may fuse.
 *
 * Per tensor, the moment pass and the update pass run back to back, so a tensor that fits in
 * the cache is read from memory once.
 */
#include <math.h>
#include <stdint.h>

typedef void (*sqrt_fn)(int n, const float *in, float *out);  /* MKL vsSqrt's signature (LP64) */

enum { CHUNK = 2048 };

static void sqrt_chunk(sqrt_fn fn, int n, const float *in, float *out)
{
    if (fn) {
        fn(n, in, out);
    } else {
        for (int k = 0; k < n; k++)
            out[k] = sqrtf(in[k]);
    }
}

/* out = sqrt(in) as the kernel computes it: lets the caller compare with torch.sqrt. */
void cautious_sqrt(sqrt_fn fn, int64_t n, const float *in, float *out)
{
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int len = (int)(n - start < CHUNK ? n - start : CHUNK);
        sqrt_chunk(fn, len, in + start, out + start);
    }
}

/* torch.maximum: NaN propagates. */
static float maximum(float a, float b)
{
    return (a != a || b != b) ? a + b : (a > b ? a : b);
}

void cautious_step(int64_t n_tensors, const int64_t *numels, const float *const *grads,
                   float *const *params, float *const *exp_avgs, float *const *exp_avg_sqs,
                   float *const *max_exp_avg_sqs,
                   float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                   int cautious, float mask_mean_floor, float mask_scale_cap,
                   float decay, int apply_decay, float bias_correction2_sqrt, float eps,
                   float neg_step_size, sqrt_fn sqrt_function)
{
    float root[CHUNK];
    for (int64_t t = 0; t < n_tensors; t++) {
        const int64_t n = numels[t];
        const float *g = grads[t];
        float *p = params[t], *m = exp_avgs[t], *v = exp_avg_sqs[t];
        float *second = max_exp_avg_sqs ? max_exp_avg_sqs[t] : v;

        int64_t agree = 0;
        for (int64_t k = 0; k < n; k++) {
            const float gk = g[k];
            const float mk = fmaf(gk, one_minus_beta1, m[k] * beta1);
            m[k] = mk;
            v[k] = fmaf(one_minus_beta2 * gk, gk, v[k] * beta2);
            agree += (gk * mk) > 0.0f;
        }
        if (max_exp_avg_sqs)
            for (int64_t k = 0; k < n; k++)
                second[k] = maximum(second[k], v[k]);

        float s = 1.0f;
        if (cautious) {
            float mean = (float)agree / (float)n;
            mean = mean < mask_mean_floor ? mask_mean_floor : mean;
            s = 1.0f / mean;
            s = s > mask_scale_cap ? mask_scale_cap : s;
        }

        for (int64_t start = 0; start < n; start += CHUNK) {
            const int len = (int)(n - start < CHUNK ? n - start : CHUNK);
            sqrt_chunk(sqrt_function, len, second + start, root);
            const float *gc = g + start, *mc = m + start;
            float *pc = p + start;
            for (int k = 0; k < len; k++) {
                const float mk = mc[k];
                float direction = mk;
                if (cautious)
                    direction = (((gc[k] * mk) > 0.0f) ? s : 0.0f) * mk;
                const float denom = root[k] / bias_correction2_sqrt + eps;
                const float pk = apply_decay ? pc[k] * decay : pc[k];
                pc[k] = fmaf(direction / denom, neg_step_size, pk);
            }
        }
    }
}
