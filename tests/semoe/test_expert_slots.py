"""The expert slot registry: ring groups, LRU victims, reassignment."""

from semoe.expert_slots import ExpertSlots


def test_ring_groups_and_lru_victims():
    s = ExpertSlots(capacity=6, experts=2)
    s.assign_block(0, 0)  # slots 0, 1 <- block 0
    assert s.group_holds(0, 0) and not s.group_holds(1, 0)
    assert s.victims(3, keep=set()) == [2, 3, 4]  # free slots first
    s.assign_block(1, 1)
    s.assign_block(2, 2)
    s.lru.move_to_end((0, 0))  # block 0 expert 0 used recently
    assert s.victims(2, keep={(1, 0)}) == [1, 3]  # oldest first: (0,1), then (1,1); (1,0) kept
    s.assign(1, (5, 0))  # slot 1 now holds (5, 0): (0, 1) is forgotten
    assert (0, 1) not in s.where and s.owner[1] == (5, 0) and not s.group_holds(0, 0)
    s.assign(4, (5, 0))  # a key moves: its old slot becomes free
    assert s.owner[1] is None and s.where[(5, 0)] == 4
