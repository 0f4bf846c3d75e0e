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

// One ray's samples [begin, end): T_i = exp(-sum_{j<i} tau_j) (accumulated in double, as the twin) and
// w_i = T_i (1 - exp(-tau_i)).
template <typename scalar_t>
RECON_HD inline void ray_weights_forward(const scalar_t* tau, int64_t begin, int64_t end, scalar_t* weights,
                                         scalar_t* transmittance) {
  double before = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double t = exp(-before);
    transmittance[i] = static_cast<scalar_t>(t);
    weights[i] = static_cast<scalar_t>(t * -expm1(-static_cast<double>(tau[i])));
    before += static_cast<double>(tau[i]);
  }
}

// Its backward: with w_i = T_i - T_{i+1} and dT_i/dtau_k = -T_i for k < i,
// dL/dtau_k = gw_k T_{k+1} - sum_{i > k} (gw_i w_i + gT_i T_i), one pass from the back.
template <typename scalar_t>
RECON_HD inline void ray_weights_backward(const scalar_t* tau, const scalar_t* weights, const scalar_t* transmittance,
                                          const scalar_t* grad_weights, const scalar_t* grad_transmittance,
                                          int64_t begin, int64_t end, scalar_t* grad_tau) {
  double behind = 0.0;
  for (int64_t k = end - 1; k >= begin; --k) {
    const double t_next = static_cast<double>(transmittance[k]) * exp(-static_cast<double>(tau[k]));
    grad_tau[k] = static_cast<scalar_t>(static_cast<double>(grad_weights[k]) * t_next - behind);
    behind += static_cast<double>(grad_weights[k]) * weights[k] + static_cast<double>(grad_transmittance[k]) * transmittance[k];
  }
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

}  // namespace recon
