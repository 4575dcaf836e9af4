// pybind11 bindings: module spear_engine._replay_index (ReplayIndex, BaselineWindow).
//
// GIL rule: every call into the C++ core runs with the GIL released (without_gil), so a thread
// never waits for the core's mutex while holding the GIL. That makes it safe for the core to take
// the GIL back while it holds its mutex (to_bytes allocates the result in place that way).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/typing.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "replay_index.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

inline bool accepts_any_object(PyObject*) { return true; }

// Any object numpy can turn into an array (ndarray, list, ...); converted and checked by the helpers
// below so that bad input raises ValueError rather than pybind11's TypeError.
class ArrayLike : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(ArrayLike, object, accepts_any_object)
};

// An integer of any kind (int, numpy integer, anything with __index__), range-checked by to_seed.
class IntLike : public py::object {
 public:
  PYBIND11_OBJECT_DEFAULT(IntLike, object, accepts_any_object)
};

}  // namespace

namespace pybind11::detail {
template <>
struct handle_type_name<ArrayLike> {
  static constexpr auto name = const_name("numpy.typing.ArrayLike");
};
template <>
struct handle_type_name<IntLike> {
  static constexpr auto name = const_name("int");
};
}  // namespace pybind11::detail

namespace {

template <class F>
auto without_gil(F&& fn) -> decltype(fn()) {
  py::gil_scoped_release release;
  return fn();
}

[[noreturn]] void value_error(const std::string& message) { throw py::value_error(message); }

std::string describe(const py::array& a) {
  return "dtype " + std::string(py::str(a.dtype())) + " and shape " + std::string(py::str(a.attr("shape")));
}

py::array to_array(const ArrayLike& object, const char* name) {
  py::array a = py::array::ensure(object);
  if (!a) value_error(std::string(name) + " must be array-like, got " + std::string(py::repr(object)));
  return a;
}

// A 1-D array of exactly dtype T (tokens int32, logp float32, mask uint8): no silent casts.
template <class T>
py::array_t<T, py::array::c_style> exact_array(const ArrayLike& object, const char* name, const char* dtype_name) {
  const py::array a = to_array(object, name);
  if (!py::isinstance<py::array_t<T>>(a) || a.ndim() != 1)
    value_error(std::string(name) + " must be a 1-D " + dtype_name + " array, got " + describe(a));
  return py::array_t<T, py::array::c_style>::ensure(a);  // copies only non-contiguous input
}

// A 1-D array of integers (any integer dtype), as contiguous int64.
py::array_t<int64_t, py::array::c_style> int64_array(const ArrayLike& object, const char* name) {
  const py::array a = to_array(object, name);
  const char kind = a.dtype().kind();
  if (a.ndim() != 1 || !(kind == 'i' || kind == 'u' || a.size() == 0))
    value_error(std::string(name) + " must be a 1-D integer array, got " + describe(a));
  return py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

// A 1-D array of real numbers (float or integer dtype), as contiguous float64.
py::array_t<double, py::array::c_style> float64_array(const ArrayLike& object, const char* name) {
  const py::array a = to_array(object, name);
  const char kind = a.dtype().kind();
  if (a.ndim() != 1 || !(kind == 'f' || kind == 'i' || kind == 'u' || a.size() == 0))
    value_error(std::string(name) + " must be a 1-D real array, got " + describe(a));
  return py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
}

void require_length(const py::array& a, py::ssize_t n, const char* name) {
  if (a.size() != n)
    value_error(std::string(name) + " must have one entry per row (" + std::to_string(n) + "), got " +
                std::to_string(a.size()));
}

uint64_t to_seed(const IntLike& seed) {
  const py::object as_int = py::reinterpret_steal<py::object>(PyNumber_Index(seed.ptr()));
  if (as_int) {
    const unsigned long long value = PyLong_AsUnsignedLongLong(as_int.ptr());
    if (!(value == static_cast<unsigned long long>(-1) && PyErr_Occurred())) return value;
  }
  PyErr_Clear();
  value_error("seed must be an integer in [0, 2**64), got " + std::string(py::repr(seed)));
}

void mark_readonly(py::array& a) {
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

// Hands a vector to numpy without copying: the array's base owns the vector.
template <class T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* owner = new std::vector<T>(std::move(values));
  py::capsule base(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(owner->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        owner->data(), base);
}

// A read-only zero-copy view of a row's data; its base pins the arena segment.
template <class T>
py::array_t<T> row_view(const spear::RowData& row, const T* data) {
  py::array_t<T> view;
  if (row.length == 0) {
    view = py::array_t<T>(0);
  } else {
    auto* pin = new std::shared_ptr<const spear::Segment>(row.segment);
    py::capsule base(pin, [](void* p) { delete static_cast<std::shared_ptr<const spear::Segment>*>(p); });
    view = py::array_t<T>({static_cast<py::ssize_t>(row.length)}, {static_cast<py::ssize_t>(sizeof(T))}, data, base);
  }
  mark_readonly(view);
  return view;
}

// Serialises straight into a new bytes object (allocated under the core's lock, with the GIL).
template <class Object>
py::bytes serialize_to_bytes(const Object& object) {
  py::object result;
  without_gil([&] {
    object.serialize([&](size_t size) -> uint8_t* {
      py::gil_scoped_acquire acquire;
      PyObject* bytes = PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(size));
      if (bytes == nullptr) throw py::error_already_set();
      result = py::reinterpret_steal<py::object>(bytes);
      return reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(bytes));
    });
  });
  return py::reinterpret_borrow<py::bytes>(result);
}

template <class Object>
std::unique_ptr<Object> deserialize_from_buffer(const py::buffer& data) {
  const py::buffer_info info = data.request();
  if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1)
    value_error("from_bytes expects bytes (a contiguous byte buffer)");
  const auto* bytes = static_cast<const uint8_t*>(info.ptr);
  const auto size = static_cast<size_t>(info.size);
  return without_gil([&] { return Object::deserialize(bytes, size); });
}

// ---------------------------------------------------------------------------------------------
// ReplayIndex methods that need more than a one-line wrapper

std::unique_ptr<spear::ReplayIndex> make_index(int64_t capacity_rows, const std::string& eviction,
                                               const IntLike& seed, int64_t segment_tokens) {
  return std::make_unique<spear::ReplayIndex>(capacity_rows, spear::parse_eviction(eviction), to_seed(seed),
                                              segment_tokens);
}

py::array_t<int64_t> insert_batch(spear::ReplayIndex& index, const ArrayLike& tokens, const ArrayLike& logp,
                                  const ArrayLike& mask, const ArrayLike& lengths, const ArrayLike& steps,
                                  const ArrayLike& group_ids, const ArrayLike& traj_ids, const ArrayLike& scores,
                                  const ArrayLike& advantages, double threshold) {
  const auto token_array = exact_array<int32_t>(tokens, "tokens", "int32");
  const auto logp_array = exact_array<float>(logp, "logp", "float32");
  const auto mask_array = exact_array<uint8_t>(mask, "mask", "uint8");
  const auto length_array = int64_array(lengths, "lengths");
  const py::ssize_t n = length_array.size();
  const auto step_array = int64_array(steps, "steps");
  const auto group_array = int64_array(group_ids, "group_ids");
  const auto traj_array = int64_array(traj_ids, "traj_ids");
  const auto score_array = float64_array(scores, "scores");
  const auto advantage_array = float64_array(advantages, "advantages");
  require_length(step_array, n, "steps");
  require_length(group_array, n, "group_ids");
  require_length(traj_array, n, "traj_ids");
  require_length(score_array, n, "scores");
  require_length(advantage_array, n, "advantages");
  if (logp_array.size() != token_array.size() || mask_array.size() != token_array.size())
    value_error("tokens, logp and mask must have the same length, got " + std::to_string(token_array.size()) + ", " +
                std::to_string(logp_array.size()) + " and " + std::to_string(mask_array.size()));

  spear::InsertBatch batch;
  batch.tokens = token_array.data();
  batch.logp = logp_array.data();
  batch.mask = mask_array.data();
  batch.num_tokens = static_cast<size_t>(token_array.size());
  batch.lengths = length_array.data();
  batch.steps = step_array.data();
  batch.group_ids = group_array.data();
  batch.traj_ids = traj_array.data();
  batch.scores = score_array.data();
  batch.advantages = advantage_array.data();
  batch.num_rows = static_cast<size_t>(n);
  batch.threshold = threshold;
  py::array_t<int64_t> row_ids(n);
  int64_t* out = row_ids.mutable_data();
  without_gil([&] { index.insert_batch(batch, out); });
  return row_ids;
}

using MetadataDict = py::typing::Dict<py::str, py::array>;
using GatherResult =
    py::typing::Tuple<py::array_t<int32_t>, py::array_t<float>, py::array_t<uint8_t>, py::array_t<int32_t>>;

MetadataDict metadata_dict(const spear::ReplayIndex& index) {
  spear::RowMetadata m = without_gil([&] { return index.metadata(); });
  return MetadataDict("row_id"_a = to_numpy(std::move(m.row_id)), "step"_a = to_numpy(std::move(m.step)),
                  "group_id"_a = to_numpy(std::move(m.group_id)), "traj_id"_a = to_numpy(std::move(m.traj_id)),
                  "score"_a = to_numpy(std::move(m.score)), "advantage"_a = to_numpy(std::move(m.advantage)),
                  "length"_a = to_numpy(std::move(m.length)));
}

GatherResult gather_rows(const spear::ReplayIndex& index, const ArrayLike& row_ids, int64_t pad_token) {
  if (pad_token < std::numeric_limits<int32_t>::min() || pad_token > std::numeric_limits<int32_t>::max())
    value_error("pad_token must fit in int32, got " + std::to_string(pad_token));
  const auto ids = int64_array(row_ids, "row_ids");
  const int64_t* id_data = ids.data();
  const auto k = static_cast<size_t>(ids.size());
  const std::vector<spear::RowData> rows = without_gil([&] { return index.rows(id_data, k); });
  size_t width = 0;
  for (const spear::RowData& row : rows) width = std::max(width, static_cast<size_t>(row.length));
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(width)};
  py::array_t<int32_t> tokens(shape);
  py::array_t<float> logp(shape);
  py::array_t<uint8_t> mask(shape);
  py::array_t<int32_t> lengths(static_cast<py::ssize_t>(k));
  int32_t* token_out = tokens.mutable_data();
  float* logp_out = logp.mutable_data();
  uint8_t* mask_out = mask.mutable_data();
  int32_t* length_out = lengths.mutable_data();
  // No lock needed: `rows` pins the segments and row data never changes.
  without_gil([&] {
    spear::gather_padded(rows, width, static_cast<int32_t>(pad_token), token_out, logp_out, mask_out, length_out);
  });
  return GatherResult(py::make_tuple(tokens, logp, mask, lengths));
}

py::array_t<int64_t> draw_rows(spear::ReplayIndex& index, int64_t k, const std::string& weighting,
                          const std::optional<ArrayLike>& candidates, double score_floor) {
  const spear::Weighting parsed = spear::parse_weighting(weighting);
  std::optional<py::array_t<int64_t, py::array::c_style>> ids;
  std::optional<std::pair<const int64_t*, size_t>> span;
  if (candidates) {
    ids = int64_array(*candidates, "candidates");
    span = std::make_pair(ids->data(), static_cast<size_t>(ids->size()));
  }
  return to_numpy(without_gil([&] { return index.draw(k, parsed, span, score_floor); }));
}

int64_t remove_rows(spear::ReplayIndex& index, const ArrayLike& row_ids) {
  const auto ids = int64_array(row_ids, "row_ids");
  const int64_t* data = ids.data();
  const auto n = static_cast<size_t>(ids.size());
  return without_gil([&] { return index.remove(data, n); });
}

py::dict arena_stats_dict(const spear::ReplayIndex& index) {
  const spear::ArenaStats s = without_gil([&] { return index.arena_stats(); });
  return py::dict("segments"_a = s.segments, "allocated_tokens"_a = s.allocated_tokens,
                  "used_tokens"_a = s.used_tokens, "dead_tokens"_a = s.dead_tokens,
                  "spare_segments"_a = s.spare_segments, "compactions"_a = s.compactions);
}

std::string index_repr(const spear::ReplayIndex& index) {
  return "ReplayIndex(rows=" + std::to_string(without_gil([&] { return index.size(); })) +
         ", tokens=" + std::to_string(without_gil([&] { return index.num_tokens(); })) +
         ", capacity_rows=" + std::to_string(index.capacity_rows()) + ", eviction='" +
         spear::eviction_name(index.eviction()) + "', seed=" + std::to_string(index.seed()) +
         ", segment_tokens=" + std::to_string(index.segment_tokens()) + ")";
}

// ---------------------------------------------------------------------------------------------
// BaselineWindow

std::unique_ptr<spear::BaselineWindow> make_window(int64_t capacity, const std::string& eviction) {
  if (capacity < 0) value_error("capacity must be >= 0 (0 means unlimited), got " + std::to_string(capacity));
  return std::make_unique<spear::BaselineWindow>(static_cast<uint64_t>(capacity),
                                                 spear::parse_baseline_eviction(eviction));
}

void push_values(spear::BaselineWindow& window, int64_t step, const ArrayLike& values) {
  const auto array = float64_array(values, "values");
  const double* data = array.data();
  const auto n = static_cast<size_t>(array.size());
  without_gil([&] { window.push(step, data, n); });
}

// Test hook: below(bound) for each bound, from one generator seeded with `seed`.
py::array_t<uint64_t> rng_below(const IntLike& seed, const ArrayLike& bounds) {
  const auto b = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(bounds);
  spear::Xoshiro256StarStar rng(to_seed(seed));
  std::vector<uint64_t> out(static_cast<size_t>(b.size()));
  for (size_t i = 0; i < out.size(); ++i) {
    if (b.data()[i] == 0) value_error("bounds must be >= 1");
    out[i] = rng.below(b.data()[i]);
  }
  return to_numpy(std::move(out));
}

// Test hook: CRC32 of a byte buffer, through the dispatching or the portable (table) path.
uint32_t crc32_of(const py::buffer& data, uint32_t value, bool portable) {
  const py::buffer_info info = data.request();
  const auto* bytes = info.ptr;
  const auto size = static_cast<size_t>(info.size * info.itemsize);
  return without_gil([&] {
    return portable ? spear::crc32_update_portable(value, bytes, size) : spear::crc32_update(value, bytes, size);
  });
}

}  // namespace

PYBIND11_MODULE(_replay_index, m) {
  m.doc() =
      "C++ replay index for SPEAR self-imitation (contract: docs/replay_index_spec.md).\n\n"
      "ReplayIndex stores variable-length rows (tokens int32, logp float32, mask uint8) with metadata and\n"
      "draws weighted samples without replacement; BaselineWindow keeps a sliding window of float64\n"
      "values with numpy-exact percentiles. spear_engine.replay.oracle holds the numpy reference.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const spear::RowNotFound& e) {
      py::set_error(PyExc_KeyError, e.what());
    }
  });

  py::class_<spear::ReplayIndex>(m, "ReplayIndex",
                                 "Variable-length rows in a segmented arena, with metadata, capacity eviction,\n"
                                 "staleness sweeps, Fenwick-tree draws and a checksummed byte format.")
      .def(py::init(&make_index), "capacity_rows"_a = 0, "eviction"_a = "oldest", "seed"_a = 0,
           "segment_tokens"_a = spear::ReplayIndex::kDefaultSegmentTokens,
           "capacity_rows: max live rows (0 = unlimited); eviction: 'oldest' or 'lowest_score';\n"
           "seed: uint64 for the xoshiro256** draw generator; segment_tokens: arena segment size.")
      .def("insert_batch", &insert_batch, "tokens"_a, "logp"_a, "mask"_a, "lengths"_a, "steps"_a, "group_ids"_a,
           "traj_ids"_a, "scores"_a, "advantages"_a, "threshold"_a = -std::numeric_limits<double>::infinity(),
           "Insert the rows given by `lengths` (consecutive slices of tokens/logp/mask). Row j is admitted\n"
           "iff advantages[j] > threshold; returns the new row ids, -1 for rejected rows. A full index\n"
           "evicts one row per admitted row. Releases the GIL.")
      .def("__len__", [](const spear::ReplayIndex& i) { return without_gil([&] { return i.size(); }); })
      .def_property_readonly("num_tokens",
                             [](const spear::ReplayIndex& i) { return without_gil([&] { return i.num_tokens(); }); },
                             "Tokens held by live rows.")
      .def_property_readonly("capacity_rows", &spear::ReplayIndex::capacity_rows)
      .def_property_readonly("eviction", [](const spear::ReplayIndex& i) { return spear::eviction_name(i.eviction()); })
      .def_property_readonly("seed", &spear::ReplayIndex::seed)
      .def_property_readonly("segment_tokens", &spear::ReplayIndex::segment_tokens)
      .def_property_readonly("next_row_id",
                             [](const spear::ReplayIndex& i) { return without_gil([&] { return i.next_row_id(); }); },
                             "The id the next admitted row will get.")
      .def_property(
          "rng_state",
          [](const spear::ReplayIndex& i) {
            const auto state = i.rng_state();
            return py::make_tuple(state[0], state[1], state[2], state[3]);
          },
          [](spear::ReplayIndex& i, const std::array<uint64_t, 4>& state) { i.set_rng_state(state); },
          "The draw generator's four xoshiro256** words; assign a saved value to undo draws made since\n"
          "(ValueError for the all-zero state).")
      .def("row_ids", [](const spear::ReplayIndex& i) { return to_numpy(without_gil([&] { return i.row_ids(); })); },
           "Live row ids, ascending (insertion order).")
      .def("metadata", &metadata_dict,
           "Dict of arrays over the live rows in order: row_id, step, group_id, traj_id, score, advantage, length.")
      .def(
          "tokens",
          [](const spear::ReplayIndex& i, int64_t row_id) {
            const spear::RowData row = without_gil([&] { return i.row(row_id); });
            return row_view(row, row.tokens());
          },
          "row_id"_a, "Read-only zero-copy int32 view of a row's tokens (KeyError if not live).")
      .def(
          "logp",
          [](const spear::ReplayIndex& i, int64_t row_id) {
            const spear::RowData row = without_gil([&] { return i.row(row_id); });
            return row_view(row, row.logp());
          },
          "row_id"_a, "Read-only zero-copy float32 view of a row's behaviour log-probs.")
      .def(
          "mask",
          [](const spear::ReplayIndex& i, int64_t row_id) {
            const spear::RowData row = without_gil([&] { return i.row(row_id); });
            return row_view(row, row.mask());
          },
          "row_id"_a, "Read-only zero-copy uint8 view of a row's mask.")
      .def("gather", &gather_rows, "row_ids"_a, "pad_token"_a = 0,
           "(tokens int32[k, Lmax], logp float32[k, Lmax], mask uint8[k, Lmax], lengths int32[k]) for the\n"
           "given rows in the given order, right-padded with pad_token / 0.0 / 0. Releases the GIL.")
      .def("remove", &remove_rows, "row_ids"_a, "Remove the given rows; returns how many were live (others are ignored).")
      .def(
          "evict_stale",
          [](spear::ReplayIndex& i, int64_t window, std::optional<int64_t> current_step) {
            return without_gil([&] { return i.evict_stale(window, current_step); });
          },
          "window"_a, "current_step"_a = py::none(),
          "Evict live rows with ref - step > window, ref = current_step or the newest live step.")
      .def(
          "flush", [](spear::ReplayIndex& i) { without_gil([&] { i.flush(); }); },
          "Remove every row (row ids keep counting; the generator is untouched).")
      .def(
          "count_score_above",
          [](const spear::ReplayIndex& i, double threshold) {
            return without_gil([&] { return i.count_score_above(threshold); });
          },
          "threshold"_a, "Live rows with score > threshold.")
      .def("draw", &draw_rows, "k"_a, "weighting"_a = "uniform", "candidates"_a = py::none(), "score_floor"_a = 0.0,
           "Draw up to k distinct rows without replacement, sequentially: weight 1 ('uniform') or\n"
           "floor(min(max(score - score_floor, 0), 2**20) * 2**20) ('score'), over all live rows or the\n"
           "given candidate ids in the given order. Returns the row ids in pick order. Releases the GIL.")
      .def("to_bytes", &serialize_to_bytes<spear::ReplayIndex>,
           "The whole state in the documented little-endian format with a CRC32 trailer. Releases the GIL.")
      .def_static("from_bytes", &deserialize_from_buffer<spear::ReplayIndex>, "data"_a,
                  "Restore from to_bytes() output (ValueError on corrupted or truncated input).")
      .def("arena_stats", &arena_stats_dict, "Diagnostics of the segmented arena (C++ only).")
      .def("__repr__", &index_repr);

  py::class_<spear::BaselineWindow>(m, "BaselineWindow",
                                    "Sliding window of float64 values tagged by step, with numpy-exact\n"
                                    "'linear' percentiles in O(log n).")
      .def(py::init(&make_window), "capacity"_a = 0, "eviction"_a = "value",
           "capacity: max values (0 = unlimited); eviction: 'value' (drop oldest values after a push) or\n"
           "'step_entries' (official SPEAR: before a push, drop whole oldest pushes while over capacity).")
      .def("push", &push_values, "step"_a, "values"_a, "Append the values of one step (NaN rejected; -0.0 stored as 0.0).")
      .def("__len__", [](const spear::BaselineWindow& w) { return without_gil([&] { return w.size(); }); })
      .def_property_readonly("capacity", &spear::BaselineWindow::capacity)
      .def_property_readonly("eviction",
                             [](const spear::BaselineWindow& w) { return spear::baseline_eviction_name(w.eviction()); })
      .def(
          "values", [](const spear::BaselineWindow& w) { return to_numpy(without_gil([&] { return w.values(); })); },
          "The values in FIFO order.")
      .def(
          "clear", [](spear::BaselineWindow& w) { without_gil([&] { w.clear(); }); }, "Remove every value.")
      .def(
          "percentile",
          [](const spear::BaselineWindow& w, double q) { return without_gil([&] { return w.percentile(q); }); },
          "q"_a, "numpy.percentile(values, q) (method 'linear'), bit for bit; ValueError when empty.")
      .def("to_bytes", &serialize_to_bytes<spear::BaselineWindow>, "The whole state, checksummed.")
      .def_static("from_bytes", &deserialize_from_buffer<spear::BaselineWindow>, "data"_a,
                  "Restore from to_bytes() output (ValueError on corrupted or truncated input).")
      .def("__repr__", [](const spear::BaselineWindow& w) {
        return "BaselineWindow(values=" + std::to_string(without_gil([&] { return w.size(); })) +
               ", capacity=" + std::to_string(w.capacity()) + ", eviction='" +
               spear::baseline_eviction_name(w.eviction()) + "')";
      });

  m.def("_crc32", &crc32_of, "data"_a, "value"_a = 0, "portable"_a = false,
        "Test hook: CRC32 like zlib.crc32(data, value), by the fast or the portable path.");
  m.def("_rng_below", &rng_below, "seed"_a, "bounds"_a,
        "Test hook: xoshiro256** below(b) for each bound, from one generator seeded with seed.");
}
