/* The engine's fused step: its per-key work in C loops over the keys (streamlstm/fused.py).
 *
 * Each loop walks the state rows of B distinct keys once, in place in the table (no
 * gather, no scatter). fused_before and fused_after do what streamlstm/engine.py's plain
 * path does with ~40 tensor operations: the same formulas, in float32, in the same order
 * of operations (no contraction into FMAs: built with -ffp-contract=off), NaN propagating
 * like torch's clamp/maximum/amax. fused_lstm_cell is the LSTM cell after the gates'
 * matrix product, with a vectorised exponential (within float32 rounding of torch's).
 * The layout's column offsets and the settings come in two arrays (COL_* and PRM_*
 * below, filled by fused.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

enum { COL_MEAN, COL_VAR, COL_FORECASTERS, COL_STEP, COL_HEDGE, COL_SCALES, COL_SVAR,
       COL_COUNT, COL_HAS_PENDING, COL_ERR_MEAN, COL_ERR_COUNT, COL_ERR_PEAK,
       COL_ERR_SINCE, COL_ERR_GAP, COL_ERR_REPEATS, COL_PH,
       COL_RECURRENT, COL_HALVES /* the state's first column; its columns of float16 pairs */ };
enum { PRM_CLIP, PRM_WINDOW, PRM_SHORT_ALPHA, PRM_LONG_ALPHA, PRM_MIN_EVENTS, PRM_MAX_STEP,
       PRM_LEVEL, PRM_DRIFT, PRM_PH_DELTA, PRM_PH_THRESHOLD, PRM_PH_ALPHA, PRM_PH_MIN,
       PRM_PH_MODE,
       /* the modules' own constants, so Python stays their one owner (fused.py fills them) */
       PRM_ETA, PRM_LOSS_FLOOR, PRM_DISCOUNT, PRM_LOSS_CLIP, PRM_SCALE0, PRM_SCALE1,
       PRM_SCALE2, PRM_VAR_FLOOR, PRM_EVIDENCE_SCALE, PRM_MAX_VALUE_Z, PRM_TESTS };

#define K 3 /* forecasters: network, persistence, ewma (combine.EXPERTS) */
#define S 3 /* anomaly time scales (anomaly.SCALES) */

static float nmax(float a, float b) { return (a != a || b != b) ? NAN : (a > b ? a : b); }
static float nmin(float a, float b) { return (a != a || b != b) ? NAN : (a < b ? a : b); }
static float cmax(float v, float hi) { return v > hi ? hi : v; } /* clamp(max=): NaN stays */
static float cmin(float v, float lo) { return v < lo ? lo : v; } /* clamp(min=): NaN stays */

/* Keys ahead of the one in hand whose rows are fetched into cache: a batch's keys are
 * spread over a table far larger than the caches, in an order the CPU's own prefetcher
 * cannot guess, so each row would otherwise cost a wait on memory. */
#ifndef AHEAD
#define AHEAD 8
#endif

/* Fetch bytes [from, to) of a row (to be written). */
static inline void prefetch(const float *row, int64_t from, int64_t to) {
    const char *base = (const char *)row;
    for (int64_t at = from; at < to; at += 64) __builtin_prefetch(base + at, 1);
    if (to > from) __builtin_prefetch(base + to - 1, 1);
}

/* A recurrent state stored as float16 (state.recurrent_dtype): converted exactly to
 * float32 when read, rounded to nearest even (as torch's conversion) when written. The
 * compiler does not vectorise these conversions: F16C's do 8 at once where the CPU has it. */
typedef _Float16 half;

static void from_half(const half *src, float *dst, int64_t m) {
    int64_t j = 0;
#ifdef __F16C__
    for (; j + 8 <= m; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
#endif
    for (; j < m; j++) dst[j] = (float)src[j];
}

static void to_half(const float *src, half *dst, int64_t m) {
    int64_t j = 0;
#ifdef __F16C__
    for (; j + 8 <= m; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < m; j++) dst[j] = (half)src[j];
}

static float std_of(float var, float mean) {
    return sqrtf(var + 1e-14f * mean * mean + 1e-30f);
}

/* -log10 of the upper normal tail beyond z (anomaly._decades), computed in double. */
static float decades(float z) {
    double y = -(double)z, t = y * 0.70710678118654752440, lg;
    if (z != z) return NAN;
    if (y < -1.0) {
        double u = -t;
        if (u < 25.0) {
            lg = log(erfc(u) / 2.0);
        } else { /* erfc underflows: its asymptotic series, log(erfcx(u) / 2) - u^2 */
            double v = 1.0 / (2.0 * u * u);
            double erfcx = (1.0 - v * (1.0 - 3.0 * v * (1.0 - 5.0 * v))) / (u * 1.7724538509055160273);
            lg = log(erfcx / 2.0) - u * u;
        }
    } else {
        lg = log1p(-erfc(t) / 2.0);
    }
    return (float)(-lg / 2.302585092994045684);
}

/* The combined forecast (combine.mix) of one key: hedge and fc are [K, f], one weight per
 * forecaster and value. */
static void mix(const double *prm, const float *hedge, const float *fc, int64_t f, float *out) {
    float eta = (float)prm[PRM_ETA], floor_ = (float)prm[PRM_LOSS_FLOOR];
    for (int64_t j = 0; j < f; j++) {
        float h0 = hedge[j], h1 = hedge[f + j], h2 = hedge[2 * f + j];
        float best = nmin(nmin(h0, h1), h2), logit[K], top, w[K], sum = 0.0f, acc;
        logit[0] = -eta * (h0 - best) / (best + floor_);
        logit[1] = -eta * (h1 - best) / (best + floor_);
        logit[2] = -eta * (h2 - best) / (best + floor_);
        top = nmax(nmax(logit[0], logit[1]), logit[2]);
        for (int k = 0; k < K; k++) sum += (w[k] = expf(logit[k] - top));
        for (int k = 0; k < K; k++) w[k] = w[k] / sum;
        acc = w[0] * fc[j];
        for (int k = 1; k < K; k++) acc += w[k] * fc[k * f + j];
        out[j] = acc;
    }
}

/* Fold the forecasters' errors on truth into the discounted losses (combine.learn), per
 * forecaster and value. */
static void learn(const double *prm, float *hedge, const float *fc, const float *truth,
                  const float *std, int64_t f) {
    float discount = (float)prm[PRM_DISCOUNT], clip = (float)prm[PRM_LOSS_CLIP];
    for (int k = 0; k < K; k++) {
        for (int64_t j = 0; j < f; j++) {
            float e = (fc[k * f + j] - truth[j]) / std[j];
            hedge[k * f + j] = discount * hedge[k * f + j] + cmax(e * e, clip);
        }
    }
}

/* anomaly._incidents: hold back fresh evidence of an incident already reported (within
 * the span after its start, unless more than twice the decayed peak p) or one that starts
 * on the key's rhythm (as many events after the last start as that one after the one
 * before, and no more than twice p). Starts need anomaly.start_level: log10(1/long_alpha). */
static float incidents(float *row, const int64_t *col, const double *prm, float fresh,
                       float peak) {
    float *since = row + col[COL_ERR_SINCE], *gap = row + col[COL_ERR_GAP];
    float span = (float)(1.0 / (prm[PRM_SHORT_ALPHA] * (double)(float)prm[PRM_SCALE0 + S - 1]));
    float level = (float)log10(1.0 / prm[PRM_LONG_ALPHA]);
    int counting = row[col[COL_ERR_COUNT]] >= (float)prm[PRM_MIN_EVENTS];
    float next = *since + 1.0f;
    int start = fresh > level && next >= span && counting;
    int on_time = start && fresh <= peak && *gap != 0.0f && fabsf(next - fabsf(*gap)) <= span;
    int within = fresh > 0.0f && next < span && *gap != 0.0f;
    int held = on_time || (within && (*gap < 0.0f || fresh <= peak));
    if (start) {
        *gap = on_time ? -next : next;
        *since = 0.0f;
    } else if (counting) {
        *since = next;
    }
    return held ? 0.0f : fresh;
}

/* anomaly._repeat_evidence: decades of the run of repeats of the key's last values that
 * this event starts or continues, each step by the counts before it; then counts it. */
static float repeat_evidence(float *row, const int64_t *col, const double *prm, int repeat) {
    float *seen = row + col[COL_ERR_REPEATS], *followed = seen + 1, *again = seen + 2;
    float *run = seen + 3, count = row[col[COL_ERR_COUNT]];
    float window = (float)(1.0 / prm[PRM_LONG_ALPHA]), d = 0.0f;
    float first = (*seen + 1.0f) / ((count > window ? window : count) + 2.0f);
    float more = (*again + 1.0f) / (*followed + 2.0f);
    float keep = count + 1.0f > window ? (float)(1.0 - prm[PRM_LONG_ALPHA]) : 1.0f;
    int after = *run > 0.0f;
    if (repeat) d = *run - log10f(after ? more : first);
    *seen = *seen * keep + (float)repeat;
    *followed = *followed * keep + (float)after;
    *again = *again * keep + (float)(after && repeat);
    *run = d;
    return d;
}

/* anomaly.update for one key: score error (std units) and fold it into the statistics. */
static float anomaly(float *row, const int64_t *col, const double *prm, float error, float value_z,
                     int repeat) {
    float *shrt = row + col[COL_SCALES], *svar = row + col[COL_SVAR];
    float *mean = row + col[COL_ERR_MEAN], *count = row + col[COL_ERR_COUNT];
    float *peak = row + col[COL_ERR_PEAK], by_scale = -INFINITY, z, by_value, d, p, fresh, a;
    float clip = (float)prm[PRM_CLIP], reach = -INFINITY; /* anomaly._reachable */
    float short_alpha = (float)prm[PRM_SHORT_ALPHA], long_alpha = (float)prm[PRM_LONG_ALPHA];
    int first = *count == 0.0f;
    z = cmax(value_z, (float)prm[PRM_MAX_VALUE_Z]);
    for (int s = 0; s < S; s++) {
        /* the fastest scale: an error only as far as the value is from its mean; the
         * middle one: at least as far as the value is (at most the clip) */
        float alpha = short_alpha * (float)prm[PRM_SCALE0 + s];
        float e = s == 0 ? nmin(error, value_z) : s == 1 ? nmax(error, cmax(z, clip)) : error;
        shrt[s] = first ? e : shrt[s] + alpha * (e - shrt[s]);
        float spread = sqrtf(svar[s] + (float)prm[PRM_VAR_FLOOR]);
        by_scale = nmax(by_scale, decades((shrt[s] - *mean) / spread));
        reach = nmax(reach, decades((clip - *mean) / spread));
    }
    by_value = nmax(log10f(1.0f + z * z), repeat_evidence(row, col, prm, repeat));
    d = cmin(nmax(by_scale, by_value) - (float)prm[PRM_TESTS], 0.0f);
    if (!(*count >= (float)prm[PRM_MIN_EVENTS])) d = 0.0f;
    reach = nmax(reach, (float)log10(1.0 + prm[PRM_MAX_VALUE_Z] * prm[PRM_MAX_VALUE_Z]));
    p = nmin(*peak * (float)(1.0 - prm[PRM_LONG_ALPHA]), reach - (float)prm[PRM_TESTS]);
    fresh = cmin(d - p, 0.0f);
    fresh = incidents(row, col, prm, fresh, p);
    *peak = nmax(p, d);
    a = 1.0f / (*count + 1.0f);
    a = a < long_alpha ? long_alpha : a;
    *mean += a * (error - *mean);
    for (int s = 0; s < S; s++) {
        float dev = shrt[s] - *mean;
        svar[s] = (1.0f - a) * svar[s] + a * dev * dev;
    }
    *count += 1.0f;
    return fresh / (fresh + (float)prm[PRM_EVIDENCE_SCALE]);
}

/* Before the network: score the pending forecasts, update forecasters and scaler, and
 * write the network's input. Outputs per key: xin [n, xin_stride] (clipped input in its
 * first f columns, then the first layer's hidden state), raw and change [n, f], std
 * [n, f], err/sq/std_err/score [n]. */
void fused_before(int64_t n, float *table, int64_t w, const int64_t *slots, const int64_t *col,
                  const double *prm,
                  const float *x, int64_t f, float *xin, int64_t xin_stride, float *raw,
                  float *change, float *std, float *err, float *sq, float *std_err, float *score) {
    float clip = (float)prm[PRM_CLIP], window = (float)prm[PRM_WINDOW];
    float pending[f], std_before[f];
    int64_t hid = xin_stride - f;
    for (int64_t i = 0; i < n; i++) {
        if (AHEAD && i + AHEAD < n) prefetch(table + slots[i + AHEAD] * w, 0, 4 * w);
        float *row = table + slots[i] * w, *mean = row + col[COL_MEAN], *var = row + col[COL_VAR];
        float *fc = row + col[COL_FORECASTERS], *last = fc + f, *ewma = fc + 2 * f;
        float *hedge = row + col[COL_HEDGE], *count = row + col[COL_COUNT];
        float *has_pending = row + col[COL_HAS_PENDING];
        const float *xi = x + i * f;
        float abs_sum = 0.0f, sq_sum = 0.0f, se_sum = 0.0f, value_z = -INFINITY, alpha;
        int is_pending = *has_pending > 0.0f, seen = *count > 0.0f;
        mix(prm, hedge, fc, f, pending);
        for (int64_t j = 0; j < f; j++) {
            float diff = xi[j] - pending[j], ad = fabsf(diff);
            std_before[j] = std_of(var[j], mean[j]);
            abs_sum += ad;
            sq_sum += diff * diff;
            se_sum += cmax(ad / std_before[j], clip);
        }
        err[i] = is_pending ? abs_sum / (float)f : NAN;
        sq[i] = is_pending ? sq_sum / (float)f : NAN;
        std_err[i] = se_sum / (float)f;
        if (is_pending) learn(prm, hedge, fc, xi, std_before, f);
        for (int64_t j = 0; j < f; j++)
            value_z = nmax(value_z, fabsf(xi[j] - mean[j]) / std_before[j]);
        if (!seen) value_z = 0.0f;
        int repeat = seen; /* exactly the key's last values: a stuck feed? */
        for (int64_t j = 0; j < f; j++) repeat = repeat && xi[j] == last[j];
        score[i] = is_pending ? anomaly(row, col, prm, std_err[i], value_z, repeat) : 0.0f;
        for (int64_t j = 0; j < f; j++) {
            float moved = xi[j] - last[j];
            change[i * f + j] = seen ? moved / std_before[j] : 0.0f;
            if (col[COL_STEP] >= 0) {
                float *step = row + col[COL_STEP], limit = *count < 1.0f ? 1.0f : *count;
                float rate = (float)seen / (limit > 100.0f ? 100.0f : limit);
                step[j] += rate * (fabsf(moved) - step[j]);
            }
            last[j] = xi[j];
            ewma[j] = seen ? ewma[j] + 0.5f * (xi[j] - ewma[j]) : xi[j];
        }
        *count += 1.0f;
        alpha = 1.0f / (*count > window ? window : *count);
        for (int64_t j = 0; j < f; j++) {
            float delta = xi[j] - mean[j], r;
            mean[j] += alpha * delta;
            var[j] = (1.0f - alpha) * (var[j] + alpha * delta * delta);
            std[i * f + j] = std_of(var[j], mean[j]);
            r = prm[PRM_LEVEL] != 0.0 ? (xi[j] - mean[j]) / std[i * f + j] : change[i * f + j];
            raw[i * f + j] = r;
            xin[i * xin_stride + j] = r < -clip ? -clip : (r > clip ? clip : r);
        }
        if (col[COL_HALVES]) /* (layer 0, hidden) comes first in the state */
            from_half((const half *)(row + col[COL_RECURRENT]), xin + i * xin_stride + f, hid);
        else
            memcpy(xin + i * xin_stride + f, row + col[COL_RECURRENT], hid * sizeof(float));
    }
}

/* Whether any of a row's w floats is a NaN or an infinity (exponent bits all ones); the
 * halves columns from rec hold two float16 values each (their exponents: 0x7c00). */
static int non_finite(const float *row, int64_t w, int64_t rec, int64_t halves) {
    uint32_t all = 0, bits;
    for (int64_t j = 0; j < w; j++) {
        memcpy(&bits, row + j, sizeof bits);
        all |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    for (int64_t j = rec; j < rec + halves; j++) {
        memcpy(&bits, row + j, sizeof bits);
        all |= ((bits & 0x7c00u) == 0x7c00u) | ((bits & 0x7c000000u) == 0x7c000000u);
    }
    return all != 0;
}

/* Page-Hinkley (drift.page_hinkley_update) on one key's 7 columns; returns the hit. */
static int page_hinkley(float *ph, float x, const double *prm) {
    float delta = (float)prm[PRM_PH_DELTA], threshold = (float)prm[PRM_PH_THRESHOLD];
    float alpha = (float)prm[PRM_PH_ALPHA], mean = ph[0], n = ph[1], inc = ph[2], dec = ph[3];
    float low = ph[4], high = ph[5], dev;
    int mode = (int)prm[PRM_PH_MODE], test, hit;
    if (n == 0.0f || ph[6] > 0.0f) mean = 0.0f, n = 0.0f, inc = 0.0f, dec = 0.0f,
                                   low = INFINITY, high = -1.0f;
    n = n + 1.0f;
    mean = mean + (x - mean) / n;
    dev = x - mean;
    inc = alpha * inc + dev - delta;
    dec = alpha * dec + dev + delta;
    low = nmin(low, inc);
    high = nmax(high, dec);
    if (mode == 1) test = inc - low > threshold;
    else if (mode == 2) test = high - dec > threshold;
    else test = (inc - low > threshold) || (high - dec > threshold);
    hit = test && n >= (float)prm[PRM_PH_MIN];
    ph[0] = mean, ph[1] = n, ph[2] = inc, ph[3] = dec, ph[4] = low, ph[5] = high;
    ph[6] = (float)hit;
    return hit;
}

/* After the network (out [n, f]: its prediction of the next clipped inputs xin): the
 * network's forecast, the combined prediction, per-key drift, and the event's outputs,
 * written at positions of the chunk's output columns; bad[i] = 1 where the key's row now
 * holds a NaN or an infinity. Returns how many do. */
int64_t fused_after(int64_t n, float *table, int64_t w, const int64_t *slots,
                    const int64_t *col, const double *prm, const float *x, int64_t f,
                    const float *xin, int64_t xin_stride, const float *out, const float *std,
                    const float *err, const float *sq, const float *std_err,
                    const float *score, const int64_t *pos, float *o_pred, float *o_err,
                    float *o_sq, float *o_score, float *o_scaled, float *o_flags, uint8_t *bad) {
    float max_step = (float)prm[PRM_MAX_STEP];
    int64_t bad_rows = 0;
    int capped = prm[PRM_MAX_STEP] == prm[PRM_MAX_STEP]; /* NaN: no cap */
    for (int64_t i = 0; i < n; i++) {
        if (AHEAD && i + AHEAD < n) prefetch(table + slots[i + AHEAD] * w, 0, 4 * w);
        float *row = table + slots[i] * w, *fc = row + col[COL_FORECASTERS];
        const float *xi = x + i * f;
        int64_t p = pos[i];
        int scored = row[col[COL_HAS_PENDING]] > 0.0f, unscored = err[i] != err[i];
        for (int64_t j = 0; j < f; j++) {
            float move = (out[i * f + j] - xin[i * xin_stride + j]) * std[i * f + j];
            if (capped) {
                float limit = max_step * row[col[COL_STEP] + j];
                move = nmax(nmin(move, limit), -limit);
            }
            fc[j] = xi[j] + move;
        }
        mix(prm, row + col[COL_HEDGE], fc, f, o_pred + p * f);
        row[col[COL_HAS_PENDING]] = 1.0f;
        o_flags[p] = 0.0f;
        if (prm[PRM_DRIFT] != 0.0 && scored) {
            float e = std_err[i];
            e = e != e ? 0.0f : (e > 3.4028234663852886e38f ? 3.4028234663852886e38f
                                 : (e < -3.4028234663852886e38f ? -3.4028234663852886e38f : e));
            o_flags[p] = (float)page_hinkley(row + col[COL_PH], e, prm);
        }
        o_err[p] = err[i];
        o_sq[p] = sq[i];
        o_score[p] = unscored ? NAN : score[i];
        o_scaled[p] = unscored ? NAN : std_err[i];
        bad_rows += bad[i] = (uint8_t)non_finite(row, w, col[COL_RECURRENT], col[COL_HALVES]);
    }
    return bad_rows;
}

/* dst[i, :m] = table[slots[i], col:col + m] (dst row stride dst_stride). */
void fused_take(int64_t n, int64_t m, const float *table, int64_t w, const int64_t *slots,
                int64_t col, float *dst, int64_t dst_stride) {
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * dst_stride, table + slots[i] * w + col, m * sizeof(float));
}

/* a * b + c, in one rounding where the CPU has fused multiply-add (the polynomial below
 * is an approximation anyway: this only makes it cheaper). */
#ifdef __FMA__
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* e^x to about 2 ulp (Cephes' expf polynomial), branch-free so the loops below vectorise:
 * n = round(x / ln 2) by adding 1.5 * 2^23 (the sum's low mantissa bits are n), then
 * e^x = 2^n e^r with |r| <= ln 2 / 2. */
static inline float exp_approx(float x) {
    union { int32_t i; float f; } round, scale;
    float n, r, p;
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* NaN stays NaN */
    round.f = x * 1.44269504088896341f + 12582912.0f;
    n = round.f - 12582912.0f;
    r = x - n * 0.693359375f + n * 2.12194440e-4f;
    p = MADD(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = MADD(p, r, 8.3334519073e-3f);
    p = MADD(p, r, 4.1665795894e-2f);
    p = MADD(p, r, 1.6666665459e-1f);
    p = MADD(p, r, 5.0000001201e-1f);
    p = MADD(p * r, r, r + 1.0f);
    scale.i = (round.i - 0x4B400000 + 127) << 23;
    return p * scale.f;
}

/* 1 / (1 + e^-x) in place over a[0..m) (one exponential per loop: few registers). */
static void sigmoid(int64_t m, float *restrict a) {
    for (int64_t j = 0; j < m; j++) a[j] = 1.0f / (1.0f + exp_approx(-a[j]));
}

/* One key's cell: gates g [4h] in (input, forget, output, cell) order, overwritten; cell
 * state c updated in place; the new hidden state written to d. tanh(x) = 2 sigmoid(2x) - 1. */
static void lstm_cell(int64_t h, float *restrict g, float *restrict c, float *restrict d) {
    float *restrict cand = g + 3 * h;
    for (int64_t j = 0; j < h; j++) cand[j] *= 2.0f;
    sigmoid(4 * h, g);
    for (int64_t j = 0; j < h; j++) {
        c[j] = g[h + j] * c[j] + g[j] * (2.0f * cand[j] - 1.0f);
        d[j] = 2.0f * c[j];
    }
    sigmoid(h, d);
    for (int64_t j = 0; j < h; j++) d[j] = g[2 * h + j] * (2.0f * d[j] - 1.0f);
}

/* One LSTM layer's cells for n keys, after its gates' matrix product (gates [n, 4h]): the
 * key's hidden and cell state at offsets hid and cel of its state (at column rec of its
 * row, row stride w; float16 values where half) updated in place; the new hidden state
 * also written to dst[i * dst_stride], followed by the next layer's hidden state (offset
 * nxt) where nxt >= 0, so that [h_new, h_next] is the next layer's matrix product input. */
void fused_lstm_cell(int64_t n, int64_t h, float *gates, float *table, int64_t w,
                     const int64_t *slots, int64_t rec, int64_t half_state, int64_t hid,
                     int64_t cel, float *dst, int64_t dst_stride, int64_t nxt) {
    int64_t size = half_state ? 2 : 4, from = 4 * rec + size * hid;
    int64_t to = 4 * rec + size * (nxt >= 0 ? nxt + h : cel + h);
    for (int64_t i = 0; i < n; i++) {
        float *row = table + slots[i] * w, *d = dst + i * dst_stride;
        if (AHEAD && i + AHEAD < n) prefetch(table + slots[i + AHEAD] * w, from, to);
        if (half_state) {
            half *state = (half *)(row + rec);
            float c[h];
            from_half(state + cel, c, h);
            lstm_cell(h, gates + i * 4 * h, c, d);
            to_half(c, state + cel, h);
            to_half(d, state + hid, h);
            if (nxt >= 0) from_half(state + nxt, d + h, h);
        } else {
            float *state = row + rec;
            lstm_cell(h, gates + i * 4 * h, state + cel, d);
            memcpy(state + hid, d, h * sizeof(float));
            if (nxt >= 0) memcpy(d + h, state + nxt, h * sizeof(float));
        }
    }
}

/* The network's step in one call, where torch's BLAS can be called from here (fused.py
 * hands its sgemm_ over; else fused.py runs the same per layer: addmm, fused_lstm_cell).
 * The keys go through in sub-blocks of sub keys (a few hundred), each through every layer
 * and the head before the next: a sub-block's gates and activations (~0.4 MB at hidden
 * 64 and 256 keys) stay in the L2 cache from the product to the cell, where a block's of
 * 1,024 keys (~1.5 MB) did not, and one call replaces six torch and ctypes calls.
 *
 * BLAS is column-major: the row-major gates [m, 4h] = inp [m, k] W [k, 4h] are its
 * gates^T = W^T inp^T, with the same memory and no copies. The bias is put in first and
 * the product added to it (beta = 1), as torch's addmm does. */
typedef void sgemm_t(const char *transa, const char *transb, const int *m, const int *n,
                     const int *k, const float *alpha, const float *a, const int *lda,
                     const float *b, const int *ldb, const float *beta, float *c, const int *ldc);

static void gates_of(sgemm_t *gemm, int64_t m, int64_t k, int64_t g, const float *weight,
                     const float *bias, const float *inp, int64_t ld, float *gates) {
    int rows = (int)g, cols = (int)m, inner = (int)k, lda = (int)g, ldb = (int)ld;
    float one = 1.0f;
    for (int64_t i = 0; i < m; i++) memcpy(gates + i * g, bias, g * sizeof(float));
    gemm("N", "N", &rows, &cols, &inner, &one, weight, &lda, inp, &ldb, &one, gates, &lda);
}

/* The head on the top layer's new hidden state hid [m, h]: out[i] = bias + weight hid[i]
 * + xin[i, :f] (weight [f, h]), each output a dot product in 8 lanes (a product by an
 * [h, f] matrix, f about 8, is a poor GEMM). */
static void head_of(int64_t m, int64_t h, int64_t f, const float *hid, const float *weight,
                    const float *bias, const float *xin, int64_t xin_stride, float *out) {
    for (int64_t i = 0; i < m; i++) {
        const float *x = hid + i * h;
        for (int64_t j = 0; j < f; j++) {
            const float *wj = weight + j * h;
            float lane[8] = {0}, acc;
            int64_t k = 0;
            for (; k + 8 <= h; k += 8)
                for (int l = 0; l < 8; l++) lane[l] += wj[k + l] * x[k + l];
            acc = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
            for (; k < h; k++) acc += wj[k] * x[k];
            out[i * f + j] = (bias[j] + acc) + xin[i * xin_stride + j];
        }
    }
}

/* The LSTM step and head of n keys: xin [n, f + h] as fused_before wrote it (clipped
 * inputs, first layer's hidden state); weights[l] / biases[l] the addresses of layer l's
 * packed [k, 4h] weight and [4h] bias; the state updated in the table as by
 * fused_lstm_cell; out [n, f] the prediction of the next clipped inputs. scratch: sub * 6h
 * floats. */
void fused_network(int64_t n, int64_t h, int64_t f, int64_t layers, void *gemm,
                   const int64_t *weights, const int64_t *biases, const float *head_weight,
                   const float *head_bias, int64_t rec, int64_t half_state, float *scratch,
                   float *table, int64_t w, const int64_t *slots, const float *xin,
                   int64_t sub, float *out) {
    float *gates = scratch, *act = scratch + sub * 4 * h;
    for (int64_t lo = 0; lo < n; lo += sub) {
        int64_t m = n - lo < sub ? n - lo : sub, k = f + h, ld = f + h;
        const float *inp = xin + lo * ld;
        for (int64_t l = 0; l < layers; l++) {
            int top = l == layers - 1;
            int64_t here = 2 * l * h, stride = top ? h : 2 * h;
            gates_of((sgemm_t *)gemm, m, k, 4 * h, (const float *)weights[l],
                     (const float *)biases[l], inp, ld, gates);
            /* inp (act, past the first layer) is read: the cells may overwrite it */
            fused_lstm_cell(m, h, gates, table, w, slots + lo, rec, half_state, here,
                            here + h, act, stride, top ? -1 : here + 2 * h);
            inp = act, k = 2 * h, ld = stride;
        }
        head_of(m, h, f, act, head_weight, head_bias, xin + lo * (f + h), f + h, out + lo * f);
    }
}

/* The whole step of n keys in one call, sub keys at a time through fused_before,
 * fused_network and fused_after (the arguments of those three, in that order, each
 * once): a sub-block's rows (~0.2 MB at 256 keys) stay in the L2 cache from the first
 * pass to the last, where a whole step's (~3.5 MB at 4,096 keys) are fetched again by
 * each pass. (With a learner attached, fused.py runs the three calls itself: the learner
 * copies the rows between the first two.) Returns how many rows became non-finite. */
int64_t fused_sweep(int64_t n, int64_t sub, float *table, int64_t w, const int64_t *slots,
                    const int64_t *col, const double *prm, const float *x, int64_t f,
                    float *xin, int64_t xin_stride, float *raw, float *change, float *std,
                    float *err, float *sq, float *std_err, float *score, int64_t h,
                    int64_t layers, void *gemm, const int64_t *weights, const int64_t *biases,
                    const float *head_weight, const float *head_bias, int64_t rec,
                    int64_t half_state, float *scratch, float *out, const int64_t *pos,
                    float *o_pred, float *o_err, float *o_sq, float *o_score, float *o_scaled,
                    float *o_flags, uint8_t *bad) {
    int64_t bad_rows = 0;
    for (int64_t lo = 0; lo < n; lo += sub) {
        int64_t m = n - lo < sub ? n - lo : sub;
        fused_before(m, table, w, slots + lo, col, prm, x + lo * f, f, xin + lo * xin_stride,
                     xin_stride, raw + lo * f, change + lo * f, std + lo * f, err + lo, sq + lo,
                     std_err + lo, score + lo);
        fused_network(m, h, f, layers, gemm, weights, biases, head_weight, head_bias, rec,
                      half_state, scratch, table, w, slots + lo, xin + lo * xin_stride, sub,
                      out + lo * f);
        bad_rows += fused_after(m, table, w, slots + lo, col, prm, x + lo * f, f,
                                xin + lo * xin_stride, xin_stride, out + lo * f, std + lo * f,
                                err + lo, sq + lo, std_err + lo, score + lo, pos + lo, o_pred,
                                o_err, o_sq, o_score, o_scaled, o_flags, bad + lo);
    }
    return bad_rows;
}
