// Implementation of replay_index.hpp. Contract: docs/replay_index_spec.md.
#include "replay_index.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <limits>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__clang__)
// percentile() must round exactly like numpy's two-step lerp, so no fused multiply-add.
// (GCC never contracts in ISO mode, which is how setup.py compiles, -std=c++17.)
#pragma STDC FP_CONTRACT OFF
#endif

namespace spear {
namespace {

constexpr double kMaxScoreUnits = 1048576.0;  // 2^20: (score - score_floor) is clamped to this
constexpr double kWeightScale = 1048576.0;    // 2^20 integer weight units per score unit
constexpr uint64_t kMaxTotalWeight = uint64_t{1} << 63;  // below() needs n < 2^63
constexpr size_t kMinTableCompaction = 32;
constexpr size_t kChecksumChunk = size_t{64} << 10;  // copy and checksum while the chunk is in cache
constexpr size_t kHugePageBytes = size_t{1} << 21;

// Byte format (see docs/replay_index_spec.md).
constexpr char kIndexMagic[8] = {'S', 'P', 'E', 'A', 'R', 'R', 'I', 'X'};
constexpr char kBaselineMagic[8] = {'S', 'P', 'E', 'A', 'R', 'B', 'L', 'W'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kIndexHeaderBytes = 104;
constexpr size_t kRowMetadataBytes = 6 * 8 + 4;  // six 8-byte columns and the int32 length
constexpr size_t kTokenBytes = 4 + 4 + 1;        // int32 token, float32 logp, uint8 mask
// Unreferenced segments kept for reuse (flush + refill then writes to warm memory): at most this
// many, holding at most this many tokens in all (256 MiB of row data).
constexpr size_t kMaxSpareSegments = 32;
constexpr size_t kMaxSpareTokens = (size_t{256} << 20) / kTokenBytes;
constexpr size_t kBaselineHeaderBytes = 48;
constexpr size_t kChecksumBytes = 4;

uint64_t lowest_bit(uint64_t i) { return i & (0 - i); }

uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// 64x64 -> 128-bit product as (high, low).
void multiply_wide(uint64_t a, uint64_t b, uint64_t& high, uint64_t& low) {
#if defined(__SIZEOF_INT128__)
  __extension__ typedef unsigned __int128 u128;
  const u128 product = static_cast<u128>(a) * b;
  high = static_cast<uint64_t>(product >> 64);
  low = static_cast<uint64_t>(product);
#else
  const uint64_t a_lo = a & 0xFFFFFFFFu, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFu, b_hi = b >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFu) + lo_hi;
  high = hi_hi + (hi_lo >> 32) + (cross >> 32);
  low = (cross << 32) | (lo_lo & 0xFFFFFFFFu);
#endif
}

// Slicing-by-8 tables for the reflected zlib polynomial 0xEDB88320.
struct Crc32Tables {
  uint32_t table[8][256];
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int bit = 0; bit < 8; ++bit) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int k = 1; k < 8; ++k) table[k][i] = (table[k - 1][i] >> 8) ^ table[0][table[k - 1][i] & 0xFFu];
  }
};

const Crc32Tables& crc32_tables() {
  static const Crc32Tables tables;
  return tables;
}

// Asks Linux for transparent huge pages on a large fresh buffer (as numpy does for its arrays):
// far fewer page faults when it is first written. A hint only; a no-op elsewhere.
void advise_huge_pages(void* data, size_t size) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (size < 2 * kHugePageBytes) return;
  constexpr uintptr_t kPage = 4096;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kPage - 1) & ~(kPage - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + size) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)size;
#endif
}

std::string describe_double(double v) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.17g", v);
  return buffer;
}

// (score - score_floor) clamped to [0, 2^20], times 2^20, rounded down: exact integer weights.
uint64_t score_weight(double score, double score_floor) {
  double units = score - score_floor;
  if (!(units > 0.0)) return 0;
  if (units > kMaxScoreUnits) units = kMaxScoreUnits;
  return static_cast<uint64_t>(std::floor(units * kWeightScale));
}

// Writes to an output buffer and keeps a running CRC32 of everything written.
class ChecksumWriter {
 public:
  explicit ChecksumWriter(uint8_t* out) : out_(out) {}
  void write(const void* source, size_t n) {
    const auto* from = static_cast<const uint8_t*>(source);
    while (n > 0) {
      const size_t chunk = std::min(n, kChecksumChunk);
      std::memcpy(out_, from, chunk);
      crc_ = crc32_update(crc_, out_, chunk);
      out_ += chunk;
      from += chunk;
      n -= chunk;
    }
  }
  template <class T>
  void value(T v) {
    write(&v, sizeof v);
  }
  uint32_t crc() const { return crc_; }

 private:
  uint8_t* out_;
  uint32_t crc_ = 0;
};

// Reads from an input buffer and keeps a running CRC32 of everything read or skipped.
class ChecksumReader {
 public:
  ChecksumReader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  void read(void* destination, size_t n) {
    require(n);
    auto* to = static_cast<uint8_t*>(destination);
    while (n > 0) {
      const size_t chunk = std::min(n, kChecksumChunk);
      std::memcpy(to, data_ + position_, chunk);
      crc_ = crc32_update(crc_, data_ + position_, chunk);
      position_ += chunk;
      to += chunk;
      n -= chunk;
    }
  }
  template <class T>
  T value() {
    T v;
    read(&v, sizeof v);
    return v;
  }
  template <class T>
  void column(std::vector<T>& out, size_t n) {
    out.resize(n);
    read(out.data(), n * sizeof(T));
  }
  void skip(size_t n) {
    require(n);
    crc_ = crc32_update(crc_, data_ + position_, n);
    position_ += n;
  }
  size_t remaining() const { return size_ - position_; }
  uint32_t crc() const { return crc_; }

 private:
  void require(size_t n) const {
    if (n > size_ - position_) throw std::invalid_argument("serialised bytes are truncated");
  }
  const uint8_t* data_;
  size_t size_;
  size_t position_ = 0;
  uint32_t crc_ = 0;
};

uint32_t stored_checksum(const uint8_t* data, size_t size) {
  uint32_t stored;
  std::memcpy(&stored, data + size - kChecksumBytes, kChecksumBytes);
  return stored;
}

void check_checksum(const char* what, uint32_t stored, uint32_t computed) {
  if (stored != computed)
    throw std::invalid_argument(std::string(what) + " bytes are corrupted: CRC32 mismatch (stored " +
                                std::to_string(stored) + ", computed " + std::to_string(computed) + ")");
}

void check_magic_version_size(const char* what, const uint8_t* data, size_t size, const char (&magic)[8],
                              size_t header_bytes) {
  const size_t minimum = header_bytes + kChecksumBytes;
  if (size < minimum)
    throw std::invalid_argument(std::string(what) + " bytes are truncated: got " + std::to_string(size) +
                                " bytes, the header and checksum alone take " + std::to_string(minimum));
  if (std::memcmp(data, magic, sizeof magic) != 0)
    throw std::invalid_argument(std::string(what) + " bytes do not start with the magic '" +
                                std::string(magic, sizeof magic) + "'");
  uint32_t version;
  std::memcpy(&version, data + 8, sizeof version);
  if (version != kFormatVersion)
    throw std::invalid_argument(std::string(what) + " format version " + std::to_string(version) +
                                " is not supported (this build reads version " +
                                std::to_string(kFormatVersion) + ")");
  uint64_t declared;
  std::memcpy(&declared, data + 16, sizeof declared);
  if (declared != size)
    throw std::invalid_argument(std::string(what) + " bytes are truncated or padded: the header declares " +
                                std::to_string(declared) + " bytes, got " + std::to_string(size));
}

// numpy.percentile(values, q, method="linear") given the sorted values through kth(): numpy's
// virtual index, its "index -1" for the top end, and its two-branch lerp, operation for operation.
template <class Kth>
double numpy_linear_percentile(uint64_t n, double fraction, const Kth& kth) {
  const double last = static_cast<double>(n - 1);
  const double virtual_index = last * fraction;
  double previous_index, below, above;
  if (virtual_index >= last) {
    previous_index = -1.0;  // numpy indexes the maximum as -1, which enters gamma below
    below = above = kth(n - 1);
  } else {
    previous_index = std::floor(virtual_index);
    const auto i = static_cast<uint64_t>(previous_index);
    below = kth(i);
    above = kth(i + 1);
  }
  const double gamma = virtual_index - previous_index;
  const double difference = above - below;
  if (gamma >= 0.5) return above - difference * (1.0 - gamma);
  return below + difference * gamma;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Errors, names

RowNotFound::RowNotFound(int64_t row_id)
    : std::runtime_error("row id " + std::to_string(row_id) +
                         " is not in the replay index (never inserted, evicted or removed)"),
      row_id_(row_id) {}

Eviction parse_eviction(const std::string& name) {
  if (name == "oldest") return Eviction::kOldest;
  if (name == "lowest_score") return Eviction::kLowestScore;
  throw std::invalid_argument("eviction must be 'oldest' or 'lowest_score', got '" + name + "'");
}

const char* eviction_name(Eviction eviction) {
  return eviction == Eviction::kOldest ? "oldest" : "lowest_score";
}

Weighting parse_weighting(const std::string& name) {
  if (name == "uniform") return Weighting::kUniform;
  if (name == "score") return Weighting::kScore;
  throw std::invalid_argument("weighting must be 'uniform' or 'score', got '" + name + "'");
}

BaselineEviction parse_baseline_eviction(const std::string& name) {
  if (name == "value") return BaselineEviction::kValue;
  if (name == "step_entries") return BaselineEviction::kStepEntries;
  throw std::invalid_argument("eviction must be 'value' or 'step_entries', got '" + name + "'");
}

const char* baseline_eviction_name(BaselineEviction eviction) {
  return eviction == BaselineEviction::kValue ? "value" : "step_entries";
}

// ---------------------------------------------------------------------------------------------
// CRC32, RNG

namespace {

// Table CRC on the working state (the inverted CRC).
uint32_t crc32_tables_state(uint32_t state, const uint8_t* p, size_t size) {
  const auto& t = crc32_tables().table;
  while (size >= 8) {
    uint32_t low, high;
    std::memcpy(&low, p, 4);
    std::memcpy(&high, p + 4, 4);
    low ^= state;
    state = t[7][low & 0xFFu] ^ t[6][(low >> 8) & 0xFFu] ^ t[5][(low >> 16) & 0xFFu] ^ t[4][low >> 24] ^
            t[3][high & 0xFFu] ^ t[2][(high >> 8) & 0xFFu] ^ t[1][(high >> 16) & 0xFFu] ^ t[0][high >> 24];
    p += 8;
    size -= 8;
  }
  while (size-- > 0) state = (state >> 8) ^ t[0][(state ^ *p++) & 0xFFu];
  return state;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPEAR_CRC32_CLMUL 1

// CRC by folding with carry-less multiplication (Gopal et al., "Fast CRC Computation for Generic
// Polynomials Using PCLMULQDQ", Intel 2009), for the bit-reflected zlib polynomial. The constants
// are x^k mod P(x) for the fold distances used (bit-reflected, shifted one bit):
//   512-bit folds: x^(4*128+32), x^(4*128-32); 128-bit folds: x^(128+32), x^(128-32);
//   64-bit fold: x^64; Barrett reduction: P(x) itself and floor(x^64 / P(x)).
struct ClmulConstants {
  static constexpr uint64_t kFold512Low = 0x0154442bd4, kFold512High = 0x01c6e41596;
  static constexpr uint64_t kFold128Low = 0x01751997d0, kFold128High = 0x00ccaa009e;
  static constexpr uint64_t kFold64 = 0x0163cd6124;
  static constexpr uint64_t kPolynomial = 0x01db710641, kBarrettMu = 0x01f7011641;
};

__attribute__((target("pclmul,sse2"))) inline __m128i clmul_fold(__m128i accumulator, __m128i constants,
                                                                 __m128i data) {
  // accumulator.low * constants.low  xor  accumulator.high * constants.high  xor  data
  const __m128i low = _mm_clmulepi64_si128(accumulator, constants, 0x00);
  const __m128i high = _mm_clmulepi64_si128(accumulator, constants, 0x11);
  return _mm_xor_si128(_mm_xor_si128(low, high), data);
}

// Requires size >= 64 and a multiple of 16; works on the state like crc32_tables_state.
__attribute__((target("pclmul,sse2"))) uint32_t crc32_clmul_state(uint32_t state, const uint8_t* p, size_t size) {
  using K = ClmulConstants;
  auto load = [](const uint8_t* at) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at)); };
  __m128i lanes[4] = {load(p), load(p + 16), load(p + 32), load(p + 48)};
  lanes[0] = _mm_xor_si128(lanes[0], _mm_cvtsi32_si128(static_cast<int>(state)));
  p += 64;
  size -= 64;

  // Four independent 128-bit lanes, each folded forward by 512 bits per 64-byte block.
  const __m128i fold512 = _mm_set_epi64x(static_cast<long long>(K::kFold512High), static_cast<long long>(K::kFold512Low));
  for (; size >= 64; p += 64, size -= 64)
    for (int lane = 0; lane < 4; ++lane) lanes[lane] = clmul_fold(lanes[lane], fold512, load(p + 16 * lane));

  // Merge the lanes, then fold any remaining 16-byte blocks in.
  const __m128i fold128 = _mm_set_epi64x(static_cast<long long>(K::kFold128High), static_cast<long long>(K::kFold128Low));
  __m128i acc = lanes[0];
  for (int lane = 1; lane < 4; ++lane) acc = clmul_fold(acc, fold128, lanes[lane]);
  for (; size >= 16; p += 16, size -= 16) acc = clmul_fold(acc, fold128, load(p));

  // 128 -> 64 bits: the low half times x^(128-32) folds into the high half.
  const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
  acc = _mm_xor_si128(_mm_srli_si128(acc, 8), _mm_clmulepi64_si128(acc, fold128, 0x10));
  // 64 -> 32 bits more to go: the low 32 bits times x^64.
  const __m128i fold64 = _mm_set_epi64x(0, static_cast<long long>(K::kFold64));
  acc = _mm_xor_si128(_mm_srli_si128(acc, 4), _mm_clmulepi64_si128(_mm_and_si128(acc, low32), fold64, 0x00));
  // Barrett reduction to the final 32 bits.
  const __m128i barrett = _mm_set_epi64x(static_cast<long long>(K::kBarrettMu), static_cast<long long>(K::kPolynomial));
  __m128i quotient = _mm_clmulepi64_si128(_mm_and_si128(acc, low32), barrett, 0x10);
  quotient = _mm_clmulepi64_si128(_mm_and_si128(quotient, low32), barrett, 0x00);
  acc = _mm_xor_si128(acc, quotient);
  return static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_srli_si128(acc, 4)));
}

bool cpu_has_clmul() {
  static const bool has = __builtin_cpu_supports("pclmul") != 0;
  return has;
}
#endif

}  // namespace

uint32_t crc32_update_portable(uint32_t crc, const void* data, size_t size) {
  return ~crc32_tables_state(~crc, static_cast<const uint8_t*>(data), size);
}

uint32_t crc32_update(uint32_t crc, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t state = ~crc;
#ifdef SPEAR_CRC32_CLMUL
  if (size >= 64 && cpu_has_clmul()) {
    const size_t bulk = size & ~size_t{15};
    state = crc32_clmul_state(state, p, bulk);
    p += bulk;
    size -= bulk;
  }
#endif
  return ~crc32_tables_state(state, p, size);
}

Xoshiro256StarStar::Xoshiro256StarStar(uint64_t seed) {
  uint64_t sequence = seed;
  for (auto& word : state_) word = splitmix64(sequence);
}

uint64_t Xoshiro256StarStar::next() {
  auto& s = state_;
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

uint64_t Xoshiro256StarStar::below(uint64_t n) {
  uint64_t high, low;
  multiply_wide(next(), n, high, low);
  if (low < n) {
    const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: the biased low products
    while (low < threshold) multiply_wide(next(), n, high, low);
  }
  return high;
}

void Xoshiro256StarStar::set_state(const State& state) {
  if (state[0] == 0 && state[1] == 0 && state[2] == 0 && state[3] == 0)
    throw std::invalid_argument("the xoshiro256** state must not be all zero");
  state_ = state;
}

// ---------------------------------------------------------------------------------------------
// FenwickTree

void FenwickTree::assign(const std::vector<uint64_t>& weights) {
  const size_t n = weights.size();
  tree_.assign(n + 1, 0);
  total_ = 0;
  for (size_t i = 1; i <= n; ++i) {
    tree_[i] += weights[i - 1];
    total_ += weights[i - 1];
    const size_t parent = i + lowest_bit(i);
    if (parent <= n) tree_[parent] += tree_[i];
  }
}

void FenwickTree::push_back(uint64_t weight) {
  // The new node i covers (i - lowbit(i), i]: its own weight plus the nodes that tile the rest.
  const size_t i = tree_.size();
  const size_t start = i - lowest_bit(i);
  uint64_t node = weight;
  for (size_t j = i - 1; j > start; j -= lowest_bit(j)) node += tree_[j];
  tree_.push_back(node);
  total_ += weight;
}

void FenwickTree::add(size_t index, uint64_t delta) {
  for (size_t i = index + 1; i < tree_.size(); i += lowest_bit(i)) tree_[i] += delta;
  total_ += delta;
}

uint64_t FenwickTree::get(size_t index) const {
  // Node i minus the nodes that tile (i - lowbit(i), i - 1] leaves element i alone.
  const size_t i = index + 1;
  const size_t start = i - lowest_bit(i);
  uint64_t weight = tree_[i];
  for (size_t j = i - 1; j > start; j -= lowest_bit(j)) weight -= tree_[j];
  return weight;
}

size_t FenwickTree::find(uint64_t x) const {
  const size_t n = size();
  size_t step = 1;
  while (step <= n / 2) step <<= 1;
  size_t position = 0;
  for (; step > 0; step >>= 1) {
    const size_t next = position + step;
    if (next <= n && tree_[next] <= x) {
      position = next;
      x -= tree_[next];
    }
  }
  return position;
}

void FenwickTree::clear() {
  tree_.assign(1, 0);
  total_ = 0;
}

// ---------------------------------------------------------------------------------------------
// OrderStatisticMultiset (treap; priorities form a max-heap, keys a search tree)

OrderStatisticMultiset::OrderStatisticMultiset() { nodes_.push_back(Node{0.0, 0, 0, 0, kNil, kNil}); }

bool OrderStatisticMultiset::contains(double key) const {
  uint32_t t = root_;
  while (t != kNil) {
    const Node& node = nodes_[t];
    if (key == node.key) return true;
    t = key < node.key ? node.left : node.right;
  }
  return false;
}

uint32_t OrderStatisticMultiset::new_node(double key) {
  const auto priority = static_cast<uint32_t>(splitmix64(priority_state_) >> 32);
  const Node node{key, 1, 1, priority, kNil, kNil};
  if (!free_nodes_.empty()) {
    const uint32_t index = free_nodes_.back();
    free_nodes_.pop_back();
    nodes_[index] = node;
    return index;
  }
  if (nodes_.size() >= UINT32_MAX) throw std::length_error("baseline window holds too many distinct values");
  nodes_.push_back(node);
  return static_cast<uint32_t>(nodes_.size() - 1);
}

void OrderStatisticMultiset::update_size(uint32_t t) {
  Node& node = nodes_[t];
  node.size = nodes_[node.left].size + nodes_[node.right].size + node.count;
}

void OrderStatisticMultiset::split(uint32_t t, double key, uint32_t& less, uint32_t& greater) {
  if (t == kNil) {
    less = greater = kNil;
    return;
  }
  if (nodes_[t].key < key) {
    split(nodes_[t].right, key, nodes_[t].right, greater);
    less = t;
  } else {
    split(nodes_[t].left, key, less, nodes_[t].left);
    greater = t;
  }
  update_size(t);
}

uint32_t OrderStatisticMultiset::merge(uint32_t a, uint32_t b) {
  if (a == kNil) return b;
  if (b == kNil) return a;
  if (nodes_[a].priority > nodes_[b].priority) {
    nodes_[a].right = merge(nodes_[a].right, b);
    update_size(a);
    return a;
  }
  nodes_[b].left = merge(a, nodes_[b].left);
  update_size(b);
  return b;
}

uint32_t OrderStatisticMultiset::insert_node(uint32_t t, uint32_t node) {
  if (t == kNil) return node;
  if (nodes_[node].priority > nodes_[t].priority) {
    split(t, nodes_[node].key, nodes_[node].left, nodes_[node].right);
    update_size(node);
    return node;
  }
  if (nodes_[node].key < nodes_[t].key) {
    const uint32_t left = insert_node(nodes_[t].left, node);
    nodes_[t].left = left;
  } else {
    const uint32_t right = insert_node(nodes_[t].right, node);
    nodes_[t].right = right;
  }
  ++nodes_[t].size;
  return t;
}

uint32_t OrderStatisticMultiset::erase_key(uint32_t t, double key) {
  if (t == kNil) throw std::logic_error("OrderStatisticMultiset::erase_one: key not present");
  Node& node = nodes_[t];  // erasing never allocates, so the reference stays valid
  if (key == node.key) {
    if (node.count > 1) {
      --node.count;
      --node.size;
      return t;
    }
    const uint32_t merged = merge(node.left, node.right);
    free_nodes_.push_back(t);
    return merged;
  }
  if (key < node.key)
    node.left = erase_key(node.left, key);
  else
    node.right = erase_key(node.right, key);
  --node.size;
  return t;
}

void OrderStatisticMultiset::insert(double key) {
  if (contains(key)) {
    for (uint32_t t = root_;;) {
      Node& node = nodes_[t];
      ++node.size;
      if (key == node.key) {
        ++node.count;
        return;
      }
      t = key < node.key ? node.left : node.right;
    }
  }
  const uint32_t node = new_node(key);
  root_ = insert_node(root_, node);
}

void OrderStatisticMultiset::erase_one(double key) { root_ = erase_key(root_, key); }

double OrderStatisticMultiset::kth(uint64_t rank) const {
  uint32_t t = root_;
  while (true) {
    const Node& node = nodes_[t];
    const uint64_t left_size = nodes_[node.left].size;
    if (rank < left_size) {
      t = node.left;
    } else if (rank < left_size + node.count) {
      return node.key;
    } else {
      rank -= left_size + node.count;
      t = node.right;
    }
  }
}

void OrderStatisticMultiset::clear() {
  nodes_.resize(1);
  free_nodes_.clear();
  root_ = kNil;
}

// ---------------------------------------------------------------------------------------------
// Arena helpers

namespace {
// Large segments start on a huge-page boundary so that transparent huge pages can back all of them.
size_t segment_alignment(size_t bytes) { return bytes >= 2 * kHugePageBytes ? kHugePageBytes : 64; }
}  // namespace

Segment::Segment(size_t capacity_tokens)
    : capacity(capacity_tokens), alignment_(segment_alignment(capacity_tokens * kTokenBytes)) {
  const size_t bytes = std::max<size_t>(capacity * kTokenBytes, 1);
  storage_ = ::operator new(bytes, std::align_val_t{alignment_});
  advise_huge_pages(storage_, bytes);
  auto* base = static_cast<unsigned char*>(storage_);
  tokens = reinterpret_cast<int32_t*>(base);
  logp = reinterpret_cast<float*>(base + capacity * sizeof(int32_t));
  mask = base + capacity * (sizeof(int32_t) + sizeof(float));
}

Segment::~Segment() { ::operator delete(storage_, std::align_val_t{alignment_}); }

void gather_padded(const std::vector<RowData>& rows, size_t width, int32_t pad_token, int32_t* tokens,
                   float* logp, uint8_t* mask, int32_t* lengths) {
  for (size_t i = 0; i < rows.size(); ++i) {
    const RowData& row = rows[i];
    const auto length = static_cast<size_t>(row.length);
    int32_t* token_row = tokens + i * width;
    float* logp_row = logp + i * width;
    uint8_t* mask_row = mask + i * width;
    if (length > 0) {
      std::memcpy(token_row, row.tokens(), length * sizeof(int32_t));
      std::memcpy(logp_row, row.logp(), length * sizeof(float));
      std::memcpy(mask_row, row.mask(), length);
    }
    std::fill(token_row + length, token_row + width, pad_token);
    std::fill(logp_row + length, logp_row + width, 0.0f);
    std::fill(mask_row + length, mask_row + width, uint8_t{0});
    lengths[i] = row.length;
  }
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex: row table

// Room for n rows, growing geometrically (an exact reserve per batch would copy the table each time).
void ReplayIndex::RowTable::reserve(size_t n) {
  if (n <= row_id.capacity()) return;
  n = std::max(n, 2 * row_id.capacity());
  row_id.reserve(n);
  step.reserve(n);
  group_id.reserve(n);
  traj_id.reserve(n);
  score.reserve(n);
  advantage.reserve(n);
  length.reserve(n);
  slot.reserve(n);
  offset.reserve(n);
  alive.reserve(n);
}

void ReplayIndex::RowTable::clear() { *this = RowTable{}; }

void ReplayIndex::RowTable::keep_alive_rows() {
  size_t kept = 0;
  for (size_t r = 0; r < size(); ++r) {
    if (!alive[r]) continue;
    row_id[kept] = row_id[r];
    step[kept] = step[r];
    group_id[kept] = group_id[r];
    traj_id[kept] = traj_id[r];
    score[kept] = score[r];
    advantage[kept] = advantage[r];
    length[kept] = length[r];
    slot[kept] = slot[r];
    offset[kept] = offset[r];
    alive[kept] = 1;
    ++kept;
  }
  row_id.resize(kept);
  step.resize(kept);
  group_id.resize(kept);
  traj_id.resize(kept);
  score.resize(kept);
  advantage.resize(kept);
  length.resize(kept);
  slot.resize(kept);
  offset.resize(kept);
  alive.resize(kept);
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex: construction and small queries

ReplayIndex::ReplayIndex(int64_t capacity_rows, Eviction eviction, uint64_t seed, int64_t segment_tokens)
    : capacity_rows_(capacity_rows), eviction_(eviction), seed_(seed), segment_tokens_(segment_tokens), rng_(seed) {
  if (capacity_rows < 0)
    throw std::invalid_argument("capacity_rows must be >= 0 (0 means unlimited), got " +
                                std::to_string(capacity_rows));
  if (eviction != Eviction::kOldest && eviction != Eviction::kLowestScore)
    throw std::invalid_argument("unknown eviction code " + std::to_string(static_cast<uint32_t>(eviction)));
  if (segment_tokens < 1 || segment_tokens > kMaxSegmentTokens)
    throw std::invalid_argument("segment_tokens must be in [1, 2**31 - 1], got " + std::to_string(segment_tokens));
}

size_t ReplayIndex::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return live_rows_;
}

int64_t ReplayIndex::num_tokens() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return live_tokens_;
}

int64_t ReplayIndex::next_row_id() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return next_row_id_;
}

Xoshiro256StarStar::State ReplayIndex::rng_state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return rng_.state();
}

void ReplayIndex::set_rng_state(const Xoshiro256StarStar::State& state) {
  std::lock_guard<std::mutex> lock(mutex_);
  rng_.set_state(state);
}

// Binary search over the sorted row ids, galloping forward from `hint` when ids[hint] <= row_id:
// ids that arrive in ascending order (candidates, gathers) resolve in O(log gap) each.
size_t ReplayIndex::position_of(int64_t row_id, size_t hint) const {
  const std::vector<int64_t>& ids = table_.row_id;
  const size_t n = ids.size();
  size_t low = 0, high = n;
  if (hint < n && ids[hint] <= row_id) {
    low = hint;
    size_t step = 1, probe = hint + 1;
    while (probe < n && ids[probe] < row_id) {
      low = probe;
      step <<= 1;
      probe = low + step;
    }
    high = std::min(probe + 1, n);
  }
  const auto it = std::lower_bound(ids.begin() + static_cast<std::ptrdiff_t>(low),
                                   ids.begin() + static_cast<std::ptrdiff_t>(high), row_id);
  if (it == ids.end() || *it != row_id) return kNotFound;
  const auto position = static_cast<size_t>(it - ids.begin());
  return table_.alive[position] ? position : kNotFound;
}

size_t ReplayIndex::require_position(int64_t row_id) const {
  const size_t position = position_of(row_id);
  if (position == kNotFound) throw RowNotFound(row_id);
  return position;
}

RowData ReplayIndex::row_data(size_t position) const {
  RowData row;
  row.length = table_.length[position];
  if (row.length > 0) {
    row.segment = segments_[table_.slot[position]].segment;
    row.offset = table_.offset[position];
  }
  return row;
}

std::vector<int64_t> ReplayIndex::row_ids() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<int64_t> ids;
  ids.reserve(live_rows_);
  for (size_t r = 0; r < table_.size(); ++r)
    if (table_.alive[r]) ids.push_back(table_.row_id[r]);
  return ids;
}

RowMetadata ReplayIndex::metadata() const {
  std::lock_guard<std::mutex> lock(mutex_);
  RowMetadata m;
  for (auto* column : {&m.row_id, &m.step, &m.group_id, &m.traj_id}) column->reserve(live_rows_);
  m.score.reserve(live_rows_);
  m.advantage.reserve(live_rows_);
  m.length.reserve(live_rows_);
  for (size_t r = 0; r < table_.size(); ++r) {
    if (!table_.alive[r]) continue;
    m.row_id.push_back(table_.row_id[r]);
    m.step.push_back(table_.step[r]);
    m.group_id.push_back(table_.group_id[r]);
    m.traj_id.push_back(table_.traj_id[r]);
    m.score.push_back(table_.score[r]);
    m.advantage.push_back(table_.advantage[r]);
    m.length.push_back(table_.length[r]);
  }
  return m;
}

RowData ReplayIndex::row(int64_t row_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return row_data(require_position(row_id));
}

std::vector<RowData> ReplayIndex::rows(const int64_t* row_ids, size_t n) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<RowData> result;
  result.reserve(n);
  size_t hint = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t position = position_of(row_ids[i], hint);
    if (position == kNotFound) throw RowNotFound(row_ids[i]);
    result.push_back(row_data(position));
    hint = position + 1;
  }
  return result;
}

int64_t ReplayIndex::count_score_above(double threshold) const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t count = 0;
  for (size_t r = 0; r < table_.size(); ++r) count += (table_.alive[r] && table_.score[r] > threshold) ? 1 : 0;
  return count;
}

ArenaStats ReplayIndex::arena_stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  ArenaStats stats;
  for (const SegmentSlot& s : segments_) {
    if (!s.segment) continue;
    ++stats.segments;
    stats.allocated_tokens += s.segment->capacity;
    stats.used_tokens += s.used;
  }
  stats.dead_tokens = dead_tokens_;
  stats.spare_segments = spare_segments_.size();
  stats.compactions = compactions_;
  return stats;
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex: arena

std::shared_ptr<Segment> ReplayIndex::take_segment(size_t capacity) {
  if (capacity == static_cast<size_t>(segment_tokens_) && !spare_segments_.empty()) {
    std::shared_ptr<Segment> segment = std::move(spare_segments_.back());
    spare_segments_.pop_back();
    return segment;
  }
  return std::make_shared<Segment>(capacity);
}

uint32_t ReplayIndex::add_slot(std::shared_ptr<Segment> segment) {
  SegmentSlot slot{std::move(segment), 0, 0};
  if (!free_slots_.empty()) {
    const uint32_t index = free_slots_.back();
    free_slots_.pop_back();
    segments_[index] = std::move(slot);
    return index;
  }
  segments_.push_back(std::move(slot));
  return static_cast<uint32_t>(segments_.size() - 1);
}

// A row never spans segments: it goes to the current segment if it fits, else to a fresh one;
// a row longer than segment_tokens gets a segment of its own.
ReplayIndex::Placement ReplayIndex::place(size_t length) {
  if (length > static_cast<size_t>(segment_tokens_)) {
    const uint32_t slot = add_slot(take_segment(length));
    segments_[slot].used = length;
    return {slot, 0};
  }
  if (current_slot_ == kNoSlot ||
      segments_[current_slot_].segment->capacity - segments_[current_slot_].used < length)
    current_slot_ = add_slot(take_segment(static_cast<size_t>(segment_tokens_)));
  SegmentSlot& current = segments_[current_slot_];
  const Placement placement{current_slot_, current.used};
  current.used += length;
  return placement;
}

// Unreferenced standard segments are kept for reuse: their pages are already mapped, so the
// next insert is a plain memcpy (no page faults). Data in them is dead and nobody can see it.
void ReplayIndex::recycle(std::shared_ptr<Segment> segment) {
  // New references are only made under our lock, so use_count() == 1 cannot go up meanwhile. Views
  // and gathers drop theirs without the lock: the fence orders their last reads before our writes.
  if (segment.use_count() == 1 && segment->capacity == static_cast<size_t>(segment_tokens_) &&
      spare_segments_.size() < kMaxSpareSegments &&
      (spare_segments_.size() + 1) * segment->capacity <= std::max(kMaxSpareTokens, segment->capacity)) {
    std::atomic_thread_fence(std::memory_order_acquire);
    spare_segments_.push_back(std::move(segment));
  }
}

void ReplayIndex::release_slot(uint32_t slot) {
  SegmentSlot& s = segments_[slot];
  dead_tokens_ -= s.used - s.live;
  if (slot == current_slot_) current_slot_ = kNoSlot;
  recycle(std::move(s.segment));
  s = SegmentSlot{};
  free_slots_.push_back(slot);
}

void ReplayIndex::release_all_segments() {
  for (uint32_t slot = 0; slot < segments_.size(); ++slot)
    if (segments_[slot].segment) recycle(std::move(segments_[slot].segment));
  segments_.clear();
  free_slots_.clear();
  current_slot_ = kNoSlot;
  dead_tokens_ = 0;
}

void ReplayIndex::append_run(std::vector<CopyRun>& runs, size_t source, const Placement& placement,
                             size_t length) {
  if (!runs.empty()) {
    CopyRun& last = runs.back();
    if (last.slot == placement.slot && last.dest + last.length == placement.offset &&
        last.source + last.length == source) {
      last.length += length;
      return;
    }
  }
  runs.push_back(CopyRun{source, placement.slot, placement.offset, length});
}

void ReplayIndex::copy_runs(const std::vector<CopyRun>& runs, const InsertBatch& batch) {
  for (const CopyRun& run : runs) {
    Segment& segment = *segments_[run.slot].segment;
    std::memcpy(segment.tokens + run.dest, batch.tokens + run.source, run.length * sizeof(int32_t));
    std::memcpy(segment.logp + run.dest, batch.logp + run.source, run.length * sizeof(float));
    std::memcpy(segment.mask + run.dest, batch.mask + run.source, run.length);
  }
}

// Copies the live rows into fresh segments. Old segments stay alive while views refer to them.
void ReplayIndex::compact_arena() {
  std::vector<SegmentSlot> old = std::move(segments_);
  segments_.clear();
  free_slots_.clear();
  current_slot_ = kNoSlot;
  dead_tokens_ = 0;
  for (size_t r = 0; r < table_.size(); ++r) {
    const auto length = static_cast<size_t>(table_.length[r]);
    if (!table_.alive[r] || length == 0) continue;
    SegmentSlot& from = old[table_.slot[r]];
    if (length > static_cast<size_t>(segment_tokens_)) {  // a row's own segment has no dead space
      const uint32_t slot = add_slot(std::move(from.segment));
      segments_[slot].used = segments_[slot].live = length;
      table_.slot[r] = slot;
      continue;
    }
    const Placement to = place(length);
    const Segment& source = *from.segment;
    Segment& dest = *segments_[to.slot].segment;
    const size_t at = table_.offset[r];
    std::memcpy(dest.tokens + to.offset, source.tokens + at, length * sizeof(int32_t));
    std::memcpy(dest.logp + to.offset, source.logp + at, length * sizeof(float));
    std::memcpy(dest.mask + to.offset, source.mask + at, length);
    segments_[to.slot].live += length;
    table_.slot[r] = to.slot;
    table_.offset[r] = to.offset;
  }
  for (SegmentSlot& s : old)
    if (s.segment) recycle(std::move(s.segment));
  ++compactions_;
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex: rows in and out

void ReplayIndex::append_row(const InsertBatch& batch, size_t j, const Placement& placement) {
  const int64_t row_id = next_row_id_++;
  const double score = batch.scores[j];
  if (!table_.step.empty() && batch.steps[j] < table_.step.back()) steps_ascending_ = false;
  table_.row_id.push_back(row_id);
  table_.step.push_back(batch.steps[j]);
  table_.group_id.push_back(batch.group_ids[j]);
  table_.traj_id.push_back(batch.traj_ids[j]);
  table_.score.push_back(score);
  table_.advantage.push_back(batch.advantages[j]);
  table_.length.push_back(static_cast<int32_t>(batch.lengths[j]));
  table_.slot.push_back(placement.slot);
  table_.offset.push_back(placement.offset);
  table_.alive.push_back(1);
  uniform_weights_.push_back(1);
  if (score_weights_valid_) score_weights_.push_back(score_weight(score, score_floor_));
  if (eviction_ == Eviction::kLowestScore) score_order_.emplace(score, row_id);
  ++live_rows_;
  live_tokens_ += batch.lengths[j];
}

void ReplayIndex::kill(size_t position) {
  table_.alive[position] = 0;
  --live_rows_;
  const int32_t length = table_.length[position];
  live_tokens_ -= length;
  uniform_weights_.add(position, 0 - uint64_t{1});
  const double score = table_.score[position];
  if (score_weights_valid_) score_weights_.add(position, 0 - score_weight(score, score_floor_));
  if (eviction_ == Eviction::kLowestScore) score_order_.erase({score, table_.row_id[position]});
  if (length > 0) {
    const uint32_t slot = table_.slot[position];
    segments_[slot].live -= static_cast<size_t>(length);
    dead_tokens_ += static_cast<size_t>(length);
    if (segments_[slot].live == 0) release_slot(slot);
  }
}

size_t ReplayIndex::victim_position() {
  if (eviction_ == Eviction::kOldest) {
    while (!table_.alive[first_alive_]) ++first_alive_;
    return first_alive_;
  }
  return require_position(score_order_.begin()->second);
}

void ReplayIndex::compact_table() {
  table_.keep_alive_rows();
  steps_ascending_ = std::is_sorted(table_.step.begin(), table_.step.end());  // dropped rows may have been out of order
  uniform_weights_.assign(std::vector<uint64_t>(table_.size(), 1));
  score_weights_valid_ = false;
  first_alive_ = 0;
}

// Keeps tombstones and dead arena space below the live amount (amortised O(1) per removal).
void ReplayIndex::after_removals() {
  const size_t dead_entries = table_.size() - live_rows_;
  if (dead_entries > live_rows_ && dead_entries >= kMinTableCompaction) compact_table();
  if (dead_tokens_ > static_cast<size_t>(live_tokens_) && dead_tokens_ >= static_cast<size_t>(segment_tokens_))
    compact_arena();
}

namespace {
void validate_batch(const InsertBatch& batch) {
  uint64_t total = 0;
  for (size_t j = 0; j < batch.num_rows; ++j) {
    const int64_t length = batch.lengths[j];
    if (length < 0)
      throw std::invalid_argument("lengths must be >= 0, got " + std::to_string(length) + " at row " +
                                  std::to_string(j));
    if (length > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("lengths must fit in int32, got " + std::to_string(length) + " at row " +
                                  std::to_string(j));
    total += static_cast<uint64_t>(length);
    if (std::isnan(batch.scores[j]))
      throw std::invalid_argument("scores must not be NaN (row " + std::to_string(j) + ")");
  }
  if (total != batch.num_tokens)
    throw std::invalid_argument("lengths sum to " + std::to_string(total) + " but the token arrays hold " +
                                std::to_string(batch.num_tokens) + " tokens");
}
}  // namespace

void ReplayIndex::insert_batch(const InsertBatch& batch, int64_t* out_row_ids) {
  validate_batch(batch);
  std::lock_guard<std::mutex> lock(mutex_);

  // 1. Place every admitted row and copy the data: one memcpy per array per contiguous run.
  std::vector<size_t> admitted;
  std::vector<Placement> placements;
  std::vector<CopyRun> runs;
  admitted.reserve(batch.num_rows);
  placements.reserve(batch.num_rows);
  size_t source = 0;
  for (size_t j = 0; j < batch.num_rows; ++j) {
    const auto length = static_cast<size_t>(batch.lengths[j]);
    out_row_ids[j] = -1;
    if (batch.advantages[j] > batch.threshold) {
      admitted.push_back(j);
      placements.push_back(length > 0 ? place(length) : Placement{kNoSlot, 0});
      if (length > 0) append_run(runs, source, placements.back(), length);
    }
    source += length;
  }
  copy_runs(runs, batch);
  for (size_t a = 0; a < admitted.size(); ++a)
    if (placements[a].slot != kNoSlot) segments_[placements[a].slot].live += static_cast<size_t>(batch.lengths[admitted[a]]);

  // 2. Commit the rows in order; a full index first evicts one live row per new row.
  table_.reserve(table_.size() + admitted.size());
  uniform_weights_.reserve(table_.row_id.capacity());  // grows with the table, not by doubling
  if (score_weights_valid_) score_weights_.reserve(table_.row_id.capacity());
  for (size_t a = 0; a < admitted.size(); ++a) {
    if (capacity_rows_ > 0 && live_rows_ == static_cast<size_t>(capacity_rows_)) kill(victim_position());
    out_row_ids[admitted[a]] = next_row_id_;
    append_row(batch, admitted[a], placements[a]);
  }
  after_removals();
}

int64_t ReplayIndex::remove(const int64_t* row_ids, size_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t removed = 0;
  size_t hint = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t position = position_of(row_ids[i], hint);
    if (position == kNotFound) continue;
    kill(position);
    ++removed;
    hint = position + 1;
  }
  after_removals();
  return removed;
}

// Newest step over the live rows. With ascending steps it is the last live row's.
int64_t ReplayIndex::newest_live_step() const {
  if (steps_ascending_) {
    for (size_t r = table_.size(); r-- > 0;)
      if (table_.alive[r]) return table_.step[r];
  }
  int64_t newest = std::numeric_limits<int64_t>::min();
  for (size_t r = 0; r < table_.size(); ++r)
    if (table_.alive[r]) newest = std::max(newest, table_.step[r]);
  return newest;
}

int64_t ReplayIndex::evict_stale(int64_t window, std::optional<int64_t> current_step) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (live_rows_ == 0) return 0;
  const int64_t reference = current_step ? *current_step : newest_live_step();
  // Evict iff reference - step > window, i.e. step < reference - window, without int64 overflow.
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  if (window >= 0 && reference < kMin + window) return 0;  // reference - window < INT64_MIN
  const bool evict_all = window < 0 && reference > kMax + window;  // reference - window > INT64_MAX
  const int64_t cutoff = evict_all ? kMax : reference - window;
  // Rows inserted with non-decreasing steps (the usual case) make the stale rows a prefix of the
  // table: binary search its end instead of scanning every row.
  size_t end = table_.size();
  if (steps_ascending_ && !evict_all)
    end = static_cast<size_t>(std::lower_bound(table_.step.begin() + static_cast<std::ptrdiff_t>(first_alive_),
                                               table_.step.end(), cutoff) -
                              table_.step.begin());
  int64_t evicted = 0;
  for (size_t r = first_alive_; r < end; ++r) {
    if (table_.alive[r] && (evict_all || table_.step[r] < cutoff)) {
      kill(r);
      ++evicted;
    }
  }
  after_removals();
  return evicted;
}

void ReplayIndex::flush() {
  std::lock_guard<std::mutex> lock(mutex_);
  table_.clear();
  steps_ascending_ = true;
  live_rows_ = 0;
  live_tokens_ = 0;
  first_alive_ = 0;
  score_order_.clear();
  uniform_weights_.clear();
  score_weights_valid_ = false;
  candidate_mark_.clear();
  release_all_segments();
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex: draws

FenwickTree& ReplayIndex::score_tree(double score_floor) {
  if (!score_weights_valid_ || score_floor != score_floor_) {
    std::vector<uint64_t> weights(table_.size(), 0);
    for (size_t r = 0; r < table_.size(); ++r)
      if (table_.alive[r]) weights[r] = score_weight(table_.score[r], score_floor);
    score_weights_.assign(weights);
    score_floor_ = score_floor;
    score_weights_valid_ = true;
  }
  return score_weights_;
}

// Sequential weighted sampling without replacement. Element e of the tree is table row
// positions[e] (or row e when positions is null). With restore, the picked weights are put back
// afterwards, for the persistent trees over all rows.
std::vector<int64_t> ReplayIndex::draw_from_tree(FenwickTree& tree, int64_t k, const std::vector<size_t>* positions,
                                                 bool restore) {
  if (tree.total() >= kMaxTotalWeight)
    throw std::invalid_argument("the total draw weight reaches 2**63; lower the scores or raise score_floor");
  std::vector<int64_t> picked;
  std::vector<std::pair<size_t, uint64_t>> taken;
  for (int64_t i = 0; i < k && tree.total() > 0; ++i) {
    const size_t element = tree.find(rng_.below(tree.total()));
    const uint64_t weight = tree.get(element);
    tree.add(element, 0 - weight);
    picked.push_back(table_.row_id[positions ? (*positions)[element] : element]);
    taken.emplace_back(element, weight);
  }
  if (restore)
    for (const auto& [element, weight] : taken) tree.add(element, weight);
  return picked;
}

// Table positions of explicit candidates: unknown ids -> RowNotFound, repeated ids -> invalid_argument.
std::vector<size_t> ReplayIndex::candidate_positions(const int64_t* row_ids, size_t n) {
  std::vector<size_t> positions;
  positions.reserve(n);
  candidate_mark_.resize(table_.size(), 0);
  auto unmark = [&] {
    for (size_t p : positions) candidate_mark_[p] = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const size_t position = position_of(row_ids[i], positions.empty() ? 0 : positions.back() + 1);
    if (position == kNotFound || candidate_mark_[position]) {
      unmark();
      if (position == kNotFound) throw RowNotFound(row_ids[i]);
      throw std::invalid_argument("candidates contain row id " + std::to_string(row_ids[i]) + " more than once");
    }
    candidate_mark_[position] = 1;
    positions.push_back(position);
  }
  unmark();
  return positions;
}

std::vector<int64_t> ReplayIndex::draw(int64_t k, Weighting weighting,
                                       const std::optional<std::pair<const int64_t*, size_t>>& candidates,
                                       double score_floor) {
  if (k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(k));
  if (!std::isfinite(score_floor))
    throw std::invalid_argument("score_floor must be finite, got " + describe_double(score_floor));
  std::lock_guard<std::mutex> lock(mutex_);
  if (!candidates) {
    FenwickTree& tree = weighting == Weighting::kUniform ? uniform_weights_ : score_tree(score_floor);
    return draw_from_tree(tree, k, nullptr, /*restore=*/true);
  }
  const std::vector<size_t> positions = candidate_positions(candidates->first, candidates->second);
  std::vector<uint64_t> weights(positions.size(), 1);
  if (weighting == Weighting::kScore)
    for (size_t i = 0; i < positions.size(); ++i) weights[i] = score_weight(table_.score[positions[i]], score_floor);
  FenwickTree tree;
  tree.assign(weights);
  return draw_from_tree(tree, k, &positions, /*restore=*/false);
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex: serialisation

std::vector<ReplayIndex::CopyRun> ReplayIndex::live_data_runs() const {
  std::vector<CopyRun> runs;
  size_t source = 0;  // position in the serialised token stream
  for (size_t r = 0; r < table_.size(); ++r) {
    const auto length = static_cast<size_t>(table_.length[r]);
    if (!table_.alive[r] || length == 0) continue;
    append_run(runs, source, Placement{table_.slot[r], table_.offset[r]}, length);
    source += length;
  }
  return runs;
}

namespace {
// Writes the live entries of a table column (tombstones skipped) through a small staging buffer.
template <class T>
void write_live_column(ChecksumWriter& writer, const std::vector<T>& column, const std::vector<uint8_t>& alive,
                       size_t live) {
  if (live == column.size()) {
    writer.write(column.data(), live * sizeof(T));
    return;
  }
  constexpr size_t kStaging = 4096;
  T staging[kStaging];
  size_t filled = 0;
  for (size_t r = 0; r < column.size(); ++r) {
    if (!alive[r]) continue;
    staging[filled++] = column[r];
    if (filled == kStaging) {
      writer.write(staging, sizeof staging);
      filled = 0;
    }
  }
  writer.write(staging, filled * sizeof(T));
}

std::string config_problem(uint32_t eviction, int64_t capacity_rows, int64_t segment_tokens) {
  if (eviction > static_cast<uint32_t>(Eviction::kLowestScore)) return "unknown eviction code " + std::to_string(eviction);
  if (capacity_rows < 0) return "negative capacity_rows " + std::to_string(capacity_rows);
  if (segment_tokens < 1 || segment_tokens > ReplayIndex::kMaxSegmentTokens)
    return "segment_tokens " + std::to_string(segment_tokens) + " is out of range";
  return {};
}

std::string lengths_problem(const std::vector<int32_t>& lengths, uint64_t n_tokens) {
  uint64_t total = 0;
  for (int32_t length : lengths) {
    if (length < 0) return "negative row length " + std::to_string(length);
    total += static_cast<uint64_t>(length);
  }
  if (total != n_tokens)
    return "row lengths sum to " + std::to_string(total) + " but the header says " + std::to_string(n_tokens) + " tokens";
  return {};
}

std::string rows_problem(const std::vector<int64_t>& row_ids, const std::vector<double>& scores, int64_t capacity_rows,
                         int64_t next_row_id, const Xoshiro256StarStar::State& rng_state) {
  if (next_row_id < 0) return "negative next row id " + std::to_string(next_row_id);
  for (size_t r = 0; r < row_ids.size(); ++r) {
    if (row_ids[r] < 0 || row_ids[r] >= next_row_id || (r > 0 && row_ids[r] <= row_ids[r - 1]))
      return "row ids must increase strictly within [0, next row id)";
    if (std::isnan(scores[r])) return "a row has a NaN score";
  }
  if (capacity_rows > 0 && row_ids.size() > static_cast<uint64_t>(capacity_rows))
    return std::to_string(row_ids.size()) + " rows exceed capacity_rows " + std::to_string(capacity_rows);
  if (rng_state[0] == 0 && rng_state[1] == 0 && rng_state[2] == 0 && rng_state[3] == 0)
    return "the RNG state is all zero";
  return {};
}
}  // namespace

size_t ReplayIndex::serialize(const std::function<uint8_t*(size_t)>& allocate) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const size_t n_rows = live_rows_;
  const auto n_tokens = static_cast<size_t>(live_tokens_);
  const size_t total = kIndexHeaderBytes + n_rows * kRowMetadataBytes + n_tokens * kTokenBytes + kChecksumBytes;
  uint8_t* out = allocate(total);
  advise_huge_pages(out, total);
  ChecksumWriter writer(out);
  writer.write(kIndexMagic, sizeof kIndexMagic);
  writer.value<uint32_t>(kFormatVersion);
  writer.value<uint32_t>(static_cast<uint32_t>(eviction_));
  writer.value<uint64_t>(total);
  writer.value<int64_t>(capacity_rows_);
  writer.value<uint64_t>(seed_);
  writer.value<int64_t>(segment_tokens_);
  writer.value<int64_t>(next_row_id_);
  for (uint64_t word : rng_.state()) writer.value<uint64_t>(word);
  writer.value<uint64_t>(n_rows);
  writer.value<uint64_t>(n_tokens);
  write_live_column(writer, table_.row_id, table_.alive, n_rows);
  write_live_column(writer, table_.step, table_.alive, n_rows);
  write_live_column(writer, table_.group_id, table_.alive, n_rows);
  write_live_column(writer, table_.traj_id, table_.alive, n_rows);
  write_live_column(writer, table_.score, table_.alive, n_rows);
  write_live_column(writer, table_.advantage, table_.alive, n_rows);
  write_live_column(writer, table_.length, table_.alive, n_rows);
  const std::vector<CopyRun> runs = live_data_runs();
  for (const CopyRun& run : runs)
    writer.write(segments_[run.slot].segment->tokens + run.dest, run.length * sizeof(int32_t));
  for (const CopyRun& run : runs)
    writer.write(segments_[run.slot].segment->logp + run.dest, run.length * sizeof(float));
  for (const CopyRun& run : runs) writer.write(segments_[run.slot].segment->mask + run.dest, run.length);
  const uint32_t crc = writer.crc();
  std::memcpy(out + total - kChecksumBytes, &crc, kChecksumBytes);
  return total;
}

// Reads and checksums in one pass (the data goes straight into arena segments); the checksum is
// compared before any semantic check, so corruption is reported as corruption.
std::unique_ptr<ReplayIndex> ReplayIndex::deserialize(const uint8_t* data, size_t size) {
  const char* what = "replay index";
  check_magic_version_size(what, data, size, kIndexMagic, kIndexHeaderBytes);
  ChecksumReader reader(data, size - kChecksumBytes);
  reader.skip(12);  // magic and version, checked above
  const auto eviction = reader.value<uint32_t>();
  reader.skip(8);  // total size, checked above
  const auto capacity_rows = reader.value<int64_t>();
  const auto seed = reader.value<uint64_t>();
  const auto segment_tokens = reader.value<int64_t>();
  const auto next_row_id = reader.value<int64_t>();
  Xoshiro256StarStar::State rng_state;
  for (uint64_t& word : rng_state) word = reader.value<uint64_t>();
  const auto n_rows = reader.value<uint64_t>();
  const auto n_tokens = reader.value<uint64_t>();
  const size_t body = size - kIndexHeaderBytes - kChecksumBytes;
  if (n_rows > body / kRowMetadataBytes || n_tokens > body / kTokenBytes ||
      n_rows * kRowMetadataBytes + n_tokens * kTokenBytes != body)
    throw std::invalid_argument("replay index bytes are corrupted: the row and token counts do not match the size");

  RowTable table;
  reader.column(table.row_id, n_rows);
  reader.column(table.step, n_rows);
  reader.column(table.group_id, n_rows);
  reader.column(table.traj_id, n_rows);
  reader.column(table.score, n_rows);
  reader.column(table.advantage, n_rows);
  reader.column(table.length, n_rows);

  std::string problem = config_problem(eviction, capacity_rows, segment_tokens);
  if (problem.empty()) problem = lengths_problem(table.length, n_tokens);
  std::unique_ptr<ReplayIndex> index;
  if (problem.empty()) {
    index = std::make_unique<ReplayIndex>(capacity_rows, static_cast<Eviction>(eviction), seed, segment_tokens);
    table.slot.assign(n_rows, kNoSlot);
    table.offset.assign(n_rows, 0);
    std::vector<CopyRun> runs;
    size_t source = 0;
    for (size_t r = 0; r < n_rows; ++r) {
      const auto length = static_cast<size_t>(table.length[r]);
      if (length == 0) continue;
      const Placement placement = index->place(length);
      table.slot[r] = placement.slot;
      table.offset[r] = placement.offset;
      append_run(runs, source, placement, length);
      source += length;
    }
    for (const CopyRun& run : runs)
      reader.read(index->segments_[run.slot].segment->tokens + run.dest, run.length * sizeof(int32_t));
    for (const CopyRun& run : runs)
      reader.read(index->segments_[run.slot].segment->logp + run.dest, run.length * sizeof(float));
    for (const CopyRun& run : runs) reader.read(index->segments_[run.slot].segment->mask + run.dest, run.length);
  } else {
    reader.skip(reader.remaining());
  }
  check_checksum(what, stored_checksum(data, size), reader.crc());
  if (problem.empty()) problem = rows_problem(table.row_id, table.score, capacity_rows, next_row_id, rng_state);
  if (!problem.empty()) throw std::invalid_argument(std::string(what) + " bytes are inconsistent: " + problem);
  index->load_rows(std::move(table), next_row_id, rng_state);
  return index;
}

// Adopts a validated table whose rows already sit in this index's arena (see deserialize).
void ReplayIndex::load_rows(RowTable&& table, int64_t next_row_id, const Xoshiro256StarStar::State& rng_state) {
  table_ = std::move(table);
  table_.alive.assign(table_.size(), 1);
  steps_ascending_ = std::is_sorted(table_.step.begin(), table_.step.end());
  live_rows_ = table_.size();
  live_tokens_ = 0;
  for (size_t r = 0; r < table_.size(); ++r) {
    const int32_t length = table_.length[r];
    live_tokens_ += length;
    if (length > 0) segments_[table_.slot[r]].live += static_cast<size_t>(length);
    if (eviction_ == Eviction::kLowestScore) score_order_.emplace(table_.score[r], table_.row_id[r]);
  }
  uniform_weights_.assign(std::vector<uint64_t>(table_.size(), 1));
  next_row_id_ = next_row_id;
  rng_.set_state(rng_state);
}

// ---------------------------------------------------------------------------------------------
// BaselineWindow

BaselineWindow::BaselineWindow(uint64_t capacity, BaselineEviction eviction)
    : capacity_(capacity), eviction_(eviction) {
  if (eviction != BaselineEviction::kValue && eviction != BaselineEviction::kStepEntries)
    throw std::invalid_argument("unknown baseline eviction code " + std::to_string(static_cast<uint32_t>(eviction)));
}

size_t BaselineWindow::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return values_.size();
}

std::vector<double> BaselineWindow::values() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::vector<double>(values_.begin(), values_.end());
}

void BaselineWindow::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  values_.clear();
  entries_.clear();
  order_.clear();
}

void BaselineWindow::append(int64_t step, const double* values, size_t n) {
  entries_.push_back(Entry{step, n});
  for (size_t i = 0; i < n; ++i) {
    const double value = values[i] == 0.0 ? 0.0 : values[i];  // -0.0 -> +0.0: equal keys, equal bits
    values_.push_back(value);
    order_.insert(value);
  }
}

void BaselineWindow::drop_front_values(uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) {
    order_.erase_one(values_.front());
    values_.pop_front();
  }
}

// step_entries (official SPEAR): before appending, drop whole oldest pushes while over capacity.
void BaselineWindow::evict_whole_entries() {
  if (capacity_ == 0) return;
  while (values_.size() > capacity_ && !entries_.empty()) {
    drop_front_values(entries_.front().count);
    entries_.pop_front();
  }
}

// value: after appending, drop the oldest values until the window fits.
void BaselineWindow::evict_single_values() {
  if (capacity_ == 0 || values_.size() <= capacity_) return;
  uint64_t excess = values_.size() - capacity_;
  while (excess > 0) {
    Entry& oldest = entries_.front();
    const uint64_t dropped = std::min(oldest.count, excess);
    drop_front_values(dropped);
    oldest.count -= dropped;
    excess -= dropped;
    if (oldest.count == 0) entries_.pop_front();
  }
}

void BaselineWindow::push(int64_t step, const double* values, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (std::isnan(values[i]))
      throw std::invalid_argument("baseline values must not be NaN (index " + std::to_string(i) + ")");
  std::lock_guard<std::mutex> lock(mutex_);
  if (eviction_ == BaselineEviction::kStepEntries) evict_whole_entries();
  append(step, values, n);
  if (eviction_ == BaselineEviction::kValue) evict_single_values();
}

double BaselineWindow::percentile(double q) const {
  const double fraction = q / 100.0;  // numpy divides first and validates the fraction
  if (!(fraction >= 0.0 && fraction <= 1.0))
    throw std::invalid_argument("percentile q must be in [0, 100], got " + describe_double(q));
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t n = order_.size();
  if (n == 0) throw std::invalid_argument("percentile of an empty baseline window");
  return numpy_linear_percentile(n, fraction, [this](uint64_t rank) { return order_.kth(rank); });
}

size_t BaselineWindow::serialize(const std::function<uint8_t*(size_t)>& allocate) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t n_values = values_.size(), n_entries = entries_.size();
  const size_t total = kBaselineHeaderBytes + n_values * 8 + n_entries * 16 + kChecksumBytes;
  uint8_t* out = allocate(total);
  ChecksumWriter writer(out);
  writer.write(kBaselineMagic, sizeof kBaselineMagic);
  writer.value<uint32_t>(kFormatVersion);
  writer.value<uint32_t>(static_cast<uint32_t>(eviction_));
  writer.value<uint64_t>(total);
  writer.value<uint64_t>(capacity_);
  writer.value<uint64_t>(n_values);
  writer.value<uint64_t>(n_entries);
  for (double v : values_) writer.value<double>(v);
  for (const Entry& e : entries_) writer.value<int64_t>(e.step);
  for (const Entry& e : entries_) writer.value<uint64_t>(e.count);
  const uint32_t crc = writer.crc();
  std::memcpy(out + total - kChecksumBytes, &crc, kChecksumBytes);
  return total;
}

std::unique_ptr<BaselineWindow> BaselineWindow::deserialize(const uint8_t* data, size_t size) {
  const char* what = "baseline window";
  check_magic_version_size(what, data, size, kBaselineMagic, kBaselineHeaderBytes);
  ChecksumReader reader(data, size - kChecksumBytes);
  reader.skip(16);  // magic, version, eviction (read below from the raw header)
  uint32_t eviction;
  std::memcpy(&eviction, data + 12, sizeof eviction);
  reader.skip(8);  // total size, checked above
  const auto capacity = reader.value<uint64_t>();
  const auto n_values = reader.value<uint64_t>();
  const auto n_entries = reader.value<uint64_t>();
  const size_t body = size - kBaselineHeaderBytes - kChecksumBytes;
  if (n_values > body / 8 || n_entries > body / 16 || n_values * 8 + n_entries * 16 != body)
    throw std::invalid_argument("baseline window bytes are corrupted: the value and entry counts do not match the size");
  std::vector<double> values;
  std::vector<int64_t> steps;
  std::vector<uint64_t> counts;
  reader.column(values, n_values);
  reader.column(steps, n_entries);
  reader.column(counts, n_entries);
  check_checksum(what, stored_checksum(data, size), reader.crc());

  if (eviction > static_cast<uint32_t>(BaselineEviction::kStepEntries))
    throw std::invalid_argument("baseline window bytes hold an unknown eviction code " + std::to_string(eviction));
  uint64_t counted = 0;
  for (uint64_t c : counts) {
    if (c > n_values - counted)
      throw std::invalid_argument("baseline window bytes are inconsistent: entry counts exceed the values");
    counted += c;
  }
  if (counted != n_values)
    throw std::invalid_argument("baseline window bytes are inconsistent: entry counts do not sum to the values");
  for (double v : values)
    if (std::isnan(v) || (v == 0.0 && std::signbit(v)))
      throw std::invalid_argument("baseline window bytes hold a NaN or -0.0 value");

  auto window = std::make_unique<BaselineWindow>(capacity, static_cast<BaselineEviction>(eviction));
  size_t next = 0;
  for (size_t e = 0; e < n_entries; ++e) {
    window->append(steps[e], values.data() + next, counts[e]);
    next += counts[e];
  }
  return window;
}

}  // namespace spear
