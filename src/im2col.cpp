// im2col / col2im on the CPU, for any number of spatial dims.
//
// Threads take whole (batch, channel) planes: every column row of a plane is written by one thread,
// and in col2im each thread accumulates only into its own planes of x, so there are no races and
// the sums are in a fixed order. Along the last spatial dim the in-bounds output range of each
// kernel offset is computed once, so the inner loops are plain strided copies (or additions) with
// the zero padding written (or skipped) around them.
#include "normkit/im2col.h"

#include <algorithm>
#include <string>

#include "cpu_threads.h"
#include "normkit/dispatch.h"

namespace normkit {

int64_t conv_output_size(int64_t n, int64_t kernel, int64_t stride, int64_t padding,
                         int64_t dilation) {
  const char* op = "conv_output_size";
  NK_CHECK_VALUE(n >= 0 && kernel >= 1 && stride >= 1 && padding >= 0 && dilation >= 1, op,
                 ": got size ", n, ", kernel ", kernel, ", stride ", stride, ", padding ", padding,
                 " and dilation ", dilation, "; size and padding must be >= 0, kernel, stride and ",
                 "dilation >= 1");
  // n + 2 padding - dilation (kernel - 1) - 1, every step checked: huge paddings or dilations
  // would otherwise overflow int64 (undefined behaviour) and yield a nonsense size.
  int64_t padded, extent, span;
  const bool overflow = __builtin_mul_overflow(padding, int64_t(2), &padded) ||
                        __builtin_add_overflow(padded, n, &padded) ||
                        __builtin_mul_overflow(dilation, kernel - 1, &extent) ||
                        __builtin_sub_overflow(padded, extent, &span);
  NK_CHECK_VALUE(!overflow, op, ": size ", n, " with padding ", padding, ", kernel ", kernel,
                 " and dilation ", dilation, " overflows 64-bit sizes");
  return span <= 0 ? 0 : (span - 1) / stride + 1;
}

namespace {

constexpr int64_t kGrain = 1 << 15;  // values copied per thread before another one helps

struct Plan {
  int dims;
  int64_t B, C, PK, L;  // batch, channels, kernel positions, output positions
  int64_t in[kMaxSpatialDims], out[kMaxSpatialDims];
};

// Output positions ow in [*lo, *hi) of the last dim read input index ow * stride + offset inside
// [0, n).
void valid_range(int64_t n, int64_t out, int64_t stride, int64_t offset, int64_t* lo, int64_t* hi) {
  *lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  *hi = n - 1 - offset < 0 ? 0 : (n - 1 - offset) / stride + 1;
  *lo = std::min(*lo, out);
  *hi = std::max(*lo, std::min(*hi, out));
}

// Visits every (kernel offset, row of output positions) of one (b, c) plane:
// line(kk, col0, x_offset, valid, lo, hi, w_offset) where the line's columns are col0 + [0, OW),
// the input of column col0 + ow is x_offset + (ow * stride + w_offset) * (last dim's stride),
// valid says the outer dims are in bounds and [lo, hi) is the in-bounds range of ow.
template <class Line>
void for_each_line(const Plan& p, const ConvGeometry& g, const int64_t* x_strides, Line&& line) {
  const int last = p.dims - 1;
  const int64_t OW = p.out[last];
  const int64_t outer = p.L / std::max<int64_t>(OW, 1);
  int64_t kidx[kMaxSpatialDims], o[kMaxSpatialDims];
  for (int64_t kk = 0; kk < p.PK; ++kk) {
    for (int64_t r = kk, d = last; d >= 0; --d) {
      kidx[d] = r % g.kernel[d];
      r /= g.kernel[d];
    }
    const int64_t w_offset = kidx[last] * g.dilation[last] - g.padding[last];
    int64_t lo, hi;
    valid_range(p.in[last], OW, g.stride[last], w_offset, &lo, &hi);
    for (int64_t t = 0; t < outer; ++t) {
      for (int64_t r = t, d = last - 1; d >= 0; --d) {
        o[d] = r % p.out[d];
        r /= p.out[d];
      }
      bool valid = true;
      int64_t offset = 0;
      for (int d = 0; d < last; ++d) {
        const int64_t i = o[d] * g.stride[d] - g.padding[d] + kidx[d] * g.dilation[d];
        valid = valid && i >= 0 && i < p.in[d];
        offset += i * x_strides[d];
      }
      line(kk, t * OW, offset, valid, lo, hi, w_offset);
    }
  }
}

std::string shape_string(const TensorView& t) {
  std::string s = "(";
  for (int d = 0; d < t.ndim; ++d) s += (d ? ", " : "") + std::to_string(t.shape[d]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

Plan check(const char* op, const TensorView& x, const ConvGeometry& g, const TensorView& cols) {
  NK_CHECK_VALUE(x.defined() && cols.defined(), op, ": x and cols are required");
  NK_CHECK_VALUE(g.dims >= 1 && g.dims <= kMaxSpatialDims, op, ": 1 to ", kMaxSpatialDims,
                 " spatial dims are supported, got ", g.dims);
  NK_CHECK_VALUE(x.ndim == g.dims + 2, op, ": x must have shape (B, C, ", g.dims,
                 " spatial dims) for a ", g.dims, "-d kernel, got ", shape_string(x));
  NK_CHECK_TYPE(cols.dtype == x.dtype, op, ": cols has dtype ", dtype_name(cols.dtype),
                " but x has ", dtype_name(x.dtype));
  NK_CHECK_TYPE(cols.device == x.device && cols.device_id == x.device_id, op, ": cols is on ",
                device_name(cols.device), " but x is on ", device_name(x.device));
  Plan p{g.dims, x.shape[0], x.shape[1], 1, 1, {}, {}};
  for (int d = 0; d < g.dims; ++d) {
    NK_CHECK_VALUE(g.kernel[d] >= 1 && g.stride[d] >= 1 && g.dilation[d] >= 1 && g.padding[d] >= 0,
                   op, ": spatial dim ", d, " has kernel ", g.kernel[d], ", stride ", g.stride[d],
                   ", dilation ", g.dilation[d], " and padding ", g.padding[d],
                   "; kernel, stride and dilation must be >= 1 and padding >= 0");
    p.in[d] = x.shape[2 + d];
    p.out[d] = conv_output_size(p.in[d], g.kernel[d], g.stride[d], g.padding[d], g.dilation[d]);
    NK_CHECK_VALUE(p.out[d] >= 1, op, ": spatial dim ", d, " of x has size ", p.in[d],
                   ", smaller than the kernel's extent (dilation * (kernel - 1) + 1 = ",
                   g.dilation[d], " * ", g.kernel[d] - 1, " + 1) with padding ", g.padding[d],
                   " on each side");
    NK_CHECK_VALUE(!__builtin_mul_overflow(p.PK, g.kernel[d], &p.PK) &&
                       !__builtin_mul_overflow(p.L, p.out[d], &p.L),
                   op, ": the kernel or output size overflows 64-bit sizes");
  }
  int64_t rows = 0;
  NK_CHECK_VALUE(!__builtin_mul_overflow(p.C, p.PK, &rows), op,
                 ": C * prod(kernel) overflows 64-bit sizes");
  NK_CHECK_VALUE(cols.ndim == 3 && cols.shape[0] == p.B && cols.shape[1] == rows &&
                     cols.shape[2] == p.L,
                 op, ": cols must have shape (B, C * prod(kernel), prod(output size)) = (", p.B,
                 ", ", rows, ", ", p.L, "), got ", shape_string(cols));
  return p;
}

// Zeroes the (spatial) plane at `base` with x's spatial shape and strides.
template <class T>
void zero_plane(T* base, const Plan& p, const int64_t* strides) {
  const int last = p.dims - 1;
  int64_t outer = 1;
  for (int d = 0; d < last; ++d) outer *= p.in[d];
  for (int64_t t = 0; t < outer; ++t) {
    int64_t offset = 0;
    for (int64_t r = t, d = last - 1; d >= 0; --d) {
      offset += (r % p.in[d]) * strides[d];
      r /= p.in[d];
    }
    T* row = base + offset;
    for (int64_t w = 0; w < p.in[last]; ++w) row[w * strides[last]] = T(0);
  }
}

}  // namespace

void im2col(const TensorView& x, const ConvGeometry& g, const TensorView& cols,
            const Launch& launch) {
  const char* op = "im2col";
  const Plan p = check(op, x, g, cols);
  check_output_memory(op, {{cols, "cols", false}}, {{x, "x", false}});
  dispatch_float(op, x, [&](auto tag) {
    using T = decltype(tag);
    const int last = p.dims - 1;
    const int64_t* xs = x.strides + 2;
    const int64_t sw = xs[last], stride = g.stride[last], OW = p.out[last];
    const int64_t cs = cols.strides[2];
    const int nthreads = cpu::threads_between_gemms(p.B * p.C * p.PK * p.L, kGrain);
    cpu::parallel_ranges(nthreads, p.B * p.C, [&](int, int64_t first, int64_t end) {
      for (int64_t bc = first; bc < end; ++bc) {
        const int64_t b = bc / p.C, c = bc % p.C;
        const T* plane = x.ptr<const T>() + b * x.strides[0] + c * x.strides[1];
        T* rows = cols.ptr<T>() + b * cols.strides[0] + c * p.PK * cols.strides[1];
        for_each_line(p, g, xs, [&](int64_t kk, int64_t col0, int64_t offset, bool valid,
                                    int64_t lo, int64_t hi, int64_t w_offset) {
          T* out = rows + kk * cols.strides[1] + col0 * cs;
          if (!valid) lo = hi = OW;
          for (int64_t ow = 0; ow < lo; ++ow) out[ow * cs] = T(0);
          const T* in = plane + offset + w_offset * sw;
          if (cs == 1 && stride * sw == 1) {
            std::copy(in + lo, in + hi, out + lo);
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) out[ow * cs] = in[ow * stride * sw];
          }
          for (int64_t ow = hi; ow < OW; ++ow) out[ow * cs] = T(0);
        });
      }
    });
  }, [&] { cuda::im2col(x, g, cols, launch); });
}

void col2im(const TensorView& cols, const ConvGeometry& g, const TensorView& x,
            const Launch& launch) {
  const char* op = "col2im";
  const Plan p = check(op, x, g, cols);
  check_output_memory(op, {{x, "x", false}}, {{cols, "cols", false}});
  dispatch_float(op, x, [&](auto tag) {
    using T = decltype(tag);
    const int last = p.dims - 1;
    const int64_t* xs = x.strides + 2;
    const int64_t sw = xs[last], stride = g.stride[last];
    const int64_t cs = cols.strides[2];
    const int nthreads = cpu::threads_between_gemms(p.B * p.C * p.PK * p.L, kGrain);
    cpu::parallel_ranges(nthreads, p.B * p.C, [&](int, int64_t first, int64_t end) {
      for (int64_t bc = first; bc < end; ++bc) {
        const int64_t b = bc / p.C, c = bc % p.C;
        T* plane = x.ptr<T>() + b * x.strides[0] + c * x.strides[1];
        const T* rows = cols.ptr<const T>() + b * cols.strides[0] + c * p.PK * cols.strides[1];
        zero_plane(plane, p, xs);
        for_each_line(p, g, xs, [&](int64_t kk, int64_t col0, int64_t offset, bool valid,
                                    int64_t lo, int64_t hi, int64_t w_offset) {
          if (!valid) return;
          const T* in = rows + kk * cols.strides[1] + col0 * cs;
          T* out = plane + offset + w_offset * sw;
          for (int64_t ow = lo; ow < hi; ++ow) out[ow * stride * sw] += in[ow * cs];
        });
      }
    });
  }, [&] { cuda::col2im(cols, g, x, launch); });
}

}  // namespace normkit
