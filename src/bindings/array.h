// Python arrays -> TensorView without copies, tried in this order: the buffer protocol (NumPy),
// "dltensor" capsules, DLPack (CuPy, PyTorch, JAX: the exporter orders its work before the
// consumer's stream) and the CUDA Array Interface (Numba and other exporters without DLPack). The
// returned Array keeps the exporter's buffer or capsule alive.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <memory>

#include "normkit/launch.h"
#include "normkit/tensor.h"

namespace normkit::bindings {

namespace py = pybind11;

struct Array {
  TensorView view;  // undefined (ndim -1) for None
  std::unique_ptr<py::buffer_info> buffer;
  py::object capsule;
  // The stream a __cuda_array_interface__ (v3) asks its consumer to synchronize with, as a
  // cudaStream_t value (1: legacy default stream, 2: per-thread default stream).
  bool has_producer_stream = false;
  uintptr_t producer_stream = 0;
};

// Read/Write: the op touches the data. Shape: only the array's description is read (a workspace
// size query), so a DLPack exporter is asked for no stream synchronization at all (stream -1):
// a query made inside a CUDA-graph capture must not queue work on the legacy default stream.
enum class Access { Read, Write, Shape };

// `obj` as a tensor view; None gives an undefined view. `op` and `name` go into error messages.
// `stream` is the cudaStream_t (0: the legacy default stream) the op will run on: a CUDA DLPack
// exporter is asked to make its data ready on it.
Array as_array(py::handle obj, const char* op, const char* name, Access access,
               uintptr_t stream = 0);

// Makes `stream` wait (on the device) for the streams that CUDA Array Interface producers asked
// their consumers to synchronize with. Call with the GIL held, before launching.
// This is the only cross-stream ordering normkit makes, and the only place it records events:
// one per distinct producer stream per call, none where it is the op's stream. DLPack exporters
// order their own work before the stream they are given (CuPy and torch record an event only
// when it is not their current stream, and normkit's Python layers pass the current one);
// capsules and NumPy buffers carry no stream, and their work is the caller's to have ordered.
void wait_for_producers(std::initializer_list<const Array*> arrays, uintptr_t stream);

// Runs op(launch) without the GIL on `stream` with `workspace` (None: an undefined view), after
// making the stream wait for the arrays' producers.
template <class Op>
void run(uintptr_t stream, const Array& workspace, std::initializer_list<const Array*> arrays,
         Op&& op) {
  wait_for_producers(arrays, stream);
  const Launch launch{reinterpret_cast<void*>(stream), workspace.view};
  py::gil_scoped_release release;
  op(launch);
}

}  // namespace normkit::bindings
