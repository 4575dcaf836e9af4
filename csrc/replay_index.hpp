// Replay index for SPEAR self-imitation, in plain C++17 (no Python; bindings.cpp wraps it).
//
// The contract shared with the numpy oracle is docs/replay_index_spec.md. In short:
//  * ReplayIndex stores variable-length rows (tokens/logp/mask) in an arena of fixed-size segments
//    held by shared_ptr, so zero-copy views outlive eviction, compaction and the index itself;
//    per-row metadata lives in structure-of-arrays columns sorted by row id.
//  * draw() is sequential weighted sampling without replacement on a Fenwick tree of integer
//    weights (O(k log n)); the tree over all live rows is maintained incrementally.
//  * BaselineWindow is a FIFO of float64 values with numpy-exact "linear" percentiles answered in
//    O(log n) by a size-augmented treap.
//  * Both serialise to a little-endian byte format with a CRC32 (zlib polynomial) trailer.
//  * Every public method takes an internal mutex; nothing here touches Python or its GIL.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__BYTE_ORDER__) && (__BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__)
#error "the replay index byte format is little-endian and is written with memcpy; big-endian hosts are unsupported"
#endif

namespace spear {

// Thrown for a row id that is not live (never inserted, evicted or removed): KeyError in Python.
// Bad arguments throw std::invalid_argument (ValueError in Python).
class RowNotFound : public std::runtime_error {
 public:
  explicit RowNotFound(int64_t row_id);
  int64_t row_id() const noexcept { return row_id_; }

 private:
  int64_t row_id_;
};

// ---------------------------------------------------------------------------------------------
// Checksum and random numbers (both identical to the Python side, bit for bit)

// CRC-32 with the zlib polynomial: crc32_update(0, data, n) == zlib.crc32(data), and it chains
// like zlib.crc32(more, previous). Uses carry-less multiplication (PCLMULQDQ) on x86-64 CPUs that
// have it, else crc32_update_portable (slicing-by-8 tables); both give the same value.
uint32_t crc32_update(uint32_t crc, const void* data, size_t size);
uint32_t crc32_update_portable(uint32_t crc, const void* data, size_t size);

// xoshiro256** seeded with four successive splitmix64 outputs.
class Xoshiro256StarStar {
 public:
  using State = std::array<uint64_t, 4>;
  explicit Xoshiro256StarStar(uint64_t seed = 0);
  uint64_t next();
  // Uniform integer in [0, n) for 1 <= n (Lemire's multiply-shift with rejection).
  uint64_t below(uint64_t n);
  const State& state() const { return state_; }
  // Throws std::invalid_argument for the all-zero state (the generator would stay at zero).
  void set_state(const State& state);

 private:
  State state_;
};

// ---------------------------------------------------------------------------------------------
// Fenwick tree (binary indexed tree) of unsigned 64-bit weights.
class FenwickTree {
 public:
  void assign(const std::vector<uint64_t>& weights);  // O(n)
  void reserve(size_t n) { tree_.reserve(n + 1); }
  void push_back(uint64_t weight);                      // O(log n)
  // Adds delta modulo 2^64 (pass 0 - w to subtract w); sums stay exact while they fit.
  void add(size_t index, uint64_t delta);
  uint64_t get(size_t index) const;  // one element's weight, O(log n)
  // Index of the first element whose inclusive prefix sum exceeds x; requires x < total().
  size_t find(uint64_t x) const;
  uint64_t total() const { return total_; }
  size_t size() const { return tree_.size() - 1; }
  void clear();

 private:
  std::vector<uint64_t> tree_ = std::vector<uint64_t>(1, 0);  // 1-based; tree_[0] is unused
  uint64_t total_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Multiset of doubles with order statistics: a treap whose nodes carry a multiplicity and the
// size of their subtree. NaN is not allowed (callers check); -0.0 and 0.0 are the same key.
class OrderStatisticMultiset {
 public:
  OrderStatisticMultiset();
  void insert(double key);               // O(log n) expected
  void erase_one(double key);            // O(log n); the key must be present
  double kth(uint64_t rank) const;       // 0-based rank in ascending order; rank < size()
  uint64_t size() const { return nodes_[root_].size; }
  void clear();

 private:
  static constexpr uint32_t kNil = 0;  // node 0 is a sentinel with size 0
  struct Node {
    double key;
    uint64_t count;
    uint64_t size;
    uint32_t priority;
    uint32_t left;
    uint32_t right;
  };
  bool contains(double key) const;
  uint32_t new_node(double key);
  void update_size(uint32_t t);
  void split(uint32_t t, double key, uint32_t& less, uint32_t& greater);
  uint32_t merge(uint32_t a, uint32_t b);
  uint32_t insert_node(uint32_t t, uint32_t node);
  uint32_t erase_key(uint32_t t, double key);

  std::vector<Node> nodes_;
  std::vector<uint32_t> free_nodes_;
  uint32_t root_ = kNil;
  uint64_t priority_state_ = 0x853C49E6748FEA9BULL;
};

// ---------------------------------------------------------------------------------------------
// Arena storage

// One arena segment: room for `capacity` tokens in three parallel arrays carved from one
// allocation (large ones 2 MiB-aligned and advised for transparent huge pages, so that first writes
// fault in few pages). Its contents are append-only while any row or view refers to it, so the data
// of a row never changes.
struct Segment {
  explicit Segment(size_t capacity);
  ~Segment();
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  size_t capacity;
  int32_t* tokens;
  float* logp;
  uint8_t* mask;

 private:
  size_t alignment_;
  void* storage_;
};

// Where a row's data lives. `segment` keeps the storage alive; it is null for an empty row.
struct RowData {
  std::shared_ptr<const Segment> segment;
  size_t offset = 0;
  int32_t length = 0;
  const int32_t* tokens() const { return segment ? segment->tokens + offset : nullptr; }
  const float* logp() const { return segment ? segment->logp + offset : nullptr; }
  const uint8_t* mask() const { return segment ? segment->mask + offset : nullptr; }
};

// Copies rows into [k, width] right-padded arrays (pad_token / 0.0 / 0); lengths[i] = row length.
// Needs no lock: RowData pins storage that never changes.
void gather_padded(const std::vector<RowData>& rows, size_t width, int32_t pad_token, int32_t* tokens,
                   float* logp, uint8_t* mask, int32_t* lengths);

// ---------------------------------------------------------------------------------------------
// ReplayIndex

enum class Eviction : uint32_t { kOldest = 0, kLowestScore = 1 };
enum class Weighting { kUniform, kScore };

Eviction parse_eviction(const std::string& name);
const char* eviction_name(Eviction eviction);
Weighting parse_weighting(const std::string& name);

// A batch of rows: row j is tokens/logp/mask[offset_j : offset_j + lengths[j]] where offset_j is
// the sum of the earlier lengths. All pointers are caller-owned and only read.
struct InsertBatch {
  const int32_t* tokens = nullptr;
  const float* logp = nullptr;
  const uint8_t* mask = nullptr;
  size_t num_tokens = 0;
  const int64_t* lengths = nullptr;
  const int64_t* steps = nullptr;
  const int64_t* group_ids = nullptr;
  const int64_t* traj_ids = nullptr;
  const double* scores = nullptr;
  const double* advantages = nullptr;
  size_t num_rows = 0;
  double threshold = -std::numeric_limits<double>::infinity();
};

// Metadata of the live rows, in row-id order.
struct RowMetadata {
  std::vector<int64_t> row_id, step, group_id, traj_id;
  std::vector<double> score, advantage;
  std::vector<int32_t> length;
};

struct ArenaStats {
  size_t segments = 0;          // segments the index holds
  size_t allocated_tokens = 0;  // their total capacity
  size_t used_tokens = 0;       // written so far (live + dead)
  size_t dead_tokens = 0;       // written, but the row is gone
  size_t spare_segments = 0;    // unreferenced segments kept for reuse
  uint64_t compactions = 0;
};

class ReplayIndex {
 public:
  static constexpr int64_t kDefaultSegmentTokens = int64_t{1} << 20;
  static constexpr int64_t kMaxSegmentTokens = (int64_t{1} << 31) - 1;

  explicit ReplayIndex(int64_t capacity_rows = 0, Eviction eviction = Eviction::kOldest, uint64_t seed = 0,
                       int64_t segment_tokens = kDefaultSegmentTokens);
  ReplayIndex(const ReplayIndex&) = delete;
  ReplayIndex& operator=(const ReplayIndex&) = delete;

  // Writes the new row id of each admitted row (advantage > threshold) or -1 to out_row_ids.
  void insert_batch(const InsertBatch& batch, int64_t* out_row_ids);

  size_t size() const;
  int64_t num_tokens() const;
  int64_t capacity_rows() const { return capacity_rows_; }
  Eviction eviction() const { return eviction_; }
  uint64_t seed() const { return seed_; }
  int64_t segment_tokens() const { return segment_tokens_; }
  int64_t next_row_id() const;
  // The draw generator's state, so a caller can draw tentatively and keep or undo the draw in O(1).
  Xoshiro256StarStar::State rng_state() const;
  void set_rng_state(const Xoshiro256StarStar::State& state);  // throws std::invalid_argument if all zero

  std::vector<int64_t> row_ids() const;
  RowMetadata metadata() const;
  RowData row(int64_t row_id) const;                            // throws RowNotFound
  std::vector<RowData> rows(const int64_t* row_ids, size_t n) const;  // throws RowNotFound

  int64_t remove(const int64_t* row_ids, size_t n);  // unknown ids are ignored
  int64_t evict_stale(int64_t window, std::optional<int64_t> current_step);
  void flush();
  int64_t count_score_above(double threshold) const;

  // candidates == nullopt: all live rows in order. Returns the drawn row ids in pick order.
  std::vector<int64_t> draw(int64_t k, Weighting weighting,
                            const std::optional<std::pair<const int64_t*, size_t>>& candidates,
                            double score_floor);

  // Serialises into the buffer returned by allocate(total_size) and returns total_size.
  size_t serialize(const std::function<uint8_t*(size_t)>& allocate) const;
  static std::unique_ptr<ReplayIndex> deserialize(const uint8_t* data, size_t size);

  ArenaStats arena_stats() const;

 private:
  static constexpr uint32_t kNoSlot = UINT32_MAX;
  static constexpr size_t kNotFound = SIZE_MAX;

  // Row metadata columns, sorted by row id. Dead rows stay as tombstones until compact_table().
  struct RowTable {
    std::vector<int64_t> row_id, step, group_id, traj_id;
    std::vector<double> score, advantage;
    std::vector<int32_t> length;
    std::vector<uint32_t> slot;    // arena segment slot (kNoSlot for an empty row)
    std::vector<uint64_t> offset;  // first token inside the segment
    std::vector<uint8_t> alive;
    size_t size() const { return row_id.size(); }
    void reserve(size_t n);
    void clear();
    void keep_alive_rows();
  };
  struct SegmentSlot {
    std::shared_ptr<Segment> segment;  // null when the slot is free
    size_t used = 0;
    size_t live = 0;
  };
  struct Placement {
    uint32_t slot;
    size_t offset;
  };
  struct CopyRun {  // contiguous tokens copied with one memcpy per array
    size_t source;
    uint32_t slot;
    size_t dest;
    size_t length;
  };
  // All private methods expect mutex_ to be held.
  size_t position_of(int64_t row_id, size_t hint = 0) const;
  size_t require_position(int64_t row_id) const;
  RowData row_data(size_t position) const;
  void append_row(const InsertBatch& batch, size_t j, const Placement& placement);
  void kill(size_t position);
  size_t victim_position();
  int64_t newest_live_step() const;
  void after_removals();
  void compact_table();
  void compact_arena();
  void release_all_segments();

  Placement place(size_t length);
  uint32_t add_slot(std::shared_ptr<Segment> segment);
  std::shared_ptr<Segment> take_segment(size_t capacity);
  void release_slot(uint32_t slot);
  void recycle(std::shared_ptr<Segment> segment);
  static void append_run(std::vector<CopyRun>& runs, size_t source, const Placement& placement, size_t length);
  void copy_runs(const std::vector<CopyRun>& runs, const InsertBatch& batch);
  std::vector<CopyRun> live_data_runs() const;  // the live rows' data, merged into contiguous runs
  void load_rows(RowTable&& table, int64_t next_row_id, const Xoshiro256StarStar::State& rng_state);

  FenwickTree& score_tree(double score_floor);
  std::vector<size_t> candidate_positions(const int64_t* row_ids, size_t n);
  std::vector<int64_t> draw_from_tree(FenwickTree& tree, int64_t k, const std::vector<size_t>* positions,
                                      bool restore);

  // configuration
  int64_t capacity_rows_;
  Eviction eviction_;
  uint64_t seed_;
  int64_t segment_tokens_;

  // rows
  int64_t next_row_id_ = 0;
  Xoshiro256StarStar rng_;
  RowTable table_;
  size_t live_rows_ = 0;
  int64_t live_tokens_ = 0;
  size_t first_alive_ = 0;       // every table position below it is dead
  bool steps_ascending_ = true;  // table steps are non-decreasing (evict_stale then binary searches)
  std::set<std::pair<double, int64_t>> score_order_;  // (score, row id); lowest_score only

  // weights over table positions for draws over all live rows
  FenwickTree uniform_weights_;  // 1 per live row
  FenwickTree score_weights_;    // score weights for score_floor_ (valid when score_weights_valid_)
  bool score_weights_valid_ = false;
  double score_floor_ = 0.0;
  std::vector<uint8_t> candidate_mark_;  // scratch for duplicate detection in draw()

  // arena
  std::vector<SegmentSlot> segments_;
  std::vector<uint32_t> free_slots_;
  uint32_t current_slot_ = kNoSlot;
  std::vector<std::shared_ptr<Segment>> spare_segments_;
  size_t dead_tokens_ = 0;
  uint64_t compactions_ = 0;

  mutable std::mutex mutex_;
};

// ---------------------------------------------------------------------------------------------
// BaselineWindow

enum class BaselineEviction : uint32_t { kValue = 0, kStepEntries = 1 };

BaselineEviction parse_baseline_eviction(const std::string& name);
const char* baseline_eviction_name(BaselineEviction eviction);

class BaselineWindow {
 public:
  explicit BaselineWindow(uint64_t capacity = 0, BaselineEviction eviction = BaselineEviction::kValue);
  BaselineWindow(const BaselineWindow&) = delete;
  BaselineWindow& operator=(const BaselineWindow&) = delete;

  // NaN values are rejected; -0.0 is stored as +0.0.
  void push(int64_t step, const double* values, size_t n);
  size_t size() const;
  uint64_t capacity() const { return capacity_; }
  BaselineEviction eviction() const { return eviction_; }
  std::vector<double> values() const;
  void clear();
  // numpy.percentile(values, q) with method="linear", bit for bit; O(log n).
  double percentile(double q) const;

  size_t serialize(const std::function<uint8_t*(size_t)>& allocate) const;
  static std::unique_ptr<BaselineWindow> deserialize(const uint8_t* data, size_t size);

 private:
  struct Entry {  // the values of one push
    int64_t step;
    uint64_t count;
  };
  void append(int64_t step, const double* values, size_t n);
  void drop_front_values(uint64_t n);
  void evict_whole_entries();
  void evict_single_values();

  uint64_t capacity_;
  BaselineEviction eviction_;
  std::deque<double> values_;
  std::deque<Entry> entries_;
  OrderStatisticMultiset order_;
  mutable std::mutex mutex_;
};

}  // namespace spear
