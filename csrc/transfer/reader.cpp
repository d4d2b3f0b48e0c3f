// FileSet (pread, optionally O_DIRECT) and ReaderPool.

#include "reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>
#include <stdexcept>

namespace remoe {

namespace {

thread_local int tls_worker_index = -1;

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

bool aligned(int64_t value) { return value % kDirectIoAlign == 0; }

}  // namespace

FileSet::~FileSet() {
  for (const File& f : files_) {
    if (f.fd >= 0) ::close(f.fd);
    if (f.direct_fd >= 0) ::close(f.direct_fd);
  }
}

int64_t FileSet::add(const std::string& path) {
  File f;
  f.path = path;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) {
    throw std::runtime_error("cannot open expert file '" + path + "': " + errno_text(errno));
  }
  struct stat st {};
  if (::fstat(f.fd, &st) == 0) f.size = static_cast<int64_t>(st.st_size);
  if (o_direct_) {
    f.direct_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (f.direct_fd < 0) {
      const int err = errno;
      ::close(f.fd);
      // tmpfs and some network filesystems refuse O_DIRECT with EINVAL: say so instead of
      // silently falling back, since the caller asked for it to bypass the page cache.
      throw std::runtime_error("cannot open '" + path + "' with O_DIRECT: " + errno_text(err) +
                               (err == EINVAL ? "; the filesystem does not support direct I/O, "
                                                "use o_direct=False"
                                              : ""));
    }
  }
  files_.push_back(std::move(f));
  return static_cast<int64_t>(files_.size()) - 1;
}

void FileSet::read_exact(int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst,
                         const std::string& what) const {
  const File& f = files_.at(id);
  const bool direct = f.direct_fd >= 0 && aligned(offset) && aligned(nbytes) &&
                      aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst)));
  const int fd = direct ? f.direct_fd : f.fd;
  int64_t done = 0;
  while (done < nbytes) {
    // pread may return fewer bytes than asked (signals, large requests): loop until done.
    const ssize_t n = ::pread(fd, dst + done, static_cast<size_t>(nbytes - done),
                              static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("reading '" + what + "' from '" + f.path + "' (bytes " +
                               std::to_string(offset) + ".." + std::to_string(offset + nbytes) +
                               ") failed: " + errno_text(errno));
    }
    if (n == 0) {
      struct stat st {};
      const int64_t now = ::fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
      throw std::runtime_error("'" + f.path + "' is truncated: '" + what + "' needs bytes " +
                               std::to_string(offset) + ".." + std::to_string(offset + nbytes) +
                               " but the file ends at " + std::to_string(now) + " (it had " +
                               std::to_string(f.size) + " bytes when opened)");
    }
    done += n;
  }
}

ReaderPool::ReaderPool(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("ReaderPool needs at least one thread");
  threads_.reserve(num_threads);
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this, i] { worker_loop(i); });
}

ReaderPool::~ReaderPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void ReaderPool::submit(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(job));
  }
  cv_.notify_one();
}

int ReaderPool::current_worker() { return tls_worker_index; }

void ReaderPool::worker_loop(int index) {
  tls_worker_index = index;
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      // Drain the queue before stopping: a queued load holds a ticket someone may wait on.
      if (queue_.empty()) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      job();
    } catch (const std::exception& e) {
      // Jobs report their own errors; this only keeps the thread alive if one breaks that rule.
      std::cerr << "remoe ReaderPool: a job threw: " << e.what() << std::endl;
    }
  }
}

}  // namespace remoe
