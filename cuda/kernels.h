// The bodies of recon's kernels, written once for both builds: nvcc compiles them as __host__ __device__
// functions that the CUDA kernels call per ray or per (point, level); the C++ compiler compiles the same
// functions for the CPU build that the tests compare with the torch twins (renderers/compositing.py,
// fields/encodings.py). Keep them free of anything only one side has.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define RECON_HD __host__ __device__
#else
#define RECON_HD
#endif

namespace recon {

// Compositing one ray's samples [begin, end), as renderers/compositing.py's `integrate`: with optical depths tau,
// T_i = exp(-(tau_before + sum_{j<i} tau_j)) (summed in double, as the twin) and w_i = T_i (1 - exp(-tau_i)),
// zero once T_i < stop_eps (early termination: the ray is opaque, later samples neither add nor learn);
// the sums of w c_i (C channels), of w, and of w t_i. Outputs per ray: color [C], opacity, weighted_t.
constexpr int MAX_CHANNELS = 8;

RECON_HD inline void ray_integrate_forward(const float* tau, const float* rgb, const float* t, int channels,
                                           int64_t begin, int64_t end, double tau_before, float stop_eps,
                                           float* weights, float* transmittance, float* color, float* opacity,
                                           float* weighted_t) {
  float sum_c[MAX_CHANNELS] = {0.0f};
  float sum_w = 0.0f, sum_wt = 0.0f;
  double before = tau_before;
  for (int64_t i = begin; i < end; ++i) {
    const double T = exp(-before);
    transmittance[i] = static_cast<float>(T);
    if (transmittance[i] < stop_eps) {  // compared in float32, as the twin and the backward compare it
      weights[i] = 0.0f;
      continue;
    }
    const float w = static_cast<float>(T * -expm1(-static_cast<double>(tau[i])));
    weights[i] = w;
    for (int c = 0; c < channels; ++c) sum_c[c] += w * rgb[i * channels + c];
    sum_w += w;
    sum_wt += w * t[i];
    before += static_cast<double>(tau[i]);
  }
  for (int c = 0; c < channels; ++c) color[c] = sum_c[c];
  *opacity = sum_w;
  *weighted_t = sum_wt;
}

// Its backward, one pass from the back. Every output is linear in the weights: with g_i = dL/dw_i (directly and
// through the sums), and since w_i = T_i - T_{i+1} with dT_i/dtau_k = -T_i for k < i,
// dL/dtau_k = g_k T_k exp(-tau_k) - sum_{i > k} g_i w_i; dL/dc_k = w_k dL/dcolor; dL/dtau_before = -sum_i g_i w_i.
// Terminated samples (T < stop_eps, saved as the forward saw it) have w = 0 and no gradient.
RECON_HD inline double ray_integrate_backward(const float* tau, const float* rgb, const float* t,
                                              const float* weights, const float* transmittance, int channels,
                                              int64_t begin, int64_t end, float stop_eps, const float* grad_weights,
                                              const float* grad_color, float grad_opacity, float grad_weighted_t,
                                              float* grad_tau, float* grad_rgb) {
  double behind = 0.0;
  for (int64_t k = end - 1; k >= begin; --k) {
    if (transmittance[k] < stop_eps) {
      grad_tau[k] = 0.0f;
      for (int c = 0; c < channels; ++c) grad_rgb[k * channels + c] = 0.0f;
      continue;
    }
    double g = static_cast<double>(grad_weights[k]) + grad_opacity + static_cast<double>(grad_weighted_t) * t[k];
    for (int c = 0; c < channels; ++c) {
      g += static_cast<double>(grad_color[c]) * rgb[k * channels + c];
      grad_rgb[k * channels + c] = weights[k] * grad_color[c];
    }
    const double t_next = static_cast<double>(transmittance[k]) * exp(-static_cast<double>(tau[k]));
    grad_tau[k] = static_cast<float>(g * t_next - behind);
    behind += g * weights[k];
  }
  return -behind;
}

// One level of the 3D multiresolution hash encoding (tiny-cuda-nn's conventions, as HashGridEncoding): a point
// in [0, 1]^3 sits at x * scale + 0.5 in vertex units, clamped onto the level's last vertex; its 8 corners'
// rows (dense x + y V + z V^2, or hashed (x ^ y * 2654435761 ^ z * 805459861) & (T - 1)) and trilinear weights.
// No gradient with respect to x: SDF fields take theirs by central differences (fields/surface.py), and
// positions that need one (an analytic eikonal) stay on the torch twin, which differentiates twice.
struct Level {
  float scale;
  int64_t vertices;
  int64_t offset;  // first row of the level in the shared table
  int64_t mask;    // T - 1 for a hashed level, -1 for a dense one
};

struct Corners {
  int64_t row[8];
  float weight[8];
};

RECON_HD inline Corners level_corners(const float* x, const Level& level) {
  Corners c;
  int64_t cell[3];
  float frac[3];
  for (int a = 0; a < 3; ++a) {
    const float xa = fminf(fmaxf(x[a], 0.0f), 1.0f);
    const float pos = fminf(xa * level.scale + 0.5f, static_cast<float>(level.vertices - 1));
    const float lower = fminf(floorf(pos), static_cast<float>(level.vertices - 2));
    cell[a] = static_cast<int64_t>(lower);
    frac[a] = pos - lower;
  }
  const uint64_t primes[3] = {1ull, 2654435761ull, 805459861ull};
  for (int corner = 0; corner < 8; ++corner) {
    int64_t row = 0;
    uint64_t hashed = 0;
    float weight = 1.0f;
    for (int a = 0; a < 3; ++a) {
      const int bit = (corner >> a) & 1;
      const int64_t v = cell[a] + bit;
      weight *= bit ? frac[a] : 1.0f - frac[a];
      if (level.mask < 0) {
        int64_t stride = 1;
        for (int s = 0; s < a; ++s) stride *= level.vertices;
        row += v * stride;
      } else {
        hashed ^= static_cast<uint64_t>(v) * primes[a];
      }
    }
    c.row[corner] = level.offset + (level.mask < 0 ? row : static_cast<int64_t>(hashed & static_cast<uint64_t>(level.mask)));
    c.weight[corner] = weight;
  }
  return c;
}

// instant-ngp's step rule dt(t) = clamp(t * cone, step, max_step), its k-th sample boundary in closed form, and
// the marching of one ray through a multi-cascade occupancy grid, as renderers/marching.py (StepRule, march):
// the same float32 formulas, so both keep the same intervals up to the last bits of exp and log.
struct StepRule {
  float step, cone, max_step, growth;  // growth = log1p(cone), as float32
};

struct Phases {
  float n1, t1, n2, t2;  // n1 constant steps reach t1 >= step / cone, then n2 geometric ones reach t2
};

RECON_HD inline float dt_at(const StepRule& rule, float t) { return fminf(fmaxf(t * rule.cone, rule.step), rule.max_step); }

RECON_HD inline Phases phases(const StepRule& rule, float t_start) {
  Phases p;
  p.n1 = fmaxf(ceilf((rule.step / rule.cone - t_start) / rule.step), 0.0f);
  p.t1 = t_start + p.n1 * rule.step;
  p.n2 = fmaxf(ceilf(logf(rule.max_step / rule.cone / p.t1) / rule.growth), 0.0f);
  p.t2 = p.t1 * expf(p.n2 * rule.growth);
  return p;
}

RECON_HD inline int64_t boundary_count(const StepRule& rule, const Phases& p, float t_start, float t_end) {
  float count;
  if (rule.cone == 0.0f || t_end <= p.t1) count = ceilf((t_end - t_start) / rule.step);
  else if (t_end <= p.t2) count = p.n1 + ceilf(logf(t_end / p.t1) / rule.growth);
  else count = p.n1 + p.n2 + ceilf((t_end - p.t2) / rule.max_step);
  return static_cast<int64_t>(fmaxf(count, 0.0f));
}

RECON_HD inline float boundary(const StepRule& rule, const Phases& p, float t_start, float k) {
  if (rule.cone == 0.0f || k <= p.n1) return t_start + k * rule.step;
  if (k <= p.n1 + p.n2) return p.t1 * expf((k - p.n1) * rule.growth);
  return p.t2 + (k - p.n1 - p.n2) * rule.max_step;
}

struct Grid {
  const bool* occupied;  // [levels, res^3], cell (i, j, k) at (i * res + j) * res + k
  int levels, resolution;
  float centre[3], half[3];  // the level-0 box: u = (x - centre) / half is in [-1, 1]^3
};

// Whether u (normalised coordinates) lies in an occupied cell of the finest level containing it.
RECON_HD inline bool occupied(const Grid& grid, const float u[3]) {
  int level = 0;
  frexpf(fmaxf(fmaxf(fabsf(u[0]), fabsf(u[1])), fabsf(u[2])), &level);
  level = level < 0 ? 0 : level;
  if (level >= grid.levels) return false;
  const float half = 0.5f * grid.resolution;
  const float scale = exp2f(-static_cast<float>(level)) * half;
  int64_t index = level;
  for (int a = 0; a < 3; ++a) {
    int cell = static_cast<int>(half + u[a] * scale);
    cell = cell < 0 ? 0 : (cell > grid.resolution - 1 ? grid.resolution - 1 : cell);
    index = index * grid.resolution + cell;
  }
  return grid.occupied[index];
}

// March one ray from t_start to t_far: each interval [t_k, min(t_k + dt(t_k), t_far)] whose midpoint is occupied,
// the nearest `max_samples` of them. Returns how many; writes them from out_t0 / out_t1 when those are given.
RECON_HD inline int64_t march_ray(const Grid& grid, const StepRule& rule, const float origin[3], const float dir[3],
                                  float t_start, float t_far, int64_t max_samples, float* out_t0, float* out_t1) {
  float o[3], d[3];
  for (int a = 0; a < 3; ++a) {
    o[a] = (origin[a] - grid.centre[a]) / grid.half[a];
    d[a] = dir[a] / grid.half[a];
  }
  const Phases p = phases(rule, t_start);
  const int64_t candidates = boundary_count(rule, p, t_start, t_far);
  int64_t kept = 0;
  for (int64_t k = 0; k < candidates && kept < max_samples; ++k) {
    const float t0 = boundary(rule, p, t_start, static_cast<float>(k));
    const float t1 = fminf(t0 + dt_at(rule, t0), t_far);
    if (!(t1 > t0)) continue;
    const float mid = (t0 + t1) / 2;
    const float u[3] = {o[0] + d[0] * mid, o[1] + d[1] * mid, o[2] + d[2] * mid};
    if (!occupied(grid, u)) continue;
    if (out_t0) {
      out_t0[kept] = t0;
      out_t1[kept] = t1;
    }
    ++kept;
  }
  return kept;
}

// NeuRBF's nearest kernels (fields/rbf.py, CellLists): a point in [0, 1]^D (D = 2 or 3) falls in one cell of a
// uniform grid of `resolution` cells per axis, whose candidate list (ascending centre indices, -1 padding at the
// end) holds every centre that can be among its k nearest. The k nearest are kept sorted while the list is
// scanned, in registers, so no [points, candidates] distance table is ever made (the twin's).
constexpr int MAX_NEIGHBOURS = 8;

RECON_HD inline void nearest_in_cell(const float* point, int dims, const float* centres, const int64_t* candidates,
                                     int64_t width, int64_t resolution, int k, int64_t* out_index, float* out_d2) {
  int64_t cell = 0;
  for (int a = 0; a < dims; ++a) {  // as the twin: truncate x * r, clamp into the grid
    int64_t i = static_cast<int64_t>(point[a] * static_cast<float>(resolution));
    i = i < 0 ? 0 : (i > resolution - 1 ? resolution - 1 : i);
    cell = cell * resolution + i;
  }
  const int64_t* list = candidates + cell * width;
  float best[MAX_NEIGHBOURS];
  int64_t index[MAX_NEIGHBOURS];
  int found = 0;
  for (int64_t j = 0; j < width && list[j] >= 0; ++j) {
    const int64_t c = list[j];
    float d2 = 0.0f;
    for (int a = 0; a < dims; ++a) {
      const float diff = point[a] - centres[c * dims + a];
      d2 += diff * diff;
    }
    if (found == k && !(d2 < best[k - 1])) continue;
    int at = found < k ? found++ : k - 1;
    for (; at > 0 && best[at - 1] > d2; --at) {
      best[at] = best[at - 1];
      index[at] = index[at - 1];
    }
    best[at] = d2;
    index[at] = c;
  }
  for (int i = 0; i < k; ++i) {  // a list shorter than k cannot happen (each holds at least the k nearest)
    out_index[i] = i < found ? index[i] : -1;
    out_d2[i] = i < found ? best[i] : INFINITY;
  }
}

}  // namespace recon
