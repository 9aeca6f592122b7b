"""CPU GEMM with weights pre-packed once for oneDNN.

torch's default CPU path for `F.linear` in float32 is MKL's sgemm, which on AMD
CPUs runs its AVX2 code even where the CPU has AVX-512, and re-reads the plain
row-major weight every call. oneDNN picks the best ISA the CPU has (AVX-512,
VNNI, bf16) and, with the weight reordered once into its blocked layout, runs
the same fp32 maths 2-4x faster on the matmul shapes of a decoder (measured on
a 2-core AMD EPYC: see benchmarks/README.md). Results match `F.linear` to
float rounding (~1e-6 relative), not bit for bit.

Batch invariance: for two or more rows, a row's result does not depend on how
many rows there are; a single row can take another path (seen with K = 1536),
so one row is computed as two. A request's matmuls then give the same numbers
alone or batched (attention is another matter: see attention/torch_backend.py).

`pack(weight, bias)` is called by a linear layer after its weights are loaded
(`pack_weights`); it returns None where the dtype/device cannot use oneDNN.
The packed weight is an opaque oneDNN tensor: the plain weight may be dropped.

torch.compile cannot trace an opaque oneDNN tensor, so under compilation a packed matmul is the
custom op `kestrel::packed_linear(x, handle, out_features)`: `handle` is a 0-d int64 tensor naming
the kernel in a registry of weak references (a tensor, not an int, so one compiled graph serves
every layer of the same shape), and the op's fake implementation gives the output shape.

With a quantized weight (`--cpu-quantized-decode`) a kernel keeps both weights and runs matmuls of
up to the quantized kernel's `max_rows` rows on it (`kernels/cpu_quant.py`: int4 or int8, fewer
bytes read, bf16 activations; at most `QUANTIZED_ROWS_BESIDE_BF16` beside the bf16 kernel below),
larger ones (prefill, big batches) on the packed one. The
quantized kernels return bf16, too coarse for the LM head's logits (near-ties decide greedy tokens:
bf16 rounding alone changed 4% of SmolLM2's top-1 tokens), so a head kernel built with
`refine_top_k` recomputes the k largest logits of each row in fp32 from the plain weight (in the
weight's dtype: bf16 for a bf16 model).

bf16 weights on a CPU with AVX512-BF16 also get a copy in `kernels/cpu_bf16_gemm.py`'s layout: matmuls of
up to `cpu_bf16_gemm.MAX_ROWS` rows (decode batches, short chunks) run on that kernel, 1.1-2x faster than
oneDNN there; oneDNN keeps the larger ones (prefill), where it is ~13% faster at 512 rows. Each row's result
is the same whatever the row count within each kernel's range, but the two kernels round differently.

Compiled decode steps know which kernel a matmul takes from the step's row count alone (`graph_rows`):
there, a matmul left to oneDNN calls the C++ op `kestrel_cpu_linear::linear(x, handle, out_features)`
(`SOURCE`, built with the CPU attention kernels), which finds the packed weight in a registry of weak
references kept in C++ and calls oneDNN's op itself: ~30 us of Python a call less than
`kestrel::packed_linear` (120 calls a SmolLM2 decode step). Compiled prefill pieces, whose chunks can be
of any size, call `kestrel_cpu_linear::linear_any`, which picks per call in C++: the small bf16 kernel's copy
(registered beside the packed weight) up to its `bf16_rows`, oneDNN beyond; the quantized kernels are left
to decode steps (a prefill piece of a few rows runs in bf16). Where the C++ ops are not built, pieces call
`kestrel::packed_linear`, which picks per call in Python (~25 us a call more).

Eager, the choice is made per call (`eager`). Compiled decode steps of few rows call the quantized
kernels inside the graph itself (their weights are plain tensors, unlike oneDNN's), with no custom-op
wrapper around them (~30 us a call from Python), and so do steps of up to `cpu_bf16_gemm.MAX_ROWS` rows
with the bf16 kernel's op: the decode runner says which graph a step takes (`graph_rows`), and
torch.compile keeps one graph for each answer. Results then depend slightly
on a step's row count (which kernel ran).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import weakref
from collections.abc import Iterator

import torch

from kestrel.kernels import cpu_amx_gemm, cpu_bf16_gemm
from kestrel.kernels.cpu_amx_gemm import PackedAmx
from kestrel.kernels.cpu_bf16_gemm import PackedBf16
from kestrel.kernels.cpu_quant import QuantizedWeight, quantized_linear

# Batch-size hint for the packed layout; any batch size works with any hint.
_HINT_BATCH = 16
QUANTIZED_ROWS_BESIDE_BF16 = 4
"""With the bf16 small-matmul kernel beside it, the quantized kernel runs at most this many rows: above,
the bf16 kernel is faster (SmolLM2's layers at 8 rows, 2-core Zen 4: int4 14 ms, bf16 kernel 12-13)."""

_KERNELS: weakref.WeakValueDictionary[int, PackedLinear] = weakref.WeakValueDictionary()
"""handle -> kernel, for the custom op a compiled graph calls."""
_NEXT_HANDLE = itertools.count()
_GRAPH_ROWS = "any"
"""While tracing: the row range of the step the graph is for (see `graph_rows`)."""


@contextlib.contextmanager
def graph_rows(kind: str) -> Iterator[None]:
    """Compiled calls inside take (or trace) the graph for steps of this many rows:

    - "quantized": at most the kernels' `quantized_rows` (the quantized kernels run in the graph);
    - "small": at most the kernels' `bf16_rows` (bf16 weights run the AMX or `cpu_bf16_gemm` op in the graph);
    - "large": more than both (a decode step of many rows): the rest run on oneDNN;
    - "any" (compiled prefill pieces): every matmul goes through `kestrel_cpu_linear::linear_any` (or, unbuilt,
      `kestrel::packed_linear`), which picks per call.

    In the first three, a matmul neither small kernel takes runs on oneDNN through the C++ op (see the
    module docstring). The compiled decode runner enters this per step; torch.compile guards on it, so
    each kind of step keeps a graph of its own.
    """
    global _GRAPH_ROWS
    before, _GRAPH_ROWS = _GRAPH_ROWS, kind
    try:
        yield
    finally:
        _GRAPH_ROWS = before


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None, quantized: QuantizedWeight | None = None,
         refine_top_k: int = 0) -> PackedLinear | None:
    """A packed kernel for weight [out, in] (+ bias), or None where packing is not supported.

    `quantized`: the same weight quantized, for matmuls of few rows; `refine_top_k`: their k largest
    outputs per row recomputed in fp32 (keeps a reference to `weight`). See the module docstring.
    """
    if not packing_supported(weight.dtype, weight.device):
        return None
    return PackedLinear(weight, bias, quantized, refine_top_k)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX), so bf16 GEMMs beat fp32 ones."""
    if not packing_supported(torch.float32, torch.device("cpu")):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear:
    """y = x @ W.T (+ b) with W packed for oneDNN; x is [..., in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 quantized: QuantizedWeight | None = None, refine_top_k: int = 0) -> None:
        # weight: [out, in]
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _HINT_BATCH)
        self.bias = None if bias is None else bias.detach().contiguous()
        self.small = None if quantized is None else quantized_linear(quantized)
        """The quantized kernel, for matmuls of up to `quantized_rows` rows, or None."""
        if self.small is not None and (self.small.out_features, self.small.in_features) != tuple(weight.shape):
            raise ValueError(f"quantized weight of shape {(self.small.out_features, self.small.in_features)} "
                             f"does not match the weight's {tuple(weight.shape)}")
        self.bf16: PackedAmx | PackedBf16 | None = None
        """The weight in the small-matmul kernel's layout (AMX tiles where the CPU has them, else
        `cpu_bf16_gemm`'s), for bf16 matmuls of up to `bf16_rows` rows."""
        self.bf16_rows = 0
        if weight.dtype == torch.bfloat16 and cpu_amx_gemm.supports(weight) and cpu_amx_gemm.available():
            self.bf16, self.bf16_rows = cpu_amx_gemm.pack_bf16(weight, bias), cpu_amx_gemm.MAX_ROWS
        elif cpu_bf16_gemm.supports(weight) and cpu_bf16_gemm.use():
            self.bf16, self.bf16_rows = cpu_bf16_gemm.pack(weight, bias), cpu_bf16_gemm.MAX_ROWS
        self.quantized_rows = 0 if self.small is None else self.small.max_rows
        """Matmuls of up to this many rows run on the quantized weight."""
        if self.bf16 is not None:
            self.quantized_rows = min(self.quantized_rows, QUANTIZED_ROWS_BESIDE_BF16)
        self.refine_top_k = min(refine_top_k, self.out_features) if self.small is not None else 0
        self.plain = weight.detach() if self.refine_top_k else None  # [out, in], for the refined outputs
        key = next(_NEXT_HANDLE)
        _KERNELS[key] = self
        self.handle = torch.tensor(key, dtype=torch.int64)
        self.native = _native_op()
        """The packed weight is in the C++ registry: decode graphs call `kestrel_cpu_linear::linear`."""
        if self.native:
            torch.ops.kestrel_cpu_linear.register_weight(key, self.packed, self.bias)
            if self.bf16 is not None:
                kind = 1 if isinstance(self.bf16, PackedAmx) else 2
                torch.ops.kestrel_cpu_linear.register_small(key, self.bf16.packed, self.bf16.bias, kind,
                                                            self.bf16_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if torch.compiler.is_compiling():
            if self.small is not None and _GRAPH_ROWS == "quantized":
                return self._quantized(x)
            if self.bf16 is not None and _GRAPH_ROWS in ("quantized", "small"):
                return _bf16_linear(x, self.bf16)  # the C++ op itself: no Python wrapper per call
            if self.native and _GRAPH_ROWS != "any":  # a decode graph: the rows are past both small kernels
                return torch.ops.kestrel_cpu_linear.linear(x, self.handle, self.out_features)
            if self.native:  # a prefill piece: C++ picks the small bf16 kernel or oneDNN by the rows
                return torch.ops.kestrel_cpu_linear.linear_any(x, self.handle, self.out_features)
            return torch.ops.kestrel.packed_linear(x, self.handle, self.out_features)
        return self.eager(x)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 0 < rows <= self.quantized_rows:
            return self._quantized(x)
        if 0 < rows <= self.bf16_rows:
            return _bf16_linear(x, self.bf16)
        if x.numel() == self.in_features:  # one row: run it as two (see the module docstring)
            out = self._matmul(x.reshape(1, -1).expand(2, -1).contiguous())[:1]
            return out.view(*x.shape[:-1], self.out_features)
        return self._matmul(x.contiguous())

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self.small(flat)  # [rows, out]
        if self.bias is not None:
            out = out + self.bias
        if self.refine_top_k:
            self._refine(flat, out)
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _refine(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Recompute each row's `refine_top_k` largest outputs in fp32, in place. x [rows, in], out [rows, out]."""
        top = out.topk(self.refine_top_k, dim=-1).indices  # [rows, k]
        exact = torch.bmm(self.plain[top], x.to(self.plain.dtype).unsqueeze(-1)).squeeze(-1)  # [rows, k]
        if self.bias is not None:
            exact += self.bias[top]
        out.scatter_(1, top, exact.to(out.dtype))


def _bf16_linear(x: torch.Tensor, weight: PackedAmx | PackedBf16) -> torch.Tensor:
    if isinstance(weight, PackedAmx):
        return cpu_amx_gemm.linear(x, weight)
    return cpu_bf16_gemm.linear(x, weight)


def packed_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """The packed kernel `handle` applied to x [..., in] -> [..., out_features] (what compiled graphs call)."""
    return _KERNELS[int(handle)].eager(x)


# Registered with the low-level library API rather than `torch.library.custom_op`: the dispatcher then
# calls the Python function directly, without custom_op's autograd and schema-inference wrappers
# (measured on a 2-core Zen 4: ~25 us a call instead of ~70, on 121 calls a decode step).
_LIB = torch.library.Library("kestrel", "DEF")
_LIB.define("packed_linear(Tensor x, Tensor handle, int out_features) -> Tensor")
_LIB.impl("packed_linear", packed_linear, "CPU")


@torch.library.register_fake("kestrel::packed_linear")
def _(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@functools.cache
def _native_op() -> bool:
    """`SOURCE`'s ops are built (with the CPU attention kernels) and may be used."""
    from kestrel.kernels import cpu_attention

    if os.environ.get("KESTREL_CPU_LINEAR_OP", "1") == "0" or not cpu_attention.load():
        return False

    @torch.library.register_fake("kestrel_cpu_linear::linear")
    def _(x, handle, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("kestrel_cpu_linear::linear_any")
    def _(x, handle, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    return True


SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <iterator>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

namespace kestrel_linear {
namespace {

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakTensor weight;  // oneDNN-packed, owned by the Python PackedLinear
  std::optional<WeakTensor> bias;
  // the small-matmul kernel's copy (PackedLinear.bf16), for `linear_any` calls of up to small_rows rows
  int64_t small_kind = 0;  // 0: none, 1: kestrel_cpu_amx::linear, 2: kestrel_cpu_gemm::linear
  int64_t small_rows = 0;
  std::optional<WeakTensor> small_packed, small_bias;
};

std::mutex registry_mutex;
std::unordered_map<int64_t, Entry> registry;

at::Tensor lock(const WeakTensor& weak) {
  auto strong = weak.lock();
  TORCH_CHECK(strong.defined(), "kestrel_cpu_linear: a registered weight was freed");
  return at::Tensor(std::move(strong));
}

// Entries whose weight is gone (its PackedLinear freed) are swept here: nothing is unregistered from
// Python, where a finalizer could run inside a tracing dispatch mode. A weak reference keeps only the
// TensorImpl's shell alive, not the packed buffer.
void register_weight(int64_t handle, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  std::lock_guard<std::mutex> guard(registry_mutex);
  for (auto it = registry.begin(); it != registry.end();) {
    it = it->second.weight.expired() ? registry.erase(it) : std::next(it);
  }
  Entry entry{WeakTensor(weight.getIntrusivePtr()), std::nullopt};
  if (bias.has_value() && bias->defined()) entry.bias = WeakTensor(bias->getIntrusivePtr());
  registry.insert_or_assign(handle, std::move(entry));
}

void register_small(int64_t handle, const at::Tensor& packed, const std::optional<at::Tensor>& bias, int64_t kind,
                    int64_t max_rows) {
  std::lock_guard<std::mutex> guard(registry_mutex);
  auto it = registry.find(handle);
  TORCH_CHECK(it != registry.end(), "kestrel_cpu_linear: register the weight before its small kernel");
  TORCH_CHECK(kind == 1 || kind == 2, "kestrel_cpu_linear: small kernel kind 1 (AMX) or 2 (AVX512-BF16)");
  it->second.small_kind = kind;
  it->second.small_rows = max_rows;
  it->second.small_packed = WeakTensor(packed.getIntrusivePtr());
  if (bias.has_value() && bias->defined()) it->second.small_bias = WeakTensor(bias->getIntrusivePtr());
}

at::Tensor onednn(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  int64_t out_features);

// x [..., K] -> [..., out_features] on the packed weight `handle` (a 0-d int64 tensor): oneDNN's
// mkldnn::_linear_pointwise, as PackedLinear._matmul calls it; one row runs as two (batch invariance).
at::Tensor linear(const at::Tensor& x, const at::Tensor& handle, int64_t out_features) {
  const int64_t key = *handle.data_ptr<int64_t>();
  at::Tensor weight;
  std::optional<at::Tensor> bias;
  {
    std::lock_guard<std::mutex> guard(registry_mutex);
    auto it = registry.find(key);
    TORCH_CHECK(it != registry.end(), "kestrel_cpu_linear: no weight registered as ", key);
    weight = lock(it->second.weight);
    if (it->second.bias) bias = lock(*it->second.bias);
  }
  return onednn(x, weight, bias, out_features);
}

// As `linear`, but a call of up to the entry's small_rows rows runs on its small-matmul kernel (what compiled
// prefill pieces call: their row count is known only at run time).
at::Tensor linear_any(const at::Tensor& x, const at::Tensor& handle, int64_t out_features) {
  const int64_t key = *handle.data_ptr<int64_t>();
  const int64_t k = x.size(-1);
  const int64_t rows = k == 0 ? 0 : x.numel() / k;
  at::Tensor weight, packed;
  std::optional<at::Tensor> bias, small_bias;
  int64_t kind = 0;
  {
    std::lock_guard<std::mutex> guard(registry_mutex);
    auto it = registry.find(key);
    TORCH_CHECK(it != registry.end(), "kestrel_cpu_linear: no weight registered as ", key);
    const Entry& e = it->second;
    if (e.small_kind != 0 && rows > 0 && rows <= e.small_rows) {
      kind = e.small_kind;
      packed = lock(*e.small_packed);
      if (e.small_bias) small_bias = lock(*e.small_bias);
    } else {
      weight = lock(e.weight);
      if (e.bias) bias = lock(*e.bias);
    }
  }
  if (kind == 0) return onednn(x, weight, bias, out_features);
  static const auto amx = c10::Dispatcher::singleton().findSchemaOrThrow("kestrel_cpu_amx::linear", "");
  static const auto gemm = c10::Dispatcher::singleton().findSchemaOrThrow("kestrel_cpu_gemm::linear", "");
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(packed);
  if (kind == 1) stack.emplace_back(c10::IValue());  // w_scale: bf16 weights have none
  stack.emplace_back(small_bias.has_value() ? c10::IValue(*small_bias) : c10::IValue());
  stack.emplace_back(out_features);
  (kind == 1 ? amx : gemm).callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor onednn(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  int64_t out_features) {
  const int64_t k = x.size(-1);
  const int64_t rows = k == 0 ? 0 : x.numel() / k;
  at::Tensor in = x.reshape({rows, k});
  if (rows == 1) in = in.expand({2, k});
  in = in.contiguous();
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(in);
  stack.emplace_back(weight);
  stack.emplace_back(bias.has_value() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(c10::IValue());
  op.callBoxed(&stack);
  at::Tensor out = stack[0].toTensor();
  if (rows == 1) out = out.narrow(0, 0, 1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return out.view(shape);
}

}  // namespace
}  // namespace kestrel_linear

TORCH_LIBRARY(kestrel_cpu_linear, m) {
  m.def("linear(Tensor x, Tensor handle, int out_features) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(kestrel_linear::linear));
  m.def("linear_any(Tensor x, Tensor handle, int out_features) -> Tensor");
  m.impl("linear_any", c10::DispatchKey::CPU, TORCH_FN(kestrel_linear::linear_any));
  m.def("register_weight(int handle, Tensor weight, Tensor? bias) -> ()");
  m.impl("register_weight", c10::DispatchKey::CatchAll, TORCH_FN(kestrel_linear::register_weight));
  m.def("register_small(int handle, Tensor packed, Tensor? bias, int kind, int max_rows) -> ()");
  m.impl("register_small", c10::DispatchKey::CatchAll, TORCH_FN(kestrel_linear::register_small));
}
"""
