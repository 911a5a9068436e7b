// A draft model's greedy proposals for a whole speculative pass in one C++ call (included by
// cpu_model.cpp after CpuModel; kvflow/worker/spec_decode/draft.py is the caller).
//
// Why: a `tiny-draft` step is ~1M multiply-adds, ~0.25 ms of kernels, but driving it from Python
// cost ~1 ms a step: step metadata built with a dozen small tensor ops, one forward call, the LM head
// through `F.linear`, an argmax, a `.tolist()`. Greedy proposals need none of that in Python: each
// step's only input is the previous step's argmax, and positions and slots follow from the start
// position and the block table. So the pass runs here: the first step over each sequence's tokens
// the draft's cache lacks, then K - 1 single-token steps, each through CpuModel::forward, its last
// rows through the LM head (the same `linear` and argmax as `CpuForward.logits` and `argmax` in
// Python), so the proposals and the KV written are those of the per-step path, step for step.

// Per sequence i (B of them): its `feed_lens[i]` tokens (concatenated in `feed_ids`) follow the
// `starts[i]` entries its draft cache already holds; `counts[i]` >= 1 proposals are wanted. The
// first step orders the sequences as the per-step path does (single tokens first, else in order);
// step j >= 1 runs the sequences with counts[i] > j, in order, one token each: the proposal it made
// at step j - 1. Returns [B, max(counts)] int64 proposals, -1 past counts[i].
at::Tensor draft_greedy(CpuModel& model, const at::Tensor& feed_ids, const at::Tensor& feed_lens,
                        const at::Tensor& starts, const at::Tensor& counts, const at::Tensor& block_tables,
                        int64_t block_size, const at::Tensor& head, const at::Tensor& head_bias, bool head_packed,
                        const at::Tensor& head_blocked) {
  for (const auto* t : {&feed_ids, &feed_lens, &starts, &counts, &block_tables}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "draft_greedy: contiguous int64 inputs");
  }
  const int64_t B = feed_lens.size(0), nb = block_tables.size(1);
  TORCH_CHECK(starts.size(0) == B && counts.size(0) == B && block_tables.dim() == 2 && block_tables.size(0) == B,
              "draft_greedy: feed_lens, starts, counts [B] and block_tables [B, blocks]");
  const at::Tensor bias = optional_weight(head_bias), blocked = optional_weight(head_blocked);  // empty: none
  const int64_t* lens = feed_lens.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* count = counts.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* feed = feed_ids.data_ptr<int64_t>();
  int64_t total = 0, steps = 0;
  std::vector<int64_t> offset(B);  // where sequence i's tokens begin in feed_ids
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(lens[i] >= 1 && count[i] >= 1, "draft_greedy: every sequence feeds a token and wants a proposal");
    TORCH_CHECK(start[i] + lens[i] + count[i] - 1 <= nb * block_size, "draft_greedy: the block table is too short");
    offset[i] = total;
    total += lens[i];
    steps = std::max(steps, count[i]);
  }
  TORCH_CHECK(feed_ids.numel() == total, "draft_greedy: feed_ids holds sum(feed_lens) tokens");
  const auto longs = at::TensorOptions().dtype(at::kLong);
  at::Tensor out = at::full({B, steps}, -1, longs);
  int64_t* proposals = out.data_ptr<int64_t>();
  // Step 0 runs the sequences in this order; step j >= 1 those of them still proposing, in index order.
  std::vector<int64_t> order;
  for (int64_t i = 0; i < B; ++i)
    if (lens[i] == 1) order.push_back(i);
  for (int64_t i = 0; i < B; ++i)
    if (lens[i] != 1) order.push_back(i);
  for (int64_t j = 0; j < steps; ++j) {
    std::vector<int64_t> rows;
    if (j == 0) {
      rows = order;
    } else {
      for (int64_t i = 0; i < B; ++i)
        if (count[i] > j) rows.push_back(i);
    }
    const int64_t tokens = j == 0 ? total : static_cast<int64_t>(rows.size());
    at::Tensor ids = at::empty({tokens}, longs), pos = at::empty({tokens}, longs), seq = at::empty({tokens}, longs);
    at::Tensor slots = at::empty({tokens}, longs), last = at::empty({static_cast<int64_t>(rows.size())}, longs);
    int64_t *ip = ids.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>(), *sp = seq.data_ptr<int64_t>();
    int64_t *slp = slots.data_ptr<int64_t>(), *lp = last.data_ptr<int64_t>();
    int64_t t = 0;
    for (size_t r = 0; r < rows.size(); ++r) {
      const int64_t i = rows[r];
      const int64_t n = j == 0 ? lens[i] : 1, first = j == 0 ? start[i] : start[i] + lens[i] + j - 1;
      for (int64_t k = 0; k < n; ++k, ++t) {
        const int64_t p = first + k;
        ip[t] = j == 0 ? feed[offset[i] + k] : proposals[i * steps + j - 1];
        pp[t] = p;
        sp[t] = i;  // rows of the full block table: attention reads a sequence's blocks through it
        slp[t] = tables[i * nb + p / block_size] * block_size + p % block_size;
      }
      lp[r] = t - 1;
    }
    const at::Tensor hidden = model.forward(ids, pos, seq, slots, block_tables, {}, std::nullopt, {}, {},
                                            std::nullopt);
    const at::Tensor picked = argmax_rows(linear(hidden.index_select(0, last), head, bias, head_packed, blocked));
    const int64_t* best = picked.data_ptr<int64_t>();
    for (size_t r = 0; r < rows.size(); ++r) proposals[rows[r] * steps + j] = best[r];
  }
  return out;
}
