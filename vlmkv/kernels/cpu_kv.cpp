// CPU kernels over vlmkv's packed KV layout, registered as torch ops `vlmkv_cpu::*` (built and loaded by
// vlmkv/kernels/cpu.py; their torch twins are vlmkv.quant.quantize and vlmkv.kernels.reference).
//
// One kernel for every stored format: a format is a table entry, not a new kernel. What varies, and how:
// * the code: FMT = 2, 4 or 8 bits (code j of a byte at bits [j*bits, (j+1)*bits)) or 3 = ternary (five 3-level
//   codes a byte, byte = sum_j c_j 3^j); or the values themselves, FMT 16 (fp16), 17 (bf16) or 32 (float32), for
//   full-precision segments and the residual window (one group, scale 1, zero 0); a template parameter;
// * the groups: per-token groups given by their channel bounds (even groups of any size dividing D, or SKVQ's
//   uneven ones), or per-channel groups of G tokens (KIVI keys); runtime data;
// * the zero point: int16, int8 or none (symmetric groups: the implied zero is 2^(bits-1) and the scale carries
//   the sign); runtime data;
// * the levels: uniform (a code is its own value) or a codebook (code c stands for levels[c], a float32 table of
//   2^bits entries: Lloyd-Max levels, with the group's norm as its scale and no zero point); runtime data.
// codes uint8 [B, H, n, bytes]; scale fp16 and zero [B, H, n, groups] (per-channel: [B, H, n / G, D]);
// value = scale * (code - zero). Strides are followed on the token, head and batch dimensions (views into a
// segment's spare-capacity buffers); the last dimension must be contiguous.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

using at::Tensor;

// float codes of every byte value, per bit-width: unpacking is a 16-byte copy per byte instead of shifts
template <int BITS>
struct Lut {
  static constexpr int PER = 8 / BITS;
  alignas(16) float v[256][PER];
  Lut() {
    for (int b = 0; b < 256; ++b)
      for (int j = 0; j < PER; ++j) v[b][j] = float((b >> (BITS * j)) & ((1 << BITS) - 1));
  }
};

template <int BITS>
const Lut<BITS>& lut() {
  static const Lut<BITS> table;
  return table;
}

// ternary codes: five base-3 digits a byte (byte = sum_j c_j 3^j), padded to 8 floats for a fixed-size copy
struct TritLut {
  alignas(32) float v[256][8];
  TritLut() {
    for (int b = 0; b < 256; ++b) {
      int x = b;
      for (int j = 0; j < 8; ++j) {
        v[b][j] = j < 5 ? float(x % 3) : 0.f;
        if (j < 5) x /= 3;
      }
    }
  }
};

const TritLut& trit_lut() {
  static const TritLut table;
  return table;
}

// codes a byte holds and the bytes D codes take, per format (FMT 3: ternary; 16, 17, 32: the values themselves)
template <int FMT>
constexpr int per_byte() { return FMT == 3 ? 5 : FMT >= 16 ? 1 : 8 / FMT; }

constexpr bool is_float_fmt(int fmt) { return fmt >= 16; }

inline int64_t code_bytes(int fmt, int64_t D) {
  const int per = fmt == 3 ? 5 : 8 / fmt;
  return (D + per - 1) / per;
}

// D codes of one token as floats (dst has room for D rounded up to a whole byte's codes, plus 8); lv: a codebook's
// byte table (`byte_levels`: the levels of the codes each byte holds), or null: the codes themselves
template <int FMT>
inline void unpack(const uint8_t* src, int D, float* dst, const float* lv = nullptr) {
  if constexpr (FMT == 32) {
    std::memcpy(dst, src, sizeof(float) * D);
  } else if constexpr (FMT == 16) {
    const at::Half* h = reinterpret_cast<const at::Half*>(src);
    for (int d = 0; d < D; ++d) dst[d] = float(h[d]);
  } else if constexpr (FMT == 17) {
    const at::BFloat16* h = reinterpret_cast<const at::BFloat16*>(src);
    for (int d = 0; d < D; ++d) dst[d] = float(h[d]);
  } else if constexpr (FMT == 8) {
    if (lv)
      for (int d = 0; d < D; ++d) dst[d] = lv[src[d]];  // one level a byte
    else
      for (int d = 0; d < D; ++d) dst[d] = float(src[d]);
  } else if constexpr (FMT == 3) {
    const TritLut& L = trit_lut();
    for (int j = 0; j < (D + 4) / 5; ++j) std::memcpy(dst + j * 5, L.v[src[j]], sizeof(float) * 8);
  } else {
    constexpr int PER = 8 / FMT;
    const float* table = lv ? lv : &lut<FMT>().v[0][0];  // a codebook's levels, or the codes: one copy a byte
    for (int j = 0; j < (D + PER - 1) / PER; ++j) std::memcpy(dst + j * PER, table + src[j] * PER, sizeof(float) * PER);
  }
}

// a codebook's byte table: for each byte, the levels of the codes it holds ([256][8 / bits] floats), so that
// unpacking a codebook is the same one copy a byte as unpacking codes
std::vector<float> byte_levels(const float* levels, int bits) {
  const int per = 8 / bits;
  std::vector<float> t(size_t(256) * per);
  for (int b = 0; b < 256; ++b)
    for (int j = 0; j < per; ++j) t[size_t(b) * per + j] = levels[(b >> (bits * j)) & ((1 << bits) - 1)];
  return t;
}

enum ZeroKind { Z_INT16 = 0, Z_INT8 = 1, Z_NONE = 2 };

struct Packed {  // one QTensor (or a float segment), pointers at (b, h) = (0, 0)
  const uint8_t* c;
  const at::Half* s;  // null: a float segment (scale 1)
  const void* z;  // int16 or int8 zero points (zk), or null: symmetric groups, zero = zconst
  int zk;
  float zconst;
  int64_t cb, ch, ct;  // codes strides in bytes (batch, head, token)
  int64_t sb, sh, st;  // scale / zero strides
  int G;  // per-channel groups: tokens a group
  bool channel;  // per-channel groups of G tokens (KIVI keys): scale / zero [B, H, n / G, D]
  std::vector<int> gb;  // per-token groups: channel bounds, 0 = gb[0] < ... < gb[ng] = D
  int ng;
  bool bytes_aligned;  // every group bound falls on a byte (the score tables apply)
  const float* lv = nullptr;  // a codebook's byte table (`byte_levels`, zero point 0), or null: uniform codes
  std::shared_ptr<std::vector<float>> lv_table;  // owns lv
};

inline float scale_at(const Packed& P, int64_t off) { return P.s ? float(P.s[off]) : 1.f; }

// zero point at element offset `off` of the scale / zero tensors
inline float zero_at(const Packed& P, int64_t off) {
  switch (P.zk) {
    case Z_INT16: return float(static_cast<const int16_t*>(P.z)[off]);
    case Z_INT8: return float(static_cast<const int8_t*>(P.z)[off]);
    default: return P.zconst;
  }
}

int zero_kind(const std::optional<Tensor>& z) {
  if (!z.has_value()) return Z_NONE;
  TORCH_CHECK(z->scalar_type() == at::kShort || z->scalar_type() == at::kChar, "zero points: int16 or int8");
  return z->scalar_type() == at::kShort ? Z_INT16 : Z_INT8;
}

// bits: the code's width (2/4/8; ternary codes are 2-bit wide); bounds: int32 [ng + 1] for per-token groups
Packed packed(const Tensor& c, const Tensor& s, const std::optional<Tensor>& z, int fmt, int bits,
              const Tensor& bounds, int64_t D, int64_t G = 0, bool channel = false,
              const std::optional<Tensor>& lv = std::nullopt) {
  TORCH_CHECK(c.dim() == 4 && c.scalar_type() == at::kByte && c.stride(3) == 1, "codes: uint8 [B, H, n, bytes], rows contiguous");
  TORCH_CHECK(s.scalar_type() == at::kHalf && s.dim() == 4 && s.stride(3) == 1, "scale: fp16 [B, H, n, groups], rows contiguous");
  TORCH_CHECK(!z.has_value() || (z->strides() == s.strides() && z->sizes() == s.sizes()),
              "zero points: shaped and strided as the scales");
  TORCH_CHECK(!z.has_value() || !channel || z->scalar_type() == at::kShort, "per-channel groups keep int16 zero points");
  Packed P{c.data_ptr<uint8_t>(), s.data_ptr<at::Half>(), z.has_value() ? z->data_ptr() : nullptr, zero_kind(z),
           float(1 << (bits - 1)), c.stride(0), c.stride(1), c.stride(2), s.stride(0), s.stride(1), s.stride(2),
           int(G), channel, {}, 0, true};
  if (!channel) {
    TORCH_CHECK(bounds.scalar_type() == at::kInt && bounds.dim() == 1 && bounds.is_contiguous() && bounds.numel() >= 2,
                "bounds: int32 [groups + 1]");
    const int* b = bounds.data_ptr<int>();
    P.gb.assign(b, b + bounds.numel());
    P.ng = int(bounds.numel()) - 1;
    TORCH_CHECK(P.gb[0] == 0 && P.gb[P.ng] == D && s.size(3) == P.ng, "bounds must run from 0 to D, one per scale");
    const int per = fmt == 3 ? 5 : 8 / fmt;
    for (int g = 0; g < P.ng; ++g) {
      TORCH_CHECK(P.gb[g + 1] > P.gb[g], "bounds must increase");
      P.bytes_aligned &= P.gb[g] % per == 0;
    }
  }
  TORCH_CHECK(c.size(3) == code_bytes(fmt, D), "codes must hold D channels a token");
  if (lv.has_value()) {
    TORCH_CHECK(lv->scalar_type() == at::kFloat && lv->dim() == 1 && lv->is_contiguous() && lv->numel() == (1 << bits) &&
                    fmt != 3 && !channel && !z.has_value(),
                "levels: float32 [2^bits] for per-token groups of 2/4/8-bit codes with no zero point");
    P.lv_table = std::make_shared<std::vector<float>>(byte_levels(lv->data_ptr<float>(), bits));
    P.lv = P.lv_table->data();
    P.zconst = 0.f;
  }
  return P;
}

// a full-precision segment [B, H, n, D] (fp16, bf16 or float32) as a format of its own: one group, scale 1, zero 0
Packed packed_float(const Tensor& x, int fmt, int64_t D) {
  const auto want = fmt == 16 ? at::kHalf : fmt == 17 ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == want && x.stride(3) == 1 && x.size(3) == D,
              "float segment: [B, H, n, D] of its format's dtype, rows contiguous");
  const int64_t e = x.element_size();
  return Packed{static_cast<const uint8_t*>(x.data_ptr()), nullptr, nullptr, Z_NONE, 0.f, x.stride(0) * e,
                x.stride(1) * e, x.stride(2) * e, 0, 0, 0, 0, false, {0, int(D)}, 1, false};
}

// 8 floats in GCC's portable vector extension: the compiler maps it to AVX/AVX-512/SSE as the CPU has
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// a . b over n floats
inline float dot(const float* a, const float* b, int n) {
  v8 acc = {};
  int d = 0;
  for (; d + 8 <= n; d += 8) acc += load8(a + d) * load8(b + d);
  float tail = 0.f;
  for (; d < n; ++d) tail += a[d] * b[d];
  return hsum(acc) + tail;
}

// o += w * c over n floats
inline void axpy(float* o, float w, const float* c, int n) {
  int d = 0;
  for (; d + 8 <= n; d += 8) store8(o + d, load8(o + d) + w * load8(c + d));
  for (; d < n; ++d) o[d] += w * c[d];
}

// exp(x) for x <= 0 (scores minus their max), 8 at a time: exp(x) = 2^k e^f with k = round(x / ln 2) and
// f in [-ln2/2, ln2/2], e^f by a degree-6 polynomial (relative error ~2e-7, as expf's own); x < -87: 0
inline v8 exp_neg8(v8 x) {
  const v8 xc = x < -87.f ? v8{} - 87.f : x;
  const v8 magic = v8{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const v8 k = (xc * 1.44269504088896341f + magic) - magic;
  const v8 f = (xc - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  v8 p = v8{} + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const v8i e = (__builtin_convertvector(k, v8i) + 127) << 23;
  const v8 r = p * reinterpret_cast<const v8&>(e);
  return x < -87.f ? v8{} : r;
}

constexpr int MAX_D = 512;
constexpr int SCRATCH = MAX_D + 16;  // unpacked codes: D rounded up to whole bytes' codes, plus a copy's overhang

// Score tables for 2- and 4-bit keys (a table-lookup GEMV): tab[(r * NB + j) * 256 + byte] = the dot product of
// q[r] with the codes that `byte` holds at byte position j (channels j * PER ... j * PER + PER - 1). Then
// q[r] . c_t over a group = the sum of one table entry per byte of the token: NB lookups instead of D
// unpacked codes and products, and the R query heads of a kv head each read the token's bytes directly.
template <int BITS>
void build_tables(const float* q, int R, int D, float* tab, const float* lv = nullptr) {
  constexpr int PER = 8 / BITS;
  const int NB = D / PER;
  if (lv) {  // a codebook: each byte's levels (`byte_levels`) instead of its codes
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) {
        float* t = tab + (size_t(r) * NB + j) * 256;
        const float* qj = q + size_t(r) * D + j * PER;
        for (int b = 0; b < 256; ++b) {
          float acc = 0.f;
          for (int k = 0; k < PER; ++k) acc += qj[k] * lv[b * PER + k];
          t[b] = acc;
        }
      }
    return;
  }
  alignas(64) static const auto codes = [] {  // codes[k][byte]: code k of `byte`, as float (SoA: vectorizes)
    std::array<std::array<float, 256>, PER> a{};
    for (int k = 0; k < PER; ++k)
      for (int b = 0; b < 256; ++b) a[k][b] = float((b >> (BITS * k)) & ((1 << BITS) - 1));
    return a;
  }();
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) {
      float* t = tab + (size_t(r) * NB + j) * 256;
      const float* qj = q + size_t(r) * D + j * PER;
      for (int b = 0; b < 256; ++b) t[b] = qj[0] * codes[0][b];
      for (int k = 1; k < PER; ++k)
        for (int b = 0; b < 256; ++b) t[b] += qj[k] * codes[k][b];
    }
}

// q[r] . c over bytes [j0, j1) of a token, from the tables
inline float lookup(const float* tr, const uint8_t* bytes, int j0, int j1) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;  // four chains: lookups overlap
  int j = j0;
  for (; j + 4 <= j1; j += 4) {
    a0 += tr[size_t(j) * 256 + bytes[j]];
    a1 += tr[size_t(j + 1) * 256 + bytes[j + 1]];
    a2 += tr[size_t(j + 2) * 256 + bytes[j + 2]];
    a3 += tr[size_t(j + 3) * 256 + bytes[j + 3]];
  }
  for (; j < j1; ++j) a0 += tr[size_t(j) * 256 + bytes[j]];
  return (a0 + a1) + (a2 + a3);
}

// Partial attention of R query heads over tokens [t0, t1) of one (batch row, kv head):
// m = max scaled score (>= -1e30), l = sum exp(s - m), o = sum exp(s - m) v.
// q: [R, D]; qsum: [R, K.ng] the query summed over each key group (for the zero-point term; per-token key groups).
// tab: the score tables of q (see build_tables) or null (unpack the codes instead); sc: scratch [R, round_up(T, 8)].
template <int KF, int VF>
void partial(const float* __restrict q, const float* __restrict qsum, const Packed& K, const Packed& V, int64_t b,
             int64_t h, const int8_t* ok, int64_t t0, int64_t t1, int R, int D, float scaling, const float* tab,
             float* __restrict sc, float* __restrict m, float* __restrict l, float* __restrict o) {
  const int T = int(t1 - t0), TP = (T + 7) / 8 * 8, KG = K.G, nkg = K.ng, nvg = V.ng;
  const int* kgb = K.gb.data();
  const int* vgb = V.gb.data();
  alignas(64) float c[SCRATCH];
  const uint8_t* kc = K.c + b * K.cb + h * K.ch;
  const int64_t kso = b * K.sb + h * K.sh;  // scale / zero offset of this (row, head)
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // per-channel key groups: k_td = s_gd (c_td - z_gd) over each group g of KG tokens, so
  // q . k_t = (q * s_g) . c_t - sum_d q_d s_gd z_gd, with q * s_g and the sum taken once per group
  std::vector<float> qs(K.channel ? size_t(R) * D : 0), kbias(K.channel ? R : 0);
  // pass 1: scores from the codes, q . k = sum_g s_g (q_g . c_g - z_g sum(q_g)) for per-token groups
  for (int64_t t = t0; t < t1; ++t) {
    const int i = int(t - t0);
    if (K.channel && (t == t0 || t % KG == 0)) {
      const int64_t go = (t / KG) * K.st;
      for (int r = 0; r < R; ++r) {
        float bias = 0.f;
        for (int d = 0; d < D; ++d) {
          qs[size_t(r) * D + d] = q[size_t(r) * D + d] * scale_at(K, kso + go + d);
          bias += qs[size_t(r) * D + d] * zero_at(K, kso + go + d);
        }
        kbias[r] = bias;
      }
    }
    if (ok && !ok[t]) {
      for (int r = 0; r < R; ++r) sc[size_t(r) * TP + i] = neg_inf;
      continue;
    }
    if (K.channel) {
      unpack<KF>(kc + t * K.ct, D, c, K.lv);
      for (int r = 0; r < R; ++r) sc[size_t(r) * TP + i] = (dot(qs.data() + size_t(r) * D, c, D) - kbias[r]) * scaling;
      continue;
    }
    const int64_t zo = kso + t * K.st;  // this token's scales and zero points
    if (tab) {
      constexpr int PER = per_byte<KF>();
      const int NB = (D + PER - 1) / PER;
      const uint8_t* bytes = kc + t * K.ct;
      for (int r = 0; r < R; ++r) {
        const float* tr = tab + size_t(r) * NB * 256;
        float acc = 0.f;
        for (int g = 0; g < nkg; ++g)
          acc += scale_at(K, zo + g) * (lookup(tr, bytes, kgb[g] / PER, kgb[g + 1] / PER) -
                                zero_at(K, zo + g) * qsum[size_t(r) * nkg + g]);
        sc[size_t(r) * TP + i] = acc * scaling;
      }
      continue;
    }
    unpack<KF>(kc + t * K.ct, D, c, K.lv);
    for (int r = 0; r < R; ++r) {
      const float* qr = q + size_t(r) * D;
      float acc = 0.f;
      for (int g = 0; g < nkg; ++g)
        acc += scale_at(K, zo + g) * (dot(qr + kgb[g], c + kgb[g], kgb[g + 1] - kgb[g]) -
                              zero_at(K, zo + g) * qsum[size_t(r) * nkg + g]);
      sc[size_t(r) * TP + i] = acc * scaling;
    }
  }
  // weights: w = exp(s - m), in place (the padding up to TP is -inf: weight 0)
  for (int r = 0; r < R; ++r) {
    float* sr = sc + size_t(r) * TP;
    for (int i = T; i < TP; ++i) sr[i] = neg_inf;
    float mr = -1e30f;
    for (int i = 0; i < T; ++i) mr = std::max(mr, sr[i]);
    v8 lr = {};
    for (int i = 0; i < TP; i += 8) {
      const v8 w = exp_neg8(load8(sr + i) - mr);
      store8(sr + i, w);
      lr += w;
    }
    m[r] = mr;
    l[r] = hsum(lr);
  }
  // pass 2: o = sum_t w_t s_g (c_t - z_g) per value group; the zero-point terms summed apart. Tokens go in tiles of
  // TT: their codes are unpacked once into a tile, then each query head's output runs over the tile 8 channels at a
  // time with its accumulator in a register (one load and one multiply-add per token, no store per token).
  constexpr int TT = 16;
  const uint8_t* vc = V.c + b * V.cb + h * V.ch;
  const int64_t vso = b * V.sb + h * V.sh;
  std::fill(o, o + size_t(R) * D, 0.f);
  std::vector<float> bs(size_t(R) * nvg, 0.f);
  const int DP = (D + 15) / 8 * 8 + 8;  // a tile row: D codes and an unpacking overhang
  std::vector<float> tile(size_t(TT) * DP), ts(size_t(TT) * nvg), tb(size_t(TT) * nvg), coef(TT);
  int64_t live[TT];
  for (int64_t tt = t0; tt < t1; tt += TT) {
    int nt = 0;
    for (int64_t t = tt; t < std::min(t1, tt + TT); ++t) {
      if (ok && !ok[t]) continue;
      unpack<VF>(vc + t * V.ct, D, tile.data() + size_t(nt) * DP, V.lv);
      const int64_t zo = vso + t * V.st;
      for (int g = 0; g < nvg; ++g) {
        const float sg = scale_at(V, zo + g);
        ts[size_t(nt) * nvg + g] = sg;
        tb[size_t(nt) * nvg + g] = -zero_at(V, zo + g) * sg;
      }
      live[nt++] = t - t0;
    }
    for (int r = 0; r < R; ++r) {
      const float* wr = sc + size_t(r) * TP;
      float* orow = o + size_t(r) * D;
      for (int g = 0; g < nvg; ++g) {
        float bias = 0.f;
        for (int k = 0; k < nt; ++k) {
          const float w = wr[live[k]];
          coef[k] = w * ts[size_t(k) * nvg + g];
          bias += w * tb[size_t(k) * nvg + g];
        }
        bs[size_t(r) * nvg + g] += bias;
        const int a = vgb[g], e = vgb[g + 1];
        int d = a;
        for (; d + 8 <= e; d += 8) {
          v8 acc = load8(orow + d);
          for (int k = 0; k < nt; ++k) acc += coef[k] * load8(tile.data() + size_t(k) * DP + d);
          store8(orow + d, acc);
        }
        for (; d < e; ++d) {
          float acc = orow[d];
          for (int k = 0; k < nt; ++k) acc += coef[k] * tile[size_t(k) * DP + d];
          orow[d] = acc;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < nvg; ++g)
      for (int d = vgb[g]; d < vgb[g + 1]; ++d) o[size_t(r) * D + d] += bs[size_t(r) * nvg + g];
}

using PartialFn = void (*)(const float*, const float*, const Packed&, const Packed&, int64_t, int64_t,
                           const int8_t*, int64_t, int64_t, int, int, float, const float*, float*, float*, float*,
                           float*);

// the format table: every (key code, value code) pair, FMT 3 = ternary
template <int KF>
PartialFn pick_v(int64_t vf) {
  switch (vf) {
    case 2: return partial<KF, 2>;
    case 3: return partial<KF, 3>;
    case 4: return partial<KF, 4>;
    case 8: return partial<KF, 8>;
  }
  TORCH_CHECK(false, "value format must be 2, 3 (ternary), 4 or 8, got ", vf);
}

PartialFn pick(int64_t kf, int64_t vf) {
  if (is_float_fmt(int(kf)) || is_float_fmt(int(vf))) {  // full-precision segments: keys and values alike
    TORCH_CHECK(kf == vf, "a float segment keeps keys and values in one dtype, got formats ", kf, " and ", vf);
    switch (kf) {
      case 16: return partial<16, 16>;
      case 17: return partial<17, 17>;
      case 32: return partial<32, 32>;
    }
    TORCH_CHECK(false, "float format must be 16 (fp16), 17 (bf16) or 32 (float32), got ", kf);
  }
  switch (kf) {
    case 2: return pick_v<2>(vf);
    case 3: return pick_v<3>(vf);
    case 4: return pick_v<4>(vf);
    case 8: return pick_v<8>(vf);
  }
  TORCH_CHECK(false, "key format must be 2, 3 (ternary), 4 or 8, got ", kf);
}

inline int code_bits(int64_t fmt) { return fmt == 3 ? 2 : int(fmt); }

// One segment of a decode step: its keys and values (packed or float), the tokens it holds and its mask.
struct Seg {
  Packed K, V;
  int kf, vf;
  int64_t n;
  const int8_t* ok;  // int8 [B, n] (0: masked) or null
  int64_t ok_b;
};

// Flash-decoding over the segments of one layer: the tokens of each (segment, row, kv head) are split into chunks
// worked on in parallel, and every chunk's (m, l, o) is merged by log-sum-exp. Returns m, l [B, H, R, 1] and
// o [B, H, R, D]: o / l = softmax(q K^T * scaling) V over every allowed token of every segment.
std::tuple<Tensor, Tensor, Tensor> decode_core(const Tensor& q, const std::vector<Seg>& segs, double scaling) {
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3);
  const float* qp = q.data_ptr<float>();
  const int64_t threads = std::max(1, at::get_num_threads());
  struct Task {
    int seg;
    int64_t bh, t0, t1;
  };
  std::vector<Task> tasks;
  std::vector<std::vector<float>> qsums(segs.size()), tabs(segs.size());
  std::vector<int> tab_of(segs.size(), 0);
  for (size_t si = 0; si < segs.size(); ++si) {
    const Seg& S = segs[si];
    const int64_t n = S.n;
    // enough chunks for 4 tasks a thread, and a multiple of the threads where that keeps chunks of 64+ tokens
    int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((4 * threads + B * H - 1) / (B * H), (n + 63) / 64));
    while ((B * H * chunks) % threads && (n + chunks) / (chunks + 1) >= 64) ++chunks;
    const int64_t per = (n + chunks - 1) / chunks;
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t ch = 0; ch < chunks; ++ch)
        if (ch * per < n) tasks.push_back({int(si), bh, ch * per, std::min(n, (ch + 1) * per)});
    // q summed over each key group, for the zero-point term
    const int64_t nkg = S.K.channel ? 1 : S.K.ng;
    std::vector<float>& qsum = qsums[si];
    qsum.assign(size_t(B * H * R * nkg), 0.f);
    if (!S.K.channel)
      for (int64_t i = 0; i < B * H * R; ++i)
        for (int64_t g = 0; g < nkg; ++g)
          for (int64_t d = S.K.gb[g]; d < S.K.gb[g + 1]; ++d) qsum[i * nkg + g] += qp[i * D + d];
    // score tables (2-bit keys in byte-aligned groups, long enough segments: a table costs about as much as 256
    // tokens' products; 4-bit keys read faster unpacked)
    if (S.kf == 2 && n >= 256 && !S.K.channel && S.K.bytes_aligned && D % 4 == 0) {
      tab_of[si] = 1;
      tabs[si].resize(size_t(B * H * R * (D / 4) * 256));
    }
  }
  for (size_t si = 0; si < segs.size(); ++si)
    if (tab_of[si])
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh)
          build_tables<2>(qp + bh * R * D, int(R), int(D), tabs[si].data() + bh * R * (D / 4) * 256, segs[si].K.lv);
      });
  const int64_t T = int64_t(tasks.size());
  std::vector<float> pm(size_t(T * R)), pl(pm.size()), po(pm.size() * D);
  const float sc = float(scaling);
  int64_t work = 0;
  for (const Seg& S : segs) work += S.n;
  // small steps run inline: waking the thread pool costs more than they do
  const int64_t grain = work * B * H < 4096 ? std::max<int64_t>(T, 1) : 1;
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& tk = tasks[ti];
      const Seg& S = segs[tk.seg];
      const int64_t b = tk.bh / H, h = tk.bh % H, nkg = S.K.channel ? 1 : S.K.ng;
      scratch.resize(size_t(R * ((tk.t1 - tk.t0 + 7) / 8 * 8)));
      const PartialFn fn = pick(S.kf, S.vf);
      fn(qp + tk.bh * R * D, qsums[tk.seg].data() + tk.bh * R * nkg, S.K, S.V, b, h,
         S.ok ? S.ok + b * S.ok_b : nullptr, tk.t0, tk.t1, int(R), int(D), sc,
         tab_of[tk.seg] ? tabs[tk.seg].data() + tk.bh * R * (D / 4) * 256 : nullptr, scratch.data(),
         pm.data() + ti * R, pl.data() + ti * R, po.data() + ti * R * D);
    }
  });
  // merge every chunk of every segment (log-sum-exp), per (row, kv head)
  auto f32 = q.options();
  Tensor m = at::empty({B, H, R, 1}, f32), l = at::empty({B, H, R, 1}, f32), o = at::empty({B, H, R, D}, f32);
  float* mo = m.data_ptr<float>();
  float* lo = l.data_ptr<float>();
  float* oo = o.data_ptr<float>();
  std::fill(oo, oo + B * H * R * D, 0.f);
  std::fill(mo, mo + B * H * R, -1e30f);
  std::fill(lo, lo + B * H * R, 0.f);
  for (int64_t ti = 0; ti < T; ++ti)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = tasks[ti].bh * R + r;
      mo[i] = std::max(mo[i], pm[ti * R + r]);
    }
  for (int64_t ti = 0; ti < T; ++ti)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t i = tasks[ti].bh * R + r;
      const float a = std::exp(pm[ti * R + r] - mo[i]);
      lo[i] += pl[ti * R + r] * a;
      const float* src = po.data() + (ti * R + r) * D;
      float* orow = oo + i * D;
      for (int64_t d = 0; d < D; ++d) orow[d] += src[d] * a;
    }
  return {m, l, o};
}

const int8_t* ok_ptr(const std::optional<Tensor>& ok, int64_t B, int64_t n, int64_t* stride) {
  if (!ok.has_value()) return nullptr;
  TORCH_CHECK(ok->scalar_type() == at::kChar && ok->dim() == 2 && ok->size(0) == B && ok->size(1) == n &&
              ok->stride(1) == 1, "ok: int8 [B, n]");
  *stride = ok->stride(0);
  return ok->data_ptr<int8_t>();
}

// One packed segment's keys and values as a Seg (kfmt / vfmt: 2, 4, 8 or 3; kbounds / vbounds: int32 per-token
// group bounds, kbounds unused for per-channel keys, whose groups are kgroup tokens; kz / vz: int16 / int8 zero
// points or None for symmetric groups), or a float segment (formats 16, 17, 32: kc / vc hold the values).
Seg make_seg(const Tensor& q, const Tensor& kc, const Tensor& ks, const std::optional<Tensor>& kz, const Tensor& vc,
             const Tensor& vs, const std::optional<Tensor>& vz, const std::optional<Tensor>& ok, int64_t kfmt,
             const Tensor& kbounds, int64_t kgroup, bool kchannel, int64_t vfmt, const Tensor& vbounds,
             const std::optional<Tensor>& klv, const std::optional<Tensor>& vlv) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), n = kc.size(2);
  TORCH_CHECK(kc.dim() == 4 && kc.size(0) == B && kc.size(1) == H && vc.dim() == 4 && vc.size(0) == B &&
              vc.size(1) == H && vc.size(2) == n, "K, V and q must agree on B, H, n");
  Seg S;
  if (is_float_fmt(int(kfmt))) {
    S.K = packed_float(kc, int(kfmt), D);
    S.V = packed_float(vc, int(vfmt), D);
  } else {
    TORCH_CHECK(!kchannel || (kgroup > 0 && ks.size(2) * kgroup >= n && ks.size(3) == D), "per-channel key scales: [B, H, n / G, D]");
    TORCH_CHECK(kchannel || ks.size(2) == n, "per-token key scales: [B, H, n, groups]");
    TORCH_CHECK(vs.size(2) == n, "value scales: [B, H, n, groups]");
    S.K = packed(kc, ks, kz, int(kfmt), code_bits(kfmt), kbounds, D, kgroup, kchannel, klv);
    S.V = packed(vc, vs, vz, int(vfmt), code_bits(vfmt), vbounds, D, 0, false, vlv);
  }
  S.kf = int(kfmt);
  S.vf = int(vfmt);
  S.n = n;
  S.ok_b = 0;
  S.ok = ok_ptr(ok, B, n, &S.ok_b);
  return S;
}

void check_q(const Tensor& q) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous float32 [B, H, R, D]");
  TORCH_CHECK(q.size(3) <= MAX_D, "head dim at most 512");
}

// One packed segment: (m, l, o) as decode_core's.
std::tuple<Tensor, Tensor, Tensor> decode_partial(const Tensor& q, const Tensor& kc, const Tensor& ks,
                                                  const std::optional<Tensor>& kz, const Tensor& vc, const Tensor& vs,
                                                  const std::optional<Tensor>& vz, const std::optional<Tensor>& ok,
                                                  double scaling, int64_t kfmt, const Tensor& kbounds, int64_t kgroup,
                                                  bool kchannel, int64_t vfmt, const Tensor& vbounds,
                                                  const std::optional<Tensor>& klv, const std::optional<Tensor>& vlv) {
  check_q(q);
  return decode_core(q, {make_seg(q, kc, ks, kz, vc, vs, vz, ok, kfmt, kbounds, kgroup, kchannel, vfmt, vbounds, klv,
                                  vlv)}, scaling);
}

// Every segment of a layer in one call, merged: segment i is kv[2i] / kv[2i+1] with scales[2i] / scales[2i+1],
// zeros, formats fmts[2i] / fmts[2i+1], bounds, levels (codebooks, or None), kgroups[i] (per-channel key group
// size, 0: per-token keys) and oks[i]; float segments (formats 16, 17, 32) ignore scales, zeros, bounds and levels.
std::tuple<Tensor, Tensor, Tensor> decode_layer(const Tensor& q, const std::vector<Tensor>& kv,
                                                const std::vector<Tensor>& scales,
                                                const std::vector<std::optional<Tensor>>& zeros,
                                                const std::vector<std::optional<Tensor>>& oks,
                                                const std::vector<int64_t>& fmts, const std::vector<Tensor>& bounds,
                                                const std::vector<std::optional<Tensor>>& levels,
                                                const std::vector<int64_t>& kgroups, double scaling) {
  check_q(q);
  const size_t ns = oks.size();
  TORCH_CHECK(kv.size() == 2 * ns && scales.size() == 2 * ns && zeros.size() == 2 * ns && fmts.size() == 2 * ns &&
              bounds.size() == 2 * ns && levels.size() == 2 * ns && kgroups.size() == ns,
              "two entries a segment (keys, values), one ok each");
  std::vector<Seg> segs;
  for (size_t i = 0; i < ns; ++i)
    segs.push_back(make_seg(q, kv[2 * i], scales[2 * i], zeros[2 * i], kv[2 * i + 1], scales[2 * i + 1],
                            zeros[2 * i + 1], oks[i], fmts[2 * i], bounds[2 * i], kgroups[i], kgroups[i] > 0,
                            fmts[2 * i + 1], bounds[2 * i + 1], levels[2 * i], levels[2 * i + 1]));
  return decode_core(q, segs, scaling);
}

// fp16 scale rounded up: never below the float32 step, so the clipped range fits in 2^bits - 1 steps; saturates
// at 65504 (NaN stays NaN)
inline at::Half round_up_half(float x) {
  if (x > 65504.f) x = 65504.f;
  at::Half h(x);
  if (float(h) < x) h = at::Half(uint16_t(h.x + 1), at::Half::from_bits());
  return h;
}

// Quantize and pack tokens x: float32 [B, H, n, D] (contiguous) into codes / scale / zero, which may be strided
// views (a segment's buffers at its write position), per-token groups given by `bounds` (int32 [ng + 1]), one clip
// ratio a group (`clips`, float32 [ng]), zero points int16 / int8 or none (symmetric groups). Equal to
// vlmkv.quant.quantize: the same float32 operations in the same order (IEEE division, round half to even), so
// codes, scales and zero points are bit for bit the same.
void quantize_pack_(const Tensor& x, const Tensor& codes, const Tensor& scale, const std::optional<Tensor>& zero,
                    int64_t fmt, const Tensor& bounds, const Tensor& clips) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [B, H, n, D]");
  TORCH_CHECK(fmt == 2 || fmt == 3 || fmt == 4 || fmt == 8, "format must be 2, 3 (ternary), 4 or 8");
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), D = x.size(3);
  const int bits = code_bits(fmt);
  const Packed P = packed(codes, scale, zero, int(fmt), bits, bounds, D);
  TORCH_CHECK(codes.size(0) == B && codes.size(1) == H && codes.size(2) == n, "codes: [B, H, n, bytes]");
  TORCH_CHECK(scale.size(2) == n, "scale: [B, H, n, groups]");
  TORCH_CHECK(clips.scalar_type() == at::kFloat && clips.numel() == P.ng && clips.is_contiguous(), "clips: float32 [groups]");
  TORCH_CHECK(P.zk != Z_NONE || fmt != 3, "symmetric groups need 2^bits levels");
  const float* xp = x.data_ptr<float>();
  const float* cl = clips.data_ptr<float>();
  const float qmax = fmt == 3 ? 2.f : float((1 << bits) - 1), half = float(1 << (bits - 1));
  const float zlim = P.zk == Z_INT8 ? 127.f : 32767.f;
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::Half* sp = scale.data_ptr<at::Half>();
  void* zp = zero.has_value() ? zero->data_ptr() : nullptr;
  const int64_t rows = B * H * n, nb = codes.size(3);
  at::parallel_for(0, rows, rows < 4096 ? rows : 256, [&](int64_t begin, int64_t end) {
    std::vector<int> qv(size_t(nb) * 8, 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * n), h = (row / n) % H, t = row % n;
      const float* xr = xp + row * D;
      uint8_t* cr = cp + b * P.cb + h * P.ch + t * P.ct;
      const int64_t so = b * P.sb + h * P.sh + t * P.st;
      for (int g = 0; g < P.ng; ++g) {
        const int a = P.gb[g], e = P.gb[g + 1];
        float mx = xr[a], mn = xr[a];
        bool nan = std::isnan(xr[a]);
        for (int i = a + 1; i < e; ++i) {
          mx = std::max(mx, xr[i]);
          mn = std::min(mn, xr[i]);
          nan |= std::isnan(xr[i]);
        }
        mx *= cl[g];
        mn *= cl[g];
        float s, z;
        at::Half sh;
        bool bad;
        if (P.zk == Z_NONE) {  // symmetric: the value of largest magnitude maps to code 0
          // a NaN in the group makes it NaN, as the reference's (the max / min above skip NaN)
          const float mm = nan ? std::numeric_limits<float>::quiet_NaN() : std::fabs(mx) > std::fabs(mn) ? mx : mn;
          const float mag = std::max(std::fabs(mm) / half, 1e-8f);
          bad = nan || !std::isfinite(mag);
          const at::Half ms = round_up_half(bad ? std::numeric_limits<float>::quiet_NaN() : mag);
          sh = mm > 0.f ? at::Half(uint16_t(ms.x ^ 0x8000), at::Half::from_bits()) : ms;
          s = float(sh);
          z = half;
        } else {
          s = (mx - mn) / qmax;
          if (s <= 0.f) s = std::max(std::fabs(mn), 1e-8f) / qmax;  // min == max: reconstruct the constant
          s = std::max(s, std::fabs(mn) / zlim);  // the zero point fits its storage
          bad = nan || !std::isfinite(s);  // NaN or inf in the group: it reads back NaN (as the reference)
          if (bad) s = std::numeric_limits<float>::quiet_NaN();
          sh = round_up_half(s);
          s = float(sh);
          z = bad ? 0.f : std::min(std::max(-std::nearbyint(mn / s), -zlim - 1.f), zlim);
        }
        for (int i = a; i < e; ++i)
          qv[i] = bad ? 0 : int(std::min(std::max(std::nearbyint(xr[i] / s) + z, 0.f), qmax));
        sp[so + g] = sh;
        if (P.zk == Z_INT16) static_cast<int16_t*>(zp)[so + g] = int16_t(z);
        else if (P.zk == Z_INT8) static_cast<int8_t*>(zp)[so + g] = int8_t(z);
      }
      if (fmt == 3) {
        for (int64_t j = 0; j < nb; ++j) {
          int byte = 0;
          for (int k = 4; k >= 0; --k) byte = byte * 3 + (j * 5 + k < D ? qv[j * 5 + k] : 0);
          cr[j] = uint8_t(byte);
        }
      } else {
        const int per = 8 / bits;
        for (int64_t j = 0; j < nb; ++j) {
          int byte = 0;
          for (int k = 0; k < per; ++k)
            if (j * per + k < D) byte |= qv[j * per + k] << (bits * k);
          cr[j] = uint8_t(byte);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(vlmkv_cpu, m) {
  m.def("decode_partial(Tensor q, Tensor kc, Tensor ks, Tensor? kz, Tensor vc, Tensor vs, Tensor? vz, Tensor? ok, "
        "float scaling, int kfmt, Tensor kbounds, int kgroup, bool kchannel, int vfmt, Tensor vbounds, Tensor? klv, "
        "Tensor? vlv) -> (Tensor, Tensor, Tensor)");
  m.def("decode_layer(Tensor q, Tensor[] kv, Tensor[] scales, Tensor?[] zeros, Tensor?[] oks, int[] fmts, "
        "Tensor[] bounds, Tensor?[] levels, int[] kgroups, float scaling) -> (Tensor, Tensor, Tensor)");
  m.def("quantize_pack_(Tensor x, Tensor(a!) codes, Tensor(b!) scale, Tensor(c!)? zero, int fmt, Tensor bounds, "
        "Tensor clips) -> ()");
}

TORCH_LIBRARY_IMPL(vlmkv_cpu, CPU, m) {
  m.impl("decode_partial", decode_partial);
  m.impl("decode_layer", decode_layer);
  m.impl("quantize_pack_", quantize_pack_);
}
