// The one-token steps of every architecture, compiled as one translation unit: each architecture's
// file is its own (step_rwkv4.cpp ... step_rwkv7.cpp, read them there), but every file pays for
// torch's headers when compiled alone, so building them together takes about the time of one.
#include "step_rwkv4.cpp"
#include "matrix_step.cpp"
#include "step_rwkv5.cpp"
#include "step_rwkv6.cpp"
#include "step_rwkv7.cpp"
