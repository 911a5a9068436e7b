// kvflow's paged attention on the CPU. Not a standalone header: cpu_model.cpp includes it inside
// its anonymous namespace, after the standard headers and the numeric helpers it uses (to_float,
// from_float, exp_scalar, exp16, exp_inplace, dot). (kvflow/model/cpu_kernels.py hashes every
// header here into the build's cache key.)

// max(x[0..n)), n >= 1: std::max_element does not vectorise (it must return the first maximum).
inline float max_of(const float* x, int64_t n) {
  int64_t i = 0;
  float r = -std::numeric_limits<float>::infinity();
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(r);
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  r = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// s[j] = exp(s[j] - mx) in place; returns their sum.
inline float exp_shifted_by(float* s, int64_t n, float mx) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] -= mx;
  exp_inplace(s, n);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += s[j];
  return sum;
}

// s[j] = exp(s[j] - max(s)) in place; returns their sum, the softmax's denominator.
inline float exp_shifted(float* s, int64_t n) { return exp_shifted_by(s, n, max_of(s, n)); }

// out = T(a * (1 / denom)): an accumulated attention row normalised by its softmax sum, rounded once.
template <typename T>
inline void store_normalised(float* a, float denom, T* out, int64_t n) {
  const float inv = 1.f / denom;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] *= inv;
  from_float(a, out, n);
}

// The first key a query at position `pos` sees: all keys, or the last `window` of them.
inline int64_t first_key(int64_t pos, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
}

// One paged_attention call's tensors as raw pointers and sizes, shared by both kernels. KV is the
// cache's element type (see kv_quant.py): T (a dense cache); int8_t (codes, with one fp32 scale per
// token and kv head in `key_scales` / `value_scales`, laid out like the codes with width 1); or
// c10::Float8_e4m3fn (codes, with one fp32 scale per kv head: `key_scales[g]`, `value_scales[g]`).
template <typename T, typename KV>
struct PagedAttentionView {
  static constexpr bool kTokenScales = std::is_same_v<KV, int8_t>;
  static constexpr bool kHeadScales = std::is_same_v<KV, c10::Float8_e4m3fn>;
  static constexpr bool kQuantised = kTokenScales || kHeadScales;
  int64_t tokens, num_heads, head_dim, num_kv_heads, block_size, group, table_stride;
  const T* q;
  const KV *keys, *values;
  const float *key_scales = nullptr, *value_scales = nullptr;
  const int64_t *tables, *seq, *pos;
  T* out;

  PagedAttentionView(const at::Tensor& q_, const at::Tensor& kv_cache, const at::Tensor& kv_scales,
                     const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& positions,
                     at::Tensor& out_)
      : tokens(q_.size(0)), num_heads(q_.size(1)), head_dim(q_.size(2)), num_kv_heads(kv_cache.size(2)),
        block_size(kv_cache.size(3)), group(num_heads / num_kv_heads), table_stride(block_tables.stride(0)),
        q(q_.data_ptr<T>()), keys(kv_cache.data_ptr<KV>()), values(keys + kv_cache.stride(0)),
        tables(block_tables.data_ptr<int64_t>()), seq(seq_index.data_ptr<int64_t>()),
        pos(positions.data_ptr<int64_t>()), out(out_.data_ptr<T>()) {
    if constexpr (kTokenScales) {
      TORCH_CHECK(kv_scales.defined() && kv_scales.scalar_type() == at::kFloat && kv_scales.dim() == 5 &&
                      kv_scales.size(4) == 1 && kv_scales.size(1) == kv_cache.size(1) && kv_scales.is_contiguous(),
                  "paged_attention: an int8 KV cache needs its fp32 scales [2, blocks, kv_heads, block_size, 1]");
    }
    if constexpr (kHeadScales) {
      TORCH_CHECK(kv_scales.defined() && kv_scales.scalar_type() == at::kFloat &&
                      kv_scales.numel() == 2 * num_kv_heads && kv_scales.is_contiguous(),
                  "paged_attention: an fp8 KV cache needs its fp32 scales [2, kv_heads, 1]");
    }
    if constexpr (kQuantised) {
      key_scales = kv_scales.data_ptr<float>();
      value_scales = key_scales + kv_scales.stride(0);
    }
  }

  // Rows [j0, ...) of block b of sequence `table` for kv head g: contiguous in the head-major cache.
  const KV* block_rows(const KV* cache_half, const int64_t* table, int64_t b, int64_t g, int64_t j0) const {
    return cache_half + row_index(table, b, g, j0) * head_dim;
  }
  // Their scales (int8), one per row.
  const float* scale_rows(const float* scales_half, const int64_t* table, int64_t b, int64_t g, int64_t j0) const {
    return scales_half + row_index(table, b, g, j0);
  }
  int64_t row_index(const int64_t* table, int64_t b, int64_t g, int64_t j0) const {
    return (table[b] * num_kv_heads + g) * block_size + (j0 - b * block_size);
  }
};

// n rows of D cache elements widened to fp32; quantised codes times their scale (scales[j *
// scale_step]: a scale per row, or with step 0 the kv head's one scale).
template <typename KV>
inline void rows_to_float(const KV* src, const float* scales, int64_t scale_step, float* dst, int64_t n, int64_t D) {
  if constexpr (std::is_same_v<KV, int8_t> || std::is_same_v<KV, c10::Float8_e4m3fn>) {
    for (int64_t j = 0; j < n; ++j) {
      const float sj = scales[j * scale_step];
      for (int64_t i = 0; i < D; ++i) dst[j * D + i] = static_cast<float>(src[j * D + i]) * sj;
    }
  } else {
    to_float(src, dst, n * D);
  }
}

// Shared-prefix attention (kvflow/attention/shared_prefix.py): decodes whose block tables start with
// the same physical blocks read those keys and values once for the whole group. A group is one query
// tile whose rows are every member's query heads, over the shared keys (all visible to every member:
// the shared run ends before each member's position); each member's own keys are items of its own,
// and the two parts are merged by log-sum-exp like a split decode's chunks. The scores are the same
// dot products, so the result equals the unshared one up to fp32 summation order.
struct SharedPrefix {
  const int64_t* groups = nullptr;   // [count, 3]: members [groups[3g], groups[3g + 1]) share groups[3g + 2] blocks
  const int64_t* members = nullptr;  // the members' decode tokens (flat indices)
  int64_t count = 0, block_size = 0;
};

// The groups from their tensors (groups [G, 3], members [N]: contiguous int64); undefined: none.
inline SharedPrefix shared_prefix_of(const at::Tensor& groups, const at::Tensor& members, int64_t block_size) {
  if (!groups.defined() || groups.numel() == 0) return {};
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.is_contiguous() && groups.dim() == 2 && groups.size(1) == 3 &&
                  members.defined() && members.scalar_type() == at::kLong && members.is_contiguous(),
              "paged_attention: shared-prefix groups are contiguous int64 groups [G, 3] and members [N]");
  const int64_t* g = groups.data_ptr<int64_t>();
  for (int64_t k = 0; k < groups.size(0); ++k)
    TORCH_CHECK(0 <= g[3 * k] && g[3 * k] <= g[3 * k + 1] && g[3 * k + 1] <= members.numel(),
                "paged_attention: a shared-prefix group's members lie in `members`");
  return {g, members.data_ptr<int64_t>(), groups.size(0), block_size};
}

// Each member's own keys start after its group's shared run (0: not a member). Checks that every
// member is a decode token in one group only, at a position after the shared run.
inline std::vector<int64_t> own_key_starts(const SharedPrefix& shared, const int64_t* pos, int64_t tokens) {
  std::vector<int64_t> from(tokens, 0);
  for (int64_t g = 0; g < shared.count; ++g) {
    const int64_t* grp = shared.groups + 3 * g;
    TORCH_CHECK(grp[2] >= 1 && grp[1] - grp[0] >= 2, "paged_attention: a shared-prefix group has >= 2 members and "
                "shares >= 1 block");
    for (int64_t k = grp[0]; k < grp[1]; ++k) {
      const int64_t t = shared.members[k];
      TORCH_CHECK(t >= 0 && t < tokens && from[t] == 0 && pos[t] >= grp[2] * shared.block_size,
                  "paged_attention: a shared-prefix member is a token in one group, after the shared blocks");
      from[t] = grp[2] * shared.block_size;
    }
  }
  return from;
}

// The checks plan_attention makes of shared-prefix groups, for the generic loop (which reads each
// token's keys itself and needs no plan): an invalid group is refused there as here, never computed.
inline void check_shared_prefix(const SharedPrefix& shared, const int64_t* seq, const int64_t* pos, int64_t tokens) {
  const std::vector<int64_t> from = own_key_starts(shared, pos, tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    const bool in_run = (t > 0 && seq[t - 1] == seq[t] && pos[t - 1] + 1 == pos[t]) ||
                        (t + 1 < tokens && seq[t + 1] == seq[t] && pos[t + 1] == pos[t] + 1);
    TORCH_CHECK(!in_run || from[t] == 0, "paged_attention: a shared-prefix member is a decode token");
  }
}

#if defined(__AVX512F__)
// v[0..15] -> one vector whose lane j is the sum of v[j]'s lanes: a transpose-and-add tree, 45
// shuffles and adds for 16 dot products instead of 16 separate horizontal reductions.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i, v2i+1, v2i, v2i+1] partial sums
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [v4i .. v4i+3] partial sums
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [q2i (L0+L1), q2i (L2+L3), q2i+1 (L0+L1), q2i+1 (L2+L3)]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Sixteen elements of T (or int8 codes), widened to fp32 in a register (exact for every type).
template <typename T>
inline __m512 load16(const T* p);
template <>
inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
inline __m512 load16<int8_t>(const int8_t* p) {  // int8 codes: exact in fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// float8_e4m3fn codes: a normal code's exponent and mantissa bits, shifted into an fp32's (bits
// 20..26), need 120 more in the exponent (bias 7 -> 127): one integer add. Subnormal codes (exponent
// 0) are their mantissa times 2^-9, blended in, so no fp32 subnormal is ever computed (x86 assists
// on them are slow, and a flush-to-zero mode would zero them). The sign bit goes on top. (Codes
// never hold the format's NaN: stores saturate at +-448.)
template <>
inline __m512 load16<c10::Float8_e4m3fn>(const c10::Float8_e4m3fn* p) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i magnitude = _mm512_and_si512(bytes, _mm512_set1_epi32(0x7f));
  const __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(magnitude, 20),
                                                             _mm512_set1_epi32(120 << 23)));
  const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(0x1p-9f));
  const __m512 value = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8)), normal,
                                            subnormal);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)), 24);
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
}

// The dot products of one query head with sixteen keys (rows kr, kr + D, ...; the first m valid),
// in fp32 lanes before their final sum. bf16 on a CPU with AVX512-BF16 multiplies bf16 pairs
// directly (`vdpbf16ps`: the products are exact in fp32); otherwise keys (bf16, fp16 or int8
// codes) are widened to fp32 in registers.
template <typename T, typename KV, int C>
inline void key_dots16(const T* q, const KV* kr, int m, __m512* dots) {
  constexpr int D = 16 * C;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<KV, T> && C % 2 == 0) {
    __m512bh qv[C / 2];
    for (int k = 0; k < C / 2; ++k) qv[k] = (__m512bh)_mm512_loadu_si512(q + 32 * k);
    for (int i = 0; i < 16; ++i) {
      dots[i] = _mm512_setzero_ps();
      if (i >= m) continue;
      for (int k = 0; k < C / 2; ++k)
        dots[i] = _mm512_dpbf16_ps(dots[i], (__m512bh)_mm512_loadu_si512(kr + i * D + 32 * k), qv[k]);
    }
    return;
  }
#endif
  __m512 qf[C];
  for (int k = 0; k < C; ++k) qf[k] = load16(q + 16 * k);
  for (int i = 0; i < 16; ++i) {
    dots[i] = _mm512_setzero_ps();
    if (i >= m) continue;
    for (int k = 0; k < C; ++k) dots[i] = _mm512_fmadd_ps(load16(kr + i * D + 16 * k), qf[k], dots[i]);
  }
}

// ----------------------------------------------------------------------------- flash decoding
// paged_attention_vec reads each key and value once, with an online softmax (FlashAttention-2):
// keys come in tiles of kKeyTile; a tile's scores go to a small buffer that stays in L1, and each
// query row keeps a running maximum m, the running sum l of exp(score - m) and the unnormalised
// fp32 sum of the weighted values, which are rescaled by exp(m_old - m_new) when a tile raises m.
// (The kernel before this one kept all of a row's scores and read them back in a second pass.)
//
// Decode tokens are split into chunks of keys (flash decoding), each its own work item, so that a
// few long sequences still keep every thread busy; the chunks of a token are merged by their
// (m, l) afterwards. Threads take items from a shared counter, longest first.

// Query tiles: runs of up to kQueryTile tokens of one sequence at consecutive positions (a prefill
// chunk), which share every key and value load. A decode token is a tile of one.
constexpr int64_t kQueryTile = 8;
// Keys per online-softmax step. Measured (9/3 heads, D 64, bf16): steps of 16 keys were 7–17%
// slower than tiles of 256 (per 16 keys and head a horizontal maximum, a rescale test and a
// 16-lane exponential, and key and value reads interleaved); 64 and 128 lay between; 512 gained
// nothing more.
constexpr int64_t kKeyTile = 256;
// Decode chunks are multiples of kMinChunk keys (so also of kKeyTile and of any power-of-two
// block size up to it) and at least that long: a chunk's start and merge cost about as much as a
// few blocks. They are sized so that the decode tokens alone give each thread about
// kItemsPerThread items (2–8 and 256–512 measured the same).
constexpr int64_t kMinChunk = 256;
constexpr int64_t kItemsPerThread = 4;
// Blocks are prefetched (into L2) this many blocks ahead. A sequence's blocks lie anywhere in the
// cache, so the hardware prefetcher, which follows address streams, starts over at each one;
// prefetching made 16 x 16k-key decode 1.3x faster. 1–8 blocks ahead measured the same; into L1
// was slower (it evicts the lines in use).
constexpr int64_t kPrefetchBlocks = 2;

struct QueryTile {
  int64_t t0, count;  // tokens [t0, t0 + count), or a shared-prefix group's members[0 .. count)
  int64_t lo, hi;     // the keys any of them sees: [first_key of t0, position of the last]; a group: its shared run
  const int64_t* members = nullptr;  // a shared-prefix group's tokens (their shared run is [lo, hi])
  int64_t token(int64_t i) const { return members ? members[i] : t0 + i; }
};

// One work item: a tile's queries for kv heads [g0, g1) over keys [k0, k1). A decode item covers
// every kv head (their rows of a block are one contiguous run of the cache); a prefill tile or a
// shared-prefix group has an item per kv head (its queries' rows already share each key and value).
// The chunks of a split decode token write their unnormalised result to slot `partial`; a group's
// chunk c writes each member's rows to the member's slot first_slot[member] + c (its chunks come
// before the member's own); other items (-1) see all their keys and store the output themselves.
struct AttentionItem {
  int64_t tile, g0, g1, k0, k1, partial;
};

// A split decode token (or a shared-prefix member): its chunks' results are in slots [first, first + chunks).
struct ChunkedToken {
  int64_t tile, first, chunks;
};

struct AttentionPlan {
  std::vector<QueryTile> tiles;
  std::vector<AttentionItem> items;  // most expensive first: the order in which threads take them
  std::vector<ChunkedToken> chunked;
  std::vector<int64_t> first_slot;  // per token: a shared-prefix member's first partial slot
  int64_t partials = 0;
};

// Keys per decode chunk: enough chunks that the decode tokens give every thread kItemsPerThread
// items, none shorter than kMinChunk (a chunk's start and merge cost about as much as a few
// blocks). Short contexts stay one chunk, and one thread splits nothing; `forced` > 0 overrides.
inline int64_t decode_chunk(int64_t decode_keys, int64_t threads, int64_t forced) {
  if (forced > 0) return forced;
  if (threads <= 1) return std::numeric_limits<int64_t>::max();
  const int64_t share = (decode_keys + threads * kItemsPerThread - 1) / (threads * kItemsPerThread);
  return std::max<int64_t>(1, (share + kMinChunk - 1) / kMinChunk) * kMinChunk;
}

// Items for keys [k0, k1) of tile i, cut at multiples of `chunk`, each writing slot `slot++` (its
// index among the token's chunks, for a shared-prefix group).
inline void push_chunks(AttentionPlan& plan, int64_t i, int64_t g0, int64_t g1, int64_t k0, int64_t k1, int64_t chunk,
                        int64_t& slot) {
  for (int64_t a = k0, e; a < k1; a = e) {
    e = std::min(k1, (a / chunk + 1) * chunk);
    plan.items.push_back({i, g0, g1, a, e, slot++});
  }
}

AttentionPlan plan_attention(const int64_t* seq, const int64_t* pos, int64_t tokens, int64_t num_kv_heads,
                             int64_t window, int64_t forced_chunk, const SharedPrefix& shared = {}) {
  AttentionPlan plan;
  const std::vector<int64_t> from = own_key_starts(shared, pos, tokens);
  int64_t decode_keys = 0;
  for (int64_t t = 0; t < tokens;) {
    int64_t count = 1;
    while (count < kQueryTile && t + count < tokens && seq[t + count] == seq[t] && pos[t + count] == pos[t] + count) ++count;
    plan.tiles.push_back({t, count, first_key(pos[t], window), pos[t + count - 1]});
    if (count == 1) decode_keys += pos[t] - std::max(from[t], first_key(pos[t], window)) + 1;
    for (int64_t i = 0; i < count; ++i)
      TORCH_CHECK(count == 1 || from[t + i] == 0, "paged_attention: a shared-prefix member is a decode token");
    t += count;
  }
  const int64_t tiles = static_cast<int64_t>(plan.tiles.size());
  for (int64_t g = 0; g < shared.count; ++g) {  // the groups' tiles follow the tokens' own
    const int64_t* grp = shared.groups + 3 * g;
    plan.tiles.push_back({shared.members[grp[0]], grp[1] - grp[0], 0, grp[2] * shared.block_size - 1,
                          shared.members + grp[0]});
    decode_keys += grp[2] * shared.block_size;  // read once for the group
  }
  const int64_t chunk = decode_chunk(decode_keys, at::get_num_threads(), forced_chunk);
  if (shared.count > 0) plan.first_slot.assign(tokens, -1);
  for (int64_t i = 0; i < tiles; ++i) {
    const QueryTile& tile = plan.tiles[i];
    const int64_t t = tile.t0;
    if (tile.count > 1) {
      for (int64_t g = 0; g < num_kv_heads; ++g) plan.items.push_back({i, g, g + 1, tile.lo, tile.hi + 1, -1});
    } else if (from[t] == 0 && tile.hi - tile.lo + 1 <= chunk) {
      plan.items.push_back({i, 0, num_kv_heads, tile.lo, tile.hi + 1, -1});
    } else {  // chunk boundaries at multiples of `chunk`; a member's slots start with its group's chunks
      plan.chunked.push_back({i, plan.partials, 0});
      if (from[t] > 0) {
        plan.first_slot[t] = plan.partials;
        plan.partials += (from[t] - 1) / chunk + 1;  // its group's chunks of [0, from) (chunk may be INT64_MAX)
      }
      push_chunks(plan, i, 0, num_kv_heads, std::max(tile.lo, from[t]), tile.hi + 1, chunk, plan.partials);
      plan.chunked.back().chunks = plan.partials - plan.chunked.back().first;
    }
  }
  for (int64_t i = tiles; i < static_cast<int64_t>(plan.tiles.size()); ++i) {
    for (int64_t g = 0; g < num_kv_heads; ++g) {
      int64_t c = 0;
      push_chunks(plan, i, g, g + 1, 0, plan.tiles[i].hi + 1, chunk, c);
    }
  }
  // Longest first, so that the last items the threads pick up are short.
  auto cost = [&](const AttentionItem& it) { return plan.tiles[it.tile].count * (it.g1 - it.g0) * (it.k1 - it.k0); };
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [&](const AttentionItem& a, const AttentionItem& b) { return cost(a) > cost(b); });
  return plan;
}

// One thread's scratch for an item's rows r = ((g - g0) * count + i) * group + h (kv head g, query
// i of the tile, query head h of the kv group): running maximum m and sum l, unnormalised sum acc
// [rows, D], the current key tile's scores (then weights) [rows, kKeyTile], and sixteen value rows
// widened to fp32. Each array starts on a cache line of its own, a line apart from the next, so
// that two threads' scratch never shares a line.
struct OnlineSoftmax {
  std::unique_ptr<float[]> buf;  // uninitialised: reset() and the steps write before they read
  float *m, *l, *acc, *scores, *wide;

  OnlineSoftmax(int64_t rows, int64_t D) {
    const int64_t sizes[] = {rows, rows, rows * D, rows * kKeyTile, 16 * D};
    float** arrays[] = {&m, &l, &acc, &scores, &wide};
    auto padded = [](int64_t n) { return (n + 15) / 16 * 16 + 16; };
    int64_t total = 32;
    for (int64_t n : sizes) total += padded(n);
    buf.reset(new float[total]);
    float* p = buf.get() + 16 + (16 - reinterpret_cast<uintptr_t>(buf.get()) / sizeof(float) % 16) % 16;
    for (int k = 0; k < 5; ++k) {
      *arrays[k] = p;
      p += padded(sizes[k]);
    }
  }

  void reset(int64_t rows, int64_t D) {
    std::fill_n(m, rows, -std::numeric_limits<float>::infinity());
    std::fill_n(l, rows, 0.f);
    std::fill_n(acc, rows * D, 0.f);
  }
};

// An item's fixed facts, shared by the steps below.
template <typename T, typename KV>
struct ItemView {
  const PagedAttentionView<T, KV>& v;
  const QueryTile& tile;
  const AttentionItem& it;
  const int64_t* table;  // the sequence's block table (a shared-prefix group: its first member's)
  int64_t head_rows;     // rows per kv head: count * group

  ItemView(const PagedAttentionView<T, KV>& v_, const QueryTile& tile_, const AttentionItem& it_)
      : v(v_), tile(tile_), it(it_), table(v_.tables + v_.seq[tile_.t0] * v_.table_stride),
        head_rows(tile_.count * v_.group) {}
  int64_t rows() const { return (it.g1 - it.g0) * head_rows; }
  int64_t position(int64_t i) const { return v.pos[tile.token(i)]; }  // of the tile's query i
  int64_t query(int64_t r) const { return r % head_rows / v.group; }  // row r's query in the tile
  int64_t head(int64_t r) const { return (it.g0 + r / head_rows) * v.group + r % v.group; }  // and query head
  // The keys of block b within [a, e): [block_start, block_end).
  int64_t block_start(int64_t b, int64_t a) const { return std::max(a, b * v.block_size); }
  int64_t block_end(int64_t b, int64_t e) const { return std::min(e, (b + 1) * v.block_size); }
};

// Requests block b's key and value rows of kv heads [g0, g1) (one contiguous run each): a
// sequence's blocks lie anywhere in the cache, so the hardware prefetcher, which follows address
// streams, would start over at every block.
// (always_inline: GCC 12 deems a function that only prefetches free of effects and drops its calls.)
template <typename T, typename KV>
inline __attribute__((always_inline)) void prefetch_block(const PagedAttentionView<T, KV>& v, const int64_t* table,
                                                          int64_t b, int64_t g0, int64_t g1) {
  const int64_t bytes = (g1 - g0) * v.block_size * v.head_dim * static_cast<int64_t>(sizeof(KV));
  const char* kp = reinterpret_cast<const char*>(v.block_rows(v.keys, table, b, g0, b * v.block_size));
  const char* vp = reinterpret_cast<const char*>(v.block_rows(v.values, table, b, g0, b * v.block_size));
  for (int64_t off = 0; off < bytes; off += 64) {
    __builtin_prefetch(kp + off, 0, 2);  // prefetcht1 on x86
    __builtin_prefetch(vp + off, 0, 2);
  }
}

// Whether quantised keys are widened to bf16 (bf16 queries on a CPU with AVX512-BF16) for
// key_dots16's bf16 dot products, rather than to fp32.
template <typename T, typename KV>
constexpr bool kBf16Codes =
#if defined(__AVX512BF16__)
    std::is_same_v<T, c10::BFloat16> && PagedAttentionView<T, KV>::kQuantised;
#else
    false;
#endif

#if defined(__AVX512BF16__)
// n rows of 16 * C codes as bf16 (exact: int8 and fp8 e4m3 values have at most 8 significant bits).
template <int C, typename KV>
inline void widen_to_bf16(const KV* codes, int64_t n, c10::BFloat16* out) {
  for (int64_t k = 0; k < n * C; k += 2) {
    const __m512i pair = (__m512i)_mm512_cvtne2ps_pbh(load16(codes + 16 * (k + 1)), load16(codes + 16 * k));
    _mm512_storeu_si512(out + 16 * k, pair);
  }
}
#else
template <int C, typename KV>
inline void widen_to_bf16(const KV*, int64_t, c10::BFloat16*) {}
#endif

// Scores of the key tile [a, e), sixteen keys at a time and summed by one transpose tree, into
// s.scores (column j - a); keys after a query's own position are skipped. Prefetches the item's
// keys and values kPrefetchBlocks blocks ahead.
template <typename T, typename KV, int C>
void tile_scores(const ItemView<T, KV>& x, int64_t a, int64_t e, float scale, OnlineSoftmax& s) {
  constexpr int64_t D = 16 * C;
  const PagedAttentionView<T, KV>& v = x.v;
  const int64_t group = v.group, last_block = (x.it.k1 - 1) / v.block_size;
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t b = a / v.block_size; b <= (e - 1) / v.block_size; ++b) {
    if (b + kPrefetchBlocks <= last_block) prefetch_block(v, x.table, b + kPrefetchBlocks, x.it.g0, x.it.g1);
    const int64_t j0 = x.block_start(b, a), j1 = x.block_end(b, e);
    for (int64_t g = x.it.g0; g < x.it.g1; ++g) {
      const KV* kb = v.block_rows(v.keys, x.table, b, g, j0);
      for (int64_t c = j0; c < j1; c += 16) {
        // Quantised: the sixteen keys' codes are widened once for all rows of their kv head (to bf16
        // where the queries are bf16 and the CPU has AVX512-BF16: codes are exact in bf16, and the
        // dot products then run as for a bf16 cache; else to fp32), and the key's scale (per
        // token, or the kv head's) multiplies its score with the softmax scale, one vector per 16 keys.
        __m512 key_scale = scale_v;
        const auto* keys = kb + (c - j0) * D;
        if constexpr (PagedAttentionView<T, KV>::kQuantised) {
          const int64_t n = std::min<int64_t>(16, j1 - c);
          if constexpr (PagedAttentionView<T, KV>::kTokenScales) {
            key_scale = _mm512_mul_ps(scale_v, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u),
                                                                     v.scale_rows(v.key_scales, x.table, b, g, c)));
          } else {
            key_scale = _mm512_mul_ps(scale_v, _mm512_set1_ps(v.key_scales[g]));
          }
          if constexpr (kBf16Codes<T, KV>) {
            widen_to_bf16<C>(keys, n, reinterpret_cast<T*>(s.wide));
          } else {
            for (int64_t k = 0; k < n * C; ++k) _mm512_storeu_ps(s.wide + 16 * k, load16(keys + 16 * k));
          }
        }
        for (int64_t i = 0; i < x.tile.count; ++i) {
          const int m = static_cast<int>(std::min<int64_t>({16, j1 - c, x.position(i) + 1 - c}));
          if (m <= 0) continue;
          const int64_t r0 = (g - x.it.g0) * x.head_rows + i * group;
          for (int64_t h = 0; h < group; ++h) {
            __m512 dots[16];
            const T* qh = v.q + (x.tile.token(i) * v.num_heads + g * group + h) * D;
            if constexpr (kBf16Codes<T, KV>) {
              key_dots16<T, T, C>(qh, reinterpret_cast<const T*>(s.wide), m, dots);
            } else if constexpr (PagedAttentionView<T, KV>::kQuantised) {
              key_dots16<T, float, C>(qh, s.wide, m, dots);
            } else {
              key_dots16<T, KV, C>(qh, keys, m, dots);
            }
            _mm512_mask_storeu_ps(s.scores + (r0 + h) * kKeyTile + (c - a), static_cast<__mmask16>((1u << m) - 1u),
                                  _mm512_mul_ps(sum_lanes16(dots), key_scale));
          }
        }
      }
    }
  }
}

// The online-softmax step of the key tile [a, e) for every row, over the row's own keys of it: a
// larger maximum rescales the row's sums so far; the scores become weights exp(score - m).
template <typename T, typename KV, int C>
void tile_softmax(const ItemView<T, KV>& x, int64_t a, int64_t e, int64_t window, OnlineSoftmax& s) {
  constexpr int64_t D = 16 * C;
  for (int64_t r = 0; r < x.rows(); ++r) {
    const int64_t at = x.position(x.query(r));
    const int64_t from = std::max(a, first_key(at, window)), to = std::min(e, at + 1);
    if (from >= to) continue;
    float* p = s.scores + r * kKeyTile + (from - a);
    const float mx = max_of(p, to - from);
    if (mx > s.m[r]) {
      if (s.m[r] != -std::numeric_limits<float>::infinity()) {  // sums so far to rescale
        const float alpha = exp_scalar(s.m[r] - mx);
        s.l[r] *= alpha;
        float* acc = s.acc + r * D;
        for (int k = 0; k < C; ++k)
          _mm512_storeu_ps(acc + 16 * k, _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * k), _mm512_set1_ps(alpha)));
      }
      s.m[r] = mx;
    }
    s.l[r] += exp_shifted_by(p, to - from, s.m[r]);
  }
}

// acc += w[j] * value row j for keys j in [from, to) of sixteen fp32 value rows vf.
template <int C>
inline void add_weighted_values(float* acc, const float* w, const float* vf, int64_t from, int64_t to) {
  constexpr int64_t D = 16 * C;
  __m512 a[C];
  for (int k = 0; k < C; ++k) a[k] = _mm512_loadu_ps(acc + 16 * k);
  for (int64_t j = from; j < to; ++j) {
    const __m512 wj = _mm512_set1_ps(w[j]);
    for (int k = 0; k < C; ++k) a[k] = _mm512_fmadd_ps(wj, _mm512_loadu_ps(vf + j * D + 16 * k), a[k]);
  }
  for (int k = 0; k < C; ++k) _mm512_storeu_ps(acc + 16 * k, a[k]);
}

// The weighted values of the key tile [a, e) added to every row's sum. Sixteen value rows at a
// time are widened to fp32 once (fp32 caches are read in place) for all rows of their kv head;
// int8 codes are multiplied by their row's scale as they are widened.
template <typename T, typename KV, int C>
void tile_values(const ItemView<T, KV>& x, int64_t a, int64_t e, int64_t window, OnlineSoftmax& s) {
  constexpr int64_t D = 16 * C;
  const PagedAttentionView<T, KV>& v = x.v;
  for (int64_t b = a / v.block_size; b <= (e - 1) / v.block_size; ++b) {
    const int64_t j0 = x.block_start(b, a), j1 = x.block_end(b, e);
    for (int64_t g = x.it.g0; g < x.it.g1; ++g) {
      const KV* vb = v.block_rows(v.values, x.table, b, g, j0);
      for (int64_t c = j0; c < j1; c += 16) {
        const int64_t n = std::min<int64_t>(16, j1 - c);
        const float* vf;
        if constexpr (std::is_same_v<KV, float>) {
          vf = vb + (c - j0) * D;
        } else if constexpr (PagedAttentionView<T, KV>::kQuantised) {
          const bool per_token = PagedAttentionView<T, KV>::kTokenScales;
          const float* vs = per_token ? v.scale_rows(v.value_scales, x.table, b, g, c) : v.value_scales + g;
          for (int64_t j = 0; j < n; ++j) {
            const __m512 sj = _mm512_set1_ps(vs[per_token ? j : 0]);
            for (int k = 0; k < C; ++k)
              _mm512_storeu_ps(s.wide + j * D + 16 * k, _mm512_mul_ps(load16(vb + (c - j0 + j) * D + 16 * k), sj));
          }
          vf = s.wide;
        } else {
          for (int64_t k = 0; k < n * C; ++k) _mm512_storeu_ps(s.wide + 16 * k, load16(vb + (c - j0) * D + 16 * k));
          vf = s.wide;
        }
        for (int64_t i = 0; i < x.tile.count; ++i) {
          const int64_t at = x.position(i);
          const int64_t from = std::max(c, first_key(at, window)), to = std::min(c + n, at + 1);
          if (from >= to) continue;
          for (int64_t r = (g - x.it.g0) * x.head_rows + i * v.group, h = 0; h < v.group; ++h, ++r)
            add_weighted_values<C>(s.acc + r * D, s.scores + r * kKeyTile + (c - a), vf, from - c, to - c);
        }
      }
    }
  }
}

// One work item, one key tile at a time; leaves every row's m, l and acc in s.
template <typename T, typename KV, int C>
void attend_item(const ItemView<T, KV>& x, float scale, int64_t window, OnlineSoftmax& s) {
  s.reset(x.rows(), 16 * C);
  const int64_t first_block = x.it.k0 / x.v.block_size, last_block = (x.it.k1 - 1) / x.v.block_size;
  for (int64_t b = first_block; b <= std::min(last_block, first_block + kPrefetchBlocks - 1); ++b)
    prefetch_block(x.v, x.table, b, x.it.g0, x.it.g1);  // tile_scores asks for the later ones
  for (int64_t a = x.it.k0, e; a < x.it.k1; a = e) {
    e = std::min(x.it.k1, (a / kKeyTile + 1) * kKeyTile);
    tile_scores<T, KV, C>(x, a, e, scale, s);
    tile_softmax<T, KV, C>(x, a, e, window, s);
    tile_values<T, KV, C>(x, a, e, window, s);
  }
}

// A split decode token's output rows [rows, D] from its chunks' results (acc [chunks, rows, D], m
// and l [chunks, rows]): each chunk's sums are relative to its own maximum m_k, so they are scaled
// by exp(m_k - M) to the overall maximum M (the log-sum-exp merge), added, then normalised and
// rounded once. `sum` is D floats of scratch.
template <typename T>
void merge_chunks(const float* acc, const float* m, const float* l, int64_t chunks, int64_t rows, int64_t D,
                  float* sum, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    float mx = -std::numeric_limits<float>::infinity(), denom = 0.f;
    for (int64_t k = 0; k < chunks; ++k) mx = std::max(mx, m[k * rows + r]);
    std::fill_n(sum, D, 0.f);
    for (int64_t k = 0; k < chunks; ++k) {
      const float w = exp_scalar(m[k * rows + r] - mx);
      const float* a = acc + (k * rows + r) * D;
      denom += w * l[k * rows + r];
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) sum[i] += w * a[i];
    }
    store_normalised(sum, denom, out + r * D, D);
  }
}

// paged_attention (below) for head_dim = 16 * C, vectorised by hand, with the same fp32
// arithmetic, reading the cache in place. All the query heads of a kv group share each key and
// value row while it is in L1: scores are computed sixteen keys at a time and summed by one
// transpose tree; the value sum runs fused multiply-adds on value rows widened to fp32 once per
// sixteen keys. (The generic loop spends most of its time converting each row into an fp32 buffer
// and reducing every dot product on its own; at the `135m` offline decode shape the first version
// of this kernel was 2.2–2.6x faster in bf16.) `forced_chunk` > 0 fixes the decode chunk (tests).
// `shared`: shared-prefix groups of decode tokens (no window), whose shared keys are read once per group.
template <typename T, typename KV, int C>
void paged_attention_vec(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& kv_scales,
                         const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& positions,
                         float scale, int64_t window, at::Tensor& out, int64_t forced_chunk, const SharedPrefix& shared) {
  constexpr int64_t D = 16 * C;
  const PagedAttentionView<T, KV> v(q, kv_cache, kv_scales, block_tables, seq_index, positions, out);
  const int64_t H = v.num_heads, group = v.group;
  const AttentionPlan plan = plan_attention(v.seq, v.pos, v.tokens, v.num_kv_heads, window, forced_chunk, shared);
  // The chunks' results, a slot per chunk of H rows: sums [partials, H, D], maxima and sums [partials, H].
  std::vector<float> part_acc(plan.partials * H * D), part_m(plan.partials * H), part_l(plan.partials * H);
  int64_t rows = std::max(kQueryTile * group, H);  // the scratch of the largest tile: a group's may be larger
  for (const QueryTile& tile : plan.tiles) rows = std::max(rows, tile.count * group);
  const int64_t items = static_cast<int64_t>(plan.items.size());
  alignas(64) std::atomic<int64_t> next{0};  // a cache line of its own: the locals beside it are read by all
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    OnlineSoftmax s(rows, D);
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const ItemView<T, KV> x(v, plan.tiles[plan.items[k].tile], plan.items[k]);
      attend_item<T, KV, C>(x, scale, window, s);
      if (x.tile.members) {  // a shared-prefix group's chunk: each member's rows to the member's slot
        for (int64_t r = 0; r < x.rows(); ++r) {
          const int64_t slot = (plan.first_slot[x.tile.token(x.query(r))] + x.it.partial) * H + x.head(r);
          std::copy_n(s.acc + r * D, D, part_acc.data() + slot * D);
          part_m[slot] = s.m[r];
          part_l[slot] = s.l[r];
        }
        continue;
      }
      if (x.it.partial >= 0) {  // a chunk of a decode token (all kv heads: H rows): kept for the merge
        std::copy_n(s.acc, H * D, part_acc.data() + x.it.partial * H * D);
        std::copy_n(s.m, H, part_m.data() + x.it.partial * H);
        std::copy_n(s.l, H, part_l.data() + x.it.partial * H);
        continue;
      }
      for (int64_t r = 0; r < x.rows(); ++r)
        store_normalised(s.acc + r * D, s.l[r], v.out + ((x.tile.t0 + x.query(r)) * H + x.head(r)) * D, D);
    }
  });
  at::parallel_for(0, static_cast<int64_t>(plan.chunked.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(D);
    for (int64_t k = begin; k < end; ++k) {
      const ChunkedToken& c = plan.chunked[k];
      merge_chunks(part_acc.data() + c.first * H * D, part_m.data() + c.first * H, part_l.data() + c.first * H,
                   c.chunks, H, D, sum.data(), v.out + plan.tiles[c.tile].t0 * H * D);
    }
  });
}
#endif

// Each query token attends to keys [start, pos] of its own sequence, read from the head-major
// paged cache [2, blocks, kv_heads, block_size, D] through the block table; no gather, no mask.
// One work item is a (token, kv head) pair: the group's query heads share every key and value
// load. Scores, softmax and the weighted sum stay in fp32; the output is rounded once. KV is the
// cache's element type (T, or int8_t with `kv_scales`; an undefined tensor for a dense cache).
// Shared-prefix groups (`shared`) are a saving of the vectorised kernel only; this loop computes each
// token over all its keys, which gives the same result.
template <typename T, typename KV = T>
void paged_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& kv_scales,
                     const at::Tensor& block_tables, const at::Tensor& seq_index, const at::Tensor& positions,
                     float scale, int64_t window, at::Tensor& out, int64_t decode_chunk = 0,
                     const SharedPrefix& shared = {}) {
  TORCH_CHECK(window <= 0 || shared.count == 0, "paged_attention: shared-prefix groups need full attention");
#if defined(__AVX512F__)
  const auto vec = [&](auto kernel) {
    kernel(q, kv_cache, kv_scales, block_tables, seq_index, positions, scale, window, out, decode_chunk, shared);
  };
  switch (q.size(2)) {  // the common head sizes take the hand-vectorised kernel
    case 32: return vec(paged_attention_vec<T, KV, 2>);
    case 64: return vec(paged_attention_vec<T, KV, 4>);
    case 128: return vec(paged_attention_vec<T, KV, 8>);
    default: break;
  }
#endif
  const PagedAttentionView<T, KV> v(q, kv_cache, kv_scales, block_tables, seq_index, positions, out);
  if (shared.count > 0) check_shared_prefix(shared, v.seq, v.pos, v.tokens);
  const int64_t num_heads = v.num_heads, head_dim = v.head_dim, num_kv_heads = v.num_kv_heads;
  const int64_t block_size = v.block_size, group = v.group;
  at::parallel_for(0, v.tokens * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), row(block_size * head_dim), scores, denom(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / num_kv_heads, g = item % num_kv_heads;
      const int64_t last = v.pos[t];
      const int64_t first = first_key(last, window);
      const int64_t n = last - first + 1;
      const int64_t* table = v.tables + v.seq[t] * v.table_stride;
      to_float(v.q + (t * num_heads + g * group) * head_dim, qf.data(), group * head_dim);
      scores.resize(group * n);
      // Calls fn(j - first, row) for every visible key or value row of this sequence and kv head,
      // converting one block at a time to fp32 (a block's rows are contiguous for a kv head).
      auto for_each_row = [&](const KV* cache_half, const float* scales_half, auto&& fn) {
        for (int64_t b = first / block_size; b <= last / block_size; ++b) {
          const int64_t j0 = std::max(first, b * block_size), j1 = std::min(last + 1, (b + 1) * block_size);
          const float* scales = nullptr;
          int64_t step = 0;  // per-head scales: one for every row
          if constexpr (PagedAttentionView<T, KV>::kTokenScales) {
            scales = v.scale_rows(scales_half, table, b, g, j0);
            step = 1;
          } else if constexpr (PagedAttentionView<T, KV>::kHeadScales) {
            scales = scales_half + g;
          }
          rows_to_float(v.block_rows(cache_half, table, b, g, j0), scales, step, row.data(), j1 - j0, head_dim);
          for (int64_t j = j0; j < j1; ++j) fn(j - first, row.data() + (j - j0) * head_dim);
        }
      };
      // Pass 1: scores.
      for_each_row(v.keys, v.key_scales, [&](int64_t j, const float* kr) {
        for (int64_t h = 0; h < group; ++h) scores[h * n + j] = dot(qf.data() + h * head_dim, kr, head_dim) * scale;
      });
      for (int64_t h = 0; h < group; ++h) denom[h] = exp_shifted(scores.data() + h * n, n);
      // Pass 2: the probability-weighted sum of the values.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_row(v.values, v.value_scales, [&](int64_t j, const float* vr) {
        for (int64_t h = 0; h < group; ++h) {
          const float p = scores[h * n + j];
          float* a = acc.data() + h * head_dim;
#pragma omp simd
          for (int64_t i = 0; i < head_dim; ++i) a[i] += p * vr[i];
        }
      });
      for (int64_t h = 0; h < group; ++h)
        store_normalised(acc.data() + h * head_dim, denom[h], v.out + (t * num_heads + g * group + h) * head_dim,
                         head_dim);
    }
  });
}
