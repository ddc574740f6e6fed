// The Python module of the CPU kernels: the WKV operator (kernels/wkv_cpu.cpp), the matvecs
// (kernels/matvec_cpu.cpp), each architecture's one-token step (kernels/step_rwkv4.cpp ...
// step_rwkv7.cpp), and the top-p sampler (kernels/sampling_cpu.cpp).
// pybind11 with torch's Tensor casters, without torch/extension.h (the C++ frontend: ~30 s more
// compile time for nothing this module uses)
#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include "matrix_step.h"
#include "rnn_cpu.h"

// kernels/wkv_cpu.cpp
std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                       at::Tensor aa, at::Tensor bb, at::Tensor pp);
at::Tensor wkv_train_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v);
std::vector<at::Tensor> wkv_train_backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v,
                                              at::Tensor y, at::Tensor gy);
// kernels/wkv_matrix_cpu.cpp
std::vector<at::Tensor> wkv5_forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w,
                                        at::Tensor u, at::Tensor state);
std::vector<at::Tensor> wkv7_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                        at::Tensor kk, at::Tensor a, at::Tensor state);
std::vector<at::Tensor> wkv7_train_forward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                              at::Tensor kk, at::Tensor a);
std::vector<at::Tensor> wkv7_train_backward(at::Tensor r, at::Tensor w, at::Tensor k, at::Tensor v,
                                               at::Tensor kk, at::Tensor a, at::Tensor checkpoints,
                                               at::Tensor gy);
// kernels/sampling_cpu.cpp
int64_t sample_top_p(const at::Tensor& logits, double temperature, double top_p, int64_t top_k, double uniform,
                     const std::string& isa);

namespace py = pybind11;

// An RWKV-5/6/7 step class: the same constructor, properties and step for each architecture.
template <typename Step>
void bind_matrix_step(py::module& m, const char* name, const char* title) {
  const std::string doc = std::string(title) + " weights for the one-token step, by checkpoint name (LoRAs transposed)";
  py::class_<Step>(m, name, doc.c_str())
      .def(py::init<const std::map<std::string, at::Tensor>&, int64_t, int64_t, int64_t, double, double,
                    const std::string&>(),
           py::arg("weights"), py::arg("n_layer"), py::arg("n_head"), py::arg("head_size"), py::arg("layer_norm_eps"),
           py::arg("group_norm_eps"), py::arg("isa") = "auto")
      .def_property_readonly("isa", &Step::isa)
      .def_property_readonly("storage", &Step::storage)
      .def("step", &Step::step, py::arg("tokens"), py::arg("att_x"), py::arg("wkv_state"), py::arg("ffn_x"),
           py::call_guard<py::gil_scoped_release>(),
           "one token for each of B sequences through every layer and the head; the states advance in place; "
           "returns the logits [B, V]");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV Playground CPU kernels: WKV operators, one-token RNN step, top-p sampler";
  // The WKV operator: the same three functions as the CUDA module (rwkv_playground.wkv wraps them).
  m.def("wkv_forward", &wkv_forward, "WKV forward with state in/out", py::call_guard<py::gil_scoped_release>());
  m.def("wkv_train_forward", &wkv_train_forward, "WKV training forward from an empty state",
        py::call_guard<py::gil_scoped_release>());
  m.def("wkv_train_backward", &wkv_train_backward, "WKV training backward: (gw, gu, gk, gv)",
        py::call_guard<py::gil_scoped_release>());

  // The RWKV-5/6/7 matrix-state recurrences (rwkv_playground.wkv: wkv5_reference, wkv7_reference).
  m.def("wkv5_forward", &wkv5_forward, py::arg("r"), py::arg("k"), py::arg("v"), py::arg("w"), py::arg("u"),
        py::arg("state"), py::call_guard<py::gil_scoped_release>(),
        "RWKV-5/6 recurrence over [B, T, H, N] float32 inputs, state [B, H, N, N] [key, value] in; (y, state) out");
  m.def("wkv7_forward", &wkv7_forward, py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"), py::arg("kk"),
        py::arg("a"), py::arg("state"), py::call_guard<py::gil_scoped_release>(),
        "RWKV-7 recurrence over [B, T, H, N] float32 inputs, state [B, H, N, N] [value, key] in; (y, state) out");
  m.def("wkv7_train_forward", &wkv7_train_forward, py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("kk"), py::arg("a"), py::call_guard<py::gil_scoped_release>(),
        "RWKV-7 training forward from an empty state (float32 or float64): (y, chunk checkpoints, final state)");
  m.def("wkv7_train_backward", &wkv7_train_backward, py::arg("r"), py::arg("w"), py::arg("k"), py::arg("v"),
        py::arg("kk"), py::arg("a"), py::arg("checkpoints"), py::arg("gy"), py::call_guard<py::gil_scoped_release>(),
        "its backward: (gr, gw, gk, gv, gkk, ga)");

  using rwkv_cpu::StepWeights;
  py::class_<StepWeights>(m, "StepWeights",
                          "The model's weights for the one-token step, taken by checkpoint name and validated once")
      .def(py::init<const std::map<std::string, at::Tensor>&, int64_t, double, const std::string&>(),
           py::arg("weights"), py::arg("n_layer"), py::arg("layer_norm_eps"), py::arg("isa") = "auto")
      .def_static("slot_names", &StepWeights::slot_names, py::arg("n_layer"),
                  "every weight name the step reads (int8 matrices also need '<name>_scale')")
      .def_property_readonly("isa", &StepWeights::isa)
      .def_property_readonly("storage", &StepWeights::storage)
      .def("step", &StepWeights::step, py::arg("tokens"), py::arg("att_x"), py::arg("aa"), py::arg("bb"),
           py::arg("pp"), py::arg("ffn_x"), py::call_guard<py::gil_scoped_release>(),
           "one token for each of B sequences through every layer and the head; the states ([L, C] "
           "float32 tensors, one per sequence) advance in place; returns the logits [B, V]");
  bind_matrix_step<rwkv_cpu::RWKV5Step>(m, "RWKV5Step", "RWKV-5.x");
  bind_matrix_step<rwkv_cpu::RWKV6Step>(m, "RWKV6Step", "RWKV-6");
  bind_matrix_step<rwkv_cpu::RWKV7Step>(m, "RWKV7Step", "RWKV-7");
  m.def("matvec", &rwkv_cpu::matvec, py::arg("weight"), py::arg("x"), py::arg("scale") = py::none(),
        py::arg("isa") = "auto", py::call_guard<py::gil_scoped_release>(),
        "y = x W^T for x [K] or [B, K] (W float32, bfloat16, or int8 with a scale per row)");
  m.def("available_isas", &rwkv_cpu::available_isas, "instruction sets this CPU can run, best first");
  m.def("cpu_features", &rwkv_cpu::cpu_features, "cpuid features that choose paths (avx512_bf16, amx_bf16, ...)");
  m.def("stream_read", &rwkv_cpu::stream_read, py::arg("buffer"), py::arg("isa") = "auto",
        py::call_guard<py::gil_scoped_release>(), "read every byte once on all threads (bandwidth bound); a checksum");

  m.def("sample_top_p", &sample_top_p, py::arg("logits"), py::arg("temperature"), py::arg("top_p"), py::arg("top_k"),
        py::arg("uniform"), py::arg("isa") = "auto", py::call_guard<py::gil_scoped_release>(),
        "top-p/top-k/temperature draw of one token id from float32 logits");
}
