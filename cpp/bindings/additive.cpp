// Fused additive (Bahdanau) attention: the key preparation a decoder keeps per sentence, and
// the attention itself, on prepared keys or on raw keys projected inside the call. Which of the
// two a public call uses is decided by the Python front (functional.additive_attention); how
// the raw-key entry splits its work is decided by the core (additive_attention.hpp).
#include <attnext/additive_attention.hpp>
#include <attnext/additive_backward.hpp>

#include "common.hpp"

namespace attnext {
namespace bind {

namespace {

// The projections are of the accumulation type (float32 for 16-bit keys): they feed float
// sums, and additive_attention takes them back in that type.
template <typename In>
py::tuple prepare_keys_impl(const py::array& key, const py::object& w_key) {
  using Acc = acc_t<In>;
  require_ndim(key, "key", 2);
  const auto wk = parameter_matrix<In>(key, "key", w_key, "w_key");
  require_dim(key, "key", -1, wk, "w_key", 0, "key's last dimension and w_key's first");
  std::vector<index_t> shape = shape_of(key);
  shape.back() = wk.shape(1);
  const std::vector<index_t> batch(shape.begin(), shape.end() - 2);
  py::array_t<Acc> raw = new_output<Acc>(shape, "projected keys");
  py::array_t<Acc> expo = new_output<Acc>(shape, "projected keys");
  py::array_t<bool> ok = new_output<bool>(batch, "projected keys");
  if (all_empty({&raw, &ok})) return py::make_tuple(raw, expo, ok);
  const Strided<const In> kv = view<In>(key, "key");
  Acc* rp = raw.mutable_data();
  Acc* ep = expo.mutable_data();
  bool* op = ok.mutable_data();
  {
    // Safe without the GIL: every array is kept alive by this frame; no Python object is used.
    py::gil_scoped_release nogil;
    additive_prepare_keys<In, Acc>(kv, map_matrix(wk), rp, ep, op);
  }
  return py::make_tuple(raw, expo, ok);
}

// Projected keys must be what additive_keys returns (or views of it broadcast over batch
// axes): of the call's accumulation dtype T, each batch entry's (Lk, U) rows contiguous, so
// the kernel can walk them directly.
template <typename T>
void check_projected(const py::array& q, const py::array& a, const char* name, const py::array& raw) {
  if (!a.dtype().equal(py::dtype::of<T>()))
    fail_type(std::string(name) + " has dtype " + std::string(py::str(a.dtype())) + " but query has " +
              std::string(py::str(q.dtype())) + ": it must be " + std::string(py::str(py::dtype::of<T>())) +
              " (as additive_keys returns it)");
  require_ndim(a, name, 2);
  if (shape_of(a) != shape_of(raw))
    fail_value(std::string(name) + " has shape " + shape_str(a) + " but keys_raw has " + shape_str(raw));
  if (a.size() == 0) return;  // nothing to walk (NumPy gives empty arrays zero strides)
  const py::ssize_t item = a.itemsize();
  if (a.shape(a.ndim() - 1) > 1 && a.strides(a.ndim() - 1) != item)
    fail_value(std::string(name) + " must have contiguous rows (as additive_keys returns them)");
  if (a.shape(a.ndim() - 2) > 1 && a.strides(a.ndim() - 2) != item * a.shape(a.ndim() - 1))
    fail_value(std::string(name) + " must have contiguous (Lk, U) blocks (as additive_keys returns them)");
}

// The keys of one attention call: prepared by additive_keys (raw, expo, ok), or raw keys and
// w_key to be projected inside the call.
struct KeysArg {
  bool projected;
  const py::array *raw, *expo, *ok;  // projected
  const py::array* key;              // not projected
  const py::object* w_key;           // not projected
};

// The arguments of one attention call (forward or backward), parsed and checked once. The
// weights and v are of the inputs' type In, bias and a float mask of the accumulation type.
template <typename In>
struct AttentionArgs {
  std::vector<index_t> batch, score_shape, out_shape;
  CArray<In> wq, wk, vc;
  Bias<acc_t<In>> bias;
  Mask<acc_t<In>> mask;
  OwnedBatch<std::int64_t> lengths;
  OwnedBatch<bool> ok;  // projected keys: owned, whether a batch entry reads keys_exp is decided by it
};

template <typename T>
AttentionArgs<T> parse_attention(const py::array& q, const py::object& w_query, const py::object& bias,
                                 const KeysArg& keys, const py::array& value, const py::object& v,
                                 const py::object& mask, const py::object& key_lengths) {
  require_ndim(q, "query", 2);
  require_same_dtype(q, "query", value, "value");
  require_ndim(value, "value", 2);
  require_same_batch(q, "query", value, "value", 2);
  AttentionArgs<T> a;
  a.batch.assign(q.shape(), q.shape() + q.ndim() - 2);
  if (keys.projected) {
    const py::array &raw = *keys.raw, &expo = *keys.expo;
    check_projected<acc_t<T>>(q, raw, "keys_raw", raw);
    check_projected<acc_t<T>>(q, expo, "keys_exp", raw);
    require_same_batch(q, "query", raw, "keys_raw", 2);
    require_dim(raw, "keys_raw", -2, value, "value", -2, "the number of keys");
    a.ok = own_batch_array<bool>(*keys.ok, "keys_ok", a.batch);
  } else {
    const py::array& key = *keys.key;
    require_same_dtype(q, "query", key, "key");
    require_ndim(key, "key", 2);
    require_same_batch(q, "query", key, "key", 2);
    require_dim(key, "key", -2, value, "value", -2, "the number of keys");
    a.wk = parameter_matrix<T>(key, "key", *keys.w_key, "w_key");
    require_dim(key, "key", -1, a.wk, "w_key", 0, "key's last dimension and w_key's first");
  }
  // units_ref: the array giving the number of units
  const py::array& units_ref = keys.projected ? *keys.raw : static_cast<const py::array&>(a.wk);
  const char* units_name = keys.projected ? "keys_raw" : "w_key";
  const py::ssize_t units = units_ref.shape(units_ref.ndim() - 1);
  a.wq = parameter_matrix<T>(q, "query", w_query, "w_query");
  require_dim(q, "query", -1, a.wq, "w_query", 0, "query's last dimension and w_query's first");
  if (a.wq.shape(1) != units)
    fail_value("w_query has shape " + shape_str(a.wq) + " but " + units_name + " has " + shape_str(units_ref) +
               ": the number of units must match");
  a.vc = parameter_vector<T>(q, "query", v, "v", units, units_are(units));
  a.bias = parameter_bias<T>(q, "query", bias, units, units_are(units));
  const index_t lk = value.shape(value.ndim() - 2);
  a.score_shape = shape_of(q);
  a.score_shape.back() = lk;
  a.mask = mask_view<acc_t<T>>(mask, a.score_shape, "mask");
  a.lengths = own_key_lengths(key_lengths, a.batch, lk);
  a.out_shape = shape_of(q);
  a.out_shape.back() = value.shape(value.ndim() - 1);
  return a;
}

// In: the inputs' type; Out: the context's (In, or float when a 16-bit call asks for
// float32). The weights are of the accumulation type (float32 for 16-bit inputs).
template <typename In, typename Out>
py::object attention_impl(const py::array& q, const py::object& w_query, const py::object& bias, const KeysArg& keys,
                          const py::array& value, const py::object& v, const py::object& mask,
                          const py::object& key_lengths, bool return_weights) {
  using Acc = acc_t<In>;
  const AttentionArgs<In> a = parse_attention<In>(q, w_query, bias, keys, value, v, mask, key_lengths);
  py::array out = new_output_like<Out>(q, a.out_shape, "context");
  py::array_t<Acc> w;
  if (return_weights) w = new_output<Acc>(a.score_shape, "weights");
  const auto result = [&]() -> py::object {
    if (return_weights) return py::make_tuple(out, w);
    return std::move(out);
  };
  // Nothing to return: no key projection is built either.
  if (all_empty({&out, return_weights ? &w : nullptr})) return result();

  const Strided<const In> qv = view<In>(q, "query"), vv = view<In>(value, "value");
  const ConstMatrixMap<In> wm = map_matrix(a.wq);
  Out* op = data_of<Out>(out);
  Acc* wp = return_weights ? w.mutable_data() : nullptr;
  if (keys.projected) {
    const AdditiveKeys<Acc> prepared{view<Acc>(*keys.raw, "keys_raw"), view<Acc>(*keys.expo, "keys_exp"),
                                     a.ok.view()};
    // Safe without the GIL: every array is kept alive by this frame, keys_ok and key_lengths
    // are the binding's own copies, and no Python object is used.
    py::gil_scoped_release nogil;
    additive_attention<In, Acc, Out>(qv, wm, a.bias.data(), prepared, vv, a.vc.data(), a.mask, a.lengths.get(), op,
                                     wp);
  } else {
    const Strided<const In> kv = view<In>(*keys.key, "key");
    const ConstMatrixMap<In> wkm = map_matrix(a.wk);
    // Safe without the GIL: every array is kept alive by this frame, key_lengths is the
    // binding's own copy, and no Python object is used.
    py::gil_scoped_release nogil;
    additive_attention<In, Acc, Out>(qv, wm, a.bias.data(), kv, wkm, vv, a.vc.data(), a.mask, a.lengths.get(), op,
                                     wp);
  }
  return result();
}

// A cotangent of the same dtype as the query and exactly the given shape (any strides).
template <typename T>
Strided<const T> cotangent_view(const py::array& q, const py::array& a, const char* name,
                                const std::vector<index_t>& shape, const char* of) {
  require_same_dtype(q, "query", a, name);
  if (shape_of(a) != shape)
    fail_value(std::string(name) + " has shape " + shape_str(a) + " but the " + of + " has " + shape_str(shape));
  return view<T>(a, name);
}

template <typename T>
py::dict backward_impl(const py::array& q, const py::object& w_query, const py::object& bias, const KeysArg& keys,
                       const py::array& value, const py::object& v, const py::object& mask,
                       const py::object& key_lengths, const py::array& grad_out, const py::object& grad_weights,
                       bool mask_grad, const py::object& weights) {
  const AttentionArgs<T> a = parse_attention<T>(q, w_query, bias, keys, value, v, mask, key_lengths);
  const Strided<const T> go = cotangent_view<T>(q, grad_out, "grad_out", a.out_shape, "context");
  Strided<const T> gw;
  if (!grad_weights.is_none())
    gw = cotangent_view<T>(q, require_array(grad_weights, "grad_weights"), "grad_weights", a.score_shape, "weights");
  Strided<const T> saved;
  if (!weights.is_none())
    saved = cotangent_view<T>(q, require_array(weights, "weights"), "weights", a.score_shape, "weights");
  const Strided<const T>* saved_p = weights.is_none() ? nullptr : &saved;
  const index_t units = a.wq.shape(1);
  std::vector<index_t> keys_shape = shape_of(value);
  keys_shape.back() = units;
  py::array_t<T> dq = new_output<T>(shape_of(q), "query gradient");
  py::array_t<T> dwq = new_output<T>(shape_of(a.wq), "w_query gradient");
  py::array_t<T> dbias = new_output<T>({units}, "bias gradient");
  py::array_t<T> dv = new_output<T>({units}, "v gradient");
  py::array_t<T> dkeys = new_output<T>(keys_shape, "keys_raw gradient");
  py::array_t<T> dvalue = new_output<T>(shape_of(value), "value gradient");
  py::array_t<T> dmask, dkey, dwk;
  if (mask_grad) dmask = new_output<T>(a.score_shape, "mask gradient");
  if (!keys.projected) {
    dkey = new_output<T>(shape_of(*keys.key), "key gradient");
    dwk = new_output<T>(shape_of(a.wk), "w_key gradient");
  }
  AdditiveGradients<T> g;
  g.query = dq.mutable_data();
  g.w_query = dwq.mutable_data();
  g.bias = dbias.mutable_data();
  g.v = dv.mutable_data();
  g.keys_raw = dkeys.mutable_data();
  g.value = dvalue.mutable_data();
  g.mask = mask_grad ? dmask.mutable_data() : nullptr;
  const Strided<const T> qv = view<T>(q, "query"), vv = view<T>(value, "value");
  const ConstMatrixMap<T> wm = map_matrix(a.wq);
  const Strided<const T>* gwp = grad_weights.is_none() ? nullptr : &gw;
  if (keys.projected) {
    const AdditiveKeys<T> prepared{view<T>(*keys.raw, "keys_raw"), view<T>(*keys.expo, "keys_exp"), a.ok.view()};
    // Safe without the GIL: every array is kept alive by this frame, keys_ok and key_lengths
    // are the binding's own copies, the outputs are ours, and no Python object is used.
    py::gil_scoped_release nogil;
    additive_attention_backward<T>(qv, wm, a.bias.data(), prepared, vv, a.vc.data(), a.mask, a.lengths.get(), go,
                                   gwp, g, saved_p);
  } else {
    g.key = dkey.mutable_data();
    g.w_key = dwk.mutable_data();
    const Strided<const T> kv = view<T>(*keys.key, "key");
    const ConstMatrixMap<T> wkm = map_matrix(a.wk);
    // Safe without the GIL: as above.
    py::gil_scoped_release nogil;
    additive_attention_backward<T>(qv, wm, a.bias.data(), kv, wkm, vv, a.vc.data(), a.mask, a.lengths.get(), go,
                                   gwp, g, saved_p);
  }
  py::dict result;
  result["query"] = dq;
  result["w_query"] = dwq;
  result["bias"] = a.bias.present ? py::object(dbias) : py::none();
  result["v"] = dv;
  result["keys_raw"] = dkeys;
  result["value"] = dvalue;
  result["mask"] = mask_grad ? py::object(dmask) : py::none();
  if (!keys.projected) {
    result["key"] = dkey;
    result["w_key"] = dwk;
  }
  return result;
}

}  // namespace

void register_additive(py::module_& m) {
  // The factored form's range (additive.hpp), the one source the Python side reads.
  m.attr("additive_exp_form_limit") =
      py::dict(py::arg("float32") = exp_form_limit<float>(), py::arg("float64") = exp_form_limit<double>());
  m.def("additive_keys", [](const py::array& key, const py::object& w_key) -> py::tuple {
    return dispatch(float_dtype(key, "key"), [&](auto t) { return prepare_keys_impl<decltype(t)>(key, w_key); });
  }, py::arg("key").noconvert(), py::arg("w_key"),
        "Projected keys for additive attention: key (..., Lk, Dk), w_key (Dk, U) -> (raw (..., Lk, U) = key w_key, "
        "expo (..., Lk, U) = exp(2 raw), ok (...,) bool: whether the batch entry may use expo). raw and expo are "
        "float32 for 16-bit keys (the accumulation type), else in key's dtype.");
  m.def("additive_attention", [](const py::array& q, const py::object& w_query, const py::object& bias,
                                 const py::array& keys_raw, const py::array& keys_exp, const py::array& keys_ok,
                                 const py::array& value, const py::object& v, const py::object& mask,
                                 const py::object& key_lengths, bool return_weights, bool out_float32) -> py::object {
    const KeysArg keys{true, &keys_raw, &keys_exp, &keys_ok, nullptr, nullptr};
    return dispatch_out(float_dtype(q, "query"), out_float32, [&](auto in, auto out) {
      return attention_impl<decltype(in), decltype(out)>(q, w_query, bias, keys, value, v, mask, key_lengths,
                                                         return_weights);
    });
  }, py::arg("query").noconvert(), py::arg("w_query"), py::arg("bias").none(true),
        py::arg("keys_raw").noconvert(), py::arg("keys_exp").noconvert(), py::arg("keys_ok").noconvert(),
        py::arg("value").noconvert(), py::arg("v"), py::arg("mask").none(true),
        py::arg("key_lengths").none(true), py::arg("return_weights") = false, py::arg("out_float32") = false,
        "softmax(v . tanh(query w_query + bias + keys) + mask) value on keys prepared by additive_keys. "
        "query (..., Lq, Dq), keys (..., Lk, U), value (..., Lk, Dv), equal batch shapes; mask broadcast to "
        "(..., Lq, Lk) or None; key_lengths (...,) int64 or None -> context (..., Lq, Dv) [, weights (..., Lq, Lk)]. "
        "16-bit inputs: w_query and v in query's dtype, bias float32 or query's dtype, keys_raw, keys_exp and a float mask float32; the "
        "context in query's dtype (float32 with out_float32), the weights float32.");
  m.def("additive_attention_keys", [](const py::array& q, const py::object& w_query, const py::object& bias,
                                      const py::array& key, const py::object& w_key, const py::array& value,
                                      const py::object& v, const py::object& mask, const py::object& key_lengths,
                                      bool return_weights, bool out_float32) -> py::object {
    const KeysArg keys{false, nullptr, nullptr, nullptr, &key, &w_key};
    return dispatch_out(float_dtype(q, "query"), out_float32, [&](auto in, auto out) {
      return attention_impl<decltype(in), decltype(out)>(q, w_query, bias, keys, value, v, mask, key_lengths,
                                                         return_weights);
    });
  }, py::arg("query").noconvert(), py::arg("w_query"), py::arg("bias").none(true),
        py::arg("key").noconvert(), py::arg("w_key"), py::arg("value").noconvert(),
        py::arg("v"), py::arg("mask").none(true), py::arg("key_lengths").none(true),
        py::arg("return_weights") = false, py::arg("out_float32") = false,
        "additive_attention on raw keys, projected inside the call: key (..., Lk, Dk) with the query's batch "
        "shape, w_key (Dk, U); otherwise as additive_attention.");
  m.def("additive_attention_backward", [](const py::array& q, const py::object& w_query, const py::object& bias,
                                          const py::array& keys_raw, const py::array& keys_exp,
                                          const py::array& keys_ok, const py::array& value, const py::object& v,
                                          const py::object& mask, const py::object& key_lengths,
                                          const py::array& grad_out, const py::object& grad_weights,
                                          bool mask_grad, const py::object& weights) -> py::dict {
    const KeysArg keys{true, &keys_raw, &keys_exp, &keys_ok, nullptr, nullptr};
    return dispatch_wide(wide_float_dtype(q, "query", "additive_attention_backward"), [&](auto t) {
      return backward_impl<decltype(t)>(q, w_query, bias, keys, value, v, mask, key_lengths, grad_out, grad_weights,
                                        mask_grad, weights);
    });
  }, py::arg("query").noconvert(), py::arg("w_query"), py::arg("bias").none(true),
        py::arg("keys_raw").noconvert(), py::arg("keys_exp").noconvert(), py::arg("keys_ok").noconvert(),
        py::arg("value").noconvert(), py::arg("v"), py::arg("mask").none(true),
        py::arg("key_lengths").none(true), py::arg("grad_out").noconvert(),
        py::arg("grad_weights").none(true) = py::none(), py::arg("mask_grad") = false,
        py::arg("weights").none(true) = py::none(),
        "Gradients of additive_attention (same arguments, keys prepared by additive_keys) given grad_out "
        "(..., Lq, Dv) = dL/d(context) and optionally grad_weights (..., Lq, Lk) = dL/d(weights), any strides. "
        "The weights are recomputed (the forward's bits), so out and lse are not needed; weights (..., Lq, Lk), "
        "the forward's returned weights for these same arguments, skips that recomputation. Returns a dict of "
        "C-contiguous arrays with the full (broadcast) batch shape: query (..., Lq, Dq), w_query (Dq, U), "
        "bias (U,) or None when bias is None, v (U,), keys_raw (..., Lk, U) = dL/d(key w_key), value "
        "(..., Lk, Dv), mask (..., Lq, Lk) = dL/d(score + mask) when mask_grad else None. Hidden keys and rows "
        "that see no key get zero gradients; bit-identical for any thread count.");
  m.def("additive_attention_keys_backward", [](const py::array& q, const py::object& w_query,
                                               const py::object& bias, const py::array& key,
                                               const py::object& w_key, const py::array& value, const py::object& v,
                                               const py::object& mask, const py::object& key_lengths,
                                               const py::array& grad_out, const py::object& grad_weights,
                                               bool mask_grad, const py::object& weights) -> py::dict {
    const KeysArg keys{false, nullptr, nullptr, nullptr, &key, &w_key};
    return dispatch_wide(wide_float_dtype(q, "query", "additive_attention_keys_backward"), [&](auto t) {
      return backward_impl<decltype(t)>(q, w_query, bias, keys, value, v, mask, key_lengths, grad_out, grad_weights,
                                        mask_grad, weights);
    });
  }, py::arg("query").noconvert(), py::arg("w_query"), py::arg("bias").none(true),
        py::arg("key").noconvert(), py::arg("w_key"), py::arg("value").noconvert(),
        py::arg("v"), py::arg("mask").none(true), py::arg("key_lengths").none(true),
        py::arg("grad_out").noconvert(), py::arg("grad_weights").none(true) = py::none(),
        py::arg("mask_grad") = false, py::arg("weights").none(true) = py::none(),
        "additive_attention_backward on raw keys (as additive_attention_keys takes them): the dict also has "
        "key (..., Lk, Dk) and w_key (Dk, U); keys_raw is dL/d(key w_key).");
}

}  // namespace bind
}  // namespace attnext
