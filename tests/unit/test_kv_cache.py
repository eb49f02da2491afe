import pytest

from zili.engine.kv_cache import KVCacheManager


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate("a", 10)  # 3 blocks
    assert kv.allocate("b", 4)  # 1 block
    assert kv.num_free_blocks == 4
    assert kv.allocate("a", 13)  # grows to 4 blocks
    assert len(kv.block_ids("a")) == 4
    kv.free("a")
    kv.free("b")
    kv.free("b")  # idempotent
    assert kv.num_free_blocks == 8
    assert kv.usage == 0.0


def test_allocation_fails_without_side_effects_when_out_of_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate("a", 8)
    assert not kv.allocate("b", 8)
    assert "b" not in kv.tables
    assert kv.num_free_blocks == 1


def test_prefix_hit_requires_full_blocks_and_matching_tokens():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks + 3
    assert kv.allocate("a", len(prompt))
    kv.register_full_blocks("a", prompt, len(prompt))
    hits = kv.find_cached_prefix(prompt)
    assert hits == kv.block_ids("a")[:2]
    # Diverging in the second block keeps only the first.
    other = prompt[:5] + [7] + prompt[6:]
    assert kv.find_cached_prefix(other) == kv.block_ids("a")[:1]
    # Same tokens in a different position in the chain do not hit (the hash is chained).
    assert kv.find_cached_prefix(prompt[4:8] + prompt[:4] + [1]) == []


def test_a_whole_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    kv.allocate("a", 8)
    kv.register_full_blocks("a", prompt, 8)
    assert len(kv.find_cached_prefix(prompt)) == 1  # the last block is recomputed for its logits


def test_shared_blocks_are_ref_counted_and_stay_cached_after_free():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    prompt = list(range(9))
    kv.allocate("a", 9)
    kv.register_full_blocks("a", prompt, 9)
    hits = kv.find_cached_prefix(prompt)
    assert kv.allocate("b", 9, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.blocks[hits[0]].ref_count == 2
    kv.free("a")
    assert kv.blocks[hits[0]].ref_count == 1
    kv.free("b")
    assert kv.num_free_blocks == 6
    # Freed but not evicted: still a hit.
    assert kv.find_cached_prefix(prompt) == hits
    assert kv.allocate("c", 9, kv.find_cached_prefix(prompt))
    assert kv.block_ids("c")[:2] == hits


def test_eviction_is_least_recently_freed_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    old, new = [1, 2, 3], [5, 6, 7]
    kv.allocate("old", 3)
    kv.register_full_blocks("old", old, 3)
    kv.free("old")
    kv.allocate("new", 3)
    kv.register_full_blocks("new", new, 3)
    kv.free("new")
    # One fresh block is needed: the oldest freed block goes first, the new prefix survives.
    kv.allocate("x", 2)
    assert kv.find_cached_prefix(new) != []
    kv.allocate("y", 6)  # takes everything left: both prefixes are evicted
    assert kv.find_cached_prefix(old) == [] and kv.find_cached_prefix(new) == []


def test_hit_rate_counts_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    kv.allocate("a", 9)
    kv.find_cached_prefix(prompt)  # 8 looked up, 0 hit
    kv.register_full_blocks("a", prompt, 9)
    kv.find_cached_prefix(prompt)  # 8 looked up, 8 hit
    assert kv.prefix_hit_rate == pytest.approx(0.5)


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prompt = list(range(9))
    kv.allocate("a", 9)
    kv.register_full_blocks("a", prompt, 9)
    assert kv.find_cached_prefix(prompt) == []


def test_share_prefix_forks_full_blocks_only():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate("p", 10)
    computed = kv.share_prefix("p", "c", 9)
    assert computed == 8
    assert kv.block_ids("c") == kv.block_ids("p")[:2]
    assert kv.allocate("c", 12)
    assert kv.block_ids("c")[2] not in kv.block_ids("p")


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)
