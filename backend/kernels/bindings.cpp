// The Python module of the project's CPU kernels (see cpu_kernels.h).
//
// The GIL is released for every call, as torch's own ops do: a serving process has Python
// threads (response senders, BLS consumers) that must run while the engine computes.
#include <torch/extension.h>

#include "cpu_kernels.h"

namespace msk {
void bind_decode_step(pybind11::module_& m);  // decode_step.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using pybind11::call_guard;
  using pybind11::gil_scoped_release;
  m.def("int4_mm", &msk::int4_mm, "int4 x bf16 decode matmul", call_guard<gil_scoped_release>());
  m.def("int8_mm", &msk::int8_mm, "int8 x bf16 -> fp32 matmul (LM head)", call_guard<gil_scoped_release>());
  msk::bind_decode_step(m);
}
