"""Three services of the tiny model fused into one engine group: one forward per
step, each member's greedy tokens what the offline engine gives the same prompt."""
from __future__ import annotations

import torch

from colocate import LLM, SamplingParams
from colocate.quant.loading import load_model
from colocate.engine.config import EngineConfig
from colocate.worker.engine_factory import GroupMember, build_engine_group

PROMPTS = {
    "svc-a": [[1, 15, 200, 33, 7], [1] + list(range(40, 90))],
    "svc-b": [[1, 99, 1000, 4, 5, 6], [1, 15, 200, 33, 7]],      # a's prompt again
    "svc-c": [[1, 2047], list(range(3, 40))],
}


GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def serve_fused(tiny_model_dir, **engine_options):
    """PROMPTS through a three-member group of the tiny model, against the offline
    engine: (the group's answers, the offline ones, per step the members that had work
    and those that ran, the group)."""
    offline = LLM(str(tiny_model_dir), kv_cache_tokens=1024)
    want = {m: [o.token_ids for o in offline.generate(ps, GREEDY)] for m, ps in PROMPTS.items()}
    model = load_model(tiny_model_dir)
    group = build_engine_group(
        model, model.config, None,
        [GroupMember(m, EngineConfig(max_model_len=256, kv_cache_tokens=256, max_num_seqs=4,
                                     **engine_options)) for m in PROMPTS],
        dtype=torch.float32, device=torch.device("cpu"), max_num_batched_tokens=96)
    ids = {m: [group.add_request(m, p, GREEDY) for p in ps] for m, ps in PROMPTS.items()}
    final, steps = {}, []
    while group.has_unfinished_requests():
        busy = {m for m, e in group.members.items() if e.has_unfinished_requests()}
        outputs = group.step()
        steps.append((busy, set(outputs)))
        for outs in outputs.values():
            final.update({o.request_id: o.token_ids for o in outs if o.finished})
    return {m: [final[i] for i in ids[m]] for m in PROMPTS}, want, steps, group


def test_fused_members_decode_what_the_offline_engine_does(tiny_model_dir):
    got, want, steps, group = serve_fused(tiny_model_dir)
    assert got == want
    assert max(len(ran) for _, ran in steps) == 3   # some steps ran all three together
    # One cache, three disjoint ranges of 16 blocks after the null block.
    assert group.runner.kv_caches[0].key.shape[0] == 1 + 3 * 16
    ranges = [sorted(b.block_id for b in e.kv.pool.blocks[1:]) for e in group.members.values()]
    assert ranges == [list(range(1, 17)), list(range(17, 33)), list(range(33, 49))]


def test_members_that_sit_out_steps_still_decode_what_the_offline_engine_does(
        tiny_model_dir):
    """A slice of a microsecond: nearly every step, whoever leads in engine time sits
    out, its requests keeping their blocks and the runner's state; every greedy answer
    is still the offline engine's."""
    got, want, steps, _ = serve_fused(tiny_model_dir, time_slice_s=1e-6)
    assert got == want
    assert sum(len(busy - ran) for busy, ran in steps) > 0


def test_borrowers_preempted_by_a_lender_finish_with_the_tokens_they_get_without(
        tiny_model_dir):
    """"a" (4 blocks) overflows into lending "b" (8); b's prompt takes its blocks back
    in the step it arrives, preempting a's youngest; every request's greedy tokens
    are those of the same group without lending."""
    params = SamplingParams(max_tokens=8, temperature=0.0)
    model = load_model(tiny_model_dir)
    a_prompts = [[1] + list(range(50 + 7 * i, 69 + 7 * i)) for i in range(3)]   # 20 tokens
    b_prompt = [1] + [(13 * i) % 2000 + 3 for i in range(99)]                   # 7 blocks

    def serve(lend: bool):
        group = build_engine_group(
            model, model.config, None,
            [GroupMember("a", EngineConfig(max_model_len=256, kv_cache_tokens=64)),
             GroupMember("b", EngineConfig(max_model_len=256, kv_cache_tokens=128,
                                           max_num_batched_tokens=128), lend=lend)],
            dtype=torch.float32, device=torch.device("cpu"), max_num_batched_tokens=256)
        ids = [group.add_request("a", p, params) for p in a_prompts]
        group.step()
        borrowed = group.members["a"].kv.num_borrowed_blocks
        ids.append(group.add_request("b", b_prompt, SamplingParams(max_tokens=4,
                                                                   temperature=0.0)))
        group.step()
        scheduled_b = group.members["b"].scheduler.requests[ids[-1]].num_computed_tokens
        a_preempted = [group.members["a"].scheduler.requests[i].num_preemptions
                       for i in ids[:3]]
        final = {}
        while group.has_unfinished_requests():
            for outs in group.step().values():
                final.update({o.request_id: o.token_ids for o in outs if o.finished})
        return [final[i] for i in ids], borrowed, scheduled_b, a_preempted, group

    want, *_ = serve(lend=False)
    got, borrowed, scheduled_b, a_preempted, group = serve(lend=True)
    assert got == want
    assert borrowed == 2                        # 3 x 2 blocks, 4 of a's own
    assert scheduled_b == len(b_prompt)         # b's whole prompt ran in the step it came
    assert a_preempted == [0, 0, 1]             # ... taking back a's youngest's blocks
    assert group.members["b"].kv.num_lent_blocks == 0


def test_a_member_sleeping_alone_gives_its_pages_back_while_the_others_decode(
        tiny_model_dir):
    """b's 32768-token range (128 MiB of the group's one cache) sleeps while a and c
    decode: this process's own memory falls by about b's share; a and c answer what
    the offline engine does; b's next request wakes it, zeroed, with its first answer."""
    from tests.test_kv_memory import resident

    params = SamplingParams(max_tokens=12, temperature=0.0)
    model = load_model(tiny_model_dir)
    sizes = {"a": 256, "b": 32768, "c": 256}
    group = build_engine_group(
        model, model.config, None,
        [GroupMember(m, EngineConfig(max_model_len=256, kv_cache_tokens=n))
         for m, n in sizes.items()],
        dtype=torch.float32, device=torch.device("cpu"), max_num_batched_tokens=96)
    b_bytes = sum(end - start for start, end in group.runner.kv_memory.block_spans(
        group.members["b"].kv.pool.first_block_id, 32768 // 16))
    b_first = group.members["b"].stream(PROMPTS["svc-b"][0], params)
    b_first = [t for out in b_first for t in out.new_token_ids]
    ids = {"a": group.add_request("a", PROMPTS["svc-a"][1], params)}
    group.step()
    held = resident()
    group.members["b"].sleep()                              # a is mid-request
    freed = held - resident()
    assert freed > 0.95 * b_bytes, (freed / 2**20, b_bytes / 2**20)
    ids["c"] = group.add_request("c", PROMPTS["svc-c"][0], params)
    final = {}
    while group.has_unfinished_requests():
        for outs in group.step().values():
            final.update({o.request_id: o.token_ids for o in outs if o.finished})
    offline = LLM(str(tiny_model_dir), kv_cache_tokens=1024)
    assert [final[ids["a"]], final[ids["c"]]] == [
        o.token_ids for o in offline.generate([PROMPTS["svc-a"][1], PROMPTS["svc-c"][0]],
                                              params)]
    assert group.members["b"].sleeping and not group.members["a"].sleeping
    asleep = resident()
    again = [t for out in group.members["b"].stream(PROMPTS["svc-b"][0], params)
             for t in out.new_token_ids]
    assert again == b_first
    assert resident() - asleep > 0.95 * b_bytes             # awake, its range is held again
