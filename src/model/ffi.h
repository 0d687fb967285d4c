// What the C++ ops share at the FFI boundary: errors go to Rust as a malloc'd message (freed
// by mp_free_error, defined in fused_bn.cpp), never as an exception across the boundary.
#pragma once

#include <cstdlib>
#include <cstring>

inline char* mp_error_copy(const char* what) {
  const size_t n = std::strlen(what) + 1;
  char* copy = static_cast<char*>(std::malloc(n));
  if (copy != nullptr) std::memcpy(copy, what, n);
  return copy;
}
