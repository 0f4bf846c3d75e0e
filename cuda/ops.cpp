// recon's kernel entry points: checks, then the CUDA launchers (kernels.cu, built with -DRECON_CUDA) for CUDA
// tensors, or the same bodies (kernels.h) in plain loops for CPU tensors (the build the tests run).
#include <torch/extension.h>

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weights_forward", &weights_forward, "packed weights and transmittance");
  m.def("weights_backward", &weights_backward, "their backward");
  m.def("hash_forward", &hash_forward, "3D hash-grid encoding");
  m.def("hash_backward", &hash_backward, "its backward (the table)");
}
