"""One rank of a 2-process LogicalBatchTrainer run over gloo (spawned by test_hf.py)."""
import os
import sys

import torch


def run(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    import test_hf
    from sdebatch.hf import LogicalBatchTrainer

    trainer = LogicalBatchTrainer(model=test_hf.tiny_llama(), args=test_hf.arguments(out + "_run", 2),
                                  train_dataset=test_hf.dataset(48), data_collator=test_hf.collate,
                                  logical_batch_size=8)
    assert trainer.args.world_size == world and trainer.args.gradient_accumulation_steps == 2
    trainer.train()
    opt = trainer.logical_batch_optimizer
    if rank == 0:
        torch.save({"params": test_hf.flat(trainer.model), "clock": opt.clock.state_dict(),
                    "logs": [h for h in trainer.state.log_history if "loss" in h]}, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
