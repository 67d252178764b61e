// Mixed-dtype operands, for both backends (docs/design.md, "Mixed precision").
//
// A call whose float operands have different dtypes (a bf16 model output with float32 data, as under autocast)
// computes in float32 and reads each operand in its own dtype: float32, float16 or bfloat16 (the host side
// refuses other mixes, csrc/checks.h). Such an operand is its address and its dtype (MixedPtr); the family
// functors (csrc/family.h) take it through their Ptrs policy, MixedPtrs, and the backend's IO policy converts
// it to float32 lanes on load (csrc/cpu/loops.h, MixedLanes; csrc/cuda/launch.cuh, PacketIO's MixedPtr
// overloads). Outputs have the promoted dtype, float32 (float*), except the loss gradients, which are written
// in the model output's dtype (a MixedMutPtr), rounded once.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "family.h"

namespace ddpm {

enum class OperandType : uint8_t { kFloat, kHalf, kBFloat16 };

inline OperandType operand_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return OperandType::kHalf;
    case at::kBFloat16: return OperandType::kBFloat16;
    default: return OperandType::kFloat;
  }
}

// An operand's address (Byte: const char, or char for an output) and dtype; `+ i` steps i of its own elements.
template <typename Byte>
struct MixedPtrOf {
  Byte* p;
  OperandType type;
  DDPM_LANE MixedPtrOf operator+(int64_t i) const {
    return {p + i * (type == OperandType::kFloat ? 4 : 2), type};
  }
  DDPM_LANE bool operator==(std::nullptr_t) const { return p == nullptr; }
};
using MixedPtr = MixedPtrOf<const char>;
using MixedMutPtr = MixedPtrOf<char>;

// One element's value in float32 (csrc/family.h's value_at for a mixed operand).
DDPM_HD float value_at(MixedPtr p) {
  switch (p.type) {
    case OperandType::kHalf: return static_cast<float>(*reinterpret_cast<const at::Half*>(p.p));
    case OperandType::kBFloat16: return static_cast<float>(*reinterpret_cast<const at::BFloat16*>(p.p));
    default: return *reinterpret_cast<const float*>(p.p);
  }
}

// The Ptrs policy (csrc/family.h) of a mixed call.
struct MixedPtrs {
  using in = MixedPtr;
  using out = MixedMutPtr;
  using model_in = MixedPtr;
  static in input(const at::Tensor& t) { return {static_cast<const char*>(t.const_data_ptr()), operand_type(t)}; }
  static out output(const at::Tensor& t) { return {static_cast<char*>(t.mutable_data_ptr()), operand_type(t)}; }
  static model_in model_input(const at::Tensor& t) { return input(t); }
};

// The Ptrs policy of the autocast mix, typed: the model outputs (model_in) in the 16-bit float dtype M, every
// other operand float32. Only for a functor that reads its model outputs through model_in and nothing else of
// that dtype (the CPU step kernels that choose it: csrc/cpu/loops.h, dispatch_model_operands).
template <typename M>
struct AutocastPtrs {
  using in = const float*;
  using out = float*;
  using model_in = const M*;
  static in input(const at::Tensor& t) { return t.const_data_ptr<float>(); }
  static out output(const at::Tensor& t) { return t.mutable_data_ptr<float>(); }
  static model_in model_input(const at::Tensor& t) { return t.const_data_ptr<M>(); }
};

// Whether the float operands of a call (nullptr: an absent one) have different dtypes.
inline bool mixed_operands(std::initializer_list<const at::Tensor*> operands) {
  const at::Tensor* first = nullptr;
  for (const at::Tensor* t : operands) {
    if (t == nullptr) continue;
    if (first == nullptr) first = t;
    else if (t->scalar_type() != first->scalar_type()) return true;
  }
  return false;
}

// A type as a value, for the generic lambdas of the backends' dispatches.
template <typename T>
struct Tag {
  using type = T;
};

}  // namespace ddpm
