// A whole decode step of a Llama-family decoder in one call: every layer (RMSNorm, fused
// q/k/v, optional q/k bias and Qwen3 q/k norm, RoPE, KV write, masked attention over the
// slot pool, o, SwiGLU MLP), then the final norm and the int8 LM head.
//
// Why: in the torch forward a one-row step of SmolLM2-135M is ~25 small ops per layer, 30
// layers, each paying Python and dispatcher overhead that added up to more than the int4
// matmuls themselves (3.4 of 12.5 ms). Here the whole step is one call and one OpenMP
// region (see SpinBarrier): 3.4 ms for a one-row step on 2 cores.
//
// The numbers follow backend/models/llama.py's decode path rounding for rounding: a bf16
// residual stream, RMSNorm in fp32 rounded to bf16 before its weight, int4 matmuls with bf16
// outputs, RoPE as bf16 products with the bf16 table, SiLU(g) rounded before the product
// with u, attention in fp32 over the fp32 KV pool with the step's boolean mask. Measured over
// 329 prompt positions of 8 prompts against the fp32 model: KL 0.0015 here, 0.0017 for the
// torch int4 path; a variant with fp32 RoPE and one rounding in the MLP was *further* from
// it (KL 0.0057), so this one keeps torch's rounding points. Each token goes through the
// same instructions whatever else is in the step: its result never depends on its batch.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "simd.h"

namespace msk {

namespace {

inline float f(bf16 v) { return static_cast<float>(v); }

// exp in 16 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp),
// where std::exp one lane at a time cost more than the matmuls at 16 rows.
inline V exp16(V x) {
  x = vmin(vmax(x, vset(-87.3f)), vset(88.3f));
  const V n = vrint(vmul(x, vset(1.44269504088896341f)));
  V r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  V y = vset(1.9875691500e-4f);
  y = vfma(y, r, vset(1.3981999507e-3f));
  y = vfma(y, r, vset(8.3334519073e-3f));
  y = vfma(y, r, vset(4.1665795894e-2f));
  y = vfma(y, r, vset(1.6666665459e-1f));
  y = vfma(y, r, vset(5.0000001201e-1f));
  y = vfma(y, vmul(r, r), vadd(r, vset(1.0f)));
  return vscale2(y, n);
}

// out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), as llama.py's _rms. h % 16 == 0.
void rms_row(const bf16* x, const bf16* w, bf16* out, int64_t h, float eps) {
  V ss = vzero();
  for (int64_t i = 0; i < h; i += 16) {
    const V v = ld(x + i);
    ss = vfma(v, v, ss);
  }
  const V r = vset(1.0f / std::sqrt(vsum(ss) / static_cast<float>(h) + eps));
  for (int64_t i = 0; i < h; i += 16) st(out + i, vmul(ld(w + i), round(vmul(ld(x + i), r))));
}

// x = bf16(x + y) over n values (n % 16 == 0): the residual adds.
void add_into(bf16* x, const bf16* y, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) st(x + j, vadd(ld(x + j), ld(y + j)));
}

struct Int4 {
  at::Tensor packed, sz;
  int64_t n = 0;
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Int4 qkv, o, gate_up, down;
  std::optional<at::Tensor> qkv_bias, q_norm, k_norm;
};

Int4 int4_of(const at::Tensor& packed, const at::Tensor& sz) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous(),
              "DecodeStep: int4 packed weight must be contiguous uint8 [N/16, K/2, 16]");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous(), "DecodeStep: int4 scales must be bf16");
  return Int4{packed, sz, packed.size(0) * 16};
}

}  // namespace

// Why one OpenMP region per step, with its own barrier: a step has ~270 parallel phases, and
// with at::parallel_for per phase under OMP_WAIT_POLICY=PASSIVE (the server sets it when its
// stubs' threads outnumber the cores) every region paid a futex wake-up: 13.8 ms for a
// one-row step against 4.0 ms with ACTIVE. One region per step pays one wake-up; the
// threads are OpenMP's own (a separate thread team competed with OpenMP's spinning idle
// workers), and they meet at this barrier, which spins briefly and then yields, so an
// oversubscribed machine is not burned on spinning.
struct SpinBarrier {
  std::atomic<int> count{0};
  std::atomic<int> gen{0};

  void wait(int n) {
    if (n == 1) return;
    const int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen.load(std::memory_order_acquire) == g; ++spins) {
      if (spins < 20000)
        _mm_pause();
      else
        std::this_thread::yield();
    }
  }
};

class DecodeStep {
 public:
  DecodeStep(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate,
             double eps, at::Tensor final_norm, at::Tensor head_packed, at::Tensor head_scales, at::Tensor cos,
             at::Tensor sin)
      : nh_(num_heads), kvh_(num_kv_heads), hd_(head_dim), h_(hidden), i_(intermediate),
        eps_(static_cast<float>(eps)), final_norm_(final_norm.contiguous()), head_packed_(head_packed.contiguous()),
        head_scales_(head_scales.contiguous()), cos_(cos.contiguous()), sin_(sin.contiguous()) {
    TORCH_CHECK(nh_ % kvh_ == 0, "DecodeStep: num_heads must be a multiple of num_kv_heads");
    TORCH_CHECK(hd_ <= 512 && hd_ % 32 == 0 && h_ % 16 == 0 && i_ % 16 == 0,
                "DecodeStep: needs head_dim % 32 == 0 (at most 512), hidden and intermediate % 16 == 0");
    TORCH_CHECK(cos_.scalar_type() == at::kFloat && cos_.size(1) == hd_, "DecodeStep: cos table must be fp32 [P, hd]");
    TORCH_CHECK(head_packed_.scalar_type() == at::kChar && head_packed_.size(1) * 2 == h_,
                "DecodeStep: LM head must be int8 [V/16, H/2, 16, 2]");
    vocab_ = head_packed_.size(0) * 16;
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, at::Tensor qkv_p, at::Tensor qkv_sz, at::Tensor o_p,
                 at::Tensor o_sz, at::Tensor gu_p, at::Tensor gu_sz, at::Tensor down_p, at::Tensor down_sz,
                 std::optional<at::Tensor> qkv_bias, std::optional<at::Tensor> q_norm,
                 std::optional<at::Tensor> k_norm) {
    Layer l;
    l.input_norm = input_norm.contiguous();
    l.post_norm = post_norm.contiguous();
    l.qkv = int4_of(qkv_p, qkv_sz);
    l.o = int4_of(o_p, o_sz);
    l.gate_up = int4_of(gu_p, gu_sz);
    l.down = int4_of(down_p, down_sz);
    TORCH_CHECK(l.qkv.n == (nh_ + 2 * kvh_) * hd_ && l.o.n == h_ && l.gate_up.n == 2 * i_ && l.down.n == h_,
                "DecodeStep: layer ", layers_.size(), " has weights of the wrong shape");
    if (qkv_bias) l.qkv_bias = qkv_bias->contiguous();
    if (q_norm) l.q_norm = q_norm->contiguous();
    if (k_norm) l.k_norm = k_norm->contiguous();
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [n, H] bf16 (embedded tokens); positions / slot / cache_index / pad_index [n] int64;
  // slots [B] int64; mask [B, 1, max_q, key_len] bool; logit_index [m] int64;
  // k_pool / v_pool: per layer fp32 [slots, kv_heads, max_context, head_dim]. -> [m, vocab] fp32.
  at::Tensor forward(at::Tensor x, at::Tensor positions, at::Tensor slot, at::Tensor cache_index,
                     at::Tensor pad_index, int64_t max_q, int64_t key_len, at::Tensor slots, at::Tensor mask,
                     at::Tensor logit_index, std::vector<at::Tensor> k_pool, std::vector<at::Tensor> v_pool) {
    const int64_t n = x.size(0), L = key_len, nl = num_layers();
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == h_, "DecodeStep: x must be bf16 [n, H]");
    TORCH_CHECK(static_cast<int64_t>(k_pool.size()) == nl && static_cast<int64_t>(v_pool.size()) == nl,
                "DecodeStep: one K and one V pool tensor per layer");
    for (auto* t : {&positions, &slot, &cache_index, &pad_index, &slots, &logit_index})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "DecodeStep: index tensors must be int64");
    mask = mask.contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == slots.numel() * max_q * L, "DecodeStep: bad mask");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* tok_slot = slot.data_ptr<int64_t>();
    const int64_t* tok_idx = cache_index.data_ptr<int64_t>();
    const int64_t* pad = pad_index.data_ptr<int64_t>();
    const int64_t* sess_slot = slots.data_ptr<int64_t>();
    const bool* msk = mask.data_ptr<bool>();
    for (int64_t t = 0; t < n; ++t)
      TORCH_CHECK(pos[t] >= 0 && pos[t] < cos_.size(0), "DecodeStep: position ", pos[t], " beyond the RoPE table");
    const int64_t max_ctx = k_pool[0].size(2);
    for (int64_t li = 0; li < nl; ++li)
      TORCH_CHECK(k_pool[li].scalar_type() == at::kFloat && v_pool[li].scalar_type() == at::kFloat &&
                      k_pool[li].is_contiguous() && v_pool[li].is_contiguous() && k_pool[li].size(1) == kvh_ &&
                      k_pool[li].size(3) == hd_,
                  "DecodeStep: KV pool tensors must be contiguous fp32 [slots, kv_heads, max_context, head_dim]");

    const int64_t qkv_n = (nh_ + 2 * kvh_) * hd_, q_n = nh_ * hd_, kv_n = kvh_ * hd_;
    const int64_t m = logit_index.size(0);
    const int64_t* lidx = logit_index.data_ptr<int64_t>();
    for (int64_t r = 0; r < m; ++r) TORCH_CHECK(lidx[r] >= 0 && lidx[r] < n, "DecodeStep: logit_index out of range");
    auto opts = x.options();
    at::Tensor res = x.contiguous().clone();
    at::Tensor hbuf = at::empty({n, std::max(h_, i_)}, opts);
    at::Tensor qkv = at::empty({n, qkv_n}, opts);
    at::Tensor att = at::empty({n, q_n}, opts);
    at::Tensor tmp = at::empty({n, std::max(h_, 2 * i_)}, opts);
    at::Tensor last = at::empty({m, h_}, opts);
    at::Tensor logits = at::empty({m, vocab_}, opts.dtype(at::kFloat));
    std::vector<float> q(n * q_n);
    bf16* X = res.data_ptr<bf16>();
    bf16* Hb = hbuf.data_ptr<bf16>();
    bf16* QKV = qkv.data_ptr<bf16>();
    bf16* ATT = att.data_ptr<bf16>();
    bf16* T = tmp.data_ptr<bf16>();
    bf16* LAST = last.data_ptr<bf16>();
    float* OUT = logits.data_ptr<float>();
    const float* cosp = cos_.data_ptr<float>();
    const float* sinp = sin_.data_ptr<float>();
    const int64_t half = hd_ / 2, group = nh_ / kvh_;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd_));
    std::vector<float*> KPs(nl), VPs(nl);
    for (int64_t li = 0; li < nl; ++li) {
      KPs[li] = k_pool[li].data_ptr<float>();
      VPs[li] = v_pool[li].data_ptr<float>();
    }

    SpinBarrier bar;
    // One parallel region for the whole step (see SpinBarrier): each thread takes its share
    // of every phase (rows, output blocks or attention tasks); they meet between phases.
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      auto share = [&](int64_t total) -> std::pair<int64_t, int64_t> {
        return {total * tid / nt, total * (tid + 1) / nt};
      };
      const auto [r0, r1] = share(n);  // this thread's rows for the row-wise phases
      std::vector<float> prep(n * int4_prep_floats(std::max({h_, q_n, i_})));
      std::vector<float> score(L + 16);
      std::vector<float> acc(hd_);
      auto matmul = [&](const Int4& w, const bf16* in, int64_t k, bf16* out, int64_t ldo) {
        int4_prep(in, n, k, prep.data());  // every thread, for all rows: cheaper than a barrier
        const auto [b0, b1] = share(w.n / 16);
        int4_mm_blocks(in, n, k, prep.data(), w.packed.data_ptr<uint8_t>(), w.sz.data_ptr<bf16>(), out, ldo, b0, b1);
      };

      for (int64_t li = 0; li < nl; ++li) {
        const Layer& ly = layers_[li];
        float* KP = KPs[li];
        float* VP = VPs[li];
        // rows: (the previous layer's MLP residual) then the input norm
        for (int64_t t = r0; t < r1; ++t) {
          if (li > 0) add_into(X + t * h_, T + t * h_, h_);
          rms_row(X + t * h_, ly.input_norm.data_ptr<bf16>(), Hb + t * h_, h_, eps_);
        }
        bar.wait(nt);
        matmul(ly.qkv, Hb, h_, QKV, qkv_n);
        bar.wait(nt);
        // rows: bias, q/k norm (Qwen3), RoPE at the token's row, K and V into the pool
        for (int64_t t = r0; t < r1; ++t) {
          if (ly.qkv_bias) {
            const bf16* b = ly.qkv_bias->data_ptr<bf16>();
            for (int64_t j = 0; j < qkv_n; ++j) QKV[t * qkv_n + j] = bf16(f(QKV[t * qkv_n + j]) + f(b[j]));
          }
          const float* c = cosp + pos[t] * hd_;
          const float* s = sinp + pos[t] * hd_;
          for (int64_t head = 0; head < nh_ + kvh_; ++head) {
            const bool is_q = head < nh_;
            const bf16* src = QKV + t * qkv_n + head * hd_;
            const std::optional<at::Tensor>& norm = is_q ? ly.q_norm : ly.k_norm;
            bf16 normed[512];
            if (norm) {
              rms_row(src, norm->data_ptr<bf16>(), normed, hd_, eps_);
              src = normed;
            }
            float* dst = is_q ? q.data() + t * q_n + head * hd_
                              : KP + ((tok_slot[t] * kvh_ + (head - nh_)) * max_ctx + tok_idx[t]) * hd_;
            // x * cos and rot * sin each rounded to bf16, then their sum, as torch computes it
            for (int64_t d = 0; d < half; d += 16) {
              const V a = ld(src + d), b = ld(src + d + half);
              const V lo = vsub(round(vmul(a, vload(c + d))), round(vmul(b, vload(s + d))));
              const V hi = vadd(round(vmul(b, vload(c + d + half))), round(vmul(a, vload(s + d + half))));
              vstore(dst + d, round(lo));
              vstore(dst + d + half, round(hi));
            }
          }
          const bf16* vsrc = QKV + t * qkv_n + q_n + kv_n;
          for (int64_t kh = 0; kh < kvh_; ++kh) {
            float* vd = VP + ((tok_slot[t] * kvh_ + kh) * max_ctx + tok_idx[t]) * hd_;
            for (int64_t d = 0; d < hd_; d += 16) vstore(vd + d, ld(vsrc + kh * hd_ + d));
          }
        }
        bar.wait(nt);
        // attention: each (token, query head) over its session's keys, masked, in fp32
        const auto [a0, a1] = share(n * nh_);
        for (int64_t task = a0; task < a1; ++task) {
          const int64_t t = task / nh_, head = task % nh_, kh = head / group;
          const int64_t b = pad[t] / max_q, qi = pad[t] % max_q;
          const bool* mrow = msk + (b * max_q + qi) * L;
          const float* qv = q.data() + t * q_n + head * hd_;
          const float* kbase = KP + (sess_slot[b] * kvh_ + kh) * max_ctx * hd_;
          const float* vbase = VP + (sess_slot[b] * kvh_ + kh) * max_ctx * hd_;
          float mx = -INFINITY;
          for (int64_t l = 0; l < L; ++l) {
            if (!mrow[l]) {
              score[l] = -INFINITY;
              continue;
            }
            const float* kv = kbase + l * hd_;
            V dot = vzero();
            for (int64_t d = 0; d < hd_; d += 16) dot = vfma(vload(qv + d), vload(kv + d), dot);
            score[l] = vsum(dot) * scale;
            mx = std::max(mx, score[l]);
          }
          for (int64_t l = L; l < L + 16; ++l) score[l] = -INFINITY;
          // p = exp(score - max), exactly 0 where masked; then sum and p-weighted values
          const V vmx = vset(mx);
          V total = vzero();
          for (int64_t l = 0; l < L; l += 16) {
            const V sc = vload(score.data() + l);
            const V p = vlive(sc, exp16(vsub(sc, vmx)));
            vstore(score.data() + l, p);
            total = vadd(total, p);
          }
          const float sum = vsum(total);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t l = 0; l < L; ++l) {
            if (score[l] == 0.f) continue;
            const V p = vset(score[l]);
            const float* vv = vbase + l * hd_;
            for (int64_t d = 0; d < hd_; d += 16) vstore(acc.data() + d, vfma(p, vload(vv + d), vload(acc.data() + d)));
          }
          const V inv = vset(sum > 0.f ? 1.0f / sum : 0.f);
          bf16* out = ATT + t * q_n + head * hd_;
          for (int64_t d = 0; d < hd_; d += 16) st(out + d, vmul(vload(acc.data() + d), inv));
        }
        bar.wait(nt);
        matmul(ly.o, ATT, q_n, T, h_);
        bar.wait(nt);
        for (int64_t t = r0; t < r1; ++t) {
          add_into(X + t * h_, T + t * h_, h_);
          rms_row(X + t * h_, ly.post_norm.data_ptr<bf16>(), Hb + t * h_, h_, eps_);
        }
        bar.wait(nt);
        matmul(ly.gate_up, Hb, h_, T, 2 * i_);
        bar.wait(nt);
        // rows: act = bf16(bf16(silu(g)) * u), as torch rounds F.silu(g) before the product
        for (int64_t t = r0; t < r1; ++t) {
          const bf16* g = T + t * 2 * i_;
          const bf16* u = g + i_;
          bf16* a = Hb + t * i_;
          for (int64_t j = 0; j < i_; j += 16) {
            const V gv = ld(g + j);
            const V sg = vdiv(gv, vadd(vset(1.0f), exp16(vsub(vzero(), gv))));
            st(a + j, vmul(round(sg), ld(u + j)));
          }
        }
        bar.wait(nt);
        matmul(ly.down, Hb, i_, T, h_);
        bar.wait(nt);
      }
      for (int64_t t = r0; t < r1; ++t) add_into(X + t * h_, T + t * h_, h_);
      bar.wait(nt);
      const auto [l0, l1] = share(m);
      for (int64_t r = l0; r < l1; ++r) rms_row(X + lidx[r] * h_, final_norm_.data_ptr<bf16>(), LAST + r * h_, h_, eps_);
      bar.wait(nt);
      const auto [b0, b1] = share(vocab_ / 16);
      int8_mm_blocks(LAST, m, h_, head_packed_.data_ptr<int8_t>(), head_scales_.data_ptr<float>(), OUT, vocab_, b0, b1);
      bar.wait(nt);
    }
    return logits;
  }

 private:
  int64_t nh_, kvh_, hd_, h_, i_, vocab_ = 0;
  float eps_;
  at::Tensor final_norm_, head_packed_, head_scales_, cos_, sin_;
  std::vector<Layer> layers_;
};

void bind_decode_step(pybind11::module_& m) {
  using pybind11::call_guard;
  using pybind11::gil_scoped_release;
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("num_layers", &DecodeStep::num_layers)
      .def("forward", &DecodeStep::forward, call_guard<gil_scoped_release>());
}

}  // namespace msk
