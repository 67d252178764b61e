// CPU kernels of the loss family (csrc/loss.h).
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "loops.h"

#include "../loss.h"

namespace ddpm::cpu::CPU_CAPABILITY {

// Elements per reduction chunk: partial sums are kept per (sample, chunk) in float64, so the result does
// not depend on the thread count, and the float32 lane accumulators sum at most a few hundred terms.
constexpr int64_t kLossChunk = 4096;

// A call whose model_output, x_start and noise have different dtypes computes in float32 and reads each in its
// own (csrc/cpu/loops.h, MixedLanes): the outputs in float32, the gradient in model_output's dtype.
void Kernels::diffusion_loss(const LossCall& call, const at::Tensor& loss, const at::Tensor& loss_simple,
                             const at::Tensor& loss_vlb) {
  const int64_t B = call.model_output.size(0), N = call.model_output.numel() / B;
  const int64_t chunks = (N + kLossChunk - 1) / kLossChunk;
  std::vector<double> partial(B * chunks, 0.0);
  const bool mixed = mixed_operands({&call.model_output, &call.x_start, &call.noise});
  dispatch_operands(call.model_output.scalar_type(), mixed, [&](auto S, auto Ps,
                                                                                              auto IO) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    // float32 data sums in a mixed call's slices (two vectors, two accumulators): a mixed call and the call
    // with its operands cast to float32 add the same terms in the same order, so they give the same bits
    using L = std::conditional_t<std::is_same_v<scalar_t, float>, MixedLanes, typename decltype(IO)::type>;
    using V = typename L::V;
    with_param_and_bool(call.param, call.l1, [&](auto P, auto L1) {
      const auto f = LossKernel<scalar_t, decltype(P), decltype(L1), Ptrs>::make(call, P, L1);
      at::parallel_for(0, B * chunks, std::max<int64_t>(1, 32768 / kLossChunk), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t b = c / chunks;
          const auto lc = f.loss_coef(b);
          int64_t i = b * N + (c % chunks) * kLossChunk;
          const int64_t stop = std::min(i + kLossChunk, (b + 1) * N);
          V acc[L::kLanes];
          for (int k = 0; k < L::kLanes; ++k) acc[k] = splat<V>(0);
          for (; i < stop; i += L::size()) {
            f.template accumulate<L>(i, std::min<int64_t>(L::size(), stop - i), lc, acc);
          }
          double s = 0;
          for (int k = 0; k < L::kLanes; ++k) s += hsum(acc[k]);
          partial[c] = s;
        }
      });
      LossTotals totals;
      for (int64_t b = 0; b < B; ++b) {
        double s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
        totals.add_sample(s, N, static_cast<double>(f.loss_coef(b).weight));
      }
      totals.store(B, call.l_simple_weight, call.original_elbo_weight, loss.mutable_data_ptr<scalar_t>(),
                   loss_simple.mutable_data_ptr<scalar_t>(), loss_vlb.mutable_data_ptr<scalar_t>());
    });
  });
}

void Kernels::diffusion_loss_backward(const LossCall& call, const at::Tensor& grad_loss,
                                      const at::Tensor& grad_loss_simple, const at::Tensor& grad_loss_vlb,
                                      const at::Tensor& grad) {
  const int64_t numel = call.model_output.numel();
  const bool mixed = mixed_operands({&call.model_output, &call.x_start, &call.noise});
  dispatch_operands(call.model_output.scalar_type(), mixed, [&](auto S, auto Ps, auto IO) {
    using scalar_t = typename decltype(S)::type;
    using Ptrs = typename decltype(Ps)::type;
    with_param_and_bool(call.param, call.l1, [&](auto P, auto L1) {
      run_family_io<typename decltype(IO)::type>(LossKernel<scalar_t, decltype(P), decltype(L1), Ptrs>::make_backward(
                                                     call, P, L1, grad_loss, grad_loss_simple, grad_loss_vlb, grad),
                                                 numel, numel / call.model_output.size(0));
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
