// CPU kernels of the flow-matching family (csrc/flow.h): the interpolant and the step (the flow step and the
// Euler steps on a sigma table) are one pass of the family loop; the step's guidance rescale adds one reduction
// pass first (cpu/guidance.h); the loss is a chunked reduction (deterministic: fixed chunks, float64 partials)
// and its backward one pass.
// The Euler samplers round every product before its sum, as the reference does (csrc/flow.h, euler_element):
// no contraction into fused multiply-adds in this file (GCC contracts `a * b + c` by default, also for at::vec
// lanes; the kernels' intended fused multiply-adds are explicit at::vec::fmadd calls, madd).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <type_traits>
#include <vector>

#include "guidance.h"
#include "kernels.h"
#include "loops.h"
#include "noise.h"

#include "../flow.h"

namespace ddpm::cpu::CPU_CAPABILITY {
namespace {

// Elements per reduction piece of the loss (a parallel work item), and per float64 flush of the lane
// accumulators inside it (as the guidance rescale's, cpu/guidance.h): partial sums per (sample, piece) make the
// result independent of the thread count. The loss sums into two accumulator sets, alternate slices each, so
// consecutive slices do not wait on one add's latency: each float32 lane sums at most 64 terms per flush.
constexpr int64_t kFlowChunk = 4096;
constexpr int64_t kFlowFlush = 2048;

}  // namespace

// A call whose operands have different dtypes (x0 and noise; the step's sample, model outputs and noise; the
// loss's three operands) computes in float32 and reads each in its own (csrc/cpu/loops.h, MixedLanes); its
// outputs have the promoted dtype, float32 (the loss's gradient: model_output's dtype).
void Kernels::flow_interpolate(const FlowInterpolateCall& call) {
  const int64_t numel = call.x.numel();
  dispatch_operands(call.x.scalar_type(), mixed_operands({&call.x, call.y, &call.out}), [&](auto St, auto Ps, auto IO) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    with_bool(call.period > 1, [&](auto T) {
      run_family_io<typename decltype(IO)::type>(FlowInterpolateKernel<scalar_t, decltype(T), Ptrs>::make(call, T),
                                                 numel, numel / call.x.size(0));
    });
  });
}

// Every sampler of the step kernel (csrc/flow.h): the flow samplers specialised by per-token sigmas, the Euler
// samplers by the parameterization; a step without a noise term compiles no noise source.
void Kernels::flow_step(const FlowStepCall& call) {
  const int64_t numel = call.sample.numel();
  // (the autocast mix, float32 data with float16 / bfloat16 model outputs, runs typed: AutocastPtrs)
  dispatch_step_with_noise({&call.model_output, call.uncond}, {&call.sample, call.noise, &call.out, call.x0},
                           call.sample, call.noise, call.adds_noise(), call.generator, call.sample_offset,
                           [&](auto St, auto Ps, auto IO, const auto& z) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    using L = typename decltype(IO)::type;
    if (numel == 0) return;
    const int64_t B = call.sample.size(0), N = numel / B;
    std::vector<double> sums;
    const auto run = [&](auto S, auto P, auto G, auto T) {
      auto f = FlowStepKernel<scalar_t, decltype(S), decltype(P), decltype(G), decltype(T), Ptrs>::make(call, S, P,
                                                                                                         G, T);
      prepare_rescale(f.guide, B, sums);
      if constexpr (decltype(S)::value == StepSampler::kFlow) {
        run_family_io<L>(f, numel, N);
      } else {
        run_family_io<L>(f, numel, N, z);
      }
    };
    using Eps = std::integral_constant<Param, Param::kEps>;  // unread by the flow samplers
    with_bool(call.guided(), [&](auto G) {
      switch (call.sampler) {
        case StepSampler::kFlow:
          return with_bool(call.per_token(), [&](auto T) {
            run(std::integral_constant<StepSampler, StepSampler::kFlow>(), Eps(), G, T);
          });
        case StepSampler::kFlowStochastic:
          return with_bool(call.per_token(), [&](auto T) {
            run(std::integral_constant<StepSampler, StepSampler::kFlowStochastic>(), Eps(), G, T);
          });
        case StepSampler::kEuler:
          return with_param(call.euler.param, [&](auto P) {
            run(std::integral_constant<StepSampler, StepSampler::kEuler>(), P, G, std::false_type());
          });
        case StepSampler::kEulerAncestral:
          return with_param(call.euler.param, [&](auto P) {
            run(std::integral_constant<StepSampler, StepSampler::kEulerAncestral>(), P, G, std::false_type());
          });
      }
    });
  });
}

void Kernels::flow_loss(const FlowLossCall& call, const at::Tensor& loss) {
  const int64_t B = call.model_output.size(0), N = call.model_output.numel() / B;
  const int64_t chunks = (N + kFlowChunk - 1) / kFlowChunk;
  std::vector<double> partial(B * chunks, 0.0);
  dispatch_operands(call.model_output.scalar_type(), call.mixed(), [&](auto St, auto Ps, auto IO) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    // float32 data sums in a mixed call's slices (two vectors): a mixed call and the call with its operands cast
    // to float32 add the same terms in the same order, so they give the same bits
    using L = std::conditional_t<std::is_same_v<scalar_t, float>, MixedLanes, typename decltype(IO)::type>;
    using V = typename L::V;
    using acc_t = at::opmath_type<scalar_t>;
    with_bool(call.l1, [&](auto L1) {
      with_bool(call.period > 1, [&](auto T) {
        const auto f = FlowLossKernel<scalar_t, decltype(L1), decltype(T), Ptrs>::make(call, L1, T);
        at::parallel_for(0, B * chunks, std::max<int64_t>(1, 32768 / kFlowChunk), [&](int64_t c0, int64_t c1) {
          const auto fl = f;  // a task-local copy: its pointers stay in registers across the loop
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t b = c / chunks;
            int64_t i = b * N + (c % chunks) * kFlowChunk;
            const int64_t stop = std::min(i + kFlowChunk, (b + 1) * N);
            double s = 0;
            while (i < stop) {
              const int64_t flush = std::min(i + kFlowFlush, stop);
              V acc[2][L::kLanes];
              for (int k = 0; k < L::kLanes; ++k) acc[0][k] = acc[1][k] = splat<V>(0);
              if constexpr (decltype(T)::value) {
                TokenCursor cur = fl.token_cursor(b, i);  // walked slice by slice: no division per slice
                for (; i + 2 * L::size() <= flush; i += 2 * L::size()) {
                  fl.template accumulate_at<L>(b, i, L::size(), cur, acc[0]);
                  fl.template accumulate_at<L>(b, i + L::size(), L::size(), cur, acc[1]);
                }
                for (; i < flush; i += L::size()) {
                  fl.template accumulate_at<L>(b, i, std::min<int64_t>(L::size(), flush - i), cur, acc[0]);
                }
              } else {
                for (; i + 2 * L::size() <= flush; i += 2 * L::size()) {
                  fl.template accumulate<L>(b, i, L::size(), acc[0]);
                  fl.template accumulate<L>(b, i + L::size(), L::size(), acc[1]);
                }
                for (; i < flush; i += L::size()) {
                  fl.template accumulate<L>(b, i, std::min<int64_t>(L::size(), flush - i), acc[0]);
                }
              }
              for (int k = 0; k < L::kLanes; ++k) s += hsum(acc[0][k] + acc[1][k]);
            }
            partial[c] = s;
          }
        });
        std::vector<double> sample_sums(B, 0.0);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < chunks; ++c) sample_sums[b] += partial[b * chunks + c];
        *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(flow_loss_total(f, sample_sums.data(), B, N));
      });
    });
  });
}

void Kernels::flow_loss_backward(const FlowLossCall& call, const at::Tensor& grad_loss, const at::Tensor& grad) {
  const int64_t numel = call.model_output.numel();
  dispatch_operands(call.model_output.scalar_type(), call.mixed(), [&](auto St, auto Ps, auto IO) {
    using scalar_t = typename decltype(St)::type;
    using Ptrs = typename decltype(Ps)::type;
    using L = typename decltype(IO)::type;
    with_bool(call.l1, [&](auto L1) {
      with_bool(call.period > 1, [&](auto T) {
        const auto f = FlowLossKernel<scalar_t, decltype(L1), decltype(T), Ptrs>::make_backward(call, L1, T,
                                                                                                grad_loss, grad);
        const int64_t N = numel / call.model_output.size(0);
        if constexpr (decltype(T)::value) {
          // run_family's loop with the sigma's cursor walked along each segment (no division per slice)
          parallel_blocks(numel, [&](int64_t blk0, int64_t blk1) {
            for_each_segment(blk0, blk1, numel, N, [&](int64_t b, int64_t i, int64_t stop) {
              const auto c = f.coef(b);
              TokenCursor cur = f.token_cursor(b, i);
              for (; i < stop; i += L::size()) f.template apply_at<L>(b, i, std::min<int64_t>(L::size(), stop - i), c, cur);
            });
          });
        } else {
          run_family_io<L>(f, numel, N);
        }
      });
    });
  });
}

}  // namespace ddpm::cpu::CPU_CAPABILITY
