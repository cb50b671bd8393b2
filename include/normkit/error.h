// Errors raised by the core. Every check failure carries a message naming the argument and the
// problem; the bindings map the kind to Python's ValueError / TypeError / RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace normkit {

enum class ErrorKind { Value, Type, Runtime };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

template <class... Parts>
[[noreturn]] void fail(ErrorKind kind, const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw Error(kind, message.str());
}

}  // namespace normkit

// Bad shapes, sizes, layouts or values: ValueError.
#define NK_CHECK_VALUE(cond, ...) \
  do { if (!(cond)) ::normkit::fail(::normkit::ErrorKind::Value, __VA_ARGS__); } while (0)
// Wrong dtype or device: TypeError.
#define NK_CHECK_TYPE(cond, ...) \
  do { if (!(cond)) ::normkit::fail(::normkit::ErrorKind::Type, __VA_ARGS__); } while (0)
// Failures of the machine or the build (CUDA errors, missing backends): RuntimeError.
#define NK_CHECK_RUNTIME(cond, ...) \
  do { if (!(cond)) ::normkit::fail(::normkit::ErrorKind::Runtime, __VA_ARGS__); } while (0)
