// recon's kernel entry points: checks, then the CUDA launchers (kernels.cu, built with -DRECON_CUDA) for CUDA
// tensors, or the same bodies (kernels.h) in plain loops for CPU tensors (the build the tests run).
#include <torch/extension.h>

#include <cmath>
#include <initializer_list>
#include <vector>

#include "kernels.h"

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType type) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == type, name, " has the wrong dtype");
}

// One call's tensors on one device: a kernel handed another device's pointer faults far from the cause.
void same_device(std::initializer_list<const torch::Tensor*> tensors) {
  const auto device = (*tensors.begin())->device();
  for (const auto* t : tensors) {
    TORCH_CHECK(t->device() == device, "a kernel's tensors must share one device, got ", device, " and ", t->device());
  }
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

#ifdef RECON_CUDA  // the launchers, in kernels.cu
void integrate_forward_cuda(const torch::Tensor& tau, const torch::Tensor& rgb, const torch::Tensor& t,
                            const torch::Tensor& starts, const torch::Tensor& tau_before, double stop_eps,
                            torch::Tensor& weights, torch::Tensor& transmittance, torch::Tensor& color,
                            torch::Tensor& opacity, torch::Tensor& weighted_t);
void integrate_backward_cuda(const torch::Tensor& tau, const torch::Tensor& rgb, const torch::Tensor& t,
                             const torch::Tensor& weights, const torch::Tensor& transmittance,
                             const torch::Tensor& starts, double stop_eps, const torch::Tensor& grad_weights,
                             const torch::Tensor& grad_color, const torch::Tensor& grad_opacity,
                             const torch::Tensor& grad_weighted_t, torch::Tensor& grad_tau, torch::Tensor& grad_rgb,
                             torch::Tensor& grad_tau_before);
void hash_forward_cuda(const torch::Tensor& x, const torch::Tensor& table, const std::vector<recon::Level>& levels,
                       torch::Tensor& out);
void hash_backward_cuda(const torch::Tensor& x, const torch::Tensor& table, const std::vector<recon::Level>& levels,
                        const torch::Tensor& grad_out, torch::Tensor& grad_table);
void march_cuda(const recon::Grid& grid, const recon::StepRule& rule, const torch::Tensor& origins,
                const torch::Tensor& dirs, const torch::Tensor& t_start, const torch::Tensor& t_far, int64_t max_samples,
                torch::Tensor& counts, const torch::Tensor* offsets, torch::Tensor* t0, torch::Tensor* t1);
void nearest_cuda(const torch::Tensor& points, const torch::Tensor& centres, const torch::Tensor& candidates,
                  int64_t resolution, int64_t k, torch::Tensor& index, torch::Tensor& d2);
#endif

// Packed samples of R rays, ray r owning [starts[r], starts[r + 1]): tau [S], rgb [S, C], t [S] (float32), tau_before
// [R] -> weights [S], transmittance [S], color [R, C], opacity [R], weighted_t [R] (renderers.compositing.integrate).
std::vector<torch::Tensor> integrate_forward(const torch::Tensor& tau, const torch::Tensor& rgb, const torch::Tensor& t,
                                             const torch::Tensor& starts, const torch::Tensor& tau_before,
                                             double stop_eps) {
  for (auto* x : {&tau, &rgb, &t, &tau_before}) check(*x, "compositing input", torch::kFloat32);
  check(starts, "starts", torch::kInt64);
  same_device({&tau, &rgb, &t, &starts, &tau_before});
  TORCH_CHECK(rgb.dim() == 2 && rgb.size(0) == tau.numel() && rgb.size(1) <= recon::MAX_CHANNELS,
              "rgb must be [S, C <= 8]");
  const int64_t rays = starts.numel() - 1, channels = rgb.size(1);
  auto weights = torch::empty_like(tau), transmittance = torch::empty_like(tau);
  auto color = torch::empty({rays, channels}, tau.options()), opacity = torch::empty({rays}, tau.options());
  auto weighted_t = torch::empty({rays}, tau.options());
#ifdef RECON_CUDA
  if (tau.is_cuda()) {
    integrate_forward_cuda(tau, rgb, t, starts, tau_before, stop_eps, weights, transmittance, color, opacity,
                           weighted_t);
    return {weights, transmittance, color, opacity, weighted_t};
  }
#endif
  const int64_t* s = starts.data_ptr<int64_t>();
  const float *pt = tau.data_ptr<float>(), *pc = rgb.data_ptr<float>(), *pd = t.data_ptr<float>();
  const float* before = tau_before.data_ptr<float>();
  float *pw = weights.data_ptr<float>(), *pT = transmittance.data_ptr<float>(), *out_c = color.data_ptr<float>();
  float *out_o = opacity.data_ptr<float>(), *out_t = weighted_t.data_ptr<float>();
  at::parallel_for(0, rays, 256, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      recon::ray_integrate_forward(pt, pc, pd, static_cast<int>(channels), s[r], s[r + 1], before[r],
                                   static_cast<float>(stop_eps), pw, pT, out_c + r * channels, out_o + r, out_t + r);
    }
  });
  return {weights, transmittance, color, opacity, weighted_t};
}

// Its backward: (grad_tau [S], grad_rgb [S, C], grad_tau_before [R]).
std::vector<torch::Tensor> integrate_backward(const torch::Tensor& tau, const torch::Tensor& rgb, const torch::Tensor& t,
                                              const torch::Tensor& weights, const torch::Tensor& transmittance,
                                              const torch::Tensor& starts, double stop_eps,
                                              const torch::Tensor& grad_weights, const torch::Tensor& grad_color,
                                              const torch::Tensor& grad_opacity, const torch::Tensor& grad_weighted_t) {
  for (auto* x : {&grad_weights, &grad_color, &grad_opacity, &grad_weighted_t}) check(*x, "gradient", torch::kFloat32);
  same_device({&tau, &rgb, &t, &weights, &transmittance, &starts, &grad_weights, &grad_color, &grad_opacity,
               &grad_weighted_t});
  const int64_t rays = starts.numel() - 1, channels = rgb.size(1);
  auto grad_tau = torch::empty_like(tau), grad_rgb = torch::empty_like(rgb);
  auto grad_tau_before = torch::empty({rays}, tau.options());
#ifdef RECON_CUDA
  if (tau.is_cuda()) {
    integrate_backward_cuda(tau, rgb, t, weights, transmittance, starts, stop_eps, grad_weights, grad_color,
                            grad_opacity, grad_weighted_t, grad_tau, grad_rgb, grad_tau_before);
    return {grad_tau, grad_rgb, grad_tau_before};
  }
#endif
  const int64_t* s = starts.data_ptr<int64_t>();
  const float *pt = tau.data_ptr<float>(), *pc = rgb.data_ptr<float>(), *pd = t.data_ptr<float>();
  const float *pw = weights.data_ptr<float>(), *pT = transmittance.data_ptr<float>();
  const float *gw = grad_weights.data_ptr<float>(), *gc = grad_color.data_ptr<float>();
  const float *go = grad_opacity.data_ptr<float>(), *gd = grad_weighted_t.data_ptr<float>();
  float *out_t = grad_tau.data_ptr<float>(), *out_c = grad_rgb.data_ptr<float>();
  float* out_b = grad_tau_before.data_ptr<float>();
  at::parallel_for(0, rays, 256, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      out_b[r] = static_cast<float>(recon::ray_integrate_backward(
          pt, pc, pd, pw, pT, static_cast<int>(channels), s[r], s[r + 1], static_cast<float>(stop_eps), gw,
          gc + r * channels, go[r], gd[r], out_t, out_c));
    }
  });
  return {grad_tau, grad_rgb, grad_tau_before};
}

// x [N, 3] float32 in [0, 1]^3, table [rows, F] float32; per level: scale (float32), vertices, offset, mask (int64).
torch::Tensor hash_forward(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scale,
                           const torch::Tensor& vertices, const torch::Tensor& offset, const torch::Tensor& mask) {
  check(x, "x", torch::kFloat32);
  check(table, "table", torch::kFloat32);
  same_device({&x, &table});
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
  at::parallel_for(0, n, 1024, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      for (int64_t l = 0; l < count; ++l) {
        const recon::Corners c = recon::level_corners(px + 3 * i, levels[l]);
        for (int k = 0; k < 8; ++k) {
          for (int64_t f = 0; f < features; ++f) po[(i * count + l) * features + f] += c.weight[k] * pt[c.row[k] * features + f];
        }
      }
    }
  });
  return out;
}

// grad_out [N, L * F] -> grad_table [rows, F].
torch::Tensor hash_backward(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scale,
                            const torch::Tensor& vertices, const torch::Tensor& offset, const torch::Tensor& mask,
                            const torch::Tensor& grad_out) {
  check(grad_out, "grad_out", torch::kFloat32);
  same_device({&x, &table, &grad_out});
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

// box: the level-0 box as x0, y0, z0, x1, y1, z1.
recon::Grid grid_of(const torch::Tensor& occupied, const std::vector<double>& box, int64_t levels,
                    int64_t resolution) {
  check(occupied, "occupied", torch::kBool);
  TORCH_CHECK(box.size() == 6, "box must be 6 numbers");
  recon::Grid grid{occupied.data_ptr<bool>(), static_cast<int>(levels), static_cast<int>(resolution), {}, {}};
  for (int a = 0; a < 3; ++a) {
    const float lo = static_cast<float>(box[a]), hi = static_cast<float>(box[a + 3]);
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

// Samples per ray (int64 [R]) of the occupancy grid's marching (renderers/marching.py's march).
torch::Tensor march_count(const torch::Tensor& origins, const torch::Tensor& dirs, const torch::Tensor& t_start,
                          const torch::Tensor& t_far, const torch::Tensor& occupied, const std::vector<double>& box,
                          int64_t levels, int64_t resolution, double step, double cone, double max_step,
                          int64_t max_samples) {
  for (auto* t : {&origins, &dirs, &t_start, &t_far}) check(*t, "ray tensor", torch::kFloat32);
  same_device({&origins, &dirs, &t_start, &t_far, &occupied});
  const auto grid = grid_of(occupied, box, levels, resolution);
  const auto rule = rule_of(step, cone, max_step);
  auto counts = torch::zeros({t_start.numel()}, t_start.options().dtype(torch::kInt64));
#ifdef RECON_CUDA
  if (origins.is_cuda()) {
    march_cuda(grid, rule, origins, dirs, t_start, t_far, max_samples, counts, nullptr, nullptr, nullptr);
    return counts;
  }
#endif
  const float *po = origins.data_ptr<float>(), *pd = dirs.data_ptr<float>();
  const float *near = t_start.data_ptr<float>(), *far = t_far.data_ptr<float>();
  int64_t* out = counts.data_ptr<int64_t>();
  at::parallel_for(0, t_start.numel(), 256, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      out[r] = recon::march_ray(grid, rule, po + 3 * r, pd + 3 * r, near[r], far[r], max_samples, nullptr, nullptr);
    }
  });
  return counts;
}

// The samples themselves, ray r's written from offsets[r]: (t0 [S], t1 [S]), S = offsets[R].
std::vector<torch::Tensor> march_fill(const torch::Tensor& origins, const torch::Tensor& dirs, const torch::Tensor& t_start,
                                      const torch::Tensor& t_far, const torch::Tensor& occupied, const std::vector<double>& box,
                                      int64_t levels, int64_t resolution, double step, double cone, double max_step,
                                      int64_t max_samples, const torch::Tensor& offsets, int64_t total) {
  same_device({&origins, &dirs, &t_start, &t_far, &occupied, &offsets});
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
  const float *po = origins.data_ptr<float>(), *pd = dirs.data_ptr<float>();
  const float *near = t_start.data_ptr<float>(), *far = t_far.data_ptr<float>();
  float *out0 = t0.data_ptr<float>(), *out1 = t1.data_ptr<float>();
  at::parallel_for(0, t_start.numel(), 256, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      recon::march_ray(grid, rule, po + 3 * r, pd + 3 * r, near[r], far[r], max_samples, out0 + o[r], out1 + o[r]);
    }
  });
  return {t0, t1};
}

// NeuRBF's k nearest centres [K, D] of points [N, D] through candidate lists [cells, width] (fields/rbf.py's
// CellLists): (index [N, k] int64, squared distance [N, k] float32), nearest first.
std::vector<torch::Tensor> nearest_kernels(const torch::Tensor& points, const torch::Tensor& centres,
                                           const torch::Tensor& candidates, int64_t resolution, int64_t k) {
  check(points, "points", torch::kFloat32);
  check(centres, "centres", torch::kFloat32);
  check(candidates, "candidates", torch::kInt64);
  same_device({&points, &centres, &candidates});
  TORCH_CHECK(k >= 1 && k <= recon::MAX_NEIGHBOURS, "at most ", recon::MAX_NEIGHBOURS, " neighbours");
  TORCH_CHECK(points.size(1) == centres.size(1) && points.size(1) <= 3, "points and centres: the same D <= 3");
  const int64_t n = points.size(0), dims = points.size(1), width = candidates.size(1);
  auto index = torch::empty({n, k}, points.options().dtype(torch::kInt64)), d2 = torch::empty({n, k}, points.options());
#ifdef RECON_CUDA
  if (points.is_cuda()) {
    nearest_cuda(points, centres, candidates, resolution, k, index, d2);
    return {index, d2};
  }
#endif
  const float *px = points.data_ptr<float>(), *pc = centres.data_ptr<float>();
  const int64_t* lists = candidates.data_ptr<int64_t>();
  int64_t* out_i = index.data_ptr<int64_t>();
  float* out_d = d2.data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      recon::nearest_in_cell(px + i * dims, static_cast<int>(dims), pc, lists, width, resolution, static_cast<int>(k),
                             out_i + i * k, out_d + i * k);
    }
  });
  return {index, d2};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("march_count", &march_count, "samples per ray of occupancy-grid marching");
  m.def("march_fill", &march_fill, "the marched samples");
  m.def("integrate_forward", &integrate_forward, "compositing over packed samples");
  m.def("integrate_backward", &integrate_backward, "its backward");
  m.def("hash_forward", &hash_forward, "3D hash-grid encoding");
  m.def("hash_backward", &hash_backward, "its backward (the table)");
  m.def("nearest_kernels", &nearest_kernels, "NeuRBF's k nearest kernels through candidate lists");
}
