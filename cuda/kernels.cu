// CUDA launchers for ops.cpp: one thread per ray (compositing, marching), per point (nearest kernels) or per
// (point, level) (hash grid), each running the shared body from kernels.h. Only torch's core headers and the CUDA
// runtime are included: ATen/cuda pulls in cuBLAS headers the slim toolkit lacks, and c10/cuda needs a header
// that only a CUDA build of torch ships (CI compiles these sources against the CPU build's).
#include <torch/types.h>

#include <vector>

#include "kernels.h"

namespace {

constexpr int THREADS = 256;

int blocks(int64_t n) { return static_cast<int>((n + THREADS - 1) / THREADS); }

// A launch runs on the tensors' device (the caller's device is restored after), on that device's default stream:
// torch's current stream unless a caller picks another, which recon never does. `done` reports a launch that
// failed (no kernel image for this GPU, too many resources): its outputs were never written.
class Launch {
 public:
  explicit Launch(const torch::Tensor& on) : device_(on.get_device()) {
    cudaGetDevice(&caller_);
    if (caller_ != device_) cudaSetDevice(device_);
  }
  ~Launch() {
    if (caller_ != device_) cudaSetDevice(caller_);
  }
  void done(const char* kernel) const {
    const cudaError_t error = cudaGetLastError();
    TORCH_CHECK(error == cudaSuccess, "recon's ", kernel, " did not run on cuda:", device_, ": ",
                cudaGetErrorString(error));
  }

 private:
  int device_, caller_ = 0;
};

__global__ void integrate_forward_kernel(const float* tau, const float* rgb, const float* t, const int64_t* starts,
                                         const float* tau_before, int64_t rays, int channels, float stop_eps,
                                         float* weights, float* transmittance, float* color, float* opacity,
                                         float* weighted_t) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rays) return;
  recon::ray_integrate_forward(tau, rgb, t, channels, starts[r], starts[r + 1], tau_before[r], stop_eps, weights,
                               transmittance, color + r * channels, opacity + r, weighted_t + r);
}

__global__ void integrate_backward_kernel(const float* tau, const float* rgb, const float* t, const float* weights,
                                          const float* transmittance, const int64_t* starts, int64_t rays,
                                          int channels, float stop_eps, const float* grad_weights,
                                          const float* grad_color, const float* grad_opacity,
                                          const float* grad_weighted_t, float* grad_tau, float* grad_rgb,
                                          float* grad_tau_before) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rays) return;
  grad_tau_before[r] = static_cast<float>(recon::ray_integrate_backward(
      tau, rgb, t, weights, transmittance, channels, starts[r], starts[r + 1], stop_eps, grad_weights,
      grad_color + r * channels, grad_opacity[r], grad_weighted_t[r], grad_tau, grad_rgb));
}

struct LevelTable {
  recon::Level level[32];
};

// One thread per (point, level), blocks of one level (blockIdx.y), as tiny-cuda-nn orders them: a warp's 32
// points read one level's table, so only the levels in flight share the L2 cache, not all of them at once.
// Outputs stay [N, L * F], as the twin's.
__global__ void hash_forward_kernel(const float* x, const float* table, LevelTable levels, int64_t n, int64_t count,
                                    int64_t features, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, l = blockIdx.y;
  if (i >= n) return;
  const recon::Corners c = recon::level_corners(x + 3 * i, levels.level[l]);
  for (int64_t f = 0; f < features; ++f) {
    float sum = 0.0f;
    for (int k = 0; k < 8; ++k) sum += c.weight[k] * table[c.row[k] * features + f];
    out[(i * count + l) * features + f] = sum;
  }
}

__global__ void hash_backward_kernel(const float* x, LevelTable levels, int64_t n, int64_t count, int64_t features,
                                     const float* grad_out, float* grad_table) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x, l = blockIdx.y;
  if (i >= n) return;
  const recon::Corners c = recon::level_corners(x + 3 * i, levels.level[l]);
  const float* g = grad_out + (i * count + l) * features;
  for (int k = 0; k < 8; ++k) {
    for (int64_t f = 0; f < features; ++f) atomicAdd(grad_table + c.row[k] * features + f, c.weight[k] * g[f]);
  }
}

__global__ void march_kernel(recon::Grid grid, recon::StepRule rule, const float* origins, const float* dirs,
                             const float* t_start, const float* t_far, int64_t rays, int64_t max_samples,
                             int64_t* counts, const int64_t* offsets, float* t0, float* t1) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rays) return;
  const bool fill = offsets != nullptr;
  const int64_t n = recon::march_ray(grid, rule, origins + 3 * r, dirs + 3 * r, t_start[r], t_far[r], max_samples,
                                     fill ? t0 + offsets[r] : nullptr, fill ? t1 + offsets[r] : nullptr);
  if (!fill) counts[r] = n;
}

__global__ void nearest_kernel(const float* points, const float* centres, const int64_t* candidates, int64_t n,
                               int dims, int64_t width, int64_t resolution, int k, int64_t* index, float* d2) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) {
    recon::nearest_in_cell(points + i * dims, dims, centres, candidates, width, resolution, k, index + i * k,
                           d2 + i * k);
  }
}

LevelTable pack(const std::vector<recon::Level>& levels) {
  TORCH_CHECK(levels.size() <= 32, "at most 32 hash-grid levels");
  LevelTable packed;
  for (size_t l = 0; l < levels.size(); ++l) packed.level[l] = levels[l];
  return packed;
}

}  // namespace

void integrate_forward_cuda(const torch::Tensor& tau, const torch::Tensor& rgb, const torch::Tensor& t,
                            const torch::Tensor& starts, const torch::Tensor& tau_before, double stop_eps,
                            torch::Tensor& weights, torch::Tensor& transmittance, torch::Tensor& color,
                            torch::Tensor& opacity, torch::Tensor& weighted_t) {
  const int64_t rays = starts.numel() - 1;
  if (rays <= 0) return;
  const Launch launch(tau);
  integrate_forward_kernel<<<blocks(rays), THREADS>>>(
      tau.data_ptr<float>(), rgb.data_ptr<float>(), t.data_ptr<float>(), starts.data_ptr<int64_t>(),
      tau_before.data_ptr<float>(), rays, static_cast<int>(rgb.size(1)), static_cast<float>(stop_eps),
      weights.data_ptr<float>(), transmittance.data_ptr<float>(), color.data_ptr<float>(), opacity.data_ptr<float>(),
      weighted_t.data_ptr<float>());
  launch.done("integrate_forward");
}

void integrate_backward_cuda(const torch::Tensor& tau, const torch::Tensor& rgb, const torch::Tensor& t,
                             const torch::Tensor& weights, const torch::Tensor& transmittance,
                             const torch::Tensor& starts, double stop_eps, const torch::Tensor& grad_weights,
                             const torch::Tensor& grad_color, const torch::Tensor& grad_opacity,
                             const torch::Tensor& grad_weighted_t, torch::Tensor& grad_tau, torch::Tensor& grad_rgb,
                             torch::Tensor& grad_tau_before) {
  const int64_t rays = starts.numel() - 1;
  if (rays <= 0) return;
  const Launch launch(tau);
  integrate_backward_kernel<<<blocks(rays), THREADS>>>(
      tau.data_ptr<float>(), rgb.data_ptr<float>(), t.data_ptr<float>(), weights.data_ptr<float>(),
      transmittance.data_ptr<float>(), starts.data_ptr<int64_t>(), rays, static_cast<int>(rgb.size(1)),
      static_cast<float>(stop_eps), grad_weights.data_ptr<float>(), grad_color.data_ptr<float>(),
      grad_opacity.data_ptr<float>(), grad_weighted_t.data_ptr<float>(), grad_tau.data_ptr<float>(),
      grad_rgb.data_ptr<float>(), grad_tau_before.data_ptr<float>());
  launch.done("integrate_backward");
}

void hash_forward_cuda(const torch::Tensor& x, const torch::Tensor& table, const std::vector<recon::Level>& levels,
                       torch::Tensor& out) {
  const int64_t n = x.size(0), count = static_cast<int64_t>(levels.size());
  if (n == 0 || count == 0) return;
  const Launch launch(x);
  hash_forward_kernel<<<dim3(blocks(n), static_cast<unsigned>(count)), THREADS>>>(
      x.data_ptr<float>(), table.data_ptr<float>(), pack(levels), n, count, table.size(1), out.data_ptr<float>());
  launch.done("hash_forward");
}

void hash_backward_cuda(const torch::Tensor& x, const torch::Tensor& table, const std::vector<recon::Level>& levels,
                        const torch::Tensor& grad_out, torch::Tensor& grad_table) {
  const int64_t n = x.size(0), count = static_cast<int64_t>(levels.size());
  if (n == 0 || count == 0) return;
  const Launch launch(x);
  hash_backward_kernel<<<dim3(blocks(n), static_cast<unsigned>(count)), THREADS>>>(
      x.data_ptr<float>(), pack(levels), n, count, table.size(1), grad_out.data_ptr<float>(),
      grad_table.data_ptr<float>());
  launch.done("hash_backward");
}

void march_cuda(const recon::Grid& grid, const recon::StepRule& rule, const torch::Tensor& origins,
                const torch::Tensor& dirs, const torch::Tensor& t_start, const torch::Tensor& t_far, int64_t max_samples,
                torch::Tensor& counts, const torch::Tensor* offsets, torch::Tensor* t0, torch::Tensor* t1) {
  const int64_t rays = t_start.numel();
  if (rays == 0) return;
  const Launch launch(origins);
  march_kernel<<<blocks(rays), THREADS>>>(
      grid, rule, origins.data_ptr<float>(), dirs.data_ptr<float>(), t_start.data_ptr<float>(),
      t_far.data_ptr<float>(), rays, max_samples, offsets ? nullptr : counts.data_ptr<int64_t>(),
      offsets ? offsets->data_ptr<int64_t>() : nullptr, t0 ? t0->data_ptr<float>() : nullptr,
      t1 ? t1->data_ptr<float>() : nullptr);
  launch.done("march");
}

void nearest_cuda(const torch::Tensor& points, const torch::Tensor& centres, const torch::Tensor& candidates,
                  int64_t resolution, int64_t k, torch::Tensor& index, torch::Tensor& d2) {
  const int64_t n = points.size(0);
  if (n == 0) return;
  const Launch launch(points);
  nearest_kernel<<<blocks(n), THREADS>>>(
      points.data_ptr<float>(), centres.data_ptr<float>(), candidates.data_ptr<int64_t>(), n,
      static_cast<int>(points.size(1)), candidates.size(1), resolution, static_cast<int>(k),
      index.data_ptr<int64_t>(), d2.data_ptr<float>());
  launch.done("nearest");
}
