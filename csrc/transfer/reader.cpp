// FileSet (pread, optionally O_DIRECT) and ReaderPool.

#include "reader.h"

#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iostream>
#include <stdexcept>

namespace remoe {

namespace {

thread_local int tls_worker_index = -1;

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

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
  // O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears. It has
  // no effect on regular files, the only kind accepted below.
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (f.fd < 0) {
    throw std::runtime_error("cannot open expert file '" + path + "': " + errno_text(errno));
  }
  struct stat st {};
  if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    const int err = errno;
    ::close(f.fd);
    throw std::runtime_error("expert file '" + path + "' " +
                             (S_ISREG(st.st_mode) ? "cannot be examined: " + errno_text(err)
                                                  : std::string("is not a regular file (a FIFO, "
                                                                "device or directory)")));
  }
  f.size = static_cast<int64_t>(st.st_size);
  f.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  // Expert reads are random and exact: readahead only fills the page cache with bytes of other
  // experts (measured: 1.5x the bytes read at scale). Advisory; ignore failures.
  ::posix_fadvise(f.fd, 0, 0, POSIX_FADV_RANDOM);
  if (mode_ != DirectIo::kOff) {
    f.direct_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (f.direct_fd < 0) {
      const int err = errno;
      if (mode_ == DirectIo::kOn) {
        ::close(f.fd);
        // tmpfs and some network filesystems refuse O_DIRECT with EINVAL: say so instead of
        // silently falling back, since the caller asked for it to bypass the page cache.
        throw std::runtime_error("cannot open '" + path + "' with O_DIRECT: " + errno_text(err) +
                                 (err == EINVAL ? "; the filesystem does not support direct I/O, "
                                                  "use o_direct=False or \"auto\""
                                                : ""));
      }
      f.direct_fd = -1;  // kAuto: buffered reads for this file
    }
  }
  files_.push_back(std::move(f));
  return static_cast<int64_t>(files_.size()) - 1;
}

namespace {

// pread until `nbytes` are in; returns the count, which is less only at the end of the file.
// Throws on an I/O error.
int64_t pread_loop(int fd, int64_t offset, int64_t nbytes, uint8_t* dst, const std::string& path,
                   const std::string& what) {
  int64_t done = 0;
  while (done < nbytes) {
    // pread may return fewer bytes than asked (signals, large requests): loop until done.
    const ssize_t n = ::pread(fd, dst + done, static_cast<size_t>(nbytes - done),
                              static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("reading '" + what + "' from '" + path + "' (bytes " +
                               std::to_string(offset) + ".." + std::to_string(offset + nbytes) +
                               ") failed: " + errno_text(errno));
    }
    if (n == 0) break;
    done += n;
  }
  return done;
}

}  // namespace

void FileSet::read_exact(int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst,
                         const std::string& what) const {
  const File& f = files_.at(id);
  if (pread_loop(f.fd, offset, nbytes, dst, f.path, what) < nbytes) {
    throw_truncated(id, what, offset, offset + nbytes);
  }
}

int64_t FileSet::read_direct(int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst,
                             const std::string& what) const {
  const File& f = files_.at(id);
  return pread_loop(f.direct_fd, offset, nbytes, dst, f.path, what);
}

namespace {

// One Linux AIO context per reader thread (the raw syscalls: no libaio dependency). Native AIO
// is truly asynchronous only with O_DIRECT, the only way it is used here.
struct AioContext {
  aio_context_t ctx = 0;
  bool ok = false;
  AioContext() { ok = ::syscall(SYS_io_setup, FileSet::kMaxChunks, &ctx) == 0; }
  ~AioContext() {
    if (ok) ::syscall(SYS_io_destroy, ctx);
  }
};

AioContext& thread_aio() {
  thread_local AioContext aio;
  return aio;
}

}  // namespace

int64_t FileSet::read_direct_chunked(
    int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst, const std::string& what,
    int64_t chunk, const std::function<void(const uint8_t*, int64_t)>& on_chunk) const {
  const File& f = files_.at(id);
  chunk = std::max<int64_t>(kDirectIoAlign, chunk);
  const int64_t count = std::min<int64_t>(kMaxChunks, (nbytes + chunk - 1) / chunk);
  AioContext& aio = thread_aio();
  if (!aio.ok || count < 2) {
    const int64_t got = read_direct(id, offset, nbytes, dst, what);
    if (got > 0) on_chunk(dst, got);
    return got;
  }
  // Equal aligned chunks; the last takes the rest.
  chunk = (nbytes / count + kDirectIoAlign - 1) / kDirectIoAlign * kDirectIoAlign;
  struct iocb cbs[kMaxChunks] = {};
  struct iocb* ptrs[kMaxChunks];
  int64_t sizes[kMaxChunks], got[kMaxChunks];
  bool done[kMaxChunks] = {};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t begin = i * chunk;
    sizes[i] = i + 1 == count ? nbytes - begin : chunk;
    cbs[i].aio_fildes = static_cast<uint32_t>(f.direct_fd);
    cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
    cbs[i].aio_buf = reinterpret_cast<uint64_t>(dst + begin);
    cbs[i].aio_nbytes = static_cast<uint64_t>(sizes[i]);
    cbs[i].aio_offset = offset + begin;
    cbs[i].aio_data = static_cast<uint64_t>(i);
    ptrs[i] = &cbs[i];
  }
  const auto reap = [&](int64_t in_flight) {  // nothing of ours may outlive this call
    while (in_flight > 0) {
      struct io_event ev[kMaxChunks];
      const long m = ::syscall(SYS_io_getevents, aio.ctx, 1, in_flight, ev, nullptr);
      if (m > 0) in_flight -= m;
      else if (errno != EINTR) break;
    }
  };
  int64_t submitted = 0;
  while (submitted < count) {
    const long n = ::syscall(SYS_io_submit, aio.ctx, count - submitted, ptrs + submitted);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EAGAIN;
      reap(submitted);
      throw std::runtime_error("reading '" + what + "' from '" + f.path +
                               "': io_submit failed: " + errno_text(err));
    }
    submitted += n;
  }
  int64_t next = 0, total = 0, pending = count;
  std::string error;
  while (pending > 0) {
    struct io_event ev[kMaxChunks];
    const long m = ::syscall(SYS_io_getevents, aio.ctx, 1, pending, ev, nullptr);
    if (m < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      reap(pending);
      throw std::runtime_error("reading '" + what + "' from '" + f.path +
                               "': io_getevents failed: " + errno_text(err));
    }
    pending -= m;
    for (long j = 0; j < m; ++j) {
      const int64_t i = static_cast<int64_t>(ev[j].data);
      got[i] = ev[j].res;
      done[i] = true;
      if (ev[j].res < 0 && error.empty()) {
        error = "reading '" + what + "' from '" + f.path + "' (bytes " +
                std::to_string(offset + i * chunk) + ".." +
                std::to_string(offset + i * chunk + sizes[i]) + ") failed: " +
                errno_text(static_cast<int>(-ev[j].res));
      }
    }
    // Hand over every complete chunk whose predecessors are all complete.
    while (error.empty() && next < count && done[next]) {
      if (got[next] > 0) on_chunk(dst + next * chunk, got[next]);
      total += got[next];
      if (got[next] < sizes[next]) {  // the end of the file: nothing after it counts
        for (int64_t k = next + 1; k < count; ++k) sizes[k] = got[k] = 0;
        total = next * chunk + got[next];
        next = count;
        break;
      }
      ++next;
    }
  }
  if (!error.empty()) throw std::runtime_error(error);
  return total;
}

void FileSet::throw_truncated(int64_t id, const std::string& what, int64_t begin,
                              int64_t end) const {
  const File& f = files_.at(id);
  struct stat st {};
  const int64_t now = ::fstat(f.fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
  throw std::runtime_error("'" + f.path + "' is truncated: '" + what + "' needs bytes " +
                           std::to_string(begin) + ".." + std::to_string(end) +
                           " but the file ends at " + std::to_string(now) + " (it had " +
                           std::to_string(f.size) + " bytes when opened)");
}

void FileSet::check_unchanged(int64_t id) const {
  const File& f = files_.at(id);
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) {
    throw std::runtime_error("cannot examine '" + f.path + "': " + errno_text(errno));
  }
  const int64_t mtime_ns =
      static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  if (static_cast<int64_t>(st.st_size) != f.size || mtime_ns != f.mtime_ns) {
    throw std::runtime_error(
        "'" + f.path + "' changed on disk after the model was loaded (size " +
        std::to_string(f.size) + " -> " + std::to_string(static_cast<int64_t>(st.st_size)) +
        " bytes, modification time changed" + (mtime_ns != f.mtime_ns ? "" : " not") +
        "); its experts may no longer match the model: load it again");
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
