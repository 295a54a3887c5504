"""Inductor's caches are keyed on moec's sources: the custom-pass uuid carries their hash."""
from torch._inductor.custom_graph_pass import CustomGraphPass

from moec.cache_tag import MoecSourceTag, source_hash, switches, tagged
from moec.codegen import grouped_mm_wgrad


class _UserPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        _UserPass.calls += 1

    def uuid(self):
        return "user-v1"


def test_tag_carries_the_source_hash_and_keeps_a_user_pass():
    tag = tagged({})["post_grad_custom_pre_pass"]
    assert isinstance(tag, MoecSourceTag) and tag.uuid() == (source_hash(), switches()) and len(source_hash()) == 64
    wrapped = tagged({"post_grad_custom_pre_pass": _UserPass()})["post_grad_custom_pre_pass"]
    assert wrapped.uuid() == ((source_hash(), switches()), "user-v1")
    wrapped(None)
    assert _UserPass.calls == 1
    assert tagged({"post_grad_custom_pre_pass": wrapped})["post_grad_custom_pre_pass"] is wrapped


def test_tag_tells_the_grouped_mm_switch_apart(monkeypatch):
    """MOEC_GROUPED_MM_WGRAD changes what the backward's rows op returns: a graph compiled with it
    off must not be replayed with it on (read at each compile: a process may flip it)."""
    tag = tagged({})["post_grad_custom_pre_pass"]
    off = tag.uuid()
    monkeypatch.setattr(grouped_mm_wgrad, "ENABLED", not grouped_mm_wgrad.ENABLED)
    assert tag.uuid() != off
