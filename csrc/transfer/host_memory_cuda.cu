// The CUDA half of pinned_host_empty (host_memory.h): cudaHostRegister / cudaHostUnregister.

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "host_memory.h"

namespace remoe {

namespace {

void lock(void* ptr, size_t nbytes) {
  // Portable: pinned for every device's context, so a pool on any GPU copies from it at full
  // speed and asynchronously.
  const cudaError_t err = cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the last-error state, so later checks do not report it
    TORCH_CHECK(false, "cannot page-lock ", nbytes, " bytes of host memory (cudaHostRegister: ",
                cudaGetErrorString(err), ")",
                err == cudaErrorMemoryAllocation
                    ? ": the host is short of memory, or the locked-memory limit (ulimit -l) is "
                      "too low"
                    : "");
  }
}

void unlock(void* ptr) {
  // In a deleter: report nothing, but leave no error behind for the next CUDA call.
  if (cudaHostUnregister(ptr) != cudaSuccess) cudaGetLastError();
}

const bool kRegistered = register_host_pinner(HostPinner{&lock, &unlock});

}  // namespace

}  // namespace remoe
