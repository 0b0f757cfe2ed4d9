"""merlin_molar.distributed.leave_process_group: a process leaves its gloo group before it exits (the multi-process
launches themselves are tested in tests/integration/distributed)."""
import torch.distributed as dist

from merlin_molar.cli import _leave_process_group
from merlin_molar.distributed import leave_process_group


def join_alone(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()


def test_leaving_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    leave_process_group()  # no group: nothing to do
    join_alone(tmp_path)
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()


def test_after_an_error_it_leaves_without_waiting_for_peers(tmp_path, monkeypatch):
    join_alone(tmp_path)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (_ for _ in ()).throw(AssertionError("waited")))
    leave_process_group(wait_for_peers=False)
    assert not dist.is_initialized()


def test_the_command_line_leaves_the_group_it_ran_in(tmp_path):
    join_alone(tmp_path)
    _leave_process_group(finished=True)
    assert not dist.is_initialized()
