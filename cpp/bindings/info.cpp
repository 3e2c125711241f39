// Thread control and build information.
#include <attnext/amx.hpp>
#include <attnext/build_info.hpp>
#include <attnext/parallel.hpp>

#include "common.hpp"

#include <cstdlib>
#include <string>
#include <vector>

#ifdef ATTNEXT_HAS_ATFORK
#include <condition_variable>
#include <mutex>
#endif

namespace attnext {
namespace bind {

namespace {

#ifdef ATTNEXT_HAS_ATFORK
// The stack size libgomp gives its threads: OMP_STACKSIZE / GOMP_STACKSIZE (a number with an
// optional B, K, M or G suffix; K when none), else the system default (0 here: use the default).
std::size_t openmp_stack_size() {
  const char* env = std::getenv("OMP_STACKSIZE");
  if (!env) env = std::getenv("GOMP_STACKSIZE");
  if (!env) return 0;
  char* end = nullptr;
  const unsigned long long value = std::strtoull(env, &end, 10);
  while (end && *end == ' ') ++end;
  const char unit = end && *end ? static_cast<char>(*end | 0x20) : 'k';
  const unsigned long long shift = unit == 'b' ? 0 : unit == 'm' ? 20 : unit == 'g' ? 30 : 10;
  return static_cast<std::size_t>(value << shift);
}

// Whether this process can run `count` more threads at once now, with the stack size the
// OpenMP runtime would give them. libgomp ends the process when it cannot start a pool thread,
// so a count is tried here first, where a failure is only an answer.
bool can_start_threads(int count) {
  struct Gate {
    std::mutex lock;
    std::condition_variable open;
    bool released = false;
  } gate;
  auto wait = [](void* arg) -> void* {
    Gate& g = *static_cast<Gate*>(arg);
    std::unique_lock<std::mutex> hold(g.lock);
    g.open.wait(hold, [&] { return g.released; });
    return nullptr;
  };
  pthread_attr_t attr;
  if (pthread_attr_init(&attr) != 0) return false;
  const std::size_t stack = openmp_stack_size();
  if (stack) pthread_attr_setstacksize(&attr, stack);
  std::vector<pthread_t> started;
  started.reserve(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    pthread_t t;
    if (pthread_create(&t, &attr, wait, &gate) != 0) break;
    started.push_back(t);
  }
  pthread_attr_destroy(&attr);
  {
    std::lock_guard<std::mutex> hold(gate.lock);
    gate.released = true;
  }
  gate.open.notify_all();
  for (pthread_t t : started) pthread_join(t, nullptr);
  return started.size() == static_cast<std::size_t>(count);
}
#endif

// set_num_threads(n): n an int or np.integer (not a bool) in [1, kMaxThreads] (parallel.hpp says
// why 256) that the process can start; TypeError or ValueError otherwise, the setting unchanged.
void set_threads(const py::object& n_arg) {
  if (PyBool_Check(n_arg.ptr()) || !PyIndex_Check(n_arg.ptr()))
    fail_type("n must be an int, got " + std::string(py::str(py::type::of(n_arg).attr("__name__"))));
  const py::object n_int = py::reinterpret_steal<py::object>(PyNumber_Index(n_arg.ptr()));
  if (!n_int) throw py::error_already_set();
  int overflow = 0;
  const long long n = PyLong_AsLongLongAndOverflow(n_int.ptr(), &overflow);
  if (n == -1 && PyErr_Occurred()) throw py::error_already_set();
  if (overflow || n < 1 || n > kMaxThreads)
    fail_value("set_num_threads: n must be in [1, " + std::to_string(kMaxThreads) + "], got " +
               std::string(py::str(n_int)) + " (" + std::to_string(kMaxThreads) + " is attnext's documented cap)");
#if defined(ATTNEXT_HAS_ATFORK) && defined(_OPENMP)
  // Counts up to one already proven need no new probe. The probe starts n - 1 threads beside
  // any pool that exists, so it asks for more than the pool will.
  static int proven = 1;
  if (n > proven && !forked_child().load()) {
    bool ok;
    {
      py::gil_scoped_release nogil;  // a few milliseconds; other Python threads may run
      ok = can_start_threads(static_cast<int>(n) - 1);
    }
    if (!ok)
      fail_value("set_num_threads: this process cannot start " + std::to_string(n) +
                 " threads now (a thread-count or address-space limit); the setting stays " +
                 std::to_string(attnext::get_num_threads()));
    proven = std::max(proven, static_cast<int>(n));
  }
#endif
  attnext::set_num_threads(static_cast<int>(n));
}

// "auto", "avx512_bf16" or "fallback" (lowp.hpp's cap); another string is a ValueError that lists them.
void set_bf16_path(const std::string& path) {
  Bf16Cap cap;
  if (path == "auto")
    cap = Bf16Cap::none;
  else if (path == "avx512_bf16")
    cap = Bf16Cap::no_amx;
  else if (path == "fallback")
    cap = Bf16Cap::fallback;
  else
    throw py::value_error("bf16 path must be \"auto\", \"avx512_bf16\" or \"fallback\", got \"" + path + "\"");
  bf16_cap().store(cap, std::memory_order_relaxed);
}

}  // namespace

void register_info(py::module_& m) {
  install_fork_handler();
  m.def("set_num_threads", &set_threads, py::arg("n"),
        "Sets the thread count of every kernel: an int in [1, 256]; in a forked child kernels run on one thread.");
  m.def("get_num_threads", &get_num_threads);
  m.def("build_info", [] {
    py::dict d;
    d["version"] = ATTNEXT_VERSION;
    d["compiler"] = compiler();
    d["simd"] = simd_level();
    d["eigen_simd"] = eigen_simd();
    d["openmp"] = openmp_enabled();
    d["eigen_version"] = ATTNEXT_EIGEN_VERSION;
    d["native"] = bool(ATTNEXT_NATIVE);
    d["max_threads"] = get_num_threads();
    d["thread_cap"] = kMaxThreads;
    d["bf16"] = bf16_path_name();
    return d;
  });
  m.def("set_bf16_path", &set_bf16_path, py::arg("path"),
        "Caps the bfloat16 product path: \"auto\" (the best the build and CPU have: AMX tiles, else vdpbf16ps, "
        "else the float32 fallback), \"avx512_bf16\" (no AMX) or \"fallback\" (float32 math everywhere), so "
        "that one build tests every path.");
  m.def("get_bf16_cap", [] {
    static const char* const names[] = {"auto", "avx512_bf16", "fallback"};
    return std::string(names[static_cast<int>(bf16_cap().load(std::memory_order_relaxed))]);
  }, "The cap set_bf16_path last set: \"auto\", \"avx512_bf16\" or \"fallback\".");
  m.def("get_bf16_path", [] { return std::string(bf16_path_name()); },
        "The active bfloat16 product path, as build_info()[\"bf16\"] names it.");
}

}  // namespace bind
}  // namespace attnext
