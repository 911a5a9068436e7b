// KIVI (`--kv-cache-dtype kivi4|kivi2`, kvflow/attention/kivi.py) on the CPU: paged attention that
// reads the 4- or 2-bit blocks in place, and the store that quantises completed groups and writes the
// residual ring. Not a standalone header: cpu_model.cpp includes it after cpu_attention.h, whose
// planning, online softmax and dot-product helpers it reuses.
//
// A query row of a chunk [start, n) at position p sees, of its sequence:
//   [0, Q)        quantised blocks: codes (low bits first) with fp16 meta; keys one (scale, zero) per
//                 channel and 32-token group, values one per token and 32-channel group;
//   [Q, start)    the residual ring, position j at ring index j % W (model dtype);
//   [start, p]    the step's own keys and values (dense, causal);
// limited to its last `window` keys where the layer has a sliding window. Q, start, the ring slot
// and the flat index of the chunk's first token come per sequence (the KiviStep's tensors).
//
// Keys: each 32-token group's scale s and zero z per channel fold into the query once per group,
// q·k = Σ_d (q_d s_d) c_d + Σ_d q_d z_d, so a key's codes only need widening (to fp32, in channel
// order, once for all the query heads of its kv head). Values are dequantised as the reference does
// (c * s + z in fp32) sixteen rows at a time into fp32 rows that every query head of the kv head
// weights. No dequantised copy of a sequence's cache is made. With bf16 queries and head_dim a
// multiple of 64, both sides run bf16 dot products on the codes instead (kKiviBf16, below).

constexpr int64_t kKiviGroup = 32;  // tokens per key group, channels per value group (kivi.KIVI_GROUP)

// The step's KIVI bookkeeping, as the tensors kivi_step_tensors (cpu_kernels.py) lists, in order:
// per sequence slots, starts, quantised (Q before the step), query_start (flat index of the chunk's
// first token); per group row group_from_step (bool), group_step_index, group_ring_slot,
// group_ring_index; per group group_block, group_index; per group row group_offset; per ring write
// ring_step_index, ring_slot, ring_index.
constexpr size_t kKiviStepTensors = 14;

inline void check_kivi_step(const std::vector<at::Tensor>& step) {
  TORCH_CHECK(step.size() == kKiviStepTensors, "kivi: the step is ", kKiviStepTensors, " tensors, got ", step.size());
  for (size_t i = 0; i < step.size(); ++i) {
    TORCH_CHECK(step[i].is_contiguous() && step[i].scalar_type() == (i == 4 ? at::kBool : at::kLong),
                "kivi: step tensor ", i, " must be contiguous ", i == 4 ? "bool" : "int64");
  }
}

// One layer's KIVI cache and a step's k, v as raw pointers and sizes.
template <typename T>
struct KiviCache {
  int64_t num_kv_heads, block_size, head_dim, row_bytes, meta_width, window, bits;
  uint8_t* codes[2];
  c10::Half* meta[2];
  T* ring[2];
  const T* step_kv[2];  // the step's keys and values [tokens, KVH, D]

  KiviCache(const at::Tensor& codes_, const at::Tensor& meta_, const at::Tensor& ring_, const at::Tensor& k,
            const at::Tensor& v, int64_t bits_)
      : num_kv_heads(codes_.size(2)), block_size(codes_.size(3)), head_dim(ring_.size(4)), row_bytes(codes_.size(4)),
        meta_width(meta_.size(4)), window(ring_.size(3)), bits(bits_) {
    TORCH_CHECK(bits == 4 || bits == 2, "kivi: 4 or 2 bits, not ", bits);
    TORCH_CHECK(codes_.dim() == 5 && meta_.dim() == 5 && ring_.dim() == 5 && codes_.scalar_type() == at::kByte &&
                    meta_.scalar_type() == at::kHalf && codes_.is_contiguous() && meta_.is_contiguous() &&
                    ring_.is_contiguous(),
                "kivi: contiguous codes uint8 [2, blocks, KVH, bs, D*bits/8], meta fp16 [2, blocks, KVH, bs, D/16] and "
                "ring [2, slots, KVH, W, D]");
    TORCH_CHECK(head_dim % kKiviGroup == 0 && block_size % kKiviGroup == 0 && row_bytes * 8 == head_dim * bits &&
                    meta_width * 16 == head_dim && meta_.size(1) == codes_.size(1) && ring_.size(2) == num_kv_heads,
                "kivi: head_dim and block_size multiples of 32, and codes, meta and ring of one layout");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.dim() == 3 && k.sizes() == v.sizes() &&
                    k.size(1) == num_kv_heads && k.size(2) == head_dim && k.scalar_type() == ring_.scalar_type(),
                "kivi: the step's k, v [T, KVH, D] contiguous, of the ring's dtype");
    for (int h = 0; h < 2; ++h) {
      codes[h] = codes_.data_ptr<uint8_t>() + h * codes_.stride(0);
      meta[h] = meta_.data_ptr<c10::Half>() + h * meta_.stride(0);
      ring[h] = ring_.data_ptr<T>() + h * ring_.stride(0);
    }
    step_kv[0] = k.data_ptr<T>();
    step_kv[1] = v.data_ptr<T>();
  }

  int64_t row(int64_t block, int64_t g, int64_t offset) const { return (block * num_kv_heads + g) * block_size + offset; }
  // Block `block`'s packed codes of kv head g at token offset o.
  const uint8_t* code_row(int h, int64_t block, int64_t g, int64_t o) const { return codes[h] + row(block, g, o) * row_bytes; }
  // Keys: the meta of key group gi of the block ([2 (scale, zero)][D]); values: token o's ([2][D / 32]).
  const c10::Half* key_meta(int64_t block, int64_t g, int64_t gi) const {
    return meta[0] + row(block, g, 0) * meta_width + gi * 2 * head_dim;
  }
  const c10::Half* value_meta(int64_t block, int64_t g, int64_t o) const { return meta[1] + row(block, g, o) * meta_width; }
  T* ring_row(int h, int64_t slot, int64_t g, int64_t index) const {
    return ring[h] + ((slot * num_kv_heads + g) * window + index) * head_dim;
  }
  const T* step_row(int h, int64_t token, int64_t g) const { return step_kv[h] + (token * num_kv_heads + g) * head_dim; }
};

// A packed row of D codes -> D uint8 codes in channel order (kivi4: channel 2i in the low nibble of
// byte i; kivi2: channel 4i + j in bits 2j..2j+1 of byte i).
inline void unpack_kivi_row(const uint8_t* row, int64_t bits, int64_t D, uint8_t* out) {
  const int64_t nbytes = D * bits / 8;
  int64_t i = 0;
  if (bits == 4) {
#if defined(__SSE2__)  // every x86-64; elsewhere (arm64) the byte loop below does the whole row
    const __m128i low = _mm_set1_epi8(0x0f);
    for (; i + 16 <= nbytes; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
      const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
    }
#endif
    for (; i < nbytes; ++i) {
      out[2 * i] = row[i] & 15;
      out[2 * i + 1] = row[i] >> 4;
    }
  } else {
#if defined(__SSE2__)
    const __m128i low = _mm_set1_epi8(0x03);
    for (; i + 16 <= nbytes; i += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
      const __m128i c0 = _mm_and_si128(b, low), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), low);
      const __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), low), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), low);
      const __m128i a_lo = _mm_unpacklo_epi8(c0, c1), a_hi = _mm_unpackhi_epi8(c0, c1);
      const __m128i b_lo = _mm_unpacklo_epi8(c2, c3), b_hi = _mm_unpackhi_epi8(c2, c3);
      uint8_t* o = out + 4 * i;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi16(a_lo, b_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi16(a_lo, b_lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm_unpacklo_epi16(a_hi, b_hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), _mm_unpackhi_epi16(a_hi, b_hi));
    }
#endif
    for (; i < nbytes; ++i)
      for (int j = 0; j < 4; ++j) out[4 * i + j] = (row[i] >> (2 * j)) & 3;
  }
}

// One step's sequence facts for a query token's sequence.
struct KiviSeq {
  const int64_t* table;
  int64_t quantised, start, slot, query_start;
};

struct KiviStepView {
  const int64_t *slots, *starts, *quantised, *query_start;
  explicit KiviStepView(const std::vector<at::Tensor>& step)
      : slots(step[0].data_ptr<int64_t>()), starts(step[1].data_ptr<int64_t>()),
        quantised(step[2].data_ptr<int64_t>()), query_start(step[3].data_ptr<int64_t>()) {}
  KiviSeq seq(const int64_t* tables, int64_t stride, int64_t s) const {
    return {tables + s * stride, quantised[s], starts[s], slots[s], query_start[s]};
  }
};

// Key or value row j (>= Q) of a sequence: from the ring below the chunk's start, else the step's own.
template <typename T>
inline const T* kivi_dense_row(const KiviCache<T>& c, const KiviSeq& s, int h, int64_t j, int64_t g) {
  return j < s.start ? c.ring_row(h, s.slot, g, j % c.window) : c.step_row(h, s.query_start + j - s.start, g);
}

// Key or value row j of a sequence as fp32 (positions below Q dequantised: code * scale + zero).
// `codes` is D bytes of scratch. The reference the vectorised kernel is tested against, and the
// kernel for head sizes it does not cover.
template <typename T>
inline void kivi_row_to_float(const KiviCache<T>& c, const KiviSeq& s, int h, int64_t j, int64_t g, uint8_t* codes,
                              float* dst) {
  const int64_t D = c.head_dim;
  if (j >= s.quantised) {
    to_float(kivi_dense_row(c, s, h, j, g), dst, D);
    return;
  }
  const int64_t block = s.table[j / c.block_size], o = j % c.block_size;
  unpack_kivi_row(c.code_row(h, block, g, o), c.bits, D, codes);
  if (h == 0) {
    const c10::Half* m = c.key_meta(block, g, o / kKiviGroup);
    for (int64_t d = 0; d < D; ++d)
      dst[d] = static_cast<float>(codes[d]) * static_cast<float>(m[d]) + static_cast<float>(m[D + d]);
  } else {
    const c10::Half* m = c.value_meta(block, g, o);
    const int64_t groups = D / kKiviGroup;
    for (int64_t d = 0; d < D; ++d)
      dst[d] = static_cast<float>(codes[d]) * static_cast<float>(m[d / kKiviGroup]) +
               static_cast<float>(m[groups + d / kKiviGroup]);
  }
}

// The generic kernel: a (token, kv head) per item, every visible row widened to fp32, two passes.
template <typename T>
void kivi_attention_generic(const at::Tensor& q_, const KiviCache<T>& c, const KiviStepView& sv,
                            const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& positions,
                            float scale, int64_t window, at::Tensor& out_) {
  const int64_t tokens = q_.size(0), H = q_.size(1), D = c.head_dim, KVH = c.num_kv_heads, group = H / KVH;
  const T* q = q_.data_ptr<T>();
  T* out = out_.data_ptr<T>();
  const int64_t* seq = seq_index.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t stride = block_tables.stride(0);
  at::parallel_for(0, tokens * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), row(D), scores, denom(group);
    std::vector<uint8_t> codes(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / KVH, g = item % KVH, last = pos[t], first = first_key(last, window);
      const int64_t n = last - first + 1;
      const KiviSeq s = sv.seq(tables, stride, seq[t]);
      to_float(q + (t * H + g * group) * D, qf.data(), group * D);
      scores.resize(group * n);
      for (int64_t j = first; j <= last; ++j) {
        kivi_row_to_float(c, s, 0, j, g, codes.data(), row.data());
        for (int64_t h = 0; h < group; ++h) scores[h * n + j - first] = dot(qf.data() + h * D, row.data(), D) * scale;
      }
      for (int64_t h = 0; h < group; ++h) denom[h] = exp_shifted(scores.data() + h * n, n);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = first; j <= last; ++j) {
        kivi_row_to_float(c, s, 1, j, g, codes.data(), row.data());
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * n + j - first];
          float* a = acc.data() + h * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) a[i] += p * row[i];
        }
      }
      for (int64_t h = 0; h < group; ++h)
        store_normalised(acc.data() + h * D, denom[h], out + (t * H + g * group + h) * D, D);
    }
  });
}

#if defined(__AVX512F__)
inline __m512 codes16_to_ps(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

// A packed row of 16 * C codes -> C vectors of sixteen fp32 codes in channel order, in registers.
template <int C>
inline void kivi_row_ps(const uint8_t* row, int64_t bits, __m512* out) {
  if (bits == 4) {  // 16 bytes: 32 channels (C is even)
    const __m128i low = _mm_set1_epi8(0x0f);
    for (int i = 0; i < C / 2; ++i) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * i));
      const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      out[2 * i] = codes16_to_ps(_mm_unpacklo_epi8(lo, hi));
      out[2 * i + 1] = codes16_to_ps(_mm_unpackhi_epi8(lo, hi));
    }
    return;
  }
  const __m128i low = _mm_set1_epi8(0x03);  // 16 bytes: 64 channels; a 32-channel row is 8 bytes
  for (int i = 0; i < (C + 3) / 4; ++i) {
    const __m128i b = C >= 4 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * i))
                             : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row));
    const __m128i c0 = _mm_and_si128(b, low), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), low);
    const __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), low), c3 = _mm_and_si128(_mm_srli_epi16(b, 6), low);
    const __m128i a_lo = _mm_unpacklo_epi8(c0, c1), b_lo = _mm_unpacklo_epi8(c2, c3);
    out[4 * i] = codes16_to_ps(_mm_unpacklo_epi16(a_lo, b_lo));
    out[4 * i + 1] = codes16_to_ps(_mm_unpackhi_epi16(a_lo, b_lo));
    if constexpr (C >= 4) {
      const __m128i a_hi = _mm_unpackhi_epi8(c0, c1), b_hi = _mm_unpackhi_epi8(c2, c3);
      out[4 * i + 2] = codes16_to_ps(_mm_unpacklo_epi16(a_hi, b_hi));
      out[4 * i + 3] = codes16_to_ps(_mm_unpackhi_epi16(a_hi, b_hi));
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 queries with head_dim a multiple of 64 take bf16 dot products on the codes (`vdpbf16ps`, as a
// bf16 cache does): 2- and 4-bit codes are exact in bf16, so a key row costs a table lookup instead of
// a widening to fp32, and a query head half the multiply-adds. The price is q·s, the query with the
// group's key scales folded in, rounded to bf16 (a relative 2^-9 per channel, as a bf16 cache's keys
// are rounded; Σ q·z stays fp32). The codes come out of the lookup in "kivi order", not channel order
// (the query is permuted to match, once per group): per 64 channels, kivi4 [0, 2, .., 62 | 1, 3, .., 63],
// kivi2 [0, 4, .., 60 | 1, 5, .., 61] and [2, 6, .., 62 | 3, 7, .., 63].
template <typename T, int C>
constexpr bool kKiviBf16 = std::is_same_v<T, c10::BFloat16> && C % 4 == 0;

// bf16(i & (2^bits - 1)) for i < 32: `vpermw` indexes with a word's low 5 bits, so a word holding a
// code in its low bits and other codes' bits above them still finds its code's bf16.
struct KiviBf16Tables {
  alignas(64) uint16_t t[2][32];  // [kivi2, kivi4]
  KiviBf16Tables() {
    for (int i = 0; i < 32; ++i) {
      t[0][i] = c10::BFloat16(static_cast<float>(i & 3)).x;
      t[1][i] = c10::BFloat16(static_cast<float>(i & 15)).x;
    }
  }
};
inline __m512i kivi_bf16_table(int64_t bits) {
  static const KiviBf16Tables tables;
  return _mm512_load_si512(tables.t[bits == 4]);
}

// 64 channels of a packed row (32 bytes of kivi4, 16 of kivi2) -> two vectors of 32 bf16 codes in kivi order.
template <int Bits>
inline void kivi_codes64_bf16(const uint8_t* p, __m512i table, __m512i* out) {
  if constexpr (Bits == 4) {  // a word per byte: low nibble (channel 2i) as it is, high one shifted down
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    out[0] = _mm512_permutexvar_epi16(w, table);
    out[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
  } else {  // the 16 bytes in both halves, shifted by 0 | 2 and 4 | 6 bits
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512i s01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    out[0] = _mm512_permutexvar_epi16(_mm512_srlv_epi16(w, s01), table);
    out[1] = _mm512_permutexvar_epi16(_mm512_srlv_epi16(w, _mm512_add_epi16(s01, _mm512_set1_epi16(4))), table);
  }
}

// 64 fp32 channels v[0..3] in channel order -> two vectors of 32 bf16 in kivi order.
template <int Bits>
inline void kivi_order_bf16(const __m512* v, __m512i* out) {
  if constexpr (Bits == 4) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    out[0] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(v[2], even, v[3]), _mm512_permutex2var_ps(v[0], even, v[1]));
    out[1] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(v[2], odd, v[3]), _mm512_permutex2var_ps(v[0], odd, v[1]));
  } else {
    // Per 32 channels [4i (i < 8) | 4i + 1] (and + 2, + 3), then the two halves' lows and highs joined.
    const __m512i by4 = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i lows = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i highs = _mm512_add_epi32(lows, _mm512_set1_epi32(8));
    for (int k = 0; k < 2; ++k) {
      const __m512i idx = _mm512_add_epi32(by4, _mm512_set1_epi32(2 * k));
      const __m512 t0 = _mm512_permutex2var_ps(v[0], idx, v[1]), t1 = _mm512_permutex2var_ps(v[2], idx, v[3]);
      out[k] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(t0, highs, t1), _mm512_permutex2var_ps(t0, lows, t1));
    }
  }
}
#else
template <typename T, int C>
constexpr bool kKiviBf16 = false;
#endif

// One thread's scratch beyond the online softmax: the group-folded queries q·s [rows, D] (fp32 in
// channel order, or bf16 in kivi order) and Σ q·z [rows] and sixteen key rows (fp32 codes, bf16 codes
// in kivi order, or dense rows of T).
struct KiviScratch {
  std::vector<float> qs, qz, keys, tile_acc;
  KiviScratch(int64_t rows, int64_t D) : qs(rows * D), qz(rows), keys(16 * D), tile_acc(rows * (D + D / 2)) {}
};

// An item's fixed facts (kivi's ItemView).
struct KiviItem {
  const QueryTile& tile;
  const AttentionItem& it;
  KiviSeq seq;
  const int64_t* pos;  // the tile's query positions
  int64_t group, head_rows;
  int64_t query(int64_t r) const { return r / group; }  // row r (of one kv head) -> its query in the tile
};

// Requests block `block`'s codes and meta of kv head g, keys and values (into L2), as prefetch_block
// does for the other formats: a sequence's blocks lie anywhere in the cache.
template <typename T>
inline __attribute__((always_inline)) void kivi_prefetch_block(const KiviCache<T>& c, int64_t block, int64_t g) {
  const int64_t code_bytes = c.block_size * c.row_bytes, meta_bytes = c.block_size * c.meta_width * 2;
  for (int h = 0; h < 2; ++h) {
    const char* cp = reinterpret_cast<const char*>(c.code_row(h, block, g, 0));
    const char* mp = reinterpret_cast<const char*>(c.meta[h] + c.row(block, g, 0) * c.meta_width);
    for (int64_t off = 0; off < code_bytes; off += 64) __builtin_prefetch(cp + off, 0, 2);
    for (int64_t off = 0; off < meta_bytes; off += 64) __builtin_prefetch(mp + off, 0, 2);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Scores of keys [lo, hi) of one key group (from offset o of `block`) for the rows whose bf16
// group-folded queries (kivi order) and Σ q·z are in k: sixteen keys at a time, their codes looked up
// as bf16 once for all rows, then dot products as for a bf16 cache.
template <typename T, int C>
void kivi_group_scores_bf16(const KiviCache<T>& c, const KiviItem& x, const uint8_t* codes, int64_t lo, int64_t hi,
                            int64_t a, __m512 scale_v, OnlineSoftmax& s, KiviScratch& k) {
  constexpr int64_t D = 16 * C;
  const __m512i table = kivi_bf16_table(c.bits);
  auto* rows = reinterpret_cast<c10::BFloat16*>(k.keys.data());  // sixteen rows of D bf16 codes
  for (int64_t c0 = lo; c0 < hi; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, hi - c0);
    const uint8_t* src = codes + (c0 - lo) * c.row_bytes;
    for (int64_t j = 0; j < n; ++j) {
      for (int i = 0; i < C / 4; ++i) {
        __m512i v[2];
        if (c.bits == 4) kivi_codes64_bf16<4>(src + j * c.row_bytes + 32 * i, table, v);
        else kivi_codes64_bf16<2>(src + j * c.row_bytes + 16 * i, table, v);
        _mm512_storeu_si512(rows + j * D + 64 * i, v[0]);
        _mm512_storeu_si512(rows + j * D + 64 * i + 32, v[1]);
      }
    }
    for (int64_t r = 0; r < x.head_rows; ++r) {
      const int mm = static_cast<int>(std::min<int64_t>(n, x.pos[x.query(r)] + 1 - c0));
      if (mm <= 0) continue;
      __m512 dots[16];
      key_dots16<c10::BFloat16, c10::BFloat16, C>(reinterpret_cast<const c10::BFloat16*>(k.qs.data() + r * D), rows,
                                                  mm, dots);
      const __m512 sc = _mm512_mul_ps(_mm512_add_ps(sum_lanes16(dots), _mm512_set1_ps(k.qz[r])), scale_v);
      _mm512_mask_storeu_ps(s.scores + r * kKeyTile + (c0 - a), static_cast<__mmask16>((1u << mm) - 1u), sc);
    }
  }
}
#endif

// Scores of key tile [a, e) for kv head g into s.scores (row r = i * group + h, column j - a); keys past
// a query's own position are skipped. The tile lies in one part: quantised (below Q) or dense.
template <typename T, int C>
void kivi_tile_scores(const KiviCache<T>& c, const KiviItem& x, const T* q, int64_t H, int64_t g, int64_t a,
                      int64_t e, float scale, OnlineSoftmax& s, KiviScratch& k) {
  constexpr int64_t D = 16 * C;
  const __m512 scale_v = _mm512_set1_ps(scale);
  auto q_row = [&](int64_t r) { return q + ((x.tile.t0 + x.query(r)) * H + g * x.group + r % x.group) * D; };
  if (a < x.seq.quantised) {
    for (int64_t g0 = a / kKiviGroup * kKiviGroup; g0 < e; g0 += kKiviGroup) {
      const int64_t lo = std::max(a, g0), hi = std::min(e, g0 + kKiviGroup);
      const int64_t block = x.seq.table[g0 / c.block_size], o0 = g0 % c.block_size;
      const int64_t ahead = g0 / c.block_size + kPrefetchBlocks;
      if (o0 == 0 && ahead * c.block_size < x.seq.quantised) kivi_prefetch_block(c, x.seq.table[ahead], g);
      const c10::Half* m = c.key_meta(block, g, o0 / kKiviGroup);
      __m512 sv[C], zv[C];
      for (int i = 0; i < C; ++i) {
        sv[i] = load16(m + 16 * i);
        zv[i] = load16(m + D + 16 * i);
      }
      for (int64_t r = 0; r < x.head_rows; ++r) {  // the queries with the group's scales folded in
        if (x.pos[x.query(r)] < lo) continue;
        const T* qr = q_row(r);
        __m512 z = _mm512_setzero_ps(), qs[C];
        for (int i = 0; i < C; ++i) {
          const __m512 qv = load16(qr + 16 * i);
          qs[i] = _mm512_mul_ps(qv, sv[i]);
          z = _mm512_fmadd_ps(qv, zv[i], z);
        }
        k.qz[r] = _mm512_reduce_add_ps(z);
        if constexpr (kKiviBf16<T, C>) {
          __m512i qb[C / 2];
          for (int i = 0; i < C / 4; ++i) {
            if (c.bits == 4) kivi_order_bf16<4>(qs + 4 * i, qb + 2 * i);
            else kivi_order_bf16<2>(qs + 4 * i, qb + 2 * i);
          }
          for (int i = 0; i < C / 2; ++i) _mm512_storeu_si512(k.qs.data() + r * D + 16 * i, qb[i]);
        } else {
          for (int i = 0; i < C; ++i) _mm512_storeu_ps(k.qs.data() + r * D + 16 * i, qs[i]);
        }
      }
      if constexpr (kKiviBf16<T, C>) {
        kivi_group_scores_bf16<T, C>(c, x, c.code_row(0, block, g, o0 + (lo - g0)), lo, hi, a, scale_v, s, k);
        continue;
      }
      for (int64_t c0 = lo; c0 < hi; c0 += 16) {
        const int64_t n = std::min<int64_t>(16, hi - c0);
        const uint8_t* rows = c.code_row(0, block, g, o0 + (c0 - g0));
        for (int64_t j = 0; j < n; ++j) {  // the keys' codes, in channel order, widened to fp32
          __m512 v[C];
          kivi_row_ps<C>(rows + j * c.row_bytes, c.bits, v);
          for (int i = 0; i < C; ++i) _mm512_storeu_ps(k.keys.data() + j * D + 16 * i, v[i]);
        }
        for (int64_t r = 0; r < x.head_rows; ++r) {
          const int mm = static_cast<int>(std::min<int64_t>(n, x.pos[x.query(r)] + 1 - c0));
          if (mm <= 0) continue;
          __m512 dots[16];
          key_dots16<float, float, C>(k.qs.data() + r * D, k.keys.data(), mm, dots);
          const __m512 sc = _mm512_mul_ps(_mm512_add_ps(sum_lanes16(dots), _mm512_set1_ps(k.qz[r])), scale_v);
          _mm512_mask_storeu_ps(s.scores + r * kKeyTile + (c0 - a), static_cast<__mmask16>((1u << mm) - 1u), sc);
        }
      }
    }
    return;
  }
  T* rows = reinterpret_cast<T*>(k.keys.data());  // sixteen dense rows of T, made contiguous
  for (int64_t c0 = a; c0 < e; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, e - c0);
    for (int64_t j = 0; j < n; ++j) std::copy_n(kivi_dense_row(c, x.seq, 0, c0 + j, g), D, rows + j * D);
    for (int64_t r = 0; r < x.head_rows; ++r) {
      const int mm = static_cast<int>(std::min<int64_t>(n, x.pos[x.query(r)] + 1 - c0));
      if (mm <= 0) continue;
      __m512 dots[16];
      key_dots16<T, T, C>(q_row(r), rows, mm, dots);
      _mm512_mask_storeu_ps(s.scores + r * kKeyTile + (c0 - a), static_cast<__mmask16>((1u << mm) - 1u),
                            _mm512_mul_ps(sum_lanes16(dots), scale_v));
    }
  }
}

// The online-softmax step of key tile [a, e) for kv head g's rows (state rows base + r).
template <int C>
void kivi_tile_softmax(const KiviItem& x, int64_t base, int64_t a, int64_t e, int64_t window, OnlineSoftmax& s) {
  constexpr int64_t D = 16 * C;
  for (int64_t r = 0; r < x.head_rows; ++r) {
    const int64_t p = x.pos[x.query(r)];
    const int64_t from = std::max(a, first_key(p, window)), to = std::min(e, p + 1);
    if (from >= to) continue;
    float* w = s.scores + r * kKeyTile + (from - a);
    const float mx = max_of(w, to - from);
    const int64_t sr = base + r;
    if (mx > s.m[sr]) {
      if (s.m[sr] != -std::numeric_limits<float>::infinity()) {
        const float alpha = exp_scalar(s.m[sr] - mx);
        s.l[sr] *= alpha;
        float* acc = s.acc + sr * D;
        for (int i = 0; i < C; ++i)
          _mm512_storeu_ps(acc + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * i), _mm512_set1_ps(alpha)));
      }
      s.m[sr] = mx;
    }
    s.l[sr] += exp_shifted_by(w, to - from, s.m[sr]);
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Value codes of tokens t, t + 1 (rows ra, rb) for 64 channels -> four vectors of bf16 pairs
// (token t's code, token t + 1's) in pair order: a dword lane per channel, out[0], out[1] the first 32
// channels' (one value group), out[2], out[3] the next 32's; kivi_pair_channel says which channel.
template <int Bits>
inline void kivi_pair_codes64(const uint8_t* ra, const uint8_t* rb, __m512i table, __m512i* out) {
  if constexpr (Bits == 4) {  // bytes interleaved so that each half of the result is one group's
    const __m256i pa = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra)), 0xd8);
    const __m256i pb = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb)), 0xd8);
    const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(pa, pb));
    const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(pa, pb));
    out[0] = _mm512_permutexvar_epi16(w0, table);
    out[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w0, 4), table);
    out[2] = _mm512_permutexvar_epi16(w1, table);
    out[3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w1, 4), table);
  } else {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rb));
    const __m512i s01 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const __m512i s23 = _mm512_add_epi16(s01, _mm512_set1_epi16(4));
    for (int h = 0; h < 2; ++h) {
      const __m128i ab = h == 0 ? _mm_unpacklo_epi8(a, b) : _mm_unpackhi_epi8(a, b);
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(ab));
      out[2 * h] = _mm512_permutexvar_epi16(_mm512_srlv_epi16(w, s01), table);
      out[2 * h + 1] = _mm512_permutexvar_epi16(_mm512_srlv_epi16(w, s23), table);
    }
  }
}

// The channel (of 64) of lane l (< 64) of kivi_pair_codes64's vectors.
inline int kivi_pair_channel(int64_t bits, int l) {
  const int v = l / 16, i = l % 16;
  if (bits == 4) return 32 * (v / 2) + 2 * i + v % 2;
  return 32 * (v / 2) + 4 * (i % 8) + 2 * (v % 2) + i / 8;
}

// kivi_tile_values for a quantised tile with bf16 queries (head_dim a multiple of 64): out = Σ_t p_t
// (c_t s_t + z_t) per value group is computed as Σ_t (p_t s_t) c_t + Σ_t p_t z_t, the first with bf16
// dot products over pairs of tokens (`vdpbf16ps`: codes exact, the weights p_t s_t rounded to bf16, as
// flash attention rounds its P for P·V), the second in fp32. Per query head and key that is half the
// multiply-adds of fp32 rows, and no row is dequantised. Sixteen tokens at a time (aligned: they lie
// in one block), those outside a row's keys weighted 0; each row's sums stay in pair order until the
// tile's end.
template <typename T, int C>
void kivi_tile_values_bf16(const KiviCache<T>& c, const KiviItem& x, int64_t g, int64_t base, int64_t a, int64_t e,
                           int64_t window, OnlineSoftmax& s, KiviScratch& k) {
  constexpr int64_t D = 16 * C, G = D / kKiviGroup;  // G value groups
  const int64_t rows = x.head_rows, mw = c.meta_width;
  const __m512i table = kivi_bf16_table(c.bits);
  float* tacc = k.tile_acc.data();           // [rows, D] in pair order
  float* zacc = tacc + rows * D;             // [rows, G, 16]: Σ p z per group, by token lane
  std::fill_n(tacc, rows * (D + 16 * G), 0.f);
  auto* pairs = reinterpret_cast<__m512i*>(k.keys.data());  // 8 pairs x C vectors (stored unaligned)
  for (int64_t c0 = a / 16 * 16; c0 < e; c0 += 16) {
    const int64_t block = x.seq.table[c0 / c.block_size], o = c0 % c.block_size;
    const uint8_t* codes = c.code_row(1, block, g, o);
    for (int p = 0; p < 8; ++p)
      for (int i = 0; i < C / 4; ++i) {
        __m512i v[4];
        const uint8_t* ra = codes + 2 * p * c.row_bytes + i * (c.bits == 4 ? 32 : 16);
        if (c.bits == 4) kivi_pair_codes64<4>(ra, ra + c.row_bytes, table, v);
        else kivi_pair_codes64<2>(ra, ra + c.row_bytes, table, v);
        for (int q = 0; q < 4; ++q) _mm512_storeu_si512(pairs + p * C + 4 * i + q, v[q]);
      }
    // The sixteen tokens' scales and zeros per group, token lanes: meta rows are [s_0..s_G-1, z_0..].
    __m512 sc[G], zc[G];
    {
      alignas(64) float m[16 * 2 * G];
      const c10::Half* mp = c.value_meta(block, g, o);
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t u = 0; u < 2 * G; ++u) m[u * 16 + j] = static_cast<float>(mp[j * mw + u]);
      for (int64_t u = 0; u < G; ++u) {
        sc[u] = _mm512_load_ps(m + u * 16);
        zc[u] = _mm512_load_ps(m + (G + u) * 16);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = x.pos[x.query(r)];
      const int64_t from = std::max({a, c0, first_key(pos, window)}), to = std::min({e, c0 + 16, pos + 1});
      if (from >= to) continue;
      const __mmask16 mask = static_cast<__mmask16>(((1u << (to - c0)) - 1u) & ~((1u << (from - c0)) - 1u));
      const __m512 pv = _mm512_maskz_loadu_ps(mask, s.scores + r * kKeyTile + (c0 - a));
      alignas(64) uint32_t w[G * 8];  // per group, 8 bf16 pairs (p_t s_t, p_t+1 s_t+1)
      for (int64_t u = 0; u < G; u += 2) {
        const __m512 w0 = _mm512_maskz_mul_ps(mask, pv, sc[u]), w1 = _mm512_maskz_mul_ps(mask, pv, sc[u + 1]);
        _mm512_store_si512(w + u * 8, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
        float* z = zacc + (r * G + u) * 16;
        _mm512_storeu_ps(z, _mm512_mask3_fmadd_ps(pv, zc[u], _mm512_loadu_ps(z), mask));
        _mm512_storeu_ps(z + 16, _mm512_mask3_fmadd_ps(pv, zc[u + 1], _mm512_loadu_ps(z + 16), mask));
      }
      __m512 acc[C];
      for (int i = 0; i < C; ++i) acc[i] = _mm512_loadu_ps(tacc + r * D + 16 * i);
      for (int p = (from - c0) / 2; p <= (to - c0 - 1) / 2; ++p)
        for (int i = 0; i < C; ++i)  // vector i holds value group i / 2 (of 64 channels i / 4)
          acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(pairs + p * C + i),
                                    (__m512bh)_mm512_set1_epi32(static_cast<int>(w[(i / 2) * 8 + p])));
      for (int i = 0; i < C; ++i) _mm512_storeu_ps(tacc + r * D + 16 * i, acc[i]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // back to channel order, with the zeros' sums, into the row's sum
    float* out = s.acc + (base + r) * D;
    for (int64_t u = 0; u < G; ++u) {
      const float zs = _mm512_reduce_add_ps(_mm512_loadu_ps(zacc + (r * G + u) * 16));
      for (int64_t d = 0; d < kKiviGroup; ++d) out[u * kKiviGroup + d] += zs;
    }
    for (int64_t l = 0; l < D; ++l) out[l / 64 * 64 + kivi_pair_channel(c.bits, l % 64)] += tacc[r * D + l];
  }
}
#endif

// The weighted values of key tile [a, e) added to kv head g's rows: sixteen value rows at a time as
// fp32 (quantised ones dequantised, c * s + z), shared by every row.
template <typename T, int C>
void kivi_tile_values(const KiviCache<T>& c, const KiviItem& x, int64_t g, int64_t base, int64_t a, int64_t e,
                      int64_t window, OnlineSoftmax& s, KiviScratch& k) {
  constexpr int64_t D = 16 * C;
  const bool quantised = a < x.seq.quantised;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (kKiviBf16<T, C>) {
    if (quantised) return kivi_tile_values_bf16<T, C>(c, x, g, base, a, e, window, s, k);
  }
#endif
  const int64_t* table = x.seq.table + a / c.block_size;  // the block of key c0 + j, at offset o
  int64_t o = a % c.block_size;
  for (int64_t c0 = a; c0 < e; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, e - c0);
    for (int64_t j = 0; j < n; ++j, ++o) {
      if (o == c.block_size) {
        o = 0;
        ++table;
      }
      float* dst = s.wide + j * D;
      if (quantised) {
        __m512 code[C];
        kivi_row_ps<C>(c.code_row(1, *table, g, o), c.bits, code);
        // The row's meta: D / 32 scales, then D / 32 zeros (at most 8 halves).
        alignas(16) float meta[8];
        const c10::Half* m = c.value_meta(*table, g, o);
        if constexpr (C == 8) {
          _mm256_store_ps(meta, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m))));
        } else if constexpr (C == 4) {
          _mm_store_ps(meta, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))));
        } else {
          for (int i = 0; i < C; ++i) meta[i] = static_cast<float>(m[i]);
        }
        for (int i = 0; i < C; ++i)
          _mm512_storeu_ps(dst + 16 * i, _mm512_fmadd_ps(code[i], _mm512_set1_ps(meta[i / 2]),
                                                         _mm512_set1_ps(meta[C / 2 + i / 2])));
      } else {
        const T* src = kivi_dense_row(c, x.seq, 1, c0 + j, g);
        for (int i = 0; i < C; ++i) _mm512_storeu_ps(dst + 16 * i, load16(src + 16 * i));
      }
    }
    for (int64_t i = 0; i < x.tile.count; ++i) {
      const int64_t from = std::max(c0, first_key(x.pos[i], window)), to = std::min(c0 + n, x.pos[i] + 1);
      if (from >= to) continue;
      for (int64_t h = 0, r = i * x.group; h < x.group; ++h, ++r)
        add_weighted_values<C>(s.acc + (base + r) * D, s.scores + r * kKeyTile + (c0 - a), s.wide, from - c0, to - c0);
    }
  }
}

// One work item: for each of its kv heads, its keys in tiles of at most kKeyTile that never straddle
// Q or the chunk's start (each tile lies in one part of the context).
template <typename T, int C>
void kivi_attend_item(const KiviCache<T>& c, const KiviItem& x, const T* q, int64_t H, float scale, int64_t window,
                      OnlineSoftmax& s, KiviScratch& k) {
  s.reset((x.it.g1 - x.it.g0) * x.head_rows, 16 * C);
  for (int64_t g = x.it.g0; g < x.it.g1; ++g) {
    const int64_t base = (g - x.it.g0) * x.head_rows;
    for (int64_t a = x.it.k0, e; a < x.it.k1; a = e) {
      e = std::min(x.it.k1, (a / kKeyTile + 1) * kKeyTile);
      if (a < x.seq.quantised) e = std::min(e, x.seq.quantised);
      else if (a < x.seq.start) e = std::min(e, x.seq.start);
      kivi_tile_scores<T, C>(c, x, q, H, g, a, e, scale, s, k);
      kivi_tile_softmax<C>(x, base, a, e, window, s);
      kivi_tile_values<T, C>(c, x, g, base, a, e, window, s, k);
    }
  }
}

// kivi_attention for head_dim 16 * C: the plan (query tiles, decode chunks, merge) of paged_attention_vec.
template <typename T, int C>
void kivi_attention_vec(const at::Tensor& q_, const KiviCache<T>& c, const KiviStepView& sv,
                        const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& positions,
                        float scale, int64_t window, at::Tensor& out_, int64_t forced_chunk) {
  constexpr int64_t D = 16 * C;
  const int64_t tokens = q_.size(0), H = q_.size(1), group = H / c.num_kv_heads;
  const T* q = q_.data_ptr<T>();
  T* out = out_.data_ptr<T>();
  const int64_t* seq = seq_index.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t stride = block_tables.stride(0);
  const AttentionPlan plan = plan_attention(seq, pos, tokens, c.num_kv_heads, window, forced_chunk);
  std::vector<float> part_acc(plan.partials * H * D), part_m(plan.partials * H), part_l(plan.partials * H);
  const int64_t items = static_cast<int64_t>(plan.items.size());
  alignas(64) std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    OnlineSoftmax s(std::max(kQueryTile * group, H), D);
    KiviScratch k(kQueryTile * group, D);
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const AttentionItem& it = plan.items[i];
      const QueryTile& tile = plan.tiles[it.tile];
      const KiviItem x{tile, it, sv.seq(tables, stride, seq[tile.t0]), pos + tile.t0, group, tile.count * group};
      kivi_attend_item<T, C>(c, x, q, H, scale, window, s, k);
      if (it.partial >= 0) {  // a chunk of a decode token (all kv heads: H rows)
        std::copy_n(s.acc, H * D, part_acc.data() + it.partial * H * D);
        std::copy_n(s.m, H, part_m.data() + it.partial * H);
        std::copy_n(s.l, H, part_l.data() + it.partial * H);
        continue;
      }
      for (int64_t g = it.g0; g < it.g1; ++g)
        for (int64_t r = 0; r < x.head_rows; ++r) {
          const int64_t sr = (g - it.g0) * x.head_rows + r;
          store_normalised(s.acc + sr * D, s.l[sr],
                           out + ((tile.t0 + x.query(r)) * H + g * group + r % group) * D, D);
        }
    }
  });
  at::parallel_for(0, static_cast<int64_t>(plan.chunked.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(D);
    for (int64_t i = begin; i < end; ++i) {
      const ChunkedToken& ch = plan.chunked[i];
      merge_chunks(part_acc.data() + ch.first * H * D, part_m.data() + ch.first * H, part_l.data() + ch.first * H,
                   ch.chunks, H, D, sum.data(), out + plan.tiles[ch.tile].t0 * H * D);
    }
  });
}
#endif

// Attention of a step's queries q [T, H, D] (positions: each one's position; seq_index: its
// sequence, an index into the per-sequence step tensors and the block tables) over the KIVI cache
// as it was before the step and the step's own k, v. Returns nothing: writes `out` [T, H, D].
template <typename T>
void kivi_attention(const at::Tensor& q, const KiviCache<T>& c, const std::vector<at::Tensor>& step,
                    const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& positions,
                    float scale, int64_t window, at::Tensor& out, int64_t decode_chunk = 0) {
  check_kivi_step(step);
  TORCH_CHECK(q.is_contiguous() && q.dim() == 3 && q.size(2) == c.head_dim && q.size(1) % c.num_kv_heads == 0 &&
                  block_tables.scalar_type() == at::kLong && seq_index.scalar_type() == at::kLong &&
                  positions.scalar_type() == at::kLong && seq_index.is_contiguous() && positions.is_contiguous() &&
                  block_tables.stride(1) == 1,
              "kivi_attention: contiguous q [T, H, D], int64 block tables, seq_index and positions");
  const KiviStepView sv(step);
#if defined(__AVX512F__)
  const auto vec = [&](auto kernel) {
    kernel(q, c, sv, block_tables, seq_index, positions, scale, window, out, decode_chunk);
  };
  switch (q.size(2)) {
    case 32: return vec(kivi_attention_vec<T, 2>);
    case 64: return vec(kivi_attention_vec<T, 4>);
    case 128: return vec(kivi_attention_vec<T, 8>);
    default: break;
  }
#endif
  kivi_attention_generic<T>(q, c, sv, block_tables, seq_index, positions, scale, window, out);
}

// ----------------------------------------------------------------------------- store
// n values x[0], x[stride], ... quantised as one group (kivi.quantize_asym): scale and zero rounded to
// fp16 first, 1 / scale once in fp32, codes rounded half to even and clamped to [0, levels].
inline void kivi_quantise_group(const float* x, int64_t n, int64_t stride, int64_t levels, uint8_t* codes,
                                int64_t code_stride, c10::Half* scale_out, c10::Half* zero_out) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i * stride]);
    hi = std::max(hi, x[i * stride]);
  }
  const c10::Half scale16((hi - lo) / static_cast<float>(levels)), zero16(lo);
  const float s = static_cast<float>(scale16), z = static_cast<float>(zero16);
  const float inv = s > 0.f ? 1.f / s : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float code = std::nearbyint((x[i * stride] - z) * inv);
    codes[i * code_stride] = static_cast<uint8_t>(std::min(static_cast<float>(levels), std::max(0.f, code)));
  }
  *scale_out = scale16;
  *zero_out = zero16;
}

// D codes in channel order -> the packed row (low bits first).
inline void pack_kivi_row(const uint8_t* codes, int64_t bits, int64_t D, uint8_t* row) {
  const int64_t per_byte = 8 / bits;
  for (int64_t i = 0; i < D / per_byte; ++i) {
    uint8_t b = 0;
    for (int64_t j = 0; j < per_byte; ++j) b |= static_cast<uint8_t>(codes[i * per_byte + j] << (bits * j));
    row[i] = b;
  }
}

// kivi.store_kivi: quantise the step's completed groups into their blocks (rows from the step's k, v
// or from the ring), then write the step's residual tokens to the ring. Runs after attention.
template <typename T>
void kivi_store(const KiviCache<T>& c, const std::vector<at::Tensor>& step) {
  check_kivi_step(step);
  const int64_t D = c.head_dim, KVH = c.num_kv_heads, levels = (1 << c.bits) - 1, G = kKiviGroup;
  const int64_t rows = step[4].numel(), groups = step[8].numel();
  TORCH_CHECK(rows == groups * G && step[5].numel() == rows && step[10].numel() == rows,
              "kivi_store: 32 group rows per group");
  const bool* from_step = step[4].data_ptr<bool>();
  const int64_t *step_index = step[5].data_ptr<int64_t>(), *ring_slot = step[6].data_ptr<int64_t>();
  const int64_t *ring_index = step[7].data_ptr<int64_t>(), *group_block = step[8].data_ptr<int64_t>();
  const int64_t *group_index = step[9].data_ptr<int64_t>(), *offset = step[10].data_ptr<int64_t>();
  at::parallel_for(0, groups * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(G * D);
    std::vector<uint8_t> codes(G * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t gr = item / KVH, g = item % KVH, block = group_block[gr];
      for (int h = 0; h < 2; ++h) {
        for (int64_t t = 0; t < G; ++t) {
          const int64_t r = gr * G + t;
          const T* src = from_step[r] ? c.step_row(h, step_index[r], g) : c.ring_row(h, ring_slot[r], g, ring_index[r]);
          to_float(src, x.data() + t * D, D);
        }
        if (h == 0) {  // per channel over the group's tokens
          c10::Half* m = c.meta[0] + c.row(block, g, 0) * c.meta_width + group_index[gr] * 2 * D;
          for (int64_t d = 0; d < D; ++d)
            kivi_quantise_group(x.data() + d, G, D, levels, codes.data() + d, D, m + d, m + D + d);
        } else {  // per token over groups of channels
          const int64_t cg = D / G;
          for (int64_t t = 0; t < G; ++t) {
            c10::Half* m = c.meta[1] + c.row(block, g, offset[gr * G + t]) * c.meta_width;
            for (int64_t k = 0; k < cg; ++k)
              kivi_quantise_group(x.data() + t * D + k * G, G, 1, levels, codes.data() + t * D + k * G, 1, m + k,
                                  m + cg + k);
          }
        }
        for (int64_t t = 0; t < G; ++t)
          pack_kivi_row(codes.data() + t * D, c.bits, D,
                        c.codes[h] + c.row(block, g, offset[gr * G + t]) * c.row_bytes);
      }
    }
  });
  const int64_t writes = step[11].numel();
  const int64_t *write_index = step[11].data_ptr<int64_t>(), *write_slot = step[12].data_ptr<int64_t>();
  const int64_t* write_ring = step[13].data_ptr<int64_t>();
  at::parallel_for(0, writes * KVH, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t w = item / KVH, g = item % KVH;
      for (int h = 0; h < 2; ++h)
        std::copy_n(c.step_row(h, write_index[w], g), D, c.ring_row(h, write_slot[w], g, write_ring[w]));
    }
  });
}
