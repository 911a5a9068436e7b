"""KV transfer between a prefill and a decode instance through the P/D connector: outputs, bytes,
overlap, admission, faults."""

from __future__ import annotations

import time

import pytest

from kvflow.config import KVTransferConfig
from tests.kv_transfer.engine_pairs import (
    assert_all_blocks_free,
    drive,
    greedy,
    make_core,
    prompts,
    run_colocated,
    submit,
)

MIXED_LENGTHS = [3, 4, 5, 17, 40, 64, 100]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("mode", ["whole", "layerwise"])
def test_disaggregated_greedy_equals_colocated(llama_dir, transport, mode):
    batch, params = prompts(MIXED_LENGTHS), greedy(12)
    expected = run_colocated(make_core(llama_dir), batch, params)
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", transport=transport, mode=mode))
    # The decode instance uses another block size: the wire layout is per token, not per block.
    decode = make_core(llama_dir, KVTransferConfig(role="decode", transport=transport, mode=mode), block_size=8)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 0
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_bytes_per_request_match_the_kv_size(llama_dir, transport):
    batch = prompts([5, 33, 90])
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", transport=transport))
    decode = make_core(llama_dir, KVTransferConfig(role="decode", transport=transport))
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, greedy(2))
    drive(prefill, decode)
    records = {load.request_id: (load.payload_bytes, load.wire_bytes) for load in decode.drain_events().loads}
    cfg = decode.config.model
    for i, ids in enumerate(batch):
        payload, wire = records[f"r{i}"]
        assert payload == 2 * cfg.num_layers * len(ids) * cfg.num_kv_heads * cfg.head_dim * 4  # fp32
        assert 0 < wire - payload <= 128 + 16 * cfg.num_layers  # header, a message per layer, done
    assert prefill.connector.sender.stats.transfers == len(batch)
    prefill.close()
    decode.close()


def test_layerwise_streaming_overlaps_transfer_with_compute(llama_dir):
    """Each layer takes 250 ms to compute and 250 ms to send: layer-wise sends layer 0 while layer 1
    computes, so the first token lands ~one layer's send earlier than after a whole-request send.
    (Delays this long keep the 125 ms margin asserted well above scheduling noise on a busy machine.)"""
    delay = 0.25
    ttft = {}
    for mode in ("whole", "layerwise"):
        prefill = make_core(llama_dir, KVTransferConfig(role="prefill", mode=mode, layer_send_delay_s=delay))
        decode = make_core(llama_dir, KVTransferConfig(role="decode", mode=mode))
        slow_layer = prefill.connector.layer_done

        def computed(layer: int, slow=slow_layer) -> None:
            time.sleep(delay)  # a model whose layers take `delay` each
            slow(layer)

        assert prefill.runner.step_hooks is prefill.connector
        prefill.connector.layer_done = computed
        # Whole mode too: both modes pay the per-layer delay.
        prefill.connector.begin_step = _always_hooked(prefill.connector.begin_step)
        submit(prefill, decode, "r0", prompts([20])[0], greedy(2))
        start, firsts = time.monotonic(), {}
        drive(prefill, decode, first_token_times=firsts)
        ttft[mode] = firsts["r0"] - start
        layers = prefill.config.model.num_layers
        prefill.close()
        decode.close()
    # whole ≈ layers·(compute + send); layer-wise ≈ layers·compute + send
    assert ttft["layerwise"] < ttft["whole"] - 0.5 * (layers - 1) * delay, ttft


def _always_hooked(begin_step):
    """Report every layer even in whole-request mode, so both modes pay the same compute delay."""

    def begin(chunks):
        begin_step(chunks)
        return bool(chunks)

    return begin


def test_decode_out_of_blocks_requests_wait_at_prefill_side(llama_dir):
    batch, params = prompts([30, 30, 30, 30], seed=3), greedy(10)
    expected = run_colocated(make_core(llama_dir), batch, params)
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill"))
    # Room for one request at a time (30 + 10 tokens = 10 blocks of 4; 12 blocks in all).
    decode = make_core(llama_dir, KVTransferConfig(role="decode"), num_blocks=12)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    # Run the prefill side first: all four prompts computed, their KV held there, while the decode
    # side can take only one of them.
    while prefill.has_unfinished_requests():
        prefill.step()
    assert prefill.connector.sender.num_held == 4
    decode.step()
    assert len(decode.scheduler.receiving) == 1 and len(decode.scheduler.waiting) == 3
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 0
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def test_dead_prefill_instance_means_local_prefill_on_decode(llama_dir):
    batch, params = prompts([9, 21]), greedy(6)
    expected = run_colocated(make_core(llama_dir), batch, params)
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", timeout_s=2))
    decode = make_core(llama_dir, KVTransferConfig(role="decode", timeout_s=2))
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    prefill.close()  # nobody listens any more
    tokens: dict[str, list[int]] = {}
    deadline = time.monotonic() + 30
    while decode.has_unfinished_requests():
        assert time.monotonic() < deadline
        for out in decode.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        time.sleep(0.001)
    assert tokens == expected
    assert decode.scheduler.num_kv_load_failures == 2
    assert_all_blocks_free(decode)
    decode.close()


def test_unpulled_transfer_times_out_and_frees_prefill_blocks(llama_dir):
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", timeout_s=0.5))
    decode = make_core(llama_dir, KVTransferConfig(role="decode"))
    submit(prefill, decode, "r0", prompts([25])[0], greedy(4))
    while prefill.has_unfinished_requests():
        prefill.step()
    assert prefill.kv.num_free_blocks < prefill.kv.num_blocks  # held for the puller
    deadline = time.monotonic() + 10
    while prefill.transfers_pending:
        assert time.monotonic() < deadline
        prefill.step()
        time.sleep(0.01)
    assert_all_blocks_free(prefill)
    # The decode side, pulling too late, computes the prompt itself.
    tokens = drive(prefill, decode)
    assert tokens == run_colocated(make_core(llama_dir), prompts([25]), greedy(4))
    assert decode.scheduler.num_kv_load_failures == 1
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def test_abort_while_receiving_frees_blocks_after_the_load_stops(llama_dir):
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", layer_send_delay_s=0.2))
    decode = make_core(llama_dir, KVTransferConfig(role="decode"))
    submit(prefill, decode, "r0", prompts([40])[0], greedy(4))
    decode.step()
    assert "r0" in decode.scheduler.receiving
    prefill.step()  # computes the prompt; the sender starts on layer 0
    assert decode.abort_request("r0")
    assert prefill.abort_request("r0") is False  # finished there already: its held KV is dropped
    deadline = time.monotonic() + 10
    while decode.transfers_pending or prefill.transfers_pending:
        assert time.monotonic() < deadline
        decode.step()
        prefill.step()
        time.sleep(0.01)
    decode.step()
    prefill.step()
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def _payload_per_prompt(llama_dir, transport: str, batch: list[list[int]], params, decode_block_size: int = 4,
                        **engine) -> tuple[dict[int, int], object]:
    """Disaggregate `batch` between two instances with these engine settings, check the outputs
    equal colocated decoding token for token and no block leaks; returns {prompt length: KV payload
    bytes} and the model config."""
    expected = run_colocated(make_core(llama_dir, **engine), batch, params)
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", transport=transport), **engine)
    decode = make_core(llama_dir, KVTransferConfig(role="decode", transport=transport), **engine,
                       block_size=decode_block_size)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    assert drive(prefill, decode) == expected
    payloads = {len(batch[int(load.request_id[1:])]): load.payload_bytes for load in decode.drain_events().loads}
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()
    return payloads, decode.config.model


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_int8_kv_moves_codes_and_scales(llama_dir, transport):
    """An int8 KV cache crosses as its quantised bytes (codes + one fp32 scale per token and kv head),
    and decoding after the transfer equals colocated int8 decoding token for token."""
    payloads, cfg = _payload_per_prompt(llama_dir, transport, prompts([5, 33, 90]), greedy(8), decode_block_size=8,
                                        kv_cache_dtype="int8")
    for tokens, payload in payloads.items():
        assert payload == 2 * cfg.num_layers * tokens * cfg.num_kv_heads * (cfg.head_dim + 4)


def test_kv_format_mismatch_fails_the_load_and_decode_recomputes(llama_dir):
    """A decode instance never splices KV of another format: the load fails naming both formats,
    the request is recomputed locally with the right output, and no block leaks."""
    batch, params = prompts([17]), greedy(6)
    expected = run_colocated(make_core(llama_dir, kv_cache_dtype="int8"), batch, params)
    prefill = make_core(llama_dir, KVTransferConfig(role="prefill", transport="tcp"))
    decode = make_core(llama_dir, KVTransferConfig(role="decode", transport="tcp"), kv_cache_dtype="int8")
    submit(prefill, decode, "r0", batch[0], params)
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 1
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def test_fp8_kv_transfers_with_a_given_scale_and_refuses_calibrated_ones(llama_dir):
    """fp8 codes cross only between instances that share their scales: a given --kv-scale works
    (outputs equal colocated), calibrated scales are refused when the engine starts."""
    with pytest.raises(ValueError, match="give --kv-scale"):
        make_core(llama_dir, KVTransferConfig(role="prefill", transport="tcp"), kv_cache_dtype="fp8_e4m3")
    payloads, cfg = _payload_per_prompt(llama_dir, "tcp", prompts([5, 33]), greedy(6), kv_cache_dtype="fp8_e4m3",
                                        kv_scale=0.02)
    for tokens, payload in payloads.items():
        assert payload == 2 * cfg.num_layers * tokens * cfg.num_kv_heads * cfg.head_dim  # a byte each


KIVI_LENGTHS = [5, 31, 33, 70, 100, 129, 200]  # with R = 32: Q = 0, 0, 0, 32, 64, 96, 160


@pytest.mark.parametrize("fmt, residual, transport, mode, decode_block_size, lengths, step_tokens", [
    # One prompt in four chunks: earlier chunks filled the ring; the last chunk's step streams each layer.
    ("kivi4", 32, "tcp", "layerwise", 64, [200], 64),
    ("kivi2", 32, "shm", "whole", 32, KIVI_LENGTHS, 1024),
    ("kivi4", 128, "tcp", "layerwise", 32, KIVI_LENGTHS, 1024),
])
def test_kivi_kv_moves_codes_and_its_ring(llama64_dir, fmt, residual, transport, mode, decode_block_size, lengths,
                                          step_tokens):
    """A KIVI cache crosses as its codes and meta below Q and its ring rows [Q, n) in the model's dtype;
    decoding after the transfer (groups quantised on the decode side as it goes) equals colocated KIVI
    decoding token for token, on another block size, and every block and ring slot comes back.
    (KIVI's prefill attends to its own chunk densely, so both sides must chunk the prompts alike:
    one prompt, or a step budget that holds them all.)"""
    engine = dict(kv_cache_dtype=fmt, kv_residual_tokens=residual, block_size=32, max_model_len=256,
                  max_num_batched_tokens=step_tokens)
    batch, params = prompts(lengths, seed=3), greedy(40)
    expected = run_colocated(make_core(llama64_dir, **engine), batch, params)
    prefill = make_core(llama64_dir, KVTransferConfig(role="prefill", transport=transport, mode=mode), **engine)
    engine["block_size"] = decode_block_size
    decode = make_core(llama64_dir, KVTransferConfig(role="decode", transport=transport, mode=mode), **engine)
    for i, ids in enumerate(batch):
        submit(prefill, decode, f"r{i}", ids, params)
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 0
    cfg = decode.config.model
    bits = {"kivi4": 4, "kivi2": 2}[fmt]
    for load in decode.drain_events().loads:
        n = len(batch[int(load.request_id[1:])])
        q = max(0, 32 * ((n - residual) // 32))
        per_head = q * (cfg.head_dim * bits // 8 + cfg.head_dim // 16 * 2) + (n - q) * cfg.head_dim * 4  # fp32 ring
        assert load.payload_bytes == 2 * cfg.num_layers * cfg.num_kv_heads * per_head
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()


def test_kivi_instances_with_another_residual_window_do_not_exchange_kv(llama64_dir):
    """R decides which tokens travel dense, so it is part of the wire format: a decode instance with
    another R fails the load (the prefill side's KV is never spliced in) and computes the prompt itself."""
    engine = dict(kv_cache_dtype="kivi4", block_size=32, max_model_len=256)
    batch, params = prompts([100], seed=4), greedy(8)
    expected = run_colocated(make_core(llama64_dir, **engine, kv_residual_tokens=64), batch, params)
    prefill = make_core(llama64_dir, KVTransferConfig(role="prefill"), **engine, kv_residual_tokens=32)
    decode = make_core(llama64_dir, KVTransferConfig(role="decode"), **engine, kv_residual_tokens=64)
    submit(prefill, decode, "r0", batch[0], params)
    assert drive(prefill, decode) == expected
    assert decode.scheduler.num_kv_load_failures == 1
    assert_all_blocks_free(prefill, decode)
    prefill.close()
    decode.close()
