import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsim.kv_cache import BlockManager
from llmsim.request import Request


def test_allocate_append_free():
    bm = BlockManager(10, 16)
    r = Request(0, 0.0, 20, 5)
    assert bm.num_new_blocks(r, 20) == 2
    bm.allocate(r, 20)
    r.num_computed_tokens = 20
    assert bm.num_new_blocks(r, 1) == 0  # token 21 fits in the second block
    r.num_computed_tokens = 32
    assert bm.num_new_blocks(r, 1) == 1
    assert bm.free(r) == 2 and bm.num_free_blocks == 10
    bm.check_integrity()


def test_watermark_blocks_admission_not_growth():
    bm = BlockManager(10, 16, watermark_blocks=2)
    r = Request(0, 0.0, 16 * 9, 5)
    assert not bm.can_admit(r, 16 * 9) and bm.can_allocate(r, 16 * 9)


def test_over_allocation_raises():
    bm = BlockManager(1, 16)
    with pytest.raises(RuntimeError):
        bm.allocate(Request(0, 0.0, 40, 1), 40)


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40), st.booleans()), max_size=200))
def test_blocks_are_conserved_under_any_sequence(ops):
    bm = BlockManager(64, 8)
    reqs = [Request(i, 0.0, 10, 10) for i in range(8)]
    for idx, n, free in ops:
        r = reqs[idx]
        if free:
            bm.free(r)
            r.num_computed_tokens = 0
        elif bm.can_allocate(r, n):
            bm.allocate(r, n)
            r.num_computed_tokens += n
            assert bm.num_held(r) == bm.blocks_for(r.num_computed_tokens)
        bm.check_integrity()
