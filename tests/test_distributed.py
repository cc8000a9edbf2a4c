"""DDP and FSDP2 on CPU (gloo, 2 processes, spawned): both ranks end with identical adapters, equal to one process
training on the global batch; a save under FSDP2 gathers the sharded adapter into an ordinary PEFT checkpoint."""

import gc
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lora_fx

WORLD = 2


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96)).eval()


def _lm():
    model = _model()
    torch.manual_seed(1)
    lm = lora_fx.lorafy(model, lora_fx.Rule(["q_proj", "v_proj", "o_proj"], r=4, init=False),
                        example_inputs=(torch.randint(0, 96, (2, 8)),))
    return lm.train()


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (2 * WORLD, 10), generator=g) for _ in range(3)]


def _train(lm, model, rank, world):
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.5)
    for ids in _batches():
        rows = ids[rank * len(ids) // world:(rank + 1) * len(ids) // world]
        loss = F.cross_entropy(model(rows).logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, mode, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = None
    try:
        lm = _lm()
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(lm)
        else:
            from torch.distributed.device_mesh import init_device_mesh

            model = lora_fx.fully_shard(lm, mesh=init_device_mesh("cpu", (WORLD,)))
        _train(lm, model, rank, WORLD)
        lm.save_pretrained(os.path.join(out, mode), is_main_process=rank == 0)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in lm.adapters.state_dict().items()}
        torch.save(state, os.path.join(out, f"{mode}_{rank}.pt"))
        dist.barrier()  # no collective still in flight at teardown
    finally:
        # DDP's reducer holds the process group: freed after it (by the interpreter, holding the GIL) the group's
        # destructor joins gloo's worker thread, which may wait for the GIL: free the wrapper while the group lives
        del model
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_train_like_one_process_on_the_global_batch(mode, tmp_path):
    ctx = mp.spawn(_worker, args=(mode, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240  # a hang in gloo's teardown must not hang the suite: bounded, then reported
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not exit within 240 s")
    ranks = [torch.load(tmp_path / f"{mode}_{r}.pt") for r in range(WORLD)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    single = _lm()
    _train(single, single, 0, 1)
    expected = single.adapters.state_dict()
    assert all(torch.allclose(ranks[0][k], expected[k], atol=1e-6) for k in expected)
    saved = lora_fx.from_peft(_model(), tmp_path / mode, example_inputs=(torch.randint(0, 96, (2, 8)),))
    assert all(torch.allclose(saved.adapters.state_dict()[k], expected[k], atol=1e-6) for k in expected)
