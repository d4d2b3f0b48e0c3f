// Storage side of expert transfers: the files an expert source reads from, and the reader thread
// pool that runs loads off the caller's thread.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace remoe {

// O_DIRECT needs the file offset, the length and the destination aligned to the logical block
// size; 4 KiB covers every block device we target (NVMe, UFS, SATA with 4Kn).
constexpr int64_t kDirectIoAlign = 4096;

// How a FileSet opens its files. kAuto: O_DIRECT where the filesystem supports it (most local
// disks), buffered elsewhere (tmpfs, some network and FUSE filesystems refuse O_DIRECT).
enum class DirectIo { kOff, kOn, kAuto };

// The files of one expert source. Each file has a buffered descriptor (with readahead off: expert
// reads are random, and readahead would pull bytes nobody asked for into the page cache) and,
// when direct I/O is on and supported, a second descriptor opened with O_DIRECT. Files are added
// before the first read and never removed, so reads need no lock.
class FileSet {
 public:
  explicit FileSet(DirectIo mode) : mode_(mode) {}
  ~FileSet();
  FileSet(const FileSet&) = delete;
  FileSet& operator=(const FileSet&) = delete;

  // Opens `path` (and its O_DIRECT twin). Throws std::runtime_error naming the path when it
  // cannot be opened, is not a regular file (a FIFO would block every read forever), or, with
  // DirectIo::kOn, refuses O_DIRECT.
  int64_t add(const std::string& path);
  int64_t size() const { return static_cast<int64_t>(files_.size()); }
  const std::string& path(int64_t id) const { return files_.at(id).path; }
  // Whether file `id` is read with O_DIRECT.
  bool direct(int64_t id) const { return files_.at(id).direct_fd >= 0; }

  // Reads exactly `nbytes` at `offset` of file `id` into `dst` through the buffered descriptor
  // (O_DIRECT reads go through read_direct). `what` names the tensor or blob for error messages. Throws std::runtime_error naming the file, the
  // tensor and the byte range on a short read (truncated file) or I/O error.
  void read_exact(int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst,
                  const std::string& what) const;
  // O_DIRECT read of the aligned range [offset, offset + nbytes) (both aligned, dst aligned).
  // Returns the bytes read: nbytes, or fewer where the file ends. Throws on an I/O error.
  int64_t read_direct(int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst,
                      const std::string& what) const;
  // Like read_direct, but as up to kMaxChunks concurrent requests of about `chunk` bytes (Linux
  // native AIO): `on_chunk(data, n)` sees each chunk, in file order, as soon as it and every
  // chunk before it have arrived, so work on the bytes (the blob checksum, which is bound by
  // memory bandwidth on data fresh from DMA) overlaps the rest of the read. Falls back to one
  // read_direct, then on_chunk over the whole, where AIO is unavailable.
  int64_t read_direct_chunked(int64_t id, int64_t offset, int64_t nbytes, uint8_t* dst,
                              const std::string& what, int64_t chunk,
                              const std::function<void(const uint8_t*, int64_t)>& on_chunk) const;
  static constexpr int kMaxChunks = 16;
  // Throws the "is truncated" error for `what` needing bytes [begin, end) of file `id`.
  [[noreturn]] void throw_truncated(int64_t id, const std::string& what, int64_t begin,
                                    int64_t end) const;
  // Throws std::runtime_error naming the file when its size or modification time differs from
  // when it was opened: bytes just read from it may belong to another version of the file.
  void check_unchanged(int64_t id) const;

 private:
  struct File {
    std::string path;
    int fd = -1;
    int direct_fd = -1;  // -1 unless O_DIRECT is on and supported
    int64_t size = 0;    // at open time
    int64_t mtime_ns = 0;
  };
  std::deque<File> files_;  // deque: references stay valid while files are added
  DirectIo mode_;
};

// A fixed set of threads running jobs in FIFO order. FIFO matters: a load that must wait for an
// earlier load into the same slot (see SlotPool) is always queued after it, so it can block on it
// without deadlock. The destructor runs the jobs still queued, then joins.
class ReaderPool {
 public:
  explicit ReaderPool(int num_threads);
  ~ReaderPool();
  ReaderPool(const ReaderPool&) = delete;
  ReaderPool& operator=(const ReaderPool&) = delete;

  // Jobs must not throw: a job reports its own failure (SlotPool's loads mark their ticket).
  void submit(std::function<void()> job);
  int size() const { return static_cast<int>(threads_.size()); }
  // Index in [0, size()) of the calling reader thread, or -1 on any other thread. Lets a job use
  // per-thread resources (the CUDA staging buffer) without a lookup.
  static int current_worker();

 private:
  void worker_loop(int index);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace remoe
