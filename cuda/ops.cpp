// recon's kernel entry points: checks, then the CUDA launchers (kernels.cu, built with -DRECON_CUDA) for CUDA
// tensors, or the same bodies (kernels.h) in plain loops for CPU tensors (the build the tests run).
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType type) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == type, name, " has the wrong dtype");
}

std::vector<recon::Level> levels_of(const torch::Tensor& scale, const torch::Tensor& vertices,
                                    const torch::Tensor& offset, const torch::Tensor& mask) {
  std::vector<recon::Level> levels(scale.numel());
  auto s = scale.cpu(), v = vertices.cpu(), o = offset.cpu(), m = mask.cpu();
  for (int64_t l = 0; l < scale.numel(); ++l) {
    levels[l] = {s.data_ptr<float>()[l], v.data_ptr<int64_t>()[l], o.data_ptr<int64_t>()[l], m.data_ptr<int64_t>()[l]};
  }
  return levels;
}

}  // namespace

#ifdef RECON_CUDA
void weights_forward_cuda(const torch::Tensor& tau, const torch::Tensor& starts, torch::Tensor& weights,
                          torch::Tensor& transmittance);
void weights_backward_cuda(const torch::Tensor& tau, const torch::Tensor& weights, const torch::Tensor& transmittance,
                           const torch::Tensor& grad_weights, const torch::Tensor& grad_transmittance,
                           const torch::Tensor& starts, torch::Tensor& grad_tau);
void hash_forward_cuda(const torch::Tensor& x, const torch::Tensor& table, const std::vector<recon::Level>& levels,
                       torch::Tensor& out);
void hash_backward_cuda(const torch::Tensor& x, const torch::Tensor& table, const std::vector<recon::Level>& levels,
                        const torch::Tensor& grad_out, torch::Tensor& grad_table);
#endif

// starts [R + 1]: ray r owns samples [starts[r], starts[r + 1]) of the packed tau [S] (float32).
std::vector<torch::Tensor> weights_forward(const torch::Tensor& tau, const torch::Tensor& starts) {
  check(tau, "tau", torch::kFloat32);
  check(starts, "starts", torch::kInt64);
  auto weights = torch::empty_like(tau), transmittance = torch::empty_like(tau);
#ifdef RECON_CUDA
  if (tau.is_cuda()) {
    weights_forward_cuda(tau, starts, weights, transmittance);
    return {weights, transmittance};
  }
#endif
  const int64_t* s = starts.data_ptr<int64_t>();
  for (int64_t r = 0; r + 1 < starts.numel(); ++r) {
    recon::ray_weights_forward(tau.data_ptr<float>(), s[r], s[r + 1], weights.data_ptr<float>(), transmittance.data_ptr<float>());
  }
  return {weights, transmittance};
}

torch::Tensor weights_backward(const torch::Tensor& tau, const torch::Tensor& weights, const torch::Tensor& transmittance,
                               const torch::Tensor& grad_weights, const torch::Tensor& grad_transmittance,
                               const torch::Tensor& starts) {
  for (auto* t : {&tau, &weights, &transmittance, &grad_weights, &grad_transmittance}) check(*t, "input", torch::kFloat32);
  auto grad_tau = torch::empty_like(tau);
#ifdef RECON_CUDA
  if (tau.is_cuda()) {
    weights_backward_cuda(tau, weights, transmittance, grad_weights, grad_transmittance, starts, grad_tau);
    return grad_tau;
  }
#endif
  const int64_t* s = starts.data_ptr<int64_t>();
  for (int64_t r = 0; r + 1 < starts.numel(); ++r) {
    recon::ray_weights_backward(tau.data_ptr<float>(), weights.data_ptr<float>(), transmittance.data_ptr<float>(),
                                grad_weights.data_ptr<float>(), grad_transmittance.data_ptr<float>(), s[r], s[r + 1],
                                grad_tau.data_ptr<float>());
  }
  return grad_tau;
}

// x [N, 3] float32 in [0, 1]^3, table [rows, F] float32; per level: scale (float32), vertices, offset, mask (int64).
torch::Tensor hash_forward(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scale,
                           const torch::Tensor& vertices, const torch::Tensor& offset, const torch::Tensor& mask) {
  check(x, "x", torch::kFloat32);
  check(table, "table", torch::kFloat32);
  const auto levels = levels_of(scale, vertices, offset, mask);
  const int64_t n = x.size(0), features = table.size(1), count = static_cast<int64_t>(levels.size());
  auto out = torch::zeros({n, count * features}, x.options());
#ifdef RECON_CUDA
  if (x.is_cuda()) {
    hash_forward_cuda(x, table, levels, out);
    return out;
  }
#endif
  const float* px = x.data_ptr<float>();
  const float* pt = table.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t l = 0; l < count; ++l) {
      const recon::Corners c = recon::level_corners(px + 3 * i, levels[l]);
      for (int k = 0; k < 8; ++k) {
        for (int64_t f = 0; f < features; ++f) po[(i * count + l) * features + f] += c.weight[k] * pt[c.row[k] * features + f];
      }
    }
  }
  return out;
}

// grad_out [N, L * F] -> grad_table [rows, F].
torch::Tensor hash_backward(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scale,
                            const torch::Tensor& vertices, const torch::Tensor& offset, const torch::Tensor& mask,
                            const torch::Tensor& grad_out) {
  check(grad_out, "grad_out", torch::kFloat32);
  const auto levels = levels_of(scale, vertices, offset, mask);
  const int64_t n = x.size(0), features = table.size(1), count = static_cast<int64_t>(levels.size());
  auto grad_table = torch::zeros_like(table);
#ifdef RECON_CUDA
  if (x.is_cuda()) {
    hash_backward_cuda(x, table, levels, grad_out, grad_table);
    return grad_table;
  }
#endif
  const float* px = x.data_ptr<float>();
  const float* pg = grad_out.data_ptr<float>();
  float* gt = grad_table.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t l = 0; l < count; ++l) {
      const recon::Corners c = recon::level_corners(px + 3 * i, levels[l]);
      const float* g = pg + (i * count + l) * features;
      for (int k = 0; k < 8; ++k) {
        for (int64_t f = 0; f < features; ++f) gt[c.row[k] * features + f] += c.weight[k] * g[f];
      }
    }
  }
  return grad_table;
}

namespace {

recon::Grid grid_of(const torch::Tensor& occupied, const torch::Tensor& box, int64_t levels, int64_t resolution) {
  check(occupied, "occupied", torch::kBool);
  auto b = box.cpu();  // [2, 3]: the level-0 box
  recon::Grid grid{occupied.data_ptr<bool>(), static_cast<int>(levels), static_cast<int>(resolution), {}, {}};
  for (int a = 0; a < 3; ++a) {
    const float lo = b[0][a].item<float>(), hi = b[1][a].item<float>();
    grid.centre[a] = (lo + hi) / 2;
    grid.half[a] = (hi - lo) / 2;
  }
  return grid;
}

recon::StepRule rule_of(double step, double cone, double max_step) {
  return {static_cast<float>(step), static_cast<float>(cone), static_cast<float>(max_step),
          static_cast<float>(std::log1p(cone))};
}

}  // namespace

#ifdef RECON_CUDA
void march_cuda(const recon::Grid& grid, const recon::StepRule& rule, const torch::Tensor& origins,
                const torch::Tensor& dirs, const torch::Tensor& t_start, const torch::Tensor& t_far, int64_t max_samples,
                torch::Tensor& counts, const torch::Tensor* offsets, torch::Tensor* t0, torch::Tensor* t1);
#endif

// Samples per ray (int64 [R]) of the occupancy grid's marching (renderers/marching.py's march).
torch::Tensor march_count(const torch::Tensor& origins, const torch::Tensor& dirs, const torch::Tensor& t_start,
                          const torch::Tensor& t_far, const torch::Tensor& occupied, const torch::Tensor& box,
                          int64_t levels, int64_t resolution, double step, double cone, double max_step,
                          int64_t max_samples) {
  for (auto* t : {&origins, &dirs, &t_start, &t_far}) check(*t, "ray tensor", torch::kFloat32);
  const auto grid = grid_of(occupied, box, levels, resolution);
  const auto rule = rule_of(step, cone, max_step);
  auto counts = torch::zeros({t_start.numel()}, t_start.options().dtype(torch::kInt64));
#ifdef RECON_CUDA
  if (origins.is_cuda()) {
    march_cuda(grid, rule, origins, dirs, t_start, t_far, max_samples, counts, nullptr, nullptr, nullptr);
    return counts;
  }
#endif
  for (int64_t r = 0; r < t_start.numel(); ++r) {
    counts.data_ptr<int64_t>()[r] = recon::march_ray(grid, rule, origins.data_ptr<float>() + 3 * r,
                                                     dirs.data_ptr<float>() + 3 * r, t_start.data_ptr<float>()[r],
                                                     t_far.data_ptr<float>()[r], max_samples, nullptr, nullptr);
  }
  return counts;
}

// The samples themselves, ray r's written from offsets[r]: (t0 [S], t1 [S]), S = offsets[R].
std::vector<torch::Tensor> march_fill(const torch::Tensor& origins, const torch::Tensor& dirs, const torch::Tensor& t_start,
                                      const torch::Tensor& t_far, const torch::Tensor& occupied, const torch::Tensor& box,
                                      int64_t levels, int64_t resolution, double step, double cone, double max_step,
                                      int64_t max_samples, const torch::Tensor& offsets, int64_t total) {
  const auto grid = grid_of(occupied, box, levels, resolution);
  const auto rule = rule_of(step, cone, max_step);
  auto t0 = torch::empty({total}, t_start.options()), t1 = torch::empty({total}, t_start.options());
#ifdef RECON_CUDA
  if (origins.is_cuda()) {
    auto counts = torch::empty({0}, offsets.options());
    march_cuda(grid, rule, origins, dirs, t_start, t_far, max_samples, counts, &offsets, &t0, &t1);
    return {t0, t1};
  }
#endif
  const int64_t* o = offsets.data_ptr<int64_t>();
  for (int64_t r = 0; r < t_start.numel(); ++r) {
    recon::march_ray(grid, rule, origins.data_ptr<float>() + 3 * r, dirs.data_ptr<float>() + 3 * r,
                     t_start.data_ptr<float>()[r], t_far.data_ptr<float>()[r], max_samples,
                     t0.data_ptr<float>() + o[r], t1.data_ptr<float>() + o[r]);
  }
  return {t0, t1};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("march_count", &march_count, "samples per ray of occupancy-grid marching");
  m.def("march_fill", &march_fill, "the marched samples");
  m.def("weights_forward", &weights_forward, "packed weights and transmittance");
  m.def("weights_backward", &weights_backward, "their backward");
  m.def("hash_forward", &hash_forward, "3D hash-grid encoding");
  m.def("hash_backward", &hash_backward, "its backward (the table)");
}
