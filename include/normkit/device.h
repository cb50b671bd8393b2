// What this build of the core can run on, and the few CUDA runtime services the bindings need to
// accept GPU arrays. Every function exists in every build; without CUDA those that need it raise
// a RuntimeError.
#pragma once

namespace normkit {

// Whether the CUDA module was compiled into this build.
bool built_with_cuda();
// CUDA devices usable now: 0 without a CUDA build, a driver or a GPU (never an error).
int cuda_device_count();

// The device ordinal that owns a CUDA pointer (device or managed memory).
int cuda_pointer_device(const void* ptr);
// The calling thread's current CUDA device (where CuPy allocates).
int cuda_current_device();

// Makes work queued later on `consumer` wait for the work queued so far on `producer`, on the
// device (no host synchronization). Streams are cudaStream_t values, null the legacy default
// stream; equal streams need no wait.
void cuda_stream_wait(int device, void* producer, void* consumer);

// Whether `device`'s primary context exists (false without CUDA): making a device current with
// cudaSetDevice creates it, so a device is restored as current only where this is true.
bool cuda_has_primary_context(int device);

// The id of the CUDA-graph capture `stream` is in (unique per capture in the process), 0 when it
// is not capturing, and 0 in a build without CUDA (where no stream can capture).
unsigned long long cuda_capture_id(void* stream);

}  // namespace normkit
